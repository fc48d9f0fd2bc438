"""The Prometheus metrics (sidecar.metrics): a real gateway over scripted providers, its
outcomes observed, the exposition parsed back with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from local_models import ModelPool, PoolSettings, build_catalog
from sidecar.config import Config
from sidecar.errors import AllTargetsFailed, ModelNotFound, RateLimited, UpstreamServerError
from sidecar.gateway import Context, Gateway, Outcome
from sidecar.host import HostWatch
from sidecar.limits import MemoryRateLimiter
from sidecar.metrics import CONTENT_TYPE, Metrics
from sidecar.money import Accountant, MemoryBudgetStore
from sidecar.providers.local import LocalProvider
from tests.support.process import local_spec
from tests.support.scripted import Answer, Fail, ScriptedProvider
from tests.unit.test_pipeline import chat, config, drain

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: bytes) -> Samples:
    """Every sample of an exposition by (name, labels); fails on text the parser rejects."""
    out: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def value(samples: Samples, name: str, /, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def labelled(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for n, labels in samples if n == name]


class Rig:
    def __init__(self, cfg: Config | None = None, *, budgets: bool = False) -> None:
        cfg = cfg or config()
        self.a, self.b = ScriptedProvider("a"), ScriptedProvider("b")
        self.metrics = Metrics()
        accountant = (Accountant(cfg, MemoryBudgetStore(), MemoryRateLimiter())
                      if budgets else None)
        self.gateway = Gateway(cfg, {"a": self.a, "b": self.b,
                                     "free": ScriptedProvider("free")},
                               accountant=accountant, rng=random.Random(1),
                               observers=[self.metrics.observe])
        self.metrics.watch(self.gateway)

    def ctx(self) -> Context:
        return Context("rid-1", self.gateway.deadline(30))

    async def scrape(self, identity: str | None = None) -> Samples:
        return parse(await self.metrics.exposition(identity))


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    yield r
    await r.gateway.aclose()


def outcome(**fields: Any) -> Outcome:
    base: dict[str, Any] = dict(
        request_id="r", op="chat/completions", model="chat", route="chat", direct=False,
        target="a/x", attempts=1, retries=0, reasons=("primary",), stream=False, status=200,
        error=None, prompt_tokens=3, completion_tokens=2, cost=None, duration_s=0.05,
        ttft_s=None)
    return Outcome(**(base | fields))


async def test_an_answer_after_a_failover_is_counted(rig: Rig) -> None:
    rig.a.script("x", Fail(UpstreamServerError))
    rig.b.script("y", Answer("hi", prompt_tokens=4, completion_tokens=6))
    await rig.gateway.complete(chat(), rig.ctx())
    s = await rig.scrape()
    assert value(s, "sidecar_requests_total", route="chat", target="b/y", operation="chat",
                 status="200") == 1
    assert value(s, "sidecar_route_reasons_total", route="chat", target="b/y",
                 reason="fallback:upstream_5xx") == 1
    assert value(s, "sidecar_attempts_total", route="chat") == 2
    gen_ai = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "b",
              "gen_ai_request_model": "chat"}
    assert value(s, "gen_ai_client_token_usage_count", **gen_ai, gen_ai_token_type="input") == 1
    assert value(s, "gen_ai_client_token_usage_sum", **gen_ai, gen_ai_token_type="input") == 4
    assert value(s, "gen_ai_client_token_usage_sum", **gen_ai, gen_ai_token_type="output") == 6
    assert value(s, "gen_ai_client_token_usage_bucket", **gen_ai, gen_ai_token_type="output",
                 le="4.0") == 0
    assert value(s, "gen_ai_client_token_usage_bucket", **gen_ai, gen_ai_token_type="output",
                 le="16.0") == 1
    assert value(s, "gen_ai_server_request_duration_seconds_count", **gen_ai,
                 error_type="") == 1
    # The target that failed shows in its circuit, the configured ones all the same.
    assert value(s, "sidecar_circuit_state", target="a/x") == 0
    assert value(s, "sidecar_circuit_state", target="b/y") == 0
    assert value(s, "sidecar_draining") == 0
    assert not any(n.endswith("_created") for n, _ in s)


async def test_failures_unknown_models_and_error_types(rig: Rig) -> None:
    rig.a.script("x", Fail(UpstreamServerError))
    rig.b.script("y", Fail(UpstreamServerError))
    with pytest.raises(AllTargetsFailed):
        await rig.gateway.complete(chat(), rig.ctx())
    with pytest.raises(ModelNotFound):
        await rig.gateway.complete(chat("made-up-by-the-client"), rig.ctx())
    s = await rig.scrape()
    assert value(s, "sidecar_requests_total", route="chat", target="", operation="chat",
                 status="502") == 1
    assert value(s, "sidecar_requests_total", route="", target="", operation="chat",
                 status="404") == 1
    assert value(s, "gen_ai_server_request_duration_seconds_count",
                 gen_ai_operation_name="chat", gen_ai_provider_name="",
                 gen_ai_request_model="chat", error_type="all_targets_failed") == 1
    assert value(s, "sidecar_route_reasons_total", route="chat", target="",
                 reason="fallback:upstream_5xx") == 1
    assert "made-up-by-the-client" not in str(list(s))


async def test_direct_targets_are_collapsed_to_their_provider(rig: Rig) -> None:
    for name in ("anything-1", "anything-2"):
        rig.a.script(name, Answer())
        await rig.gateway.complete(chat(f"a/{name}"), rig.ctx())
    rig.b.script("whatever", Fail(UpstreamServerError))
    with pytest.raises(AllTargetsFailed):
        await rig.gateway.complete(chat("b/whatever"), rig.ctx())
    s = await rig.scrape()
    assert value(s, "sidecar_requests_total", route="a/*", target="a/*", operation="chat",
                 status="200") == 2
    assert value(s, "sidecar_requests_total", route="b/*", target="", operation="chat",
                 status="502") == 1
    assert value(s, "gen_ai_client_token_usage_count", gen_ai_operation_name="chat",
                 gen_ai_provider_name="a", gen_ai_request_model="a/*",
                 gen_ai_token_type="output") == 2
    assert {d["target"] for d in labelled(s, "sidecar_circuit_state")} == {
        "a/x", "b/y", "a/*", "b/*"}
    assert "anything" not in str(list(s)) and "whatever" not in str(list(s))


async def test_circuits_of_direct_targets_show_the_worst() -> None:
    cfg = config(routing={"circuit_failures": 1, "circuit_cooldown_s": 60})
    rig = Rig(cfg)
    rig.a.script("ok", Answer())
    await rig.gateway.complete(chat("a/ok"), rig.ctx())
    rig.a.script("broken", Fail(UpstreamServerError))
    with pytest.raises(AllTargetsFailed):
        await rig.gateway.complete(chat("a/broken"), rig.ctx())
    rig.b.script("y", Fail(UpstreamServerError))
    rig.a.script("x", Answer())
    await rig.gateway.complete(chat(), rig.ctx())  # b/y not tried: a/x answers first
    s = await rig.scrape()
    assert value(s, "sidecar_circuit_state", target="a/*") == 2  # one open, one closed
    assert value(s, "sidecar_circuit_state", target="a/x") == 0
    await rig.gateway.aclose()


async def test_a_stream_records_time_to_first_token_and_per_token(rig: Rig) -> None:
    rig.a.script("x", Answer("a b c d e", frames=5, completion_tokens=5))
    await drain(await rig.gateway.stream(chat(stream=True), rig.ctx()))
    s = await rig.scrape()
    gen_ai = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "a",
              "gen_ai_request_model": "chat"}
    assert value(s, "gen_ai_server_time_to_first_token_seconds_count", **gen_ai) == 1
    assert value(s, "gen_ai_server_time_to_first_token_seconds_bucket", **gen_ai,
                 le="+Inf") == 1
    assert value(s, "gen_ai_server_time_per_output_token_seconds_count", **gen_ai) <= 1


def test_time_per_output_token_is_the_time_after_the_first_per_token() -> None:
    m = Metrics()
    m.observe(outcome(stream=True, ttft_s=0.5, duration_s=2.5, completion_tokens=21))
    m.observe(outcome(stream=True, ttft_s=0.5, duration_s=0.6, completion_tokens=1))
    m.observe(outcome(stream=True, status=502, error="upstream_5xx", ttft_s=0.5,
                      duration_s=2.5, completion_tokens=21))
    s = parse(prometheus_client.generate_latest(m.registry))
    gen_ai = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "a",
              "gen_ai_request_model": "chat"}
    assert value(s, "gen_ai_server_time_per_output_token_seconds_count", **gen_ai) == 1
    assert value(s, "gen_ai_server_time_per_output_token_seconds_sum", **gen_ai) == 0.1
    assert value(s, "gen_ai_server_time_to_first_token_seconds_count", **gen_ai) == 2


def test_labels_stay_bounded() -> None:
    m = Metrics()
    m.observe(outcome(op="completions", status=404, route=None, target=None, reasons=(),
                      error="model_not_found", model="whatever the client sent"))
    m.observe(outcome(op="embeddings", status=400, error="context_length_exceeded",
                      target=None, reasons=(), prompt_tokens=None, completion_tokens=None))
    m.observe(outcome(status=499, target=None, reasons=(), prompt_tokens=None,
                      completion_tokens=None))
    m.observe(outcome(direct=True, route="a/client-model", target="a/client-model",
                      request_id="unique-request-id"))
    s = parse(prometheus_client.generate_latest(m.registry))
    assert value(s, "sidecar_requests_total", route="", target="",
                 operation="text_completion", status="404") == 1
    errors = {d["error_type"] for d in labelled(s, "gen_ai_server_request_duration_seconds_count")}
    # An upstream's own code is not a label value; a client that left is its status.
    assert errors == {"model_not_found", "other", "499", ""}
    text = str(list(s))
    for unbounded in ("whatever the client sent", "client-model", "unique-request-id",
                      "context_length_exceeded"):
        assert unbounded not in text


def test_rate_limit_rejections_by_code() -> None:
    m = Metrics()
    m.observe(outcome(status=429, error="rate_limit_exceeded", target=None, reasons=()))
    m.observe(outcome(status=429, error="budget_exhausted", target=None, reasons=()))
    m.observe(outcome(status=429, error="upstream_rate_limited", target=None, reasons=()))
    m.observe(outcome(status=200, cost=150))
    m.observe(outcome(status=200, cost=50))
    s = parse(prometheus_client.generate_latest(m.registry))
    assert {d["code"] for d in labelled(s, "sidecar_rate_limited_total")} == {
        "rate_limit_exceeded", "budget_exhausted", "upstream_rate_limited"}
    assert value(s, "sidecar_cost_microdollars_total", route="chat", target="a/x") == 200


async def test_an_inbound_rate_limit_is_counted() -> None:
    cfg = config(routes=[{"model": "chat", "rpm": 1, "targets": [
        {"provider": "a", "model": "x"}]}])
    rig = Rig(cfg)
    await rig.gateway.complete(chat(), rig.ctx())
    with pytest.raises(RateLimited):
        await rig.gateway.complete(chat(), rig.ctx())
    s = await rig.scrape()
    assert value(s, "sidecar_rate_limited_total", route="chat", code="rate_limit_exceeded") == 1
    assert value(s, "sidecar_requests_total", route="chat", target="", operation="chat",
                 status="429") == 1
    await rig.gateway.aclose()


async def test_budgets_in_dollars() -> None:
    cfg = config(routes=[{"model": "chat", "targets": [{"provider": "a", "model": "x"}]}],
                 prices={"a/x": {"input": 1.0, "output": 2.0}},
                 budgets=[{"name": "daily", "limit_usd": 5.0}])
    rig = Rig(cfg, budgets=True)
    rig.a.script("x", Answer(prompt_tokens=1000, completion_tokens=500))
    done = await rig.gateway.complete(chat(max_tokens=600), rig.ctx())
    assert done.cost == 2000  # µ$: 1000 * 1 + 500 * 2
    s = await rig.scrape()
    labels = {"budget": "daily", "scope": "global", "subject": "*"}
    assert value(s, "sidecar_budget_limit_dollars", **labels) == 5.0
    assert value(s, "sidecar_budget_spent_dollars", **labels) == 0.002
    assert value(s, "sidecar_budget_reserved_dollars", **labels) == 0.0
    assert value(s, "sidecar_cost_microdollars_total", route="chat", target="a/x") == 2000
    await rig.gateway.aclose()


async def test_configured_secrets_never_leave() -> None:
    secret = "sk-route-named-like-a-key-123"
    cfg = config(routes=[{"model": secret, "targets": [{"provider": "a", "model": "x"}]}],
                 keys=[{"name": "ops", "key": secret}])
    rig = Rig(cfg)
    await rig.gateway.complete(chat(secret), rig.ctx())
    text = await rig.metrics.exposition("ops")
    assert secret.encode() not in text and b"[redacted]" in text
    parse(text)  # still valid
    await rig.gateway.aclose()


async def test_host_and_local_models_at_scrape_time(tmp_path: Any) -> None:
    cfg = config()
    catalog = build_catalog([local_spec("m")])
    pool = ModelPool(catalog.entries, PoolSettings(memory_budget_bytes=1 << 40))
    host = HostWatch(cfg.resources, workers=pool.worker_pids)
    metrics = Metrics()
    gateway = Gateway(cfg, {"a": ScriptedProvider("a"), "b": ScriptedProvider("b"),
                            "free": ScriptedProvider("free"), "local": LocalProvider(pool)},
                      local_models=["m"], host=host, observers=[metrics.observe])
    metrics.watch(gateway)
    s = parse(await metrics.exposition())  # before the first sample: no host figures
    assert ("sidecar_host_cpus", frozenset()) not in s
    await gateway.start()
    try:
        s = parse(await metrics.exposition())
        assert value(s, "sidecar_local_queue_depth", model="m") == 0
        assert value(s, "sidecar_local_slots_in_use", model="m") == 0
        assert value(s, "sidecar_local_slots", model="m") == 2
        assert value(s, "sidecar_local_model_state", model="m", state="stopped") == 1
        assert value(s, "sidecar_local_model_state", model="m", state="ready") == 0
        for counter in ("loads", "load_failures", "unloads", "worker_crashes"):
            assert value(s, f"sidecar_local_{counter}_total", model="m") == 0
        assert value(s, "sidecar_local_model_estimated_bytes", model="m") > 0
        assert value(s, "sidecar_circuit_state", target="local/m") == 0
        assert value(s, "sidecar_host_cpus") >= 1
        assert value(s, "sidecar_host_memory_total_bytes") > value(
            s, "sidecar_host_memory_available_bytes") > 0
        assert 0 <= value(s, "sidecar_host_cpu_percent") <= 100
        assert value(s, "sidecar_host_pressure", resource="cpu") == 0
        assert value(s, "sidecar_host_pressure", resource="memory") == 0
        assert value(s, "sidecar_host_local_workers_yielding") == 0
        assert {d["period"] for d in labelled(s, "sidecar_host_load_average")} == {
            "1m", "5m", "15m"}
    finally:
        await gateway.aclose()
        await pool.aclose()


def test_every_metrics_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    one.observe(outcome())
    assert b"sidecar_requests_total{" in prometheus_client.generate_latest(one.registry)
    assert b"sidecar_requests_total{" not in prometheus_client.generate_latest(two.registry)
    assert b"sidecar_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


async def test_concurrent_scrapes_and_requests(rig: Rig) -> None:
    async def one(i: int) -> None:
        await rig.gateway.complete(chat(), rig.ctx())

    results = await asyncio.gather(*(one(i) for i in range(20)),
                                   *(rig.metrics.exposition() for _ in range(5)))
    for text in results[20:]:
        assert isinstance(text, bytes)
        parse(text)
    s = await rig.scrape()
    assert value(s, "sidecar_requests_total", route="chat", target="a/x", operation="chat",
                 status="200") == 20
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_gpus_and_local_workers_from_the_host_snapshot() -> None:
    from sidecar.gateway import GatewayState
    from sidecar.host import Pressure, ResourceSnapshot
    from sidecar.host.sampler import GpuUsage, WorkerUsage
    from sidecar.metrics import _state_families

    snap = ResourceSnapshot(
        taken_at=1.0, cpu_count=16, cpu_percent=50.0, sidecar_cpu_percent=20.0,
        others_cpu_percent=30.0, load_avg=(1.0, 2.0, 3.0), memory_total_bytes=8 << 30,
        memory_available_bytes=4 << 30, swap_total_bytes=0, swap_used_bytes=0,
        workers=(WorkerUsage("m", 123, 12.5, 300 << 20, 10),),
        gpus=(GpuUsage(0, "NVIDIA H200", 141 << 30, 2 << 30, 7.0),))
    state = GatewayState(draining=True, targets=frozenset(), circuits={}, local_models=[],
                         pressure=Pressure(cpu=True), host=snap, yielding=True)
    registry = prometheus_client.CollectorRegistry(auto_describe=False)

    class Fixed(prometheus_client.registry.Collector):
        def collect(self) -> Any:
            return list(_state_families(state))

    registry.register(Fixed())
    s = parse(prometheus_client.generate_latest(registry))
    gpu = {"gpu": "0", "name": "NVIDIA H200"}
    assert value(s, "sidecar_gpu_memory_total_bytes", **gpu) == 141 << 30
    assert value(s, "sidecar_gpu_memory_used_bytes", **gpu) == 2 << 30
    assert value(s, "sidecar_gpu_utilization_percent", **gpu) == 7.0
    assert value(s, "sidecar_local_worker_rss_bytes", model="m") == 300 << 20
    assert value(s, "sidecar_local_worker_cpu_percent", model="m") == 12.5
    assert value(s, "sidecar_host_cpu_others_percent") == 30.0
    assert value(s, "sidecar_host_load_average", period="15m") == 3.0
    assert value(s, "sidecar_host_pressure", resource="cpu") == 1
    assert value(s, "sidecar_host_local_workers_yielding") == 1
    assert value(s, "sidecar_draining") == 1
