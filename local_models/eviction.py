"""Which loaded models to unload so that another one can load: a pure decision.

Contract:

* :func:`plan_load` takes a snapshot (the model to load, its estimated bytes, the budget,
  the memory the host has available, the floor that must stay available, and the loaded
  models) and returns a :class:`LoadPlan`. No I/O, no clock, no logging: the same snapshot
  always gives the same plan.
* A load must satisfy both limits: (a) the estimated budget, ``sum(estimated of the models
  that stay) + need <= budget``; (b) actual free memory, ``available + sum(rss of the
  victims) - need >= floor``. Measured RSS counts for (b) because that is what unloading a
  model returns; the estimate counts for (a) because that is what the budget is written in.
* Victims are idle models only (a busy one is never unloaded), least recently used first,
  and no more than both limits need. When even unloading every idle model would not
  satisfy both, the plan is a refusal that unloads nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

__all__ = ["LoadPlan", "Resident", "plan_load"]


class Resident(msgspec.Struct, frozen=True):
    """A loaded model as the decision sees it."""

    name: str
    estimated_bytes: int
    rss_bytes: int
    """Measured; what unloading it actually frees."""
    busy: bool
    """In flight or queued: never a victim."""
    last_used: float


class LoadPlan(msgspec.Struct, frozen=True):
    unload: tuple[str, ...]
    """Victims, least recently used first."""
    refusal: str | None
    """None: load after unloading ``unload``; else a one-line reason (``unload`` is empty)."""


def plan_load(
    name: str,
    need_bytes: int,
    *,
    budget_bytes: int,
    available_bytes: int,
    floor_bytes: int,
    residents: Sequence[Resident],
) -> LoadPlan:
    """Plan loading ``name`` (``need_bytes`` estimated): the idle models to unload first,
    or why it cannot load. A resident named ``name`` is ignored (it is being replaced)."""
    if need_bytes > budget_bytes:
        return LoadPlan((), f"local model '{name}' needs about {_mib_up(need_bytes):,} MiB; "
                            f"the memory budget is {_mib_up(budget_bytes):,} MiB")
    others = [r for r in residents if r.name != name]
    held = sum(r.estimated_bytes for r in others)
    free = available_bytes

    def fits() -> bool:
        return held + need_bytes <= budget_bytes and free - need_bytes >= floor_bytes

    victims: list[str] = []
    for r in sorted((r for r in others if not r.busy), key=lambda r: r.last_used):
        if fits():
            break
        victims.append(r.name)
        held -= r.estimated_bytes
        free += r.rss_bytes
    if fits():
        return LoadPlan(tuple(victims), None)
    need = f"local model '{name}' needs about {_mib_up(need_bytes):,} MiB"
    if held + need_bytes > budget_bytes:
        return LoadPlan((), f"{need}; {_mib_up(held):,} MiB of the {_mib_up(budget_bytes):,} "
                            "MiB budget is held by busy models")
    free_now = "would be free after unloading idle models" if victims else "is free"
    return LoadPlan((), f"{need}; {_mib_down(max(free, 0)):,} MiB {free_now} and "
                        f"{_mib_up(floor_bytes):,} MiB must stay free for the host (memory floor)")


def _mib_up(n: int) -> int:
    return (n + (1 << 20) - 1) >> 20


def _mib_down(n: int) -> int:
    return n >> 20
