"""Route resolution and planning."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sidecar.config import parse_config
from sidecar.errors import ModelNotFound
from sidecar.routing.routes import Router
from sidecar.routing.strategies import by_strategy

CONFIG = parse_config(
    {
        "providers": [{"name": "a", "type": "openai"}, {"name": "b", "type": "openai"}],
        "routes": [
            {
                "model": "chat",
                "targets": [{"provider": "a", "model": "x"}, {"provider": "b", "model": "y"}],
            },
            {
                "model": "w",
                "strategy": "weighted",
                "targets": [
                    {"provider": "a", "model": "x", "weight": 3},
                    {"provider": "b", "model": "y", "weight": 1},
                ],
            },
        ],
    },
    env={},
)


def test_resolve_route_and_direct_target() -> None:
    router = Router(CONFIG, ["a", "b"])
    assert [t.key for t in router.resolve("chat").targets] == ["a/x", "b/y"]
    direct = router.resolve("b/some/model")
    assert [t.key for t in direct.targets] == ["b/some/model"]
    for bad in ("nope", "c/x", "a/", "/x"):
        with pytest.raises(ModelNotFound):
            router.resolve(bad)


def test_priority_plan_keeps_order() -> None:
    route = Router(CONFIG, ["a", "b"]).resolve("chat")
    assert [t.key for t in by_strategy(route, random.Random(1))] == ["a/x", "b/y"]


def test_weighted_plan_follows_weights_and_keeps_fallbacks() -> None:
    route = Router(CONFIG, ["a", "b"]).resolve("w")
    rng = random.Random(7)
    firsts = Counter(by_strategy(route, rng)[0].key for _ in range(4000))
    assert 0.70 < firsts["a/x"] / 4000 < 0.80  # 3:1
    assert all(len(by_strategy(route, rng)) == 2 for _ in range(10))


LOCAL = parse_config(
    {
        "providers": [{"name": "a", "type": "openai"}],
        "local_models": [{"name": "tiny", "path": "/m/tiny.gguf"},
                         {"name": "chat", "path": "/m/chat.gguf"}],
        "routes": [{"model": "chat", "targets": [{"provider": "a", "model": "x"},
                                                 {"provider": "local", "model": "tiny"}]}],
    },
    env={},
)


def test_local_models_are_routes_and_targets() -> None:
    router = Router(LOCAL, ["a", "local"], local_models=["tiny", "chat"])
    assert [t.key for t in router.resolve("tiny").targets] == ["local/tiny"]
    assert router.resolve("tiny").model == "tiny"
    assert [t.key for t in router.resolve("local/tiny").targets] == ["local/tiny"]
    # A configured route of the same name wins over the bare local name...
    assert [t.key for t in router.resolve("chat").targets] == ["a/x", "local/tiny"]
    # ...and the model stays reachable as local/<name>.
    assert [t.key for t in router.resolve("local/chat").targets] == ["local/chat"]
    with pytest.raises(ModelNotFound):
        router.resolve("local/unknown")


def test_plan_dispatches_to_the_route_strategy() -> None:
    from sidecar.routing.routes import Route, Target
    from sidecar.routing.strategies import TargetStats

    a, b, c = Target("p", "a"), Target("p", "b"), Target("p", "c")
    stats = {"p/a": TargetStats(in_flight=2, ttft_s=0.1, total_s=2.0, samples=3),
             "p/b": TargetStats(in_flight=0, ttft_s=0.5, total_s=1.0, samples=3),
             "p/c": TargetStats(in_flight=1, ttft_s=0.3, total_s=3.0, samples=3)}
    costs = {"p/a": 30, "p/b": None, "p/c": 10}

    def order(strategy: str, stream: bool = False) -> list[str]:
        route = Route("r", strategy, (a, b, c), 0)  # type: ignore[arg-type]
        got = by_strategy(route, random.Random(1), stats=stats, costs=costs, stream=stream)
        return [t.model for t in got]

    assert order("priority") == ["a", "b", "c"]
    assert order("least-busy") == ["b", "c", "a"]
    assert order("latency") == ["b", "a", "c"]
    assert order("latency", stream=True) == ["a", "c", "b"]
    assert order("cost") == ["c", "a", "b"]
    # Nothing measured: the listed order.
    route = Route("r", "latency", (a, b, c), 0)
    assert by_strategy(route, random.Random(1)) == [a, b, c]
