"""The attempt loop: one request walked along its plan until a target answers.

    plan (strategy, host pressure, deadline: routing.planner)
    -> for each target:
        local deadline check -> circuit check -> budget reserve -> outbound limit
        -> provider call (bounded by the request deadline; by ``[routing].attempt_share`` of the
           time left when a later target could still answer, so a hung one fails over)
        -> on retryable failure: record health, retry with backoff (within the retry
           budget, honouring Retry-After) or fail over to the next target
        -> a cascade route's answer judged; one not good enough billed, kept, and the next
           step tried

:class:`Attempts` owns the loop and the bookkeeping of the attempt that answered (its cost
settled once, its target's latency recorded); :class:`~sidecar.gateway.pipeline.Gateway`
owns what comes before (route, cache, admission) and after (redaction, observers).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import msgspec

from sidecar.config import LOCAL_PROVIDER, RoutingConfig
from sidecar.errors import CutAttempt, LocalTooSlow, SidecarError, UpstreamError
from sidecar.gateway.context import Context
from sidecar.gateway.outcome import Trace
from sidecar.gateway.verdict import deadline_passed, exhausted
from sidecar.health import Circuit, Health, RetryBudget
from sidecar.host import HostWatch, LocalLoad
from sidecar.money import Accountant, Estimate, Ticket
from sidecar.money import cost as cost_of
from sidecar.providers.base import Provider, Reply
from sidecar.routing import CALM, Plan, Route, Target, TargetTracker, cascade, plan
from sidecar.types import Call, Meter

T = TypeVar("T")
log = logging.getLogger("sidecar.gateway")


class Attempt(msgspec.Struct):
    """The successful attempt of :meth:`Gateway._run`."""

    target: Target
    attempts: int
    ticket: Ticket
    meter: Meter
    reason: str
    started: float
    settled: bool = False
    """Its cost is recorded already (a cascade's escalated answer, kept as a last resort)."""
    cost: int | None = None
    """What was recorded, when ``settled``."""


Judge = Callable[[Target, T], tuple[cascade.Verdict, T]]
"""A cascade's verdict on one step's result, and the result to serve if it is accepted."""


class Attempts:
    """Walks requests along their plans. Shares its collaborators with the gateway that
    made it (the same health, tracker, accountant and reason counts); safe to call
    concurrently on the gateway's loop."""

    def __init__(
        self,
        routing: RoutingConfig,
        providers: Mapping[str, Provider],
        *,
        health: Health,
        accountant: Accountant,
        tracker: TargetTracker,
        retry_budget: RetryBudget,
        reasons: collections.Counter[str],
        clock: Callable[[], float],
        rng: random.Random,
        local_load: Callable[[str], LocalLoad | None] | None,
        host: HostWatch | None,
    ) -> None:
        """``reasons``: served requests per route reason, counted here as answers are
        served; ``local_load``: the local models' queues (None: no local models);
        ``host``: the host's pressure (None: never under pressure)."""
        self._routing = routing
        self.providers = providers
        self.health = health
        self.accountant = accountant
        self.tracker = tracker
        self._retry_budget = retry_budget
        self.reasons = reasons
        self._clock = clock
        self._rng = rng
        self._local_load = local_load
        self.host = host

    async def run(
        self,
        call: Call,
        route: Route,
        ctx: Context,
        est: Estimate,
        attempt: Callable[[Provider, Target, float, Call, Meter, bool], Awaitable[T]],
        trace: Trace,
        judge: Judge[T] | None = None,
    ) -> tuple[T, Attempt]:
        """Walk the plan until a target answers. ``judge`` (a cascade route): a step with
        others after it is asked for log-probabilities (``attempt``'s last argument: the
        whole answer is wanted) and judged; an answer judged not good enough is settled
        (it was billed) and kept, the next step tried, and the kept answer served when
        no later step answers."""
        attempts = 0
        failures: list[UpstreamError] = []
        next_open: float | None = None
        order = self._order(call, route, ctx, est)
        reasons = list(order.reasons)
        if order.reasons:  # offloaded: no longer cheapest first, so nothing is judged
            judge = None
        kept: tuple[T, Attempt, int] | None = None
        escalated = ""
        for i, target in enumerate(order.targets):
            provider = self.providers[target.provider]
            if not provider.supports(call.op):
                continue
            # The plan says which targets are tried only when they can answer in time.
            slow = self._too_slow(order, i, ctx.deadline - self._clock())
            if slow is not None:
                failures.append(slow)
                _note(reasons, f"fallback:{slow.route_reason}")
                continue
            circuit = self.health.circuit(target.key)
            tries = 0
            while True:
                now = self._clock()
                if not circuit.try_acquire(now):
                    at = circuit.available_at(now)
                    next_open = at if next_open is None else min(next_open, at)
                    _note(reasons, "fallback:circuit_open")
                    break
                remaining = ctx.deadline - now
                if remaining <= 0:
                    circuit.release()
                    if kept is not None:
                        return self._kept(kept, attempts, reasons, trace)
                    raise deadline_passed(failures)
                # A target with others after it gets a share of what is left, so a hung
                # one cannot use up the whole deadline; the last one gets all of it.
                cut = (None if not self._others_after(order, i, call, ctx, now)
                       else now + remaining * self._routing.attempt_share)
                judged = judge is not None and cut is not None
                ticket: Ticket | None = None
                meter = Meter()
                try:
                    async with asyncio.timeout_at(ctx.deadline):
                        await self.accountant.check_retry_after(target)  # RetryAfterHeld
                        ticket = await self.accountant.reserve(call, target, ctx.identity, est)
                        await self.accountant.outbound(target, est)
                        attempts += 1
                        trace.attempts = attempts
                        this_call = (call if ticket.cap is None
                                     else msgspec.structs.replace(call, token_cap=ticket.cap))
                        if judged:
                            this_call = cascade.asking(this_call)
                        started = self._clock()
                        self.tracker.started(target.key)
                        try:
                            result = await _cut_at(
                                cut, target, attempt(provider, target, remaining, this_call,
                                                     meter, judged))
                        except BaseException:
                            self.tracker.finished(target.key)
                            raise
                except TimeoutError:
                    circuit.release()
                    await self.accountant.release(ticket)
                    if kept is not None:
                        return self._kept(kept, attempts, reasons, trace)
                    raise deadline_passed(failures) from None
                except UpstreamError as e:
                    if meter.usage_invalid and ticket is not None:  # billed, amount unknown
                        with contextlib.suppress(SidecarError):
                            await self.accountant.settle(ticket, est, None, meter)
                    else:
                        await self.accountant.release(ticket)
                    self._note_limits(target, meter)
                    if not e.retryable:
                        circuit.success()  # it answered; the request itself was refused
                        if kept is not None:
                            return self._kept(kept, attempts, reasons, trace)
                        raise
                    failures.append(e)
                    _note(reasons, f"fallback:{e.route_reason}")
                    if not e.counts_against_health:
                        circuit.release()  # no verdict on its health; move on
                        break
                    await self.failed(target, circuit, e)
                    delay = self._retry_delay(e, tries, route, ctx)
                    if delay is None:
                        break
                    tries += 1
                    trace.retries += 1
                    await asyncio.sleep(delay)
                    continue
                except BaseException:
                    circuit.release()
                    await asyncio.shield(self.accountant.release(ticket))
                    raise
                circuit.success()
                self._note_limits(target, meter)
                if call.stream:
                    self.tracker.first_byte(target.key, self._clock() - started)
                done = Attempt(target, attempts, ticket, meter, "", started)
                if judge is not None:
                    why = escalated or ("fallback" if failures else cascade.UNJUDGED)
                    if judged:
                        verdict, result = judge(target, result)
                        if verdict.escalate:
                            await self._escalated(ctx, route, est, done, result, i, verdict, trace)
                            kept, escalated = (result, done, i), verdict.why
                            break
                        why = verdict.why
                    reasons.append(cascade.reason(i, why))
                return self._served(result, done, reasons, trace)
        if kept is not None:
            return self._kept(kept, attempts, reasons, trace)
        trace.reasons = tuple(reasons)
        raise exhausted(call, route, failures, next_open, self._clock())

    def _served(self, result: T, done: Attempt, reasons: list[str], trace: Trace
                ) -> tuple[T, Attempt]:
        """The attempt that answers: its reasons recorded (header, counts, trace)."""
        done.reason = ",".join(reasons) or "primary"
        self.reasons.update(reasons or ["primary"])
        trace.target, trace.reasons = done.target.key, tuple(reasons or ["primary"])
        return result, done

    def _kept(self, kept: tuple[T, Attempt, int], attempts: int, reasons: list[str],
              trace: Trace) -> tuple[T, Attempt]:
        """A cascade's escalated answer, served after all: no later step answered."""
        result, done, step = kept
        done.attempts = attempts
        if done.cost is not None:  # the last escalated cost is now the served answer's
            trace.escalated_costs = trace.escalated_costs[:-1]
        reasons.append(cascade.reason(step, cascade.KEPT))
        return self._served(result, done, reasons, trace)

    async def _escalated(self, ctx: Context, route: Route, est: Estimate, done: Attempt,
                         result: object, step: int, verdict: cascade.Verdict, trace: Trace
                         ) -> None:
        """Step ``step``'s answer was judged not good enough: it was billed, so its cost is
        recorded now (the budgets see it and the next step's); it is kept as the last
        resort, marked settled."""
        self.finished(done, completed=True)
        reply = result if isinstance(result, Reply) else None
        done.cost = await asyncio.shield(self.settle(ctx, route, est, done, reply))
        done.settled = True
        trace.escalations += (f"{step}:{verdict.why}",)
        if done.cost is not None:
            trace.escalated_costs += ((done.target.key, done.cost),)
        log.debug("cascade: %s step %d escalated (%s)", route.model, step, verdict.why)

    async def failed(self, target: Target, circuit: Circuit, e: UpstreamError) -> None:
        """``target`` failed in a way that counts against its health: the circuit's verdict,
        and its Retry-After held before anything else is tried (for every sidecar sharing
        the limiter)."""
        circuit.failure(self._clock())
        await self.accountant.retry_after(target, e.retry_after_s)

    def _others_after(self, order: Plan, i: int, call: Call, ctx: Context, now: float
                      ) -> bool:
        """Whether a target after step ``i`` may be tried now: it serves the operation,
        its circuit lets calls through and the plan does not rule it out for the time
        left."""
        for j in range(i + 1, len(order.steps)):
            t = order.steps[j].target
            if (self.providers[t.provider].supports(call.op)
                    and self.health.circuit(t.key).available_at(now) <= now
                    and self._too_slow(order, j, ctx.deadline - now) is None):
                return True
        return False

    def _order(self, call: Call, route: Route, ctx: Context, est: Estimate) -> Plan:
        """The planner's plan for this request, from what is measured now: target stats or
        costs for the strategy, the host's pressure, the local targets' loads."""
        stats = costs = None
        if route.strategy in ("least-busy", "latency"):
            stats = self.tracker.stats()
        elif route.strategy in ("cost", "cascade"):
            prices = self.accountant.prices
            completion = (est.max_tokens or est.prompt_guess) * est.choices
            costs = {}
            for t in route.targets:
                price = prices.lookup(t.provider, t.model)
                costs[t.key] = None if price is None else cost_of(price, est.prompt_guess,
                                                                  completion)
        known = self._local_load
        loads = {} if known is None else {
            t.key: load for t in route.targets
            if t.provider == LOCAL_PROVIDER and (load := known(t.model)) is not None}
        pressure = self.host.pressure if self.host is not None else CALM
        return plan(route, self._rng, stats=stats, costs=costs, stream=call.stream,
                    pressure=pressure, loads=loads, left_s=ctx.deadline - self._clock(),
                    max_tokens=est.max_tokens)

    def _too_slow(self, order: Plan, i: int, left_s: float) -> LocalTooSlow | None:
        """The error of step ``i`` when the plan rules it out with ``left_s`` seconds left
        and its model's load now (:meth:`~sidecar.routing.planner.Plan.too_slow`)."""
        step = order.steps[i]
        if not step.in_time_only or self._local_load is None:
            return None
        late = order.too_slow(i, self._local_load(step.target.model), left_s)
        if late is None:
            return None
        speed = f", {late.decode_tps:.0f} tokens/s" if late.decode_tps else ""
        return LocalTooSlow(
            f"{late.target.key} cannot answer before the deadline: it needs about "
            f"{late.eta_s:.1f} s ({late.in_flight} running, {late.queued} queued{speed}) and "
            f"{max(late.left_s, 0):.1f} s are left",
            target=late.target.key, retry_after_s=max(1.0, round(late.eta_s - late.left_s, 1)),
        )

    async def settle(self, ctx: Context, route: Route, est: Estimate, done: Attempt,
                      reply: Reply | None) -> int | None:
        """Record the cost of the attempt that answered: a non-stream ``reply``'s usage
        (or its reservation, when it has none), else what the stream's meter saw (once:
        a settled attempt's recorded cost is returned as it is)."""
        if done.settled:
            return done.cost
        usage = reply.usage if reply is not None else done.meter.usage
        meter = None if reply is not None else done.meter
        cost = await self.accountant.settle(done.ticket, est, usage, meter)
        await self.accountant.used(ctx.identity, route, done.target, est, usage)
        return cost

    def finished(self, done: Attempt, completed: bool) -> None:
        if done.settled:  # a kept cascade answer: its attempt was finished when judged
            return
        key = done.target.key
        self.tracker.finished(key)
        if completed:
            self.tracker.completed(key, self._clock() - done.started)

    def _note_limits(self, target: Target, meter: Meter) -> None:
        """Remember when a provider's headers said its limit is used up (x-ratelimit-*);
        a failure's Retry-After is held where the failure is handled. Both are holds in the
        rate limiter (:mod:`sidecar.limits.holds`)."""
        if meter.limited_for_s:
            self.accountant.provider_limited(target, meter.limited_for_s)

    def _retry_delay(self, err: UpstreamError, tries: int, route: Route, ctx: Context
                     ) -> float | None:
        """Seconds to wait before retrying the same target, or None to move on."""
        if tries >= route.retries or not err.retry_same_target:
            return None
        if err.retry_after_s is not None:
            if err.retry_after_s > self._routing.max_retry_after_s:
                return None
            delay = err.retry_after_s
        else:
            cap = min(self._routing.backoff_max_s, self._routing.backoff_base_s * 2**tries)
            delay = self._rng.uniform(0, cap)  # full jitter
        if self._clock() + delay >= ctx.deadline:
            return None
        if not self._retry_budget.try_spend():
            return None
        return delay


def _note(reasons: list[str], reason: str) -> None:
    if reason not in reasons:
        reasons.append(reason)


async def _cut_at(cut: float | None, target: Target, attempt: Awaitable[T]) -> T:
    """Await ``attempt``; at loop time ``cut`` (None: never) abandon it as a
    :class:`CutAttempt` of ``target``, which then counts against a remote one's health."""
    if cut is None:
        return await attempt
    try:
        async with asyncio.timeout_at(cut):
            return await attempt
    except TimeoutError:
        err = CutAttempt(
            f"{target.key} did not answer within its share of the request deadline",
            target=target.key,
        )
        if target.provider == LOCAL_PROVIDER:
            # A local model that is slow to start is busy, not hung (its pool watches its
            # workers): no verdict on its health.
            err.counts_against_health = False
        raise err from None
