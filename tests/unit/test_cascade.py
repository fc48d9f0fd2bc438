"""The confidence cascade: its pure verdicts (sidecar/routing/cascade.py, schema_check.py),
its config, and the gateway walking a cascade over a real fake provider on loopback (two
priced OpenAI-compatible targets: ``cheap/c`` and ``dear/d``), with no model."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from sidecar.config import CascadeConfig, ConfigError, parse_config
from sidecar.errors import AllTargetsFailed
from sidecar.gateway import Context, Ended, Failed, Gateway, Outcome, Streaming
from sidecar.limits import MemoryRateLimiter
from sidecar.metrics import Metrics
from sidecar.money import Accountant, MemoryBudgetStore
from sidecar.routing import cascade
from sidecar.routing.schema_check import schema_problem
from sidecar.types import Call, Op, validate_call
from tests.support.fake_provider import FakeProvider, ok, status

DEFAULTS = CascadeConfig()


def chat_body(text: str | None, logprobs: list[float] | None, **choice: Any) -> bytes:
    lp = None if logprobs is None else {
        "content": [{"token": "t", "logprob": v, "bytes": [116], "top_logprobs": []}
                    for v in logprobs]}
    return json.dumps({"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text, **choice},
         "logprobs": lp, "finish_reason": "stop"}]}).encode()


def chat(**fields: Any) -> Call:
    return validate_call(Op.CHAT, {"model": "smart",
                                   "messages": [{"role": "user", "content": "2+2?"}], **fields})


# --- pure verdicts ---------------------------------------------------------------------------

def test_confidence_mean_and_min() -> None:
    c = cascade.confidence([-0.1, -0.3, -2.0])
    assert c is not None and c.tokens == 3
    assert c.mean == pytest.approx(-0.8) and c.min == -2.0
    assert cascade.confidence([]) is None
    bad = cascade.confidence([-0.1, math.nan])
    assert bad is not None and bad.min == -math.inf


@pytest.mark.parametrize(("logprobs", "settings", "escalate", "why"), [
    ([-0.1, -0.2], CascadeConfig(min_mean_logprob=-0.5), False, "confident"),
    ([-0.9, -0.8], CascadeConfig(min_mean_logprob=-0.5), True, "low_mean_logprob"),
    ([-0.01, -5.0], CascadeConfig(min_mean_logprob=-3.0, min_token_logprob=-4.0), True,
     "low_min_logprob"),
    ([-0.01, -5.0], CascadeConfig(min_mean_logprob=-3.0), False, "confident"),
    # the mean is checked first
    ([-6.0, -6.0], CascadeConfig(min_mean_logprob=-1.0, min_token_logprob=-4.0), True,
     "low_mean_logprob"),
    ([-0.5], CascadeConfig(min_mean_logprob=-0.5), False, "confident"),  # not below
])
def test_logprob_thresholds(logprobs: list[float], settings: CascadeConfig, escalate: bool,
                            why: str) -> None:
    answer = cascade.read_body(Op.CHAT, chat_body("4", logprobs))
    verdict = cascade.judge(answer, settings)
    assert (verdict.escalate, verdict.why) == (escalate, why)
    assert verdict.confidence is not None and verdict.confidence.tokens == len(logprobs)


def test_no_logprobs_is_configurable() -> None:
    answer = cascade.read_body(Op.CHAT, chat_body("4", None))
    assert answer is not None and answer.logprobs == (None,)
    assert cascade.judge(answer, DEFAULTS) == cascade.Verdict(False, "no_logprobs")
    assert cascade.judge(answer, CascadeConfig(no_logprobs="escalate")).escalate
    # an answer the cascade cannot read is judged the same way
    assert cascade.judge(None, DEFAULTS).why == "no_logprobs"
    assert cascade.read_body(Op.CHAT, b"not json") is None
    assert cascade.read_body(Op.EMBEDDINGS, chat_body("4", [-0.1])) is None


def test_empty_answer_escalates() -> None:
    assert cascade.judge(cascade.read_body(Op.CHAT, chat_body("", [])), DEFAULTS).why == "empty"
    assert cascade.judge(cascade.read_body(Op.CHAT, chat_body(None, None)), DEFAULTS).why == \
        "empty"


def test_several_choices_the_least_confident_decides() -> None:
    body = json.dumps({"choices": [
        {"index": 0, "message": {"content": "a"}, "logprobs": {"content": [{"logprob": -0.1}]}},
        {"index": 1, "message": {"content": "b"}, "logprobs": {"content": [{"logprob": -2.0}]}},
    ]}).encode()
    verdict = cascade.judge(cascade.read_body(Op.CHAT, body), CascadeConfig(min_mean_logprob=-1))
    assert verdict.why == "low_mean_logprob"
    assert verdict.confidence == cascade.Confidence(2, -2.0, -2.0)


SCHEMA = {"type": "json_schema", "json_schema": {"name": "sum", "schema": {
    "type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
    "additionalProperties": False}}}


@pytest.mark.parametrize(("text", "fmt", "problem"), [
    ('{"answer": 4}', SCHEMA, None),
    ('{"answer": "4"}', SCHEMA, "$.answer: expected integer"),
    ('{"answer": 4, "x": 1}', SCHEMA, "$: property 'x' is not allowed"),
    ('{}', SCHEMA, "$: missing required property 'answer'"),
    ('{"answer": ', SCHEMA, "not JSON"),
    ('[1]', {"type": "json_object"}, "not a JSON object"),
    ('{"a": 1}', {"type": "json_object"}, None),
    ("plain words", {"type": "text"}, None),
    ("plain words", None, None),
])
def test_format_problems(text: str, fmt: Any, problem: str | None) -> None:
    assert cascade.format_problem(text, fmt) == problem


def test_schema_verdict_comes_first_and_can_be_off() -> None:
    answer = cascade.read_body(Op.CHAT, chat_body('{"answer": ', [-0.01]))
    verdict = cascade.judge(answer, DEFAULTS, SCHEMA)
    assert (verdict.escalate, verdict.why, verdict.detail) == (True, "schema", "not JSON")
    assert cascade.judge(answer, CascadeConfig(check_schema=False), SCHEMA).why == "confident"
    # a tool call is not held to the response format
    called = cascade.read_body(Op.CHAT, chat_body(None, [-0.01], tool_calls=[
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]))
    assert cascade.judge(called, DEFAULTS, SCHEMA).why == "confident"


SCHEMAS: list[tuple[dict[str, Any], list[Any]]] = [
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
      "required": ["n"]}, [{"n": 3}, {"n": 10}, {"n": -1}, {"n": 2.0}, {"n": True}, {}, []]),
    ({"type": "array", "items": {"type": "string", "maxLength": 2}, "minItems": 1,
      "maxItems": 2}, [[], ["a"], ["abc"], ["a", "b", "c"], [1]]),
    ({"enum": ["a", 1, None]}, ["a", 1, None, "b", 1.5, True]),
    ({"anyOf": [{"type": "string"}, {"type": "null"}]}, ["x", None, 3]),
    ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, [1.5, 2, "x"]),
    ({"$defs": {"p": {"type": "object", "properties": {"x": {"$ref": "#/$defs/p"}}}},
      "$ref": "#/$defs/p"}, [{"x": {"x": {}}}, {"x": 1}]),
    ({"type": ["string", "integer"], "exclusiveMinimum": 0}, ["s", 1, 0, 1.5]),
    ({"prefixItems": [{"type": "integer"}], "items": {"type": "string"}},
     [[1, "a"], ["a"], [1, 2]]),
    ({"const": {"a": [1]}}, [{"a": [1]}, {"a": [2]}]),
]


@pytest.mark.parametrize(("schema", "values"), SCHEMAS)
def test_schema_check_agrees_with_jsonschema(schema: dict[str, Any], values: list[Any]) -> None:
    for value in values:
        expected = jsonschema.Draft202012Validator(schema).is_valid(value)
        assert (schema_problem(value, schema) is None) == expected, (schema, value)


def test_schema_check_bounds_depth() -> None:
    value: Any = 1
    for _ in range(100):
        value = [value]
    nested = {"$defs": {"l": {"type": ["array", "integer"], "items": {"$ref": "#/$defs/l"}}},
              "$ref": "#/$defs/l"}
    assert "nested deeper than 64 levels" in (schema_problem(value, nested) or "")
    assert schema_problem(value, {"items": True}) is None  # the schema stops looking


def test_reading_streams() -> None:
    frames = b"".join(
        b"data: " + json.dumps(c).encode() + b"\n\n" for c in [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None}]},
            {"choices": [{"index": 0, "delta": {"content": "4"},
                          "logprobs": {"content": [{"logprob": -0.2}]}}]},
            {"choices": [{"index": 0, "delta": {"content": "."},
                          "logprobs": {"content": [{"logprob": -0.4}]}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]},
            {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
        ])
    answer = cascade.read_stream(Op.CHAT, frames)
    assert answer == cascade.Answer(("4.",), ((-0.2, -0.4),), (False,))
    stripped = cascade.strip_stream(frames)
    assert cascade.read_stream(Op.CHAT, stripped) == cascade.Answer(("4.",), (None,), (False,))
    assert stripped.count(b"data: ") == 5 and b'"logprob"' not in stripped
    text = (b'data: {"choices":[{"index":0,"text":"4","logprobs":'
            b'{"tokens":["4"],"token_logprobs":[-0.3]}}]}\n\n')
    assert cascade.read_stream(Op.COMPLETIONS, text) == cascade.Answer(("4",), ((-0.3,),),
                                                                      (False,))
    assert cascade.read_stream(Op.CHAT, b"event: message_start\ndata: {}\n\n") is None


def test_asking_and_stripping() -> None:
    call = chat()
    asked = cascade.asking(call)
    assert asked.raw["logprobs"] is True and asked.request.logprobs is True  # type: ignore[union-attr]
    assert "logprobs" not in call.raw
    own = chat(logprobs=True, top_logprobs=2)
    assert cascade.asking(own) is own and cascade.client_asked(own)
    text = validate_call(Op.COMPLETIONS, {"model": "smart", "prompt": "2+2="})
    assert cascade.asking(text).raw["logprobs"] == 0
    body = chat_body("4", [-0.1])
    verdict, served = cascade.judge_reply(call, body, DEFAULTS)
    assert verdict.why == "confident" and json.loads(served)["choices"][0]["logprobs"] is None
    assert cascade.judge_reply(own, body, DEFAULTS)[1] == body
    assert cascade.strip_body(b"not json") == b"not json"
    assert cascade.reason(1, "schema") == "cascade:1:schema"


# --- config ----------------------------------------------------------------------------------

def cfg(route: dict[str, Any], **extra: Any) -> Any:
    return parse_config({
        "state": {"backend": "memory"},
        "providers": [{"name": "cheap", "type": "openai", "base_url": "http://127.0.0.1:9"},
                      {"name": "dear", "type": "openai", "base_url": "http://127.0.0.1:9"}],
        "routes": [{"model": "smart", "targets": [
            {"provider": "dear", "model": "d"}, {"provider": "cheap", "model": "c"}], **route}],
        **extra}, env={})


@pytest.mark.parametrize(("route", "message"), [
    ({"strategy": "cascade", "cascade": {"min_mean_logprob": 0.5}},
     "routes[0].cascade.min_mean_logprob: Expected `float` <= 0.0"),
    ({"strategy": "cascade", "cascade": {"min_token_logprob": "low"}},
     "routes[0].cascade.min_token_logprob: Expected `float | null`, got `str`"),
    ({"strategy": "cascade", "cascade": {"no_logprobs": "maybe"}},
     "routes[0].cascade.no_logprobs: Invalid enum value 'maybe'"),
    ({"strategy": "cascade", "cascade": {"threshold": -1}},
     "routes[0].cascade: Object contains unknown field `threshold`"),
    ({"strategy": "cost", "cascade": {}}, 'routes[0].cascade: only for strategy = "cascade"'),
    ({"strategy": "cascade", "prefer": "local"}, "routes[0].prefer: a cascade orders"),
    ({"strategy": "cascade", "targets": [{"provider": "cheap", "model": "c"}]},
     "routes[0].targets: a cascade needs at least two targets"),
    ({"strategy": "cascade", "cascade": {"min_mean_logprob": None, "check_schema": False}},
     "routes[0].cascade: every check is off"),
])
def test_bad_config_names_the_path(route: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(route)
    assert str(e.value).startswith(message), str(e.value)


def test_config_defaults() -> None:
    config = cfg({"strategy": "cascade"})
    assert config.routes[0].cascade is None  # the defaults apply
    assert (DEFAULTS.min_mean_logprob, DEFAULTS.min_token_logprob, DEFAULTS.no_logprobs,
            DEFAULTS.check_schema) == (-0.5, None, "accept", True)


# --- the gateway walking a cascade (real HTTP on loopback) ------------------------------------

PRICES = {"cheap/c": {"input": 1.0, "output": 2.0}, "dear/d": {"input": 10.0, "output": 30.0},
          "mid/m": {"input": 3.0, "output": 6.0}}
TWO = [{"provider": "dear", "model": "d"}, {"provider": "cheap", "model": "c"}]


class Rig:
    def __init__(self, fp: FakeProvider, outcomes: list[Outcome],
                 targets: list[dict[str, str]] = TWO, **cascade_cfg: Any) -> None:
        url = fp.openai_base_url
        self.config = parse_config({
            "routing": {"retries": 0},
            "state": {"backend": "memory"},
            "providers": [{"name": name, "type": "openai", "base_url": url}
                          for name in ("cheap", "mid", "dear")],
            # listed dear first: the cascade orders by price
            "routes": [{"model": "smart", "strategy": "cascade", "targets": targets,
                        **({"cascade": cascade_cfg} if cascade_cfg else {})}],
            "prices": PRICES,
            "budgets": [{"name": "all", "limit_usd": 100.0}],
        }, env={})
        from sidecar.providers.openai import OpenAICompatible
        providers = {p.name: OpenAICompatible(p) for p in self.config.providers}  # type: ignore[arg-type]
        self.metrics = Metrics()
        self.gateway = Gateway(
            self.config, providers,
            accountant=Accountant(self.config, MemoryBudgetStore(), MemoryRateLimiter()),
            observers=[outcomes.append, self.metrics.observe])
        self.metrics.watch(self.gateway)

    def ctx(self) -> Context:
        return Context("r", self.gateway.deadline(30.0))

    async def spent(self) -> str:
        views = json.loads(await self.gateway.budgets(None))["data"]
        return str(views[0]["spent_usd"])


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as fp:
        yield fp


@pytest.fixture
async def outcomes() -> list[Outcome]:
    return []


@pytest.fixture
async def rig(fake: FakeProvider, outcomes: list[Outcome]) -> AsyncIterator[Rig]:
    r = Rig(fake, outcomes)
    yield r
    await r.gateway.aclose()


async def test_confident_answer_stays_on_the_cheap_step(rig: Rig, fake: FakeProvider,
                                                        outcomes: list[Outcome]) -> None:
    fake.script("c", ok("4", logprob=-0.05))
    done = await rig.gateway.complete(chat(), rig.ctx())
    assert (done.target, done.reason, done.attempts) == ("cheap/c", "cascade:0:confident", 1)
    body = json.loads(done.reply.body)
    assert body["choices"][0]["message"]["content"] == "4"
    assert body["choices"][0]["logprobs"] is None  # asked for the cascade, not the client
    [sent] = fake.requests()
    assert sent["model"] == "c" and sent["body"]["logprobs"] is True
    assert outcomes[-1].escalations == ()


async def test_low_confidence_escalates_and_both_are_billed(rig: Rig, fake: FakeProvider,
                                                            outcomes: list[Outcome]) -> None:
    fake.script("c", ok("5", logprob=-2.0, prompt_tokens=1000, completion_tokens=1000))
    fake.script("d", ok("4", prompt_tokens=1000, completion_tokens=1000))
    done = await rig.gateway.complete(chat(), rig.ctx())
    assert (done.target, done.reason, done.attempts) == ("dear/d", "cascade:1:low_mean_logprob", 2)
    assert json.loads(done.reply.body)["choices"][0]["message"]["content"] == "4"
    cheap, dear = fake.requests()
    assert cheap["body"]["logprobs"] is True and "logprobs" not in dear["body"]  # the last step
    # cheap: 1000 * (1 + 2) µ$ = 3000; dear: 1000 * (10 + 30) = 40000; the budget sees both
    assert done.cost == 40_000
    assert await rig.spent() == "0.043000"
    assert outcomes[-1].escalations == ("0:low_mean_logprob",)
    assert outcomes[-1].escalated_costs == (("cheap/c", 3000),)
    text = (await rig.metrics.exposition()).decode()
    assert ('sidecar_cascade_escalations_total{route="smart",step="0",why="low_mean_logprob"} '
            '1.0') in text
    assert 'sidecar_cost_microdollars_total{route="smart",target="cheap/c"} 3000.0' in text
    assert ('sidecar_route_reasons_total{reason="cascade:1:low_mean_logprob",route="smart",'
            'target="dear/d"} 1.0') in text


async def test_schema_failure_escalates(rig: Rig, fake: FakeProvider) -> None:
    fake.script("c", ok('{"answer": "four"}', logprob=-0.01))
    fake.script("d", ok('{"answer": 4}'))
    done = await rig.gateway.complete(chat(response_format=SCHEMA), rig.ctx())
    assert (done.target, done.reason) == ("dear/d", "cascade:1:schema")


async def test_client_asked_logprobs_keeps_them(rig: Rig, fake: FakeProvider) -> None:
    fake.script("c", ok("4", logprob=-0.05))
    done = await rig.gateway.complete(chat(logprobs=True), rig.ctx())
    assert done.reason == "cascade:0:confident"
    assert json.loads(done.reply.body)["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.05


async def test_no_logprobs_accepts_by_default_or_escalates(fake: FakeProvider,
                                                           outcomes: list[Outcome]) -> None:
    fake.set_default("d", ok("4"))
    fake.set_default("c", ok("5"))  # no logprob: the fake gives none
    default, strict = Rig(fake, outcomes), Rig(fake, outcomes, no_logprobs="escalate")
    try:
        assert (await default.gateway.complete(chat(), default.ctx())).reason == \
            "cascade:0:no_logprobs"
        done = await strict.gateway.complete(chat(), strict.ctx())
        assert (done.target, done.reason) == ("dear/d", "cascade:1:no_logprobs")
    finally:
        await default.gateway.aclose()
        await strict.gateway.aclose()


async def test_failing_cheap_step_falls_back(rig: Rig, fake: FakeProvider) -> None:
    fake.script("c", status(500))
    fake.script("d", ok("4"))
    done = await rig.gateway.complete(chat(), rig.ctx())
    assert (done.target, done.reason) == ("dear/d", "fallback:upstream_5xx,cascade:1:fallback")


async def test_escalated_answer_is_kept_when_the_next_step_fails(
        rig: Rig, fake: FakeProvider, outcomes: list[Outcome]) -> None:
    fake.script("c", ok("5", logprob=-3.0, prompt_tokens=10, completion_tokens=10))
    fake.script("d", status(503))
    done = await rig.gateway.complete(chat(), rig.ctx())
    assert (done.target, done.reason, done.attempts) == (
        "cheap/c", "fallback:upstream_5xx,cascade:0:kept", 2)
    assert json.loads(done.reply.body)["choices"][0]["message"]["content"] == "5"
    assert json.loads(done.reply.body)["choices"][0]["logprobs"] is None
    assert done.cost == 30 and await rig.spent() == "0.000030"  # recorded once
    assert rig.gateway.tracker.get("cheap/c").in_flight == 0
    assert outcomes[-1].cost == 30 and outcomes[-1].escalated_costs == ()  # counted once
    assert outcomes[-1].escalations == ("0:low_mean_logprob",)
    text = (await rig.metrics.exposition()).decode()
    assert 'sidecar_cost_microdollars_total{route="smart",target="cheap/c"} 30.0' in text


async def test_nothing_answers(rig: Rig, fake: FakeProvider) -> None:
    fake.script("c", status(500))
    fake.script("d", status(500))
    with pytest.raises(AllTargetsFailed):
        await rig.gateway.complete(chat(), rig.ctx())


async def read(streaming: Streaming) -> tuple[list[dict[str, Any]], int | None]:
    chunks: list[dict[str, Any]] = []
    cost = None
    async for event in streaming.events:
        if isinstance(event, Ended):
            cost = event.cost
        elif isinstance(event, Failed):
            raise AssertionError(event.error)
        else:
            for block in event.frame.split(b"\n\n")[:-1]:
                chunks.append(json.loads(block[len(b"data: "):]))
    return chunks, cost


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_stream_confident_is_replayed_whole(rig: Rig, fake: FakeProvider) -> None:
    fake.script("c", ok("four is it", chunks=3, logprob=-0.1, completion_tokens=3))
    streaming = await rig.gateway.stream(chat(stream=True), rig.ctx())
    assert (streaming.target, streaming.reason) == ("cheap/c", "cascade:0:confident")
    chunks, cost = await read(streaming)
    assert text_of(chunks) == "four is it"
    assert all(c["choices"][0]["logprobs"] is None for c in chunks if c["choices"])
    assert not any("usage" in c and c["usage"] for c in chunks)  # the ledger's, not the client's
    assert cost is not None and cost > 0
    assert rig.gateway.tracker.get("cheap/c").in_flight == 0


async def test_stream_low_confidence_escalates(rig: Rig, fake: FakeProvider,
                                               outcomes: list[Outcome]) -> None:
    fake.script("c", ok("five", chunks=2, logprob=-4.0, prompt_tokens=100,
                        completion_tokens=100))
    fake.script("d", ok("four", chunks=2, prompt_tokens=100, completion_tokens=100))
    streaming = await rig.gateway.stream(chat(stream=True), rig.ctx())
    assert (streaming.target, streaming.reason) == ("dear/d", "cascade:1:low_mean_logprob")
    chunks, cost = await read(streaming)
    assert text_of(chunks) == "four" and cost == 4000
    assert await rig.spent() == "0.004300"  # 300 µ$ for the cheap step's answer too
    assert outcomes[-1].escalations == ("0:low_mean_logprob",)


async def test_stream_failing_mid_answer_on_the_cheap_step_falls_back(
        rig: Rig, fake: FakeProvider) -> None:
    from tests.support.fake_provider import reset
    fake.script("c", reset(after_chunks=1))
    fake.script("d", ok("four"))
    streaming = await rig.gateway.stream(chat(stream=True), rig.ctx())
    assert streaming.target == "dear/d"
    assert streaming.reason.endswith(",cascade:1:fallback")
    assert text_of((await read(streaming))[0]) == "four"


async def test_three_steps_each_judged_but_the_last(fake: FakeProvider,
                                                    outcomes: list[Outcome]) -> None:
    rig = Rig(fake, outcomes, [*TWO, {"provider": "mid", "model": "m"}])
    try:
        fake.script("c", ok("5", logprob=-2.0))
        fake.script("m", ok("4", logprob=-0.1))
        done = await rig.gateway.complete(chat(), rig.ctx())
        assert (done.target, done.reason) == ("mid/m", "cascade:1:confident")
        fake.script("c", ok("5", logprob=-2.0))
        fake.script("m", ok('"4"', logprob=-0.1))
        fake.script("d", ok('{"answer": 4}'))
        done = await rig.gateway.complete(chat(response_format=SCHEMA), rig.ctx())
        assert (done.target, done.reason) == ("dear/d", "cascade:2:schema")
        assert outcomes[-1].escalations == ("0:schema", "1:schema")
        assert [r["body"].get("logprobs") for r in fake.requests()[2:]] == [True, True, None]
    finally:
        await rig.gateway.aclose()


def test_the_order_is_cheapest_first_unknown_prices_last() -> None:
    import random

    from sidecar.routing import Route, Target, by_strategy
    targets = (Target("x", "unknown"), Target("dear", "d"), Target("local", "m"),
               Target("cheap", "c"))
    route = Route("smart", "cascade", targets, 0, cascade=DEFAULTS)
    costs = {"dear/d": 400, "local/m": 0, "cheap/c": 30}
    order = by_strategy(route, random.Random(1), costs=costs)
    assert [t.key for t in order] == ["local/m", "cheap/c", "dear/d", "x/unknown"]


async def test_under_host_pressure_nothing_is_judged(fake: FakeProvider, tmp_path: Any) -> None:
    """Offloaded, the order is no longer cheapest first: the cascade steps aside."""
    from local_models import ModelPool, PoolSettings
    from local_models.catalog import build_catalog
    from sidecar.host import HostWatch, Pressure
    from sidecar.providers.local import LocalProvider
    from sidecar.providers.openai import OpenAICompatible
    from tests.support.process import local_spec

    config = parse_config({
        "state": {"backend": "memory"},
        "providers": [{"name": "dear", "type": "openai", "base_url": fake.openai_base_url}],
        "local_models": [{"name": "m", "path": str(tmp_path / "m.gguf")}],
        "routes": [{"model": "smart", "strategy": "cascade", "targets": [
            {"provider": "local", "model": "m"}, {"provider": "dear", "model": "d"}]}],
        "prices": PRICES}, env={})
    pool = ModelPool(build_catalog([local_spec("m")]).entries,
                     PoolSettings(memory_budget_bytes=1 << 40))
    host = HostWatch(config.resources)
    host.pressure = Pressure(cpu=True)
    gateway = Gateway(config, {"dear": OpenAICompatible(config.providers[0]),  # type: ignore[arg-type]
                               "local": LocalProvider(pool)},
                      local_models=["m"], host=host)
    try:
        fake.script("d", ok("4", logprob=-5.0))
        done = await gateway.complete(chat(), Context("r", gateway.deadline(30.0)))
        assert (done.target, done.reason) == ("dear/d", "offload:cpu")
        [sent] = fake.requests()
        assert "logprobs" not in sent["body"]
    finally:
        await gateway.aclose()
