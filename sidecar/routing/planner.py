"""The planner: the one place that decides in what order a request tries a route's targets.

:func:`plan` is a pure function of what the caller measured: the route; the strategy's
inputs (target stats for least-busy and latency, this request's cost per target for cost,
a random source for weighted); the host's :class:`~sidecar.host.pressure.Pressure`; each
local target's :class:`~sidecar.host.pressure.LocalLoad` (its queue and measured speed);
the seconds left before the request's deadline and its ``max_tokens``. It reads no clock,
host or pool, so every rule is tested in milliseconds (``tests/unit/test_planner.py``).

The rules, in the order they apply:

1. **Strategy** (:func:`~sidecar.routing.strategies.by_strategy`): the route's strategy
   orders every target (priority: as listed; weighted: sampled by weight; least-busy,
   latency, cost: by the measurements given, listed order on ties).
2. **Preference**: ``prefer = "local"`` (or ``"remote"``) moves the local (remote)
   targets to the front, keeping the strategy's order within each group.
3. **Offload** (:func:`arrange`), only while some local target would still be tried before
   a remote one: under CPU or memory pressure every local target moves behind the remote
   ones (``offload:cpu``, ``offload:memory``, in that order); otherwise, each local target
   ahead of the last remote one that would wait for a free slot *and* then miss the
   deadline moves behind them (``offload:queue``). A long ``max_tokens`` alone on a free
   slot does not give up a local-first route's own choice: the answer may end early.
   Moved targets stay in the plan, in order, as a last resort.
4. **Deadline**: the first step is always tried (the deadline bounds it). Every later
   local step is *in time only* (:attr:`Step.in_time_only`): it is tried only if, when
   its turn comes, :func:`too_slow` (strict: its whole ETA, queued or not, against the
   time left then) does not rule it out; skipped, it moves the request on with
   ``fallback:deadline`` and the :class:`TooSlow` facts of its ``LocalTooSlow`` error.
   The gateway asks :meth:`Plan.too_slow` with the load and time left at that moment, both
   before trying a step and when deciding whether a step has others after it (which then
   get a share of the time left), so the same rule answers both.

A local model not measured yet (no speed, or no load reported) is taken to be in time.
Health (the circuits) and capability (``supports(op)``) are not order: the gateway applies
them as it walks the plan.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence

import msgspec

from sidecar.config import LOCAL_PROVIDER
from sidecar.host.pressure import LocalLoad, Pressure
from sidecar.routing.routes import Route, Target
from sidecar.routing.strategies import TargetStats, by_strategy

CALM = Pressure()
"""No pressure."""


class TooSlow(msgspec.Struct, frozen=True, kw_only=True):
    """A local target that cannot answer before the deadline: the facts its error states."""

    target: Target
    eta_s: float
    """Seconds it would need to answer (:func:`local_eta_s`)."""
    left_s: float
    """Seconds left before the deadline when it was judged."""
    in_flight: int
    queued: int
    decode_tps: float | None


class Step(msgspec.Struct, frozen=True):
    """One target of a plan."""

    target: Target
    in_time_only: bool = False
    """A local fallback: tried only when :meth:`Plan.too_slow` says it can answer in time."""
    moved: tuple[str, ...] = ()
    """Why it was moved behind the remote targets (``offload:*``); empty if it was not."""


class Plan(msgspec.Struct, frozen=True):
    """The order for one request, and what the gateway needs to walk it."""

    steps: tuple[Step, ...]
    reasons: tuple[str, ...]
    """The ``offload:*`` reasons that shaped the order, in rule order."""
    max_tokens: int | None
    """The request's ``max_tokens``, which the deadline rule weighs."""

    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(s.target for s in self.steps)

    def too_slow(self, i: int, load: LocalLoad | None, left_s: float) -> TooSlow | None:
        """Why step ``i`` must be skipped with ``left_s`` seconds left and its model's
        ``load`` now; None: try it (the first step, a remote one, or one in time)."""
        step = self.steps[i]
        if not step.in_time_only:
            return None
        return too_slow(step.target, load, self.max_tokens, left_s)


def plan(route: Route, rng: random.Random, *,
         stats: Mapping[str, TargetStats] | None = None,
         costs: Mapping[str, int | None] | None = None, stream: bool = False,
         pressure: Pressure = CALM, loads: Mapping[str, LocalLoad] | None = None,
         left_s: float = math.inf, max_tokens: int | None = None) -> Plan:
    """The plan for one request on ``route`` (see the module's rules). ``stats`` and
    ``costs`` (µ$ of this request) are by target key and feed the strategy (``stream``:
    the latency strategy ranks by time to first byte); ``loads`` are the local targets'
    by key (missing: not measured, in time); ``left_s``: seconds before the deadline."""
    ordered = by_strategy(route, rng, stats=stats, costs=costs, stream=stream)
    if not any(is_local(t) for t in ordered):  # rules 3 and 4 concern local targets only
        return Plan(tuple(map(Step, ordered)), (), max_tokens)
    loads = loads or {}
    arranged = arrange(ordered, route.prefer, pressure, lambda t: too_slow(
        t, loads.get(t.key), max_tokens, left_s, only_if_queued=True) is not None)
    steps = tuple(
        Step(t, in_time_only=i > 0 and is_local(t),
             moved=arranged.reasons if t in arranged.moved else ())
        for i, t in enumerate(arranged.order))
    return Plan(steps, arranged.reasons, max_tokens)


# --- the local deadline ---------------------------------------------------------------------

def waits_for_slot(load: LocalLoad) -> bool:
    """Whether a new request would queue behind others before a slot is free."""
    return load.in_flight + load.queued >= max(load.n_parallel, 1)


def local_eta_s(load: LocalLoad, max_tokens: int | None) -> float | None:
    """Seconds until a new request of up to ``max_tokens`` (None: as long as the model's
    answers usually are) would be answered; None when the model has not been measured yet
    (it is then assumed to be in time)."""
    if load.decode_tps is None or load.decode_tps <= 0 or load.ttft_s is None:
        return None
    tokens = max_tokens if max_tokens is not None else (load.avg_completion_tokens or 0.0)
    eta = load.ttft_s + tokens / load.decode_tps
    n = max(load.n_parallel, 1)
    if waits_for_slot(load):
        # Everything ahead of it must finish in waves of n_parallel before its turn.
        waves = math.ceil((load.in_flight + load.queued + 1 - n) / n)
        eta += waves * (load.avg_duration_s or eta)
    if not load.loaded:
        eta += load.load_s or 0.0
    return eta


def too_slow(target: Target, load: LocalLoad | None, max_tokens: int | None, left_s: float,
             *, only_if_queued: bool = False) -> TooSlow | None:
    """Why ``target`` cannot answer a request of ``max_tokens`` in the ``left_s`` seconds
    left, if it is local and its ``load`` says so: its :func:`local_eta_s` exceeds
    ``left_s``. None: remote, not measured (no ``load`` or no speed yet), or in time.
    ``only_if_queued``: only when the request would also wait for a free slot (the offload
    rule: a local-first route's own choice is not given up for a long ``max_tokens``
    alone)."""
    if not is_local(target) or load is None:
        return None
    if only_if_queued and not waits_for_slot(load):
        return None
    eta = local_eta_s(load, max_tokens)
    if eta is None or eta <= left_s:
        return None
    return TooSlow(target=target, eta_s=eta, left_s=left_s, in_flight=load.in_flight,
                   queued=load.queued, decode_tps=load.decode_tps)


# --- offload ----------------------------------------------------------------------------------

class Arrangement(msgspec.Struct, frozen=True):
    order: tuple[Target, ...]
    reasons: tuple[str, ...]
    """Why local targets were moved behind remote ones (``offload:*``), in rule order."""
    moved: tuple[Target, ...] = ()
    """The targets moved, in their new order (at the end of ``order``)."""


def is_local(target: Target) -> bool:
    return target.provider == LOCAL_PROVIDER


def arrange(ordered: Sequence[Target], prefer: str | None, pressure: Pressure,
            too_slow: Callable[[Target], bool]) -> Arrangement:
    """Rules 2 and 3 on ``ordered`` (the strategy's order): ``prefer`` groups the targets,
    then local ones ahead of a remote one are offloaded under ``pressure``, or, when calm,
    those for which ``too_slow`` holds (asked only then, only of those). Offloaded targets
    stay in the plan as a last resort."""
    order = list(ordered)
    if prefer is not None:
        first_local = prefer == "local"
        order.sort(key=lambda t: is_local(t) != first_local)
    remote_at = [i for i, t in enumerate(order) if not is_local(t)]
    if not remote_at or not any(is_local(t) for t in order[:remote_at[-1]]):
        return Arrangement(tuple(order), ())
    reasons = [f"offload:{r}" for r in pressure.reasons]
    if reasons:
        moved = [t for t in order if is_local(t)]
    else:
        moved = [t for t in order[:remote_at[-1]] if is_local(t) and too_slow(t)]
        reasons = ["offload:queue"] if moved else []
    kept = [t for t in order if t not in moved]
    return Arrangement(tuple(kept + moved), tuple(reasons), tuple(moved))
