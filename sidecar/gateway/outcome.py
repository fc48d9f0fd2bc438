"""What one request came to, for observers (metrics, request logs): :class:`Outcome`.

The gateway builds one per request when it ends, however it ends (answered, refused, failed
over to nothing, failed mid-stream, abandoned by its client), and hands it to every observer
it was given. Observers run on the event loop, must be quick, and must not raise (an error in
one is logged, never seen by the client). An outcome holds no prompt or answer text; the
model name and target are the client's and the config's words, so an observer that turns
them into metric labels must bound them (see ``direct``).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from sidecar.cache import Result


class Trace(msgspec.Struct):
    """Filled in as one request goes through the pipeline (mutable, one per request)."""

    route: str | None = None
    direct: bool = False
    attempts: int = 0
    retries: int = 0
    target: str | None = None
    reasons: tuple[str, ...] = ()
    cache: Result | None = None
    escalations: tuple[str, ...] = ()
    escalated_costs: tuple[tuple[str, int], ...] = ()


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    op: str
    """The operation's path below ``/v1/`` (``chat/completions``, ``embeddings``...)."""
    model: str
    """The name the client asked for (as given: never a metric label)."""
    route: str | None
    """The route it resolved to (None: it did not resolve)."""
    direct: bool
    """The route is a direct ``provider/model`` target, whose model name is the client's."""
    target: str | None
    """The ``provider/model`` that answered (None when none did)."""
    attempts: int
    """Provider calls made, retries included."""
    retries: int
    """Of those, retries of the same target."""
    reasons: tuple[str, ...]
    """Why it went where it did (``primary``, ``fallback:upstream_5xx``, ...)."""
    escalations: tuple[str, ...] = ()
    """A cascade's steps judged not good enough, as ``<step>:<why>`` (``0:schema``)."""
    escalated_costs: tuple[tuple[str, int], ...] = ()
    """(target, µ$) recorded for those steps' answers (billed, not served): ``cost`` is the
    served answer's only."""
    stream: bool
    status: int
    """The HTTP status it came to: 200, the error's status (a stream that failed after it
    committed too), or 499 when the client went away first."""
    error: str | None
    """The error's code (or type) when it failed."""
    prompt_tokens: int | None
    completion_tokens: int | None
    cost: int | None
    """µ$ recorded (None: unknown price, or none recorded)."""
    duration_s: float
    ttft_s: float | None
    """Streams: seconds until the first frame was relayed."""
    cache: Result | None = None
    """``hit`` | ``miss`` | ``bypass`` on a route with the response cache (None: none)."""


Observer = Callable[[Outcome], None]
