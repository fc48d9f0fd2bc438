"""What a client is told when no target answered: one pure decision over the failures.

The attempt loop collects an :class:`~sidecar.errors.UpstreamError` per target that failed
or was skipped; :func:`exhausted` turns them into the one :class:`~sidecar.errors.SidecarError`
the client gets (its status, message and Retry-After), :func:`deadline_passed` the error
of a request whose deadline passed first.
"""

from __future__ import annotations

from sidecar.errors import (
    AllTargetsFailed,
    BudgetExhausted,
    BudgetRejected,
    DeadlineExceeded,
    InvalidRequest,
    LedgerDown,
    LocalTooSlow,
    RateLimited,
    SidecarError,
    Unavailable,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnsupported,
)
from sidecar.routing import Route
from sidecar.types import Call


def exhausted(call: Call, route: Route, failures: list[UpstreamError], next_open: float | None,
              now: float) -> SidecarError:
    """The error for a request no target of ``route`` answered: ``failures`` in the order
    they happened, ``next_open`` the loop time the first open circuit lets calls through
    (None: no circuit was open), ``now`` the loop time."""
    if not failures:
        if next_open is None:
            return InvalidRequest(
                f"No target of '{route.model}' supports /v1/{call.op.value}.",
                param="model",
            )
        retry = max(0.0, next_open - now)
        return Unavailable(
            f"Every target of '{route.model}' is temporarily unavailable (circuit open).",
            retry_after_s=round(retry, 3),
        )
    last = failures[-1]
    if all(isinstance(f, UpstreamUnsupported) for f in failures):
        return InvalidRequest(last.message, param=last.param)
    refused = [f for f in failures if isinstance(f, UpstreamUnsupported)]
    if refused:
        # The targets that were tried decide the answer; the refusals are only added.
        tried = [f for f in failures if not isinstance(f, UpstreamUnsupported)]
        err = exhausted(call, route, tried, next_open, now)
        err.message += " Not tried: " + "; ".join(f.message for f in refused) + "."
        err.args = (err.message,)
        return err
    if isinstance(last, LocalTooSlow):
        # Local was the last resort and would only time out: say so now, with why the
        # targets before it did not answer.
        before = f" Before it: {failures[-2].message}" if len(failures) > 1 else ""
        return Unavailable(last.message + "." + before, retry_after_s=last.retry_after_s)
    if all(isinstance(f, UpstreamOverloaded) for f in failures):
        return Unavailable(last.message, retry_after_s=last.retry_after_s)
    if all(not f.counts_against_health for f in failures):
        # Every target was skipped. A free or local one that was full, or whose circuit
        # is open, is why nothing served: say that (503), with the budget's reason.
        busy = next((f for f in failures if isinstance(f, UpstreamOverloaded)), None)
        if busy is not None or next_open is not None:
            return _unavailable(route, failures, busy, next_open, now)
        # Else say why, budget first (it is the client's to fix).
        for kind in (BudgetExhausted, LedgerDown):
            skipped = next((f for f in failures if isinstance(f, kind)), None)
            if isinstance(skipped, BudgetExhausted):
                return BudgetRejected(skipped.message, retry_after_s=skipped.retry_after_s)
            if skipped is not None:
                return Unavailable(skipped.message, retry_after_s=1.0)
    if all(isinstance(f, UpstreamRateLimited) for f in failures):
        waits = [f.retry_after_s for f in failures if f.retry_after_s is not None]
        return RateLimited(
            f"Every target of '{route.model}' is rate limited. Last: {last.message}",
            retry_after_s=min(waits) if waits else None,
        )
    if all(isinstance(f, UpstreamTimeout) for f in failures):
        return DeadlineExceeded(
            f"Every target of '{route.model}' timed out. Last: {last.message}"
        )
    return AllTargetsFailed(
        f"All {len(failures)} attempts for '{route.model}' failed. Last: {last.message}"
    )

def _unavailable(route: Route, failures: list[UpstreamError], busy: UpstreamError | None,
             next_open: float | None, now: float) -> Unavailable:
    """503 for a route whose every target was skipped while one of them was full
    (``busy``) or behind an open circuit (``next_open``), naming every reason."""
    waits = [f.retry_after_s for f in failures if f.retry_after_s is not None]
    parts = [f.message for f in failures if f is not busy]
    if next_open is not None:
        waits.append(max(0.0, next_open - now))
        parts.append("the other targets' circuits are open")
    head = busy.message if busy is not None else (
        f"No target of '{route.model}' can serve now")
    return Unavailable(head + (". Other targets: " + "; ".join(parts) if parts else "")
                       + ".", retry_after_s=round(min(waits), 3) if waits else 1.0)


def deadline_passed(failures: list[UpstreamError]) -> DeadlineExceeded:
    """The error of a request whose deadline passed before any target answered."""
    msg = "The request deadline passed before any target answered."
    if failures:
        msg += f" Last failure: {failures[-1].message}"
    return DeadlineExceeded(msg)
