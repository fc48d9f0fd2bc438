"""A canary scan of every sink: configure distinctive secrets (provider keys, a provider
header value, client keys, credentials inside a ``base_url``, a Redis password), drive
traffic that makes errors happen against an upstream that echoes every header it receives
(stream and non-stream, OpenAI and Anthropic types, completions, embeddings, gRPC), then
look for the secrets in everything that leaves the process: response bodies and headers,
SSE frames, gRPC details and metadata, the sidecar's stdout/stderr, the status endpoints,
``sidecar check`` and the ledger's files. None may appear anywhere (issue 11)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from sidecar.grpc.v1 import sidecar_pb2 as pb
from sidecar.grpc.v1 import sidecar_pb2_grpc
from tests.support.fake_provider import FakeProvider, ok
from tests.support.faults import follow_output
from tests.support.process import SidecarProcess, closed_port, run_cli

PROVIDER_KEY = "sk-canary-PROVKEY-1f9e7d"
ANTHROPIC_KEY = "sk-ant-canary-ANTKEY-2c8b0a"
HEADER_VALUE = "canary-HDRVAL-3a7c51"
CLIENT_KEY = "sk-canary-CLIENT-4d6e22"
NAMED_KEY = "sk-canary-NAMED-5e5f33"
URL_USER = "canaryUSER6b4a"
URL_PASS = "canaryPASS7c3b"
REDIS_PASSWORD = "canaryREDIS8d2c"


def forms(secret: str) -> list[str]:
    """How a secret may leak: as itself, or its distinctive core without a ``sk-`` style
    prefix (a truncation that keeps most of it is a leak too)."""
    core = secret.split("-", 2)[-1] if secret.startswith("sk-") else secret
    return [secret, core]


CANARIES: dict[str, list[str]] = {
    "provider api_key": forms(PROVIDER_KEY),
    "anthropic api_key": forms(ANTHROPIC_KEY),
    "provider header value": forms(HEADER_VALUE),
    "client key (api_keys)": forms(CLIENT_KEY),
    "client key ([[keys]])": forms(NAMED_KEY),
    "base_url user": [URL_USER],
    "base_url password": [URL_PASS],
    "base_url credentials as Basic auth": [
        base64.b64encode(f"{URL_USER}:{URL_PASS}".encode()).decode()],
    "redis password": [REDIS_PASSWORD],
}


def scan(sinks: dict[str, bytes]) -> dict[str, list[str]]:
    """For each secret found anywhere: the sinks it is in, the first with some context."""
    found: dict[str, list[str]] = {}
    for sink, data in sinks.items():
        text = data.decode("utf-8", "replace")
        for secret, variants in CANARIES.items():
            for v in variants:
                at = text.find(v)
                if at >= 0:
                    where = found.setdefault(secret, [])
                    where.append(sink if where else
                                 f"{sink}: ...{text[max(0, at - 100):at + 40]!r}")
                    break
    return found


def assert_no_leaks(sinks: dict[str, bytes]) -> None:
    leaks = scan(sinks)
    assert not leaks, f"secrets found in {sum(map(len, leaks.values()))} sinks:\n" + "\n".join(
        f"* {secret} ({len(where)} sinks): " + "\n    ".join(where)
        for secret, where in leaks.items())


# --- an upstream that echoes the credentials it received ------------------------------------


class EchoUpstream:
    """A tiny HTTP/1.1 upstream on loopback that answers every API request with an error
    whose message is the request's whole head (so every credential the sidecar sent is in
    it), the way a misconfigured proxy or a chatty provider might:

    * model containing ``401``: 401; otherwise 500 (OpenAI or Anthropic error envelope by
      path);
    * ``"stream": true`` with a model containing ``midstream``: 200, one content delta,
      then the echo as an in-stream error event."""

    def __init__(self) -> None:
        self.port = 0
        self.seen = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-upstream", daemon=True)

    def __enter__(self) -> EchoUpstream:
        self._thread.start()
        assert self._ready.wait(10), "echo upstream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                self.seen += 1
                writer.write(self._answer(head, body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _answer(head: bytes, body: bytes) -> bytes:
        path = head.split(b" ", 2)[1].decode("latin-1")
        try:
            req = json.loads(body) if body else {}
        except ValueError:
            req = {}
        model = str(req.get("model", "")) if isinstance(req, dict) else ""
        stream = isinstance(req, dict) and req.get("stream") is True
        echo = "upstream saw: " + head.decode("latin-1")
        anthropic = path.endswith("/messages")
        if anthropic:
            err: dict[str, Any] = {"type": "error",
                                   "error": {"type": "api_error", "message": echo}}
        else:
            err = {"error": {"message": echo, "type": "server_error", "code": None,
                             "param": None}}
        if stream and "midstream" in model:
            if anthropic:
                frames = [
                    "event: message_start\ndata: " + json.dumps({"type": "message_start",
                        "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                    "model": model, "content": [], "stop_reason": None,
                                    "stop_sequence": None,
                                    "usage": {"input_tokens": 1, "output_tokens": 1}}}),
                    "event: error\ndata: " + json.dumps(err),
                ]
            else:
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                         "model": model, "choices": [{"index": 0, "delta": {
                             "role": "assistant", "content": "hi"}, "finish_reason": None}]}
                frames = ["data: " + json.dumps(chunk), "data: " + json.dumps(err)]
            payload = "".join(f + "\n\n" for f in frames).encode()
            return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"content-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        code = 401 if "401" in model else 500
        payload = json.dumps(err).encode()
        reason = b"Unauthorized" if code == 401 else b"Internal Server Error"
        return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n" % (code, reason, len(payload)) + payload)


# --- the scan -------------------------------------------------------------------------------


def _config(echo: EchoUpstream, fake: FakeProvider, ledger: Path) -> str:
    echo_url = f"http://127.0.0.1:{echo.port}"
    return f"""
        [server]
        api_keys = ["{CLIENT_KEY}"]
        access_log = true
        request_timeout_s = 20

        [routing]
        retries = 0
        circuit_failures = 1000000

        [[keys]]
        name = "named"
        key = "{NAMED_KEY}"

        [[providers]]
        name = "echo"
        type = "openai"
        base_url = "{echo_url}/v1"
        api_key = "{PROVIDER_KEY}"
        headers = {{ "x-canary" = "{HEADER_VALUE}" }}
        timeout_s = 5
        free = true  # no price needed under the budget

        [[providers]]
        name = "userinfo"
        type = "openai"
        base_url = "http://{URL_USER}:{URL_PASS}@127.0.0.1:{echo.port}/v1"
        timeout_s = 5
        free = true  # no price needed under the budget

        [[providers]]
        name = "claude"
        type = "anthropic"
        base_url = "{echo_url}"
        api_key = "{ANTHROPIC_KEY}"
        timeout_s = 5
        free = true  # no price needed under the budget

        [[providers]]
        name = "good"
        type = "openai"
        base_url = "{fake.openai_base_url}"
        api_key = "{PROVIDER_KEY}"

        [[routes]]
        model = "e500"
        targets = [{{ provider = "echo", model = "m500" }}]

        [[routes]]
        model = "e401"
        targets = [{{ provider = "echo", model = "m401" }}]

        [[routes]]
        model = "all-fail"
        targets = [{{ provider = "echo", model = "a500" }},
                   {{ provider = "userinfo", model = "b500" }},
                   {{ provider = "claude", model = "c500" }}]

        [[routes]]
        model = "fail-then-ok"
        targets = [{{ provider = "echo", model = "x500" }}, {{ provider = "good", model = "fine" }}]

        [[routes]]
        model = "midstream"
        targets = [{{ provider = "echo", model = "midstream" }}]

        [[routes]]
        model = "claude-midstream"
        targets = [{{ provider = "claude", model = "midstream" }}]

        [[routes]]
        model = "claude500"
        targets = [{{ provider = "claude", model = "k500" }}]

        [[routes]]
        model = "userinfo500"
        targets = [{{ provider = "userinfo", model = "u500" }}]

        [prices]
        "good/fine" = {{ input = 100.0, output = 1000.0 }}

        [[budgets]]
        name = "all"
        limit_usd = 100.0
        window = "total"

        [state]
        path = "{ledger}"
    """


def _record(sinks: dict[str, bytes], name: str, r: httpx.Response) -> None:
    head = "".join(f"{k}: {v}\n" for k, v in r.headers.multi_items())
    sinks[f"{name} [{r.status_code}]"] = head.encode() + b"\n" + r.content


@pytest.fixture
def echo() -> Iterator[EchoUpstream]:
    with EchoUpstream() as e:
        yield e


def test_no_configured_secret_leaves_the_process(
    tmp_path: Path, echo: EchoUpstream, fake: FakeProvider
) -> None:
    ledger_dir = tmp_path / "state"
    config = _config(echo, fake, ledger_dir / "ledger.sqlite3")
    grpc_port = closed_port()
    sc = SidecarProcess(config, tmp_path, args=("--grpc-port", str(grpc_port)))
    follow_output(sc)
    sinks: dict[str, bytes] = {}
    fake.set_default("fine", ok(prompt_tokens=3, completion_tokens=2))
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    try:
        with httpx.Client(base_url=sc.url, headers=auth, timeout=30) as http:
            hi = [{"role": "user", "content": "hi"}]
            for model in ("e500", "e401", "all-fail", "fail-then-ok", "midstream",
                          "claude-midstream", "claude500", "userinfo500", "echo/direct500",
                          "claude/direct401"):
                for stream in (False, True):
                    body = {"model": model, "messages": hi, "stream": stream, "max_tokens": 5}
                    _record(sinks, f"chat {model} stream={stream}",
                            http.post("/v1/chat/completions", json=body))
                _record(sinks, f"completion {model}", http.post(
                    "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 5}))
                _record(sinks, f"completion {model} stream", http.post(
                    "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 5,
                                             "stream": True}))
                _record(sinks, f"embeddings {model}", http.post(
                    "/v1/embeddings", json={"model": model, "input": ["a", "b"]}))
            named = {"authorization": f"Bearer {NAMED_KEY}"}
            _record(sinks, "chat with the named key", http.post(
                "/v1/chat/completions", headers=named,
                json={"model": "all-fail", "messages": hi}))
            _record(sinks, "chat with a wrong key", http.post(
                "/v1/chat/completions", headers={"authorization": "Bearer wrong"},
                json={"model": "e500", "messages": hi}))
            for path in ("/v1/sidecar/status", "/readyz", "/healthz", "/v1/sidecar/budgets",
                         "/metrics", "/v1/models", "/openapi.json"):
                _record(sinks, f"GET {path}", http.get(path))
                _record(sinks, f"GET {path} (named key)", http.get(path, headers=named))
        assert echo.seen > 0, f"nothing reached the echoing upstream: {list(sinks.items())[:3]}"
        assert sinks["chat fail-then-ok stream=False [200]"]  # the good target served
        sinks.update(_grpc_sinks(f"127.0.0.1:{grpc_port}"))
        check = run_cli("check", "--config", str(sc.config_path))
        sinks["sidecar check"] = (check.stdout + check.stderr).encode()
    finally:
        sc.stop(signal.SIGTERM)
    sinks["sidecar stdout+stderr"] = "".join(sc.output).encode()
    ledger_files = sorted(p for p in ledger_dir.rglob("*") if p.is_file())
    assert ledger_files, "no ledger file was written"
    for p in ledger_files:
        sinks[f"ledger file {p.name}"] = p.read_bytes()
    assert_no_leaks(sinks)


def _grpc_sinks(address: str) -> dict[str, bytes]:
    sinks: dict[str, bytes] = {}
    meta = (("authorization", f"Bearer {CLIENT_KEY}"),)
    hi = [pb.Message(role=pb.ROLE_USER, content="hi")]
    with grpc.insecure_channel(address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        calls: list[tuple[str, Any]] = []
        for model in ("e500", "all-fail", "claude500", "userinfo500", "e401"):
            calls.append((f"grpc Chat {model}",
                          lambda m=model: stub.Chat(pb.ChatRequest(model=m, messages=hi),
                                                    metadata=meta, timeout=30)))
            calls.append((f"grpc Embed {model}",
                          lambda m=model: stub.Embed(pb.EmbedRequest(model=m, input=["a"]),
                                                     metadata=meta, timeout=30)))
        for model in ("midstream", "claude-midstream", "all-fail"):
            calls.append((f"grpc ChatStream {model}", lambda m=model: list(stub.ChatStream(
                pb.ChatRequest(model=m, messages=hi), metadata=meta, timeout=30))))
        for name, call in calls:
            try:
                result = call()
                sinks[name] = str(result).encode()
            except grpc.RpcError as e:
                parts = [str(e.code()), e.details() or "", str(e.trailing_metadata()),
                         str(e.initial_metadata()) if hasattr(e, "initial_metadata") else "",
                         e.debug_error_string() if hasattr(e, "debug_error_string") else ""]
                for k, v in e.trailing_metadata() or ():
                    parts.append(f"{k}={v!r}")
                sinks[name] = "\n".join(parts).encode()
    assert any(b"StatusCode" in v for v in sinks.values())
    return sinks


def test_redis_password_never_leaves_the_process(tmp_path: Path, fake: FakeProvider) -> None:
    from tests.support.redis_server import RedisServer, redis_server_binary

    redis_server_binary()  # skips without redis-server
    with RedisServer(password=REDIS_PASSWORD) as redis_srv, contextlib.ExitStack() as stack:
        config = f"""
            [server]
            api_keys = ["{CLIENT_KEY}"]
            access_log = true
            [routing]
            retries = 0
            [[providers]]
            name = "good"
            type = "openai"
            base_url = "{fake.openai_base_url}"
            [[routes]]
            model = "paid"
            targets = [{{ provider = "good", model = "fine" }}]
            [prices]
            "good/fine" = {{ input = 100.0, output = 1000.0 }}
            [[budgets]]
            name = "all"
            limit_usd = 100.0
            window = "total"
            [[keys]]
            name = "named"
            key = "{NAMED_KEY}"
            rpm = 6000
            [state]
            backend = "redis"
            redis_url = "{redis_srv.url}"
        """
        sc = SidecarProcess(config, tmp_path)
        stack.callback(sc.stop)
        follow_output(sc)
        fake.set_default("fine", ok(prompt_tokens=3, completion_tokens=2))
        sinks: dict[str, bytes] = {}
        auth = {"authorization": f"Bearer {CLIENT_KEY}"}
        body = {"model": "paid", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 5}
        with httpx.Client(base_url=sc.url, headers=auth, timeout=30) as http:
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            _record(sinks, "chat (redis up)", r)
            redis_srv.stop(kill=True)  # the budget store is gone: paid calls fail closed
            for stream in (False, True):
                _record(sinks, f"chat (redis down) stream={stream}",
                        http.post("/v1/chat/completions", json={**body, "stream": stream}))
            _record(sinks, "chat (redis down, named key)", http.post(
                "/v1/chat/completions", json=body,
                headers={"authorization": f"Bearer {NAMED_KEY}"}))
            for path in ("/v1/sidecar/status", "/readyz", "/v1/sidecar/budgets", "/metrics"):
                _record(sinks, f"GET {path} (redis down)", http.get(path))
        assert any("[503]" in k for k in sinks), list(sinks)
        check = run_cli("check", "--config", str(sc.config_path))
        sinks["sidecar check"] = (check.stdout + check.stderr).encode()
        sc.stop()
        sinks["sidecar stdout+stderr"] = "".join(sc.output).encode()
    assert_no_leaks(sinks)
