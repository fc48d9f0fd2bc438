"""Hostile input against a real ``sidecar serve``: whatever a client sends (deep JSON, huge
integers, model names that would break a header, too many or too large headers) gets a 400
(or 431) in OpenAI's envelope before any upstream is called, with no traceback on stderr;
and whatever usage an upstream reports, a budget never goes down."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_provider import FakeProvider, ok
from tests.support.process import SidecarProcess, poll

CONFIG = """
[server]
request_timeout_s = 20

[routing]
retries = 0
circuit_failures = 1000

[[providers]]
name = "p"
type = "openai"
base_url = "{url}/v1"
timeout_s = 5

[[providers]]
name = "claude"
type = "anthropic"
base_url = "{url}"
timeout_s = 5

[[routes]]
model = "chat"
targets = [{{ provider = "p", model = "m" }}]

[prices]
"p/m" = {{ input = 1.0, output = 1.0 }}
"p/org/Model-7B:free@v1 q4" = {{ input = 1.0, output = 1.0 }}
"p/neg" = {{ input = 100.0, output = 1000.0 }}
"p/huge" = {{ input = 100.0, output = 1000.0 }}
"p/negs" = {{ input = 100.0, output = 1000.0 }}
"claude/neg" = {{ input = 100.0, output = 1000.0 }}

[state]
backend = "memory"

[[budgets]]
name = "all"
scope = "global"
limit_usd = 1000.0
window = "total"
"""


@pytest.fixture(scope="module")
def sidecar(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(CONFIG.format(url=fake_mod.url), tmp_path_factory.mktemp("bounds"))
    yield proc
    proc.stop()
    assert "Traceback" not in "".join(proc.output), "".join(proc.output)


def _post(sc: SidecarProcess, body: bytes | dict[str, Any], path: str = "/chat/completions",
          headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(sc.base_url + path, content=content, timeout=10,
                      headers={"content-type": "application/json", **(headers or {})})


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    return err  # type: ignore[no-any-return]


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": "user", "content": "hi"}], **fields}


# --- 1. deep JSON ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [70, 1000, 5000, 100_000])
def test_deeply_nested_json_gets_400(sidecar: SidecarProcess, fp: FakeProvider,
                                     depth: int) -> None:
    deep = b'{"a":' * depth + b"1" + b"}" * depth
    body = b'{"model":"chat","messages":[{"role":"user","content":"x"}],"extra":' + deep + b"}"
    for payload in (deep, body, b"[" * depth + b"]" * depth):
        for path in ("/chat/completions", "/completions", "/embeddings"):
            assert _error(_post(sidecar, payload, path), 400)["type"] == "invalid_request_error"
    assert fp.requests() == []


def test_nesting_below_the_limit_passes(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(20):
        schema = {"type": "object", "properties": {"x": schema}}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    r = _post(sidecar, _chat(tools=[tool]))
    assert r.status_code == 200, r.text
    assert fp.requests()[0]["body"]["tools"][0]["function"]["parameters"] == schema


# --- 2. integers and numbers ----------------------------------------------------------------


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/chat/completions", "max_tokens", 2**64),
    ("/chat/completions", "max_tokens", 2**31),
    ("/chat/completions", "max_completion_tokens", 2**64),
    ("/chat/completions", "seed", 2**64),
    ("/chat/completions", "seed", -(2**63) - 1),
    ("/chat/completions", "n", 2**64),
    ("/chat/completions", "top_logprobs", 2**64),
    ("/chat/completions", "logprobs", 2**64),
    ("/chat/completions", "presence_penalty", 1e308),
    ("/chat/completions", "frequency_penalty", -3),
    ("/chat/completions", "unmodelled_field", 2**64),
    ("/completions", "max_tokens", 2**64),
    ("/completions", "seed", 2**70),
    ("/completions", "logprobs", 2**64),
    ("/completions", "n", 2**64),
    ("/embeddings", "dimensions", 2**64),
])
def test_out_of_range_numbers_get_400_naming_the_field(
    sidecar: SidecarProcess, fp: FakeProvider, path: str, field: str, value: int | float
) -> None:
    body: dict[str, Any] = {"model": "chat", field: value}
    if path == "/chat/completions":
        body["messages"] = [{"role": "user", "content": "x"}]
    else:
        body["prompt" if path == "/completions" else "input"] = "x"
    err = _error(_post(sidecar, body, path), 400)
    assert err["param"] == field, err
    assert fp.requests() == []


def test_numbers_beyond_float_and_in_token_arrays_get_400(sidecar: SidecarProcess,
                                                          fp: FakeProvider) -> None:
    body = b'{"model":"chat","messages":[{"role":"user","content":"x"}],"temperature":1e999}'
    _error(_post(sidecar, body), 400)
    err = _error(_post(sidecar, {"model": "chat", "input": [[1, 2**64]]}, "/embeddings"), 400)
    assert err["param"] == "input[0][1]"
    assert fp.requests() == []


def test_largest_valid_seed_reaches_the_provider(sidecar: SidecarProcess,
                                                 fp: FakeProvider) -> None:
    r = _post(sidecar, _chat(seed=2**63 - 1, max_tokens=5))
    assert r.status_code == 200, r.text
    assert fp.requests()[0]["body"]["seed"] == 2**63 - 1


# --- 3. model names and headers -------------------------------------------------------------


@pytest.mark.parametrize("model", ["p/m\r\nx-evil: 1", "p/m\n", "p/\x00m", "p/é", "p/模型",
                                   "p/m\x7f", " p/m", "p/" + "m" * 300])
def test_model_names_that_would_break_a_header_get_400(sidecar: SidecarProcess,
                                                       fp: FakeProvider, model: str) -> None:
    for path, body in (("/chat/completions", _chat(model=model)),
                       ("/completions", {"model": model, "prompt": "x"}),
                       ("/embeddings", {"model": model, "input": "x"})):
        for stream in (False, True):
            if stream and path == "/embeddings":
                continue
            r = _post(sidecar, {**body, "stream": True} if stream else body, path)
            assert _error(r, 400)["param"] == "model"
    assert fp.requests() == []


def test_odd_but_printable_model_names_are_served(sidecar: SidecarProcess,
                                                  fp: FakeProvider) -> None:
    r = _post(sidecar, _chat(model="p/org/Model-7B:free@v1 q4"))
    assert r.status_code == 200, r.text
    assert r.headers["x-sidecar-target"] == "p/org/Model-7B:free@v1 q4"


def test_bad_request_ids_are_replaced(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    # httpx refuses to send CR/LF itself, so write the request by hand.
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as s:
        body = json.dumps(_chat()).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                  b"content-type: application/json\r\n"
                  b"x-request-id: \xc3\xa9\xff bad id\r\n"
                  b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = s.recv(65536).split(b"\r\n\r\n")[0].decode("ascii")
    assert head.startswith("HTTP/1.1 200"), head
    rid = next(ln for ln in head.split("\r\n") if ln.lower().startswith("x-request-id:"))
    assert rid.split(":", 1)[1].strip().isalnum()


# --- 5. header caps -------------------------------------------------------------------------


def test_too_many_headers_get_431(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    many = {f"x-h{i}": "v" for i in range(150)}
    err = _error(_post(sidecar, _chat(), headers=many), 431)
    assert err["type"] == "invalid_request_error"
    big = {"x-big": "v" * 20_000}
    _error(_post(sidecar, _chat(), headers=big), 431)
    spread = {f"x-s{i}": "v" * 400 for i in range(60)}  # 60 headers, 24 KB
    _error(_post(sidecar, _chat(), headers=spread), 431)
    assert fp.requests() == []
    # a normal request on a new connection is still served
    assert _post(sidecar, _chat(), headers={f"x-ok{i}": "v" * 50 for i in range(50)}
                 ).status_code == 200


def test_one_endless_header_is_cut_off(sidecar: SidecarProcess) -> None:
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-big: ")
        answer = b""
        try:
            for _ in range(64):  # 4 MiB at most, never the end of the header
                s.sendall(b"v" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]


def test_an_unparsable_request_gets_400_in_the_envelope(sidecar: SidecarProcess,
                                                        fp: FakeProvider) -> None:
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                  b"x-bad: a\x01b\r\ncontent-length: 2\r\n\r\n{}")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"content-type: application/json" in head
    assert set(json.loads(body)["error"]) == {"message", "type", "code", "param"}
    assert fp.requests() == []


# --- 4. usage an upstream cannot have used --------------------------------------------------


def _micro(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def _budget(sc: SidecarProcess) -> tuple[int, int]:
    r = httpx.get(sc.base_url + "/sidecar/budgets", timeout=10)
    view = r.json()["data"][0]
    return _micro(view["spent_usd"]), _micro(view["reserved_usd"])


def _reservation(sc: SidecarProcess, fp: FakeProvider, model: str,
                 body: dict[str, Any]) -> int:
    """What the sidecar reserves for ``body`` on ``model`` (read while a slow answer of the
    same request is in flight)."""
    fp.script(model.split("/", 1)[1], ok(delay_s=1.0, prompt_tokens=1, completion_tokens=1))
    before = _budget(sc)[0]
    done = threading.Event()
    t = threading.Thread(target=lambda: (_post(sc, body), done.set()))
    t.start()
    poll(lambda: _budget(sc)[1] > 0)
    reserved = _budget(sc)[1]
    t.join()
    spent = _budget(sc)[0]
    assert spent - before == 1100  # 1 x 100 + 1 x 1000 µ$
    fp.reset()
    return reserved


@pytest.mark.parametrize(("model", "stream", "usage"), [
    ("p/neg", False, {"prompt_tokens": -(10**9), "completion_tokens": 1}),
    ("p/neg", False, {"prompt_tokens": 1, "completion_tokens": -5}),
    ("p/huge", False, {"prompt_tokens": 1, "completion_tokens": 2**61}),
    ("p/negs", True, {"prompt_tokens": 1, "completion_tokens": -(10**9)}),
    ("claude/neg", False, {"prompt_tokens": -(10**9), "completion_tokens": 1}),
    ("claude/neg", True, {"prompt_tokens": 1, "completion_tokens": -(10**9)}),
])
def test_impossible_usage_is_malformed_and_charged_the_reservation(
    sidecar: SidecarProcess, fp: FakeProvider, model: str, stream: bool, usage: dict[str, int]
) -> None:
    body = _chat(model=model, max_tokens=10, stream=stream,
                 stream_options={"include_usage": True} if stream else None)
    if not stream:
        del body["stream_options"]
    reserved = _reservation(sidecar, fp, model, body)
    assert reserved > 0
    spent_before = _budget(sidecar)[0]
    fp.script(model.split("/", 1)[1], ok(**usage))
    r = _post(sidecar, body)
    if stream:
        # committed once content flowed: it ends with an error event, never a usage
        assert r.status_code == 200
        events = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
        last = json.loads(events[-1].removeprefix("data: "))
        assert "impossible usage" in last["error"]["message"], events
        assert all('"usage":{' not in e for e in events)
    else:
        assert "impossible usage" in _error(r, 502)["message"]
    spent, still_reserved = _budget(sidecar)
    assert still_reserved == 0
    assert spent - spent_before == reserved
    assert spent >= 0


# --- 7. the OpenAPI document ----------------------------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_openapi_document_describes_the_bodies(sidecar: SidecarProcess,
                                               fp: FakeProvider) -> None:
    r = httpx.get(sidecar.url + "/openapi.json", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):  # every reference resolves
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    bodies = {}
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        bodies[path] = schemas[ref.rsplit("/", 1)[1]]
        assert "model" in bodies[path]["required"]
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"] \
            .endswith("/ErrorEnvelope")
    for path in ("/v1/models", "/healthz", "/readyz", "/v1/sidecar/budgets", "/openapi.json"):
        assert "get" in doc["paths"][path]
    assert "options" not in doc["paths"]["/v1/models"]
    chat = bodies["/v1/chat/completions"]["properties"]
    assert set(chat) >= {"model", "messages", "max_tokens", "seed", "stream", "tools"}
    # The document states the limits the sidecar enforces: one past them gets 400.
    limit = chat["max_tokens"]["anyOf"][0]["maximum"]
    err = _error(_post(sidecar, _chat(max_tokens=limit + 1)), 400)
    assert err["param"] == "max_tokens"
    assert fp.requests() == []


def test_openapi_document_needs_a_key_when_models_do(fake: FakeProvider,
                                                     tmp_path: Path) -> None:
    sc = SidecarProcess(f"""
        [server]
        api_keys = ["sk-client"]
        [[providers]]
        name = "p"
        type = "openai"
        base_url = "{fake.openai_base_url}"
    """, tmp_path)
    try:
        assert httpx.get(sc.url + "/openapi.json", timeout=10).status_code == 401
        assert httpx.get(sc.base_url + "/models", timeout=10).status_code == 401
        doc = httpx.get(sc.url + "/openapi.json", timeout=10,
                        headers={"authorization": "Bearer sk-client"}).json()
        assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert doc["paths"]["/v1/chat/completions"]["post"]["security"] == [{"bearer": []}]
        assert "security" not in doc["paths"]["/healthz"]["get"]
    finally:
        sc.stop()
