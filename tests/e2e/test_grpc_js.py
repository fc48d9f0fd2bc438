"""The gRPC front end from grpc-js, Node's official gRPC library, as an internal Node service
would call it: a real ``sidecar serve`` with gRPC on a free loopback port against the fake
provider, and ``tests/clients/node/grpc.mjs`` (the .proto loaded with @grpc/proto-loader) run
once per call. What grpcio checks in test_grpc.py, seen through another gRPC stack: answers,
streams, status codes, details, trailers and rich status, deadlines and cancellation.

``make test`` installs grpc-js (scripts/client-deps.sh, from the committed package-lock.json);
run alone without it, the tests skip naming what is missing."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_provider import FakeProvider, hang, ok, slow_drip, status
from tests.support.process import GrpcSidecar

NODE_DIR = Path(__file__).resolve().parents[1] / "clients" / "node"
INSTALL = "run `make clients` (scripts/client-deps.sh)"
KEY = "sk-js-key"

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
timeout_s = 10
free = true

[[providers]]
name = "p2"
type = "openai"
base_url = "{url}/v1"
timeout_s = 10

[[routes]]
model = "single"
targets = [{{ provider = "p1", model = "only" }}]

[[routes]]
model = "limited"
targets = [{{ provider = "p1", model = "lim" }}]

[[routes]]
model = "limited-stream"
targets = [{{ provider = "p1", model = "lim-s" }}]

[[routes]]
model = "embed"
targets = [{{ provider = "p1", model = "emb" }}]

[[routes]]
model = "priced"
targets = [{{ provider = "p2", model = "priced" }}]

[[routes]]
model = "unpriced"
targets = [{{ provider = "p2", model = "unpriced" }}]

[prices]
"p2/priced" = {{ input = 1.0, output = 2.0 }}
"""


@pytest.fixture(scope="module")
def sidecar(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GrpcSidecar]:
    proc = GrpcSidecar(CONFIG.format(url=fake_mod.url, key=KEY), tmp_path_factory.mktemp("grpc-js"))
    yield proc
    assert proc.stop() == 0
    assert "Traceback" not in "".join(proc.output)


def grpc_js(sidecar: GrpcSidecar, method: str, key: str = KEY, **options: Any) -> dict[str, Any]:
    """What grpc-js saw of one call of ``method`` (see grpc.mjs for ``options``)."""
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip(f"Node.js or @grpc/grpc-js is not installed: {INSTALL}")
    run = subprocess.run([node, "grpc.mjs", sidecar.grpc_address, key, method,
                          json.dumps(options)], cwd=NODE_DIR, capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    return result


def pieces_of(chunks: list[dict[str, Any]]) -> list[str]:
    """The content deltas of a stream's chunks, in order (the role's chunk has an empty one,
    the finishing chunk none: its ``delta`` is null, as proto-loader renders an unset
    message with ``defaults: true``)."""
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    return [d["content"] for d in deltas if d and d.get("content")]


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(pieces_of(chunks))


def detail(result: dict[str, Any], type_: str) -> dict[str, Any]:
    """The rich status detail of ``type_`` (e.g. ``google.rpc.RetryInfo``)."""
    assert result["rich"] is not None, result
    found: list[dict[str, Any]] = [d for d in result["rich"]["details"] if d["type"] == type_]
    assert len(found) == 1, result["rich"]
    return found[0]


# --- answers --------------------------------------------------------------------------------


def test_chat_unary_with_bearer_auth(sidecar: GrpcSidecar, fp: FakeProvider) -> None:
    fp.script("only", ok(text="Hi from the fake, to Node", prompt_tokens=7, completion_tokens=5))
    out = grpc_js(sidecar, "Chat", request_id="js-1")
    assert out["code_name"] == "OK", out
    reply = out["response"]
    [choice] = reply["choices"]
    assert choice["message"]["content"] == "Hi from the fake, to Node"
    assert choice["finish_reason"] == "stop"
    # int64 fields arrive as strings (longs: String), as a Node service would load them.
    assert reply["usage"]["prompt_tokens"] == "7"
    assert reply["usage"]["completion_tokens"] == "5"
    assert reply["usage"]["total_tokens"] == "12"
    assert (reply["target"], reply["attempts"], reply["request_id"]) == ("p1/only", 1, "js-1")
    assert reply["route_reason"] == "primary"
    assert (reply["cost_micro_usd"], reply["cost_usd"]) == ("0", "0.000000")
    trailers = out["trailers"]
    assert trailers["x-sidecar-target"] == "p1/only"
    assert trailers["x-sidecar-attempts"] == "1"
    assert trailers["x-sidecar-route-reason"] == "primary"
    assert trailers["x-request-id"] == "js-1"
    assert trailers["x-sidecar-cost-usd"] == "0.000000"
    [sent] = fp.requests()
    assert sent["body"]["model"] == "only"
    assert sent["body"]["messages"] == [{"role": "user", "content": "hi"}]


def test_chat_cost_and_its_absence(sidecar: GrpcSidecar, fp: FakeProvider) -> None:
    fp.script("priced", ok(prompt_tokens=1000, completion_tokens=500))
    out = grpc_js(sidecar, "Chat", request={"model": "priced"})
    # 1000 tokens at $1/M + 500 at $2/M = $0.002
    assert (out["response"]["cost_micro_usd"], out["response"]["cost_usd"]) == ("2000",
                                                                                "0.002000")
    assert out["response"]["_cost_micro_usd"] == "cost_micro_usd", out  # oneofs: true
    assert out["trailers"]["x-sidecar-cost-usd"] == "0.002000"
    out = grpc_js(sidecar, "Chat", request={"model": "unpriced"})
    assert out["response"]["target"] == "p2/unpriced"
    assert out["response"]["cost_usd"] == ""
    # proto3 optional: unset stays unset (a synthetic oneof), not a default "0"
    assert "cost_micro_usd" not in out["response"], out
    assert out["response"].get("_cost_micro_usd") is None, out
    assert "x-sidecar-cost-usd" not in out["trailers"]


def test_chat_stream_in_order_then_ok(sidecar: GrpcSidecar, fp: FakeProvider) -> None:
    fp.script("only", ok(text="one two three four", chunks=4))
    out = grpc_js(sidecar, "ChatStream", request={"include_usage": True}, request_id="js-s")
    assert out["code_name"] == "OK", out
    chunks = out["messages"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = pieces_of(chunks)
    assert len(pieces) == 4 and "".join(pieces) == "one two three four"
    first, usage, last = chunks[0], chunks[-2], chunks[-1]
    assert (first["target"], first["attempts"], first["request_id"]) == ("p1/only", 1, "js-s")
    assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == "stop"
    assert not usage["choices"] and int(usage["usage"]["completion_tokens"]) > 0
    assert not last["choices"] and (last["cost_micro_usd"], last["cost_usd"]) == ("0",
                                                                                  "0.000000")
    assert out["initial"]["x-sidecar-target"] == "p1/only"
    assert out["initial"]["x-sidecar-attempts"] == "1"
    assert out["initial"]["x-request-id"] == "js-s"
    assert out["trailers"]["x-sidecar-cost-usd"] == "0.000000"
    assert fp.requests()[0]["body"]["stream"] is True


def test_embed_and_list_models(sidecar: GrpcSidecar, fp: FakeProvider) -> None:
    out = grpc_js(sidecar, "Embed", request={"input": ["a", "b"], "dimensions": 16})
    assert out["code_name"] == "OK", out
    data = out["response"]["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert all(len(d["values"]) == 16 for d in data)
    assert all(isinstance(v, float | int) for d in data for v in d["values"])
    assert data[0]["values"] != data[1]["values"]
    assert out["response"]["target"] == "p1/emb"
    assert out["trailers"]["x-sidecar-target"] == "p1/emb"
    assert fp.requests()[0]["body"] == {"model": "emb", "input": ["a", "b"], "dimensions": 16}

    out = grpc_js(sidecar, "ListModels")
    models = {m["id"]: m["owned_by"] for m in out["response"]["models"]}
    assert models["single"] == "sidecar" and models["p1/only"] == "p1"


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "auth", "message"), [
    ("wrong", "authorization", "Incorrect API key provided."),
    ("wrong", "x-api-key", "Incorrect API key provided."),
    ("", "authorization", "Missing API key."),
])
@pytest.mark.parametrize("method", ["Chat", "ChatStream"])
def test_bad_key_is_unauthenticated(sidecar: GrpcSidecar, fp: FakeProvider, method: str, key: str,
                                    auth: str, message: str) -> None:
    out = grpc_js(sidecar, method, key=key, auth=auth)
    assert (out["code_name"], out["details"]) == ("UNAUTHENTICATED", message)
    assert out["trailers"]["x-request-id"]
    assert out.get("messages", []) == []
    assert fp.requests() == []  # nothing reached a provider


def test_x_api_key_is_accepted(sidecar: GrpcSidecar) -> None:
    out = grpc_js(sidecar, "Chat", auth="x-api-key")
    assert out["code_name"] == "OK" and out["response"]["target"] == "p1/only"


@pytest.mark.parametrize(("body", "request_"), [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, {"model": "nope"}),
    ({"model": "single", "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
     {"temperature": 3}),
    ({"model": "single", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     {"max_tokens": 0}),
    ({"model": "single", "messages": []}, {"messages": []}),
    ({"model": "single", "messages": [{"content": "hi"}]}, {"messages": [{"content": "hi"}]}),
], ids=["unknown-model", "temperature", "max_tokens", "no-messages", "no-role"])
@pytest.mark.parametrize("method", ["Chat", "ChatStream"])
def test_invalid_requests_match_http(sidecar: GrpcSidecar, fp: FakeProvider, method: str,
                                     body: dict[str, Any], request_: dict[str, Any]) -> None:
    r = httpx.post(sidecar.base_url + "/chat/completions", json=body,
                   headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    http_err = r.json()["error"]
    out = grpc_js(sidecar, method, request=request_)
    expected = "NOT_FOUND" if r.status_code == 404 else "INVALID_ARGUMENT"
    assert r.status_code in (400, 404)
    assert (out["code_name"], out["details"]) == (expected, http_err["message"])
    info = detail(out, "google.rpc.ErrorInfo")
    assert info["domain"] == "sidecar"
    assert info["metadata"]["code"] == http_err["code"]
    assert info["metadata"].get("param") == http_err["param"]
    assert out["rich"]["message"] == out["details"]
    assert out["trailers"]["x-should-retry"] == "false"
    assert fp.requests() == []


@pytest.mark.parametrize(("method", "route", "model"), [
    ("Chat", "limited", "lim"), ("ChatStream", "limited-stream", "lim-s")])
def test_upstream_rate_limit_carries_retry_trailers(sidecar: GrpcSidecar, fp: FakeProvider,
                                                    method: str, route: str, model: str
                                                    ) -> None:
    """A target of its own per method: the sidecar holds a target's Retry-After, so a second
    call to the same target would be refused before it reached the upstream."""
    fp.script(model, status(429, retry_after="30"))
    out = grpc_js(sidecar, method, request={"model": route}, request_id="rl-js")
    assert out["code_name"] == "RESOURCE_EXHAUSTED", out
    assert "rate limited" in out["details"]
    trailers = out["trailers"]
    assert trailers["retry-after"] == "30"
    assert trailers["x-request-id"] == "rl-js"
    assert trailers["x-should-retry"] == "true"
    assert "grpc-status-details-bin" in trailers
    assert out["rich"]["code"] == out["code"] and out["rich"]["message"] == out["details"]
    assert detail(out, "google.rpc.RetryInfo")["retry_delay"] == {"seconds": "30", "nanos": 0}
    info = detail(out, "google.rpc.ErrorInfo")
    assert (info["reason"], info["domain"]) == ("RATE_LIMIT_EXCEEDED", "sidecar")
    assert out.get("messages", []) == []
    assert [r["body"]["model"] for r in fp.requests()] == [model]


def test_every_target_failed_is_unavailable(sidecar: GrpcSidecar, fp: FakeProvider) -> None:
    fp.script("only", status(500))
    out = grpc_js(sidecar, "Chat", request_id="fail-js")
    assert out["code_name"] == "UNAVAILABLE", out
    assert out["details"].startswith("All 1 attempts for 'single' failed.")
    assert "Traceback" not in out["details"]
    assert out["trailers"]["x-should-retry"] == "false"
    assert out["trailers"]["x-request-id"] == "fail-js"
    assert "retry-after" not in out["trailers"]
    assert [d["type"] for d in out["rich"]["details"]] == ["google.rpc.ErrorInfo"]
    assert len(fp.requests()) == 1  # retries = 0


# --- deadlines and cancellation -------------------------------------------------------------


def test_deadline_shorter_than_a_hanging_upstream(sidecar: GrpcSidecar, fp: FakeProvider) -> None:
    fp.script("only", hang())
    out = grpc_js(sidecar, "Chat", timeout_ms=1000, then_chat=True)
    assert out["code_name"] == "DEADLINE_EXCEEDED", out
    assert 900 <= out["elapsed_ms"] < 3000
    assert fp.wait_for_cancelled(1, timeout=5)  # the upstream call was closed
    then = out["then"]  # the same channel serves the next call
    assert then["code_name"] == "OK" and then["response"]["choices"][0]["message"]["content"]
    again = grpc_js(sidecar, "Chat")  # and a new client too
    assert again["response"]["choices"][0]["message"]["content"] == "Hello from fake/only"


def test_deadline_mid_stream(sidecar: GrpcSidecar, fp: FakeProvider) -> None:
    fp.script("only", hang(after_chunks=2))
    out = grpc_js(sidecar, "ChatStream", timeout_ms=1000, then_chat=True)
    assert out["code_name"] == "DEADLINE_EXCEEDED", out
    assert pieces_of(out["messages"]) == ["Hell", "o fr"]  # sent before the hang
    assert out["messages"][0]["target"] == "p1/only"
    assert fp.wait_for_cancelled(1, timeout=5)
    assert out["then"]["code_name"] == "OK"


def test_cancel_of_a_slow_drip_stream_mid_way(sidecar: GrpcSidecar, fp: FakeProvider) -> None:
    fp.script("only", slow_drip(interval_s=0.05, chunks=200))
    out = grpc_js(sidecar, "ChatStream", cancel_after=3, then_chat=True)
    assert out["code_name"] == "CANCELLED", out
    assert len(out["messages"]) == 3  # the role's chunk, then two pieces
    assert pieces_of(out["messages"]) == ["H", "e"]
    assert out["elapsed_ms"] < 3000  # 200 chunks would take 10 s
    assert fp.wait_for_cancelled(1, timeout=5)  # the upstream connection was closed
    assert fp.requests()[0]["outcome"] == "cancelled"
    assert out["then"]["code_name"] == "OK"
    fp.script("only", ok(text="still here", chunks=2))
    again = grpc_js(sidecar, "ChatStream")
    assert (again["code_name"], text_of(again["messages"])) == ("OK", "still here")
