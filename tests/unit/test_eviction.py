"""plan_load: which idle models to unload so another can load, or why it cannot."""

from __future__ import annotations

import pytest

from local_models.eviction import LoadPlan, Resident, plan_load

MiB = 1 << 20


def r(name: str, estimated_mib: int, rss_mib: int, last_used: float,
      busy: bool = False) -> Resident:
    return Resident(name, estimated_mib * MiB, rss_mib * MiB, busy, last_used)


# (residents, need MiB, budget MiB, available MiB, floor MiB) -> plan
CASES: dict[str, tuple[list[Resident], int, int, int, int, LoadPlan]] = {
    "fits outright": (
        [r("a", 300, 200, 1.0)], 100, 1000, 2000, 500,
        LoadPlan((), None),
    ),
    "nothing loaded": (
        [], 553, 1000, 2000, 0,
        LoadPlan((), None),
    ),
    "budget unloads least recently used first, only as many as needed": (
        [r("a", 300, 10, 2.0), r("b", 300, 10, 1.0), r("c", 300, 10, 3.0)], 500, 1000, 9000, 0,
        LoadPlan(("b", "a"), None),
    ),
    "floor counts measured rss, not the estimate": (
        # by estimate, unloading "a" alone would free plenty; by rss it frees 50 MiB
        [r("a", 1000, 50, 1.0), r("b", 10, 200, 2.0), r("c", 10, 500, 3.0)],
        500, 10_000, 1000, 600,
        LoadPlan(("a", "b"), None),
    ),
    "both limits: the stricter one decides how many go": (
        # the budget needs one victim, the floor two
        [r("a", 400, 100, 1.0), r("b", 400, 100, 2.0), r("c", 100, 100, 3.0)],
        400, 1000, 500, 250,
        LoadPlan(("a", "b"), None),
    ),
    "busy residents are never unloaded": (
        [r("a", 300, 10, 1.0, busy=True), r("b", 300, 10, 2.0), r("c", 300, 10, 3.0)],
        500, 1000, 9000, 0,
        LoadPlan(("b", "c"), None),
    ),
    "a resident with the model's own name is ignored": (
        [r("m", 900, 900, 1.0, busy=True)], 500, 1000, 600, 0,
        LoadPlan((), None),
    ),
    "budget held by busy models: refused, nothing unloaded": (
        [r("a", 600, 10, 1.0, busy=True), r("b", 300, 10, 0.5)], 500, 1000, 9000, 0,
        LoadPlan((), "local model 'm' needs about 500 MiB; 600 MiB of the 1,000 MiB budget "
                     "is held by busy models"),
    ),
    "floor, nothing to unload": (
        [], 553, 4096, 1024, 2048,
        LoadPlan((), "local model 'm' needs about 553 MiB; 1,024 MiB is free and 2,048 MiB "
                     "must stay free for the host (memory floor)"),
    ),
    "floor, even unloading every idle model is not enough": (
        [r("a", 100, 100, 1.0), r("b", 100, 300, 2.0, busy=True), r("c", 100, 24, 3.0)],
        553, 4096, 1024, 2048,
        LoadPlan((), "local model 'm' needs about 553 MiB; 1,148 MiB would be free after "
                     "unloading idle models and 2,048 MiB must stay free for the host "
                     "(memory floor)"),
    ),
    "larger than the budget: refused without victims": (
        [r("a", 100, 100, 1.0)], 2000, 1000, 9000, 0,
        LoadPlan((), "local model 'm' needs about 2,000 MiB; the memory budget is 1,000 MiB"),
    ),
}


@pytest.mark.parametrize(("residents", "need", "budget", "available", "floor", "expected"),
                         list(CASES.values()), ids=list(CASES))
def test_plan_load(residents: list[Resident], need: int, budget: int, available: int,
                   floor: int, expected: LoadPlan) -> None:
    plan = plan_load("m", need * MiB, budget_bytes=budget * MiB,
                     available_bytes=available * MiB, floor_bytes=floor * MiB,
                     residents=residents)
    assert plan == expected


def test_megabytes_are_rounded_against_the_load() -> None:
    """Need and floor round up, free memory rounds down: the message never makes a refused
    load look as if it fitted."""
    plan = plan_load("m", 100 * MiB + 1, budget_bytes=1 << 40,
                     available_bytes=150 * MiB - 1, floor_bytes=50 * MiB + 1, residents=[])
    assert plan.refusal == ("local model 'm' needs about 101 MiB; 149 MiB is free and 51 MiB "
                            "must stay free for the host (memory floor)")
