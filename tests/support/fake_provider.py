"""A scripted fake LLM provider: a real HTTP/1.1 server on loopback.

It speaks enough of the OpenAI and Anthropic wire formats for the official SDKs to parse
its answers, and every request can be scripted to misbehave (error statuses, hangs, slow
drips, TCP resets, garbage, disconnects, redirects, JSON of the wrong shape, impossible
usage). It is built on plain ``asyncio.start_server``
with its own tiny HTTP parser so that faults are exact at the byte and socket level.

Endpoints (API):
    POST /v1/chat/completions     OpenAI chat (JSON, or SSE with ``stream: true``)
    POST /v1/completions          OpenAI text completion (JSON or SSE)
    POST /v1/embeddings           OpenAI embeddings (float or base64 encoding)
    GET  /v1/models[/{id}]        OpenAI model list (Anthropic shape if ``anthropic-version``)
    POST /v1/messages             Anthropic Messages (JSON, or SSE with ``stream: true``)
    POST /v1/messages/count_tokens

Endpoints (control, never recorded as API requests):
    POST /_control/script   {"model": str, "behaviours": [behaviour, ...]}  append to queue
    POST /_control/default  {"model": str, "behaviour": behaviour | null}    set/clear default
    POST /_control/reset    clear queues, defaults, recorded requests and counters
    GET  /_control/requests recorded API requests in arrival order
    GET  /_control/stats    counters (see ``FakeProvider.stats``)
    GET  /_control/wait?requests=N&cancelled=M&timeout=S   long-poll until the counters
                            reach the given values (200 + stats) or time out (408 + stats)
    GET  /_control/health   {"ok": true}

Behaviour selection for an API request with a ``model``: the model's queue, then the ``"*"``
queue, then the model's default, then the ``"*"`` default, then ``Ok()``.

Usage from tests::

    with FakeProvider() as fp:
        fp.script("gpt-x", status(429, retry_after="1"), ok(text="hi", chunks=2))
        client = openai.OpenAI(base_url=fp.openai_base_url, api_key="k")

CLI (benchmarks): ``python -m tests.support.fake_provider --port 9000 [--host 127.0.0.1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import http
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal, TypeAlias
from urllib.parse import parse_qs

import msgspec

__all__ = [
    "Behaviour",
    "Disconnect",
    "Echo",
    "FakeProvider",
    "Garbage",
    "Hang",
    "Ok",
    "Redirect",
    "Reset",
    "SlowDrip",
    "Status",
    "StreamError",
    "WrongShape",
    "disconnect",
    "echo",
    "garbage",
    "hang",
    "ok",
    "redirect",
    "reset",
    "slow_drip",
    "status",
    "stream_error",
    "wrong_shape",
]

# --------------------------------------------------------------------------------------
# Behaviours
# --------------------------------------------------------------------------------------

_Count = Annotated[int, msgspec.Meta(ge=0, le=100_000)]
_Chunks = Annotated[int, msgspec.Meta(ge=1, le=100_000)]
_Seconds = Annotated[float, msgspec.Meta(ge=0, le=3600)]
_Tokens = Annotated[int, msgspec.Meta(ge=-(2**62), le=2**62)]
"""Reported usage: negative or absurd values test how the gateway treats a lying upstream."""


class _BehaviourBase(
    msgspec.Struct, tag_field="kind", kw_only=True, frozen=True, forbid_unknown_fields=True
):
    pass


class Ok(_BehaviourBase, tag="ok"):
    """Answer normally.

    ``text`` defaults to ``"Hello from fake/<model>"``; streams carry it in (at most)
    ``chunks`` content deltas. ``delay_s`` waits before the status line;
    ``chunk_interval_s`` waits before each content delta of a stream. With ``tool_call`` and
    a request that has ``tools``, answer with a call of ``tool_name`` (default: the first
    tool of the request) with ``tool_arguments`` (default ``{"query": "fake"}``). With
    ``logprob`` and a chat request that has ``logprobs: true``, each piece of the text (a
    stream's content delta, or the whole text of a non-stream answer as one entry) carries
    that log-probability in ``logprobs.content``; without it ``logprobs`` is null.
    """

    text: str | None = None
    chunks: _Chunks = 5
    delay_s: _Seconds = 0.0
    chunk_interval_s: _Seconds = 0.0
    tool_call: bool = False
    tool_name: str | None = None
    tool_arguments: dict[str, Any] | None = None
    prompt_tokens: _Tokens | None = None
    completion_tokens: _Tokens | None = None
    logprob: Annotated[float, msgspec.Meta(le=0)] | None = None


class Status(_BehaviourBase, tag="status"):
    """Answer with HTTP ``status``; the body defaults to the API's error envelope."""

    status: Annotated[int, msgspec.Meta(ge=100, le=999)]
    body: str | dict[str, Any] | None = None
    retry_after: str | None = None
    headers: dict[str, str] = {}
    message: str | None = None
    delay_s: _Seconds = 0.0


class Hang(_BehaviourBase, tag="hang"):
    """Read the request and never answer (until the client closes or the server stops).

    For streams, ``after_chunks`` (if not None) first sends the headers, the stream's
    preamble and that many content deltas, then hangs.
    """

    after_chunks: _Count | None = None


class SlowDrip(_BehaviourBase, tag="slow_drip"):
    """Send the answer in ``chunks`` pieces with ``interval_s`` before each one after the
    first (non-stream: pieces of the JSON body; stream: content deltas, the interval also
    precedes the first delta)."""

    interval_s: _Seconds = 0.1
    chunks: _Chunks = 10
    text: str | None = None


class Reset(_BehaviourBase, tag="reset"):
    """Abort the TCP connection with RST (SO_LINGER 0).

    Streams: first send the headers, the preamble and ``after_chunks`` content deltas
    (``after_chunks=None``: abort before the status line). Non-stream: abort before any
    response byte.
    """

    after_chunks: _Count | None = 0


class Garbage(_BehaviourBase, tag="garbage"):
    """200 with a body that is not JSON; for streams, ``data: not-json`` SSE frames."""

    body: str = "<html>oops</html>"
    content_type: str = "text/html; charset=utf-8"


class Disconnect(_BehaviourBase, tag="disconnect"):
    """Close the connection (FIN) without sending anything."""


class StreamError(_BehaviourBase, tag="stream_error"):
    """Streams: 200, the preamble and ``after_chunks`` deltas, then an in-stream error event
    (OpenAI ``data: {"error": ...}``, Anthropic ``event: error``) and the end of the body.
    Non-stream: like ``Status(status)``."""

    after_chunks: _Count = 1
    status: Annotated[int, msgspec.Meta(ge=100, le=999)] = 500
    message: str | None = None


class Redirect(_BehaviourBase, tag="redirect"):
    """Answer ``status`` (a 3xx) with ``Location: location`` and a small JSON body, for
    streams too: a client that follows it calls ``location`` (which tests point at another
    loopback server, to see that nothing follows)."""

    location: str
    status: Annotated[int, msgspec.Meta(ge=300, le=399)] = 302


class WrongShape(_BehaviourBase, tag="wrong_shape"):
    """200 with a body that is valid JSON of the wrong shape (``body``, any JSON value);
    streams: ``data: <body>`` SSE frames, then (OpenAI dialect) ``data: [DONE]``."""

    body: Any = msgspec.field(default_factory=lambda: {"unexpected": "shape"})
    frames: _Chunks = 2


# --- Echo: a leaky upstream that echoes the credentials it received ----------------------


class Echo(_BehaviourBase, tag="echo"):
    """Echo what the request carried (its ``authorization`` and ``x-api-key`` headers and
    all its headers, see :func:`echo_text`) back, as a leaky upstream or proxy would.

    ``where="error"``: HTTP ``status`` with the echo as the error message (stream or not);
    ``"ok"``: a normal 200 answer whose text is the echo (a stream sends it in one delta),
    and whose non-stream JSON body also has it under ``"echo"`` (embeddings carry no text);
    ``"stream_error"``: a stream sends the preamble, one delta, then an error event whose
    message is the echo (non-stream: like ``"error"``)."""

    where: Literal["error", "ok", "stream_error"] = "error"
    status: Annotated[int, msgspec.Meta(ge=100, le=999)] = 500


def echo(where: Literal["error", "ok", "stream_error"] = "error", *, code: int = 500) -> Echo:
    return Echo(where=where, status=code)


def echo_text(headers: dict[str, str]) -> str:
    """What :class:`Echo` sends back for a request with ``headers``."""
    return (f"echo: authorization={headers.get('authorization')!r} "
            f"x-api-key={headers.get('x-api-key')!r} headers={_encode(headers).decode()}")


def _echoed(b: Echo, headers: dict[str, str]) -> Behaviour:
    """The behaviour that renders :class:`Echo` ``b`` for a request with ``headers``."""
    text = echo_text(headers)
    if b.where == "ok":
        return Ok(text=text, chunks=1)
    if b.where == "stream_error":
        return StreamError(after_chunks=1, status=b.status, message=text)
    return Status(status=b.status, message=text)


def _with_echo(body: bytes, headers: dict[str, str]) -> bytes:
    """A JSON answer ``body`` with the echo under ``"echo"``."""
    obj = _decode(body)
    return _encode({**obj, "echo": echo_text(headers)}) if isinstance(obj, dict) else body


# --- end of Echo ------------------------------------------------------------------------


Behaviour: TypeAlias = (
    Ok | Status | Hang | SlowDrip | Reset | Garbage | Disconnect | StreamError | Echo
    | Redirect | WrongShape
)


def ok(
    text: str | None = None,
    *,
    chunks: int = 5,
    delay_s: float = 0.0,
    chunk_interval_s: float = 0.0,
    tool_call: bool = False,
    tool_name: str | None = None,
    tool_arguments: dict[str, Any] | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    logprob: float | None = None,
) -> Ok:
    return Ok(
        logprob=logprob,
        text=text,
        chunks=chunks,
        delay_s=delay_s,
        chunk_interval_s=chunk_interval_s,
        tool_call=tool_call,
        tool_name=tool_name,
        tool_arguments=tool_arguments,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


def status(
    code: int,
    *,
    body: str | dict[str, Any] | None = None,
    retry_after: str | None = None,
    headers: dict[str, str] | None = None,
    message: str | None = None,
    delay_s: float = 0.0,
) -> Status:
    return Status(
        status=code,
        body=body,
        retry_after=retry_after,
        headers=dict(headers or {}),
        message=message,
        delay_s=delay_s,
    )


def hang(*, after_chunks: int | None = None) -> Hang:
    return Hang(after_chunks=after_chunks)


def slow_drip(*, interval_s: float = 0.1, chunks: int = 10, text: str | None = None) -> SlowDrip:
    return SlowDrip(interval_s=interval_s, chunks=chunks, text=text)


def reset(*, after_chunks: int | None = 0) -> Reset:
    return Reset(after_chunks=after_chunks)


def garbage(
    *, body: str = "<html>oops</html>", content_type: str = "text/html; charset=utf-8"
) -> Garbage:
    return Garbage(body=body, content_type=content_type)


def disconnect() -> Disconnect:
    return Disconnect()


def stream_error(
    *, after_chunks: int = 1, code: int = 500, message: str | None = None
) -> StreamError:
    return StreamError(after_chunks=after_chunks, status=code, message=message)


def redirect(location: str, *, code: int = 302) -> Redirect:
    return Redirect(location=location, status=code)


def wrong_shape(body: Any = None, *, frames: int = 2) -> WrongShape:
    return WrongShape(body={"unexpected": "shape"} if body is None else body, frames=frames)


_BEHAVIOUR_TYPES: Final = (
    Ok, Status, Hang, SlowDrip, Reset, Garbage, Disconnect, StreamError, Echo, Redirect,
    WrongShape
)


def _as_behaviour(b: Behaviour | dict[str, Any]) -> Behaviour:
    if isinstance(b, _BEHAVIOUR_TYPES):
        return b
    if isinstance(b, dict):
        return msgspec.convert(b, Behaviour)  # type: ignore[arg-type]
    raise TypeError(f"not a behaviour: {b!r}")


# --------------------------------------------------------------------------------------
# Shared state (thread-safe: the server loop and test threads both touch it)
# --------------------------------------------------------------------------------------

_OK_DEFAULT: Final = Ok()


class _Record:
    __slots__ = ("data", "done", "gen")

    def __init__(self, data: dict[str, Any], gen: int) -> None:
        self.data = data
        self.gen = gen
        self.done = False


class _State:
    def __init__(self, record_limit: int) -> None:
        self.cond = threading.Condition()
        self.on_change: Callable[[], None] | None = None
        self.queues: dict[str, deque[Behaviour]] = {}
        self.defaults: dict[str, Behaviour] = {}
        self.records: deque[_Record] = deque(maxlen=record_limit)
        self.gen = 0
        self.total = 0
        self.completed = 0
        self.cancelled = 0
        self.in_flight = 0
        self.connections_open = 0
        self.connections_total = 0
        self.by_kind: Counter[str] = Counter()
        self.by_path: Counter[str] = Counter()
        self.by_outcome: Counter[str] = Counter()

    def _changed(self) -> None:
        # Called with self.cond held.
        self.cond.notify_all()
        cb = self.on_change
        if cb is not None:
            cb()

    # scripting
    def script(self, model: str, behaviours: list[Behaviour]) -> int:
        with self.cond:
            q = self.queues.setdefault(model, deque())
            q.extend(behaviours)
            return len(q)

    def set_default(self, model: str, behaviour: Behaviour | None) -> None:
        with self.cond:
            if behaviour is None:
                self.defaults.pop(model, None)
            else:
                self.defaults[model] = behaviour

    def reset(self) -> None:
        with self.cond:
            self.queues.clear()
            self.defaults.clear()
            self.records.clear()
            self.gen += 1
            self.total = self.completed = self.cancelled = 0
            self.by_kind.clear()
            self.by_path.clear()
            self.by_outcome.clear()
            self._changed()

    def next_behaviour(self, model: str) -> Behaviour:
        with self.cond:
            for key in (model, "*"):
                q = self.queues.get(key)
                if q:
                    return q.popleft()
            b = self.defaults.get(model) or self.defaults.get("*")
            return b if b is not None else _OK_DEFAULT

    # recording
    def record(self, data: dict[str, Any]) -> _Record:
        with self.cond:
            rec = _Record(data, self.gen)
            self.records.append(rec)
            self.total += 1
            self.in_flight += 1
            self.by_kind[data["behaviour"]] += 1
            self.by_path[data["path"]] += 1
            self._changed()
            return rec

    def finish(self, rec: _Record, outcome: str) -> None:
        with self.cond:
            if rec.done:
                return
            rec.done = True
            self.in_flight -= 1
            if rec.gen == self.gen:
                rec.data["outcome"] = outcome
                self.by_outcome[outcome] += 1
                if outcome == "completed":
                    self.completed += 1
                elif outcome == "cancelled":
                    self.cancelled += 1
            self._changed()

    def connection(self, delta: int) -> None:
        with self.cond:
            self.connections_open += delta
            if delta > 0:
                self.connections_total += delta
            self._changed()

    # reading
    def requests(self) -> list[dict[str, Any]]:
        with self.cond:
            return [dict(r.data) for r in self.records]

    def stats(self) -> dict[str, Any]:
        with self.cond:
            return self._stats_locked()

    def _stats_locked(self) -> dict[str, Any]:
        return {
            "requests": self.total,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "in_flight": self.in_flight,
            "connections_open": self.connections_open,
            "connections_total": self.connections_total,
            "by_kind": dict(self.by_kind),
            "by_path": dict(self.by_path),
            "by_outcome": dict(self.by_outcome),
            "queued": {m: len(q) for m, q in self.queues.items() if q},
        }

    def wait_until(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        with self.cond:
            ok_ = self.cond.wait_for(lambda: pred(self._stats_locked()), timeout)
            snapshot = self._stats_locked()
        if not ok_:
            raise TimeoutError(f"fake provider: condition not met within {timeout}s: {snapshot}")
        return snapshot


# --------------------------------------------------------------------------------------
# Wire formats
# --------------------------------------------------------------------------------------

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

_JSON: Final = "application/json"
_SSE: Final = "text/event-stream; charset=utf-8"
_FINGERPRINT: Final = "fp_fake"
_DONE: Final = b"data: [DONE]\n\n"
_TEXT_KEYS: Final = frozenset({"messages", "content", "text", "system", "prompt", "input"})


def _rid() -> str:
    return os.urandom(12).hex()


def _words(obj: Any) -> int:
    if isinstance(obj, str):
        return len(obj.split())
    if isinstance(obj, list):
        return sum(_words(x) for x in obj)
    if isinstance(obj, dict):
        return sum(_words(v) for k, v in obj.items() if k in _TEXT_KEYS)
    if isinstance(obj, int) and not isinstance(obj, bool):
        return 1  # a token id
    return 0


def _split(text: str, n: int) -> list[str]:
    n = max(1, min(n, len(text)))
    if n == 1:
        return [text]
    q, r = divmod(len(text), n)
    out: list[str] = []
    i = 0
    for k in range(n):
        step = q + (1 if k < r else 0)
        out.append(text[i : i + step])
        i += step
    return out


def _sse(obj: Any) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def _event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(obj) + b"\n\n"


class _Params:
    """What an answer should contain (derived from the behaviour)."""

    __slots__ = (
        "chunks",
        "completion_tokens",
        "logprob",
        "prompt_tokens",
        "text",
        "tool_args",
        "tool_call",
        "tool_name",
    )

    def __init__(self, b: Behaviour, model: str, body: dict[str, Any]) -> None:
        self.tool_call = False
        self.tool_name: str | None = None
        self.tool_args: dict[str, Any] | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.logprob: float | None = None
        default_text = f"Hello from fake/{model}"
        text: str | None = None
        if isinstance(b, Ok):
            text, chunks = b.text, b.chunks
            self.tool_call = b.tool_call
            self.tool_name, self.tool_args = b.tool_name, b.tool_arguments
            self.prompt_tokens, self.completion_tokens = b.prompt_tokens, b.completion_tokens
            self.logprob = b.logprob
        elif isinstance(b, SlowDrip):
            text, chunks = b.text, b.chunks
            if text is None and len(default_text) < chunks:
                default_text += "." * (chunks - len(default_text))
        elif isinstance(b, Hang | Reset | StreamError) and b.after_chunks is not None:
            chunks = max(5, b.after_chunks + 1)
            if len(default_text) < chunks:
                default_text += "." * (chunks - len(default_text))
        else:
            chunks = 5
        self.text = default_text if text is None else text
        self.chunks = chunks
        if self.prompt_tokens is None:
            self.prompt_tokens = max(1, _words(body))


class _Plan:
    """A rendered answer: a JSON body, or SSE frames split in preamble/content/epilogue."""

    __slots__ = ("body", "content", "epilogue", "preamble")

    def __init__(
        self,
        body: bytes = b"",
        preamble: list[bytes] | None = None,
        content: list[bytes] | None = None,
        epilogue: list[bytes] | None = None,
    ) -> None:
        self.body = body
        self.preamble = preamble or []
        self.content = content or []
        self.epilogue = epilogue or []


_OPENAI_ERRORS: Final[dict[int, tuple[str, str | None]]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_denied", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _error_obj(dialect: str, code: int, message: str | None) -> dict[str, Any]:
    msg = message or f"fake provider: scripted {code} error"
    if dialect == "anthropic":
        etype = _ANTHROPIC_ERRORS.get(code) or (
            "invalid_request_error" if code < 500 else "api_error"
        )
        return {"type": "error", "error": {"type": etype, "message": msg}}
    etype, ecode = _OPENAI_ERRORS.get(code) or (
        ("invalid_request_error", None) if code < 500 else ("server_error", None)
    )
    return {"error": {"message": msg, "type": etype, "code": ecode, "param": None}}


def _tool_name(p: _Params, tools: Any, dialect: str) -> str | None:
    """The tool to call, or None when the answer should be text."""
    if not p.tool_call or not isinstance(tools, list) or not tools:
        return None
    if p.tool_name:
        return p.tool_name
    first = tools[0] if isinstance(tools[0], dict) else {}
    if dialect == "openai":
        fn = first.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
    else:
        name = first.get("name")
    return name if isinstance(name, str) and name else "tool"


def _plan_chat(model: str, body: dict[str, Any], p: _Params, stream: bool) -> _Plan:
    cid = "chatcmpl-" + _rid()
    created = int(time.time())
    tool = _tool_name(p, body.get("tools"), "openai")
    args = _encode(p.tool_args if p.tool_args is not None else {"query": "fake"}).decode()
    out_text = args if tool else p.text
    pt = p.prompt_tokens or 1
    ct = p.completion_tokens if p.completion_tokens is not None else max(1, _words(out_text))
    usage = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
    finish = "tool_calls" if tool else "stop"
    call_id = "call_" + _rid()
    logprob = p.logprob if body.get("logprobs") is True else None

    def logprobs(piece: str) -> dict[str, Any] | None:
        if logprob is None or not piece:
            return None
        entry = {"token": piece, "logprob": logprob, "bytes": list(piece.encode()),
                 "top_logprobs": []}
        return {"content": [entry], "refusal": None}
    if not stream:
        message: dict[str, Any]
        if tool:
            message = {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": tool, "arguments": args},
                    }
                ],
            }
        else:
            message = {"role": "assistant", "content": p.text, "refusal": None}
        return _Plan(
            body=_encode(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "system_fingerprint": _FINGERPRINT,
                    "choices": [
                        {
                            "index": 0,
                            "message": message,
                            "logprobs": logprobs(out_text),
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage,
                }
            )
        )
    so = body.get("stream_options")
    include_usage = isinstance(so, dict) and so.get("include_usage") is True
    # Chunks share everything but "choices": encode the head once.
    head: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": _FINGERPRINT,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None,
              piece: str = "") -> bytes:
        obj = dict(head)
        obj["choices"] = [
            {"index": 0, "delta": delta, "logprobs": logprobs(piece),
             "finish_reason": finish_reason}
        ]
        if include_usage:
            obj["usage"] = None
        return _sse(obj)

    if tool:
        first = chunk(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "index": 0,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": tool, "arguments": ""},
                    }
                ],
            }
        )
        content = [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]},
                  piece=piece)
            for piece in _split(args, p.chunks)
        ]
    else:
        first = chunk({"role": "assistant", "content": "", "refusal": None})
        content = [chunk({"content": piece}, piece=piece) for piece in _split(p.text, p.chunks)]
    epilogue = [chunk({}, finish)]
    if include_usage:
        epilogue.append(_sse({**head, "choices": [], "usage": usage}))
    epilogue.append(_DONE)
    return _Plan(preamble=[first], content=content, epilogue=epilogue)


def _plan_completion(model: str, body: dict[str, Any], p: _Params, stream: bool) -> _Plan:
    cid = "cmpl-" + _rid()
    created = int(time.time())
    pt = p.prompt_tokens or 1
    ct = p.completion_tokens if p.completion_tokens is not None else max(1, _words(p.text))
    usage = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
    head = {"id": cid, "object": "text_completion", "created": created, "model": model}
    if not stream:
        return _Plan(
            body=_encode(
                {
                    **head,
                    "system_fingerprint": _FINGERPRINT,
                    "choices": [
                        {"text": p.text, "index": 0, "logprobs": None, "finish_reason": "stop"}
                    ],
                    "usage": usage,
                }
            )
        )
    so = body.get("stream_options")
    include_usage = isinstance(so, dict) and so.get("include_usage") is True

    def chunk(text: str, finish_reason: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            **head,
            "choices": [
                {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            obj["usage"] = None
        return _sse(obj)

    content = [chunk(piece) for piece in _split(p.text, p.chunks)]
    epilogue = [chunk("", "stop")]
    if include_usage:
        epilogue.append(_sse({**head, "choices": [], "usage": usage}))
    epilogue.append(_DONE)
    return _Plan(content=content, epilogue=epilogue)


def _embedding(item: Any, dims: int) -> list[float]:
    digest = hashlib.shake_128(_encode(item)).digest(2 * dims)
    # Multiples of 2**-15 in [-1, 1): exact in float32, so base64 round-trips losslessly.
    return [
        (int.from_bytes(digest[2 * i : 2 * i + 2], "little") - 32768) / 32768.0 for i in range(dims)
    ]


def _plan_embeddings(model: str, body: dict[str, Any], p: _Params, stream: bool) -> _Plan:
    inp = body.get("input")
    items: list[Any]
    if isinstance(inp, str) or (
        isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp)
    ):
        items = [inp]
    elif isinstance(inp, list) and inp:
        items = inp
    else:
        raise _ApiError(400, "'input' must be a non-empty string or array")
    dims = body.get("dimensions")
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 4096:
        dims = 8
    b64 = body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(items):
        vec = _embedding(item, dims)
        emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    pt = p.prompt_tokens or 1
    return _Plan(
        body=_encode(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": pt, "total_tokens": pt},
            }
        )
    )


def _plan_messages(model: str, body: dict[str, Any], p: _Params, stream: bool) -> _Plan:
    mid = "msg_" + _rid()
    tool = _tool_name(p, body.get("tools"), "anthropic")
    tool_input = p.tool_args if p.tool_args is not None else {"query": "fake"}
    args = _encode(tool_input).decode()
    pt = p.prompt_tokens or 1
    ct = p.completion_tokens
    if ct is None:
        ct = max(1, _words(args if tool else p.text))
    stop_reason = "tool_use" if tool else "end_turn"
    tool_id = "toolu_" + _rid()
    if not stream:
        block: dict[str, Any]
        if tool:
            block = {"type": "tool_use", "id": tool_id, "name": tool, "input": tool_input}
        else:
            block = {"type": "text", "text": p.text}
        return _Plan(
            body=_encode(
                {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [block],
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": {"input_tokens": pt, "output_tokens": ct},
                }
            )
        )
    start = _event(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": pt, "output_tokens": 1},
            },
        },
    )
    if tool:
        block_start: dict[str, Any] = {"type": "tool_use", "id": tool_id, "name": tool, "input": {}}
        content = [
            _event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": piece},
                },
            )
            for piece in _split(args, p.chunks)
        ]
    else:
        block_start = {"type": "text", "text": ""}
        content = [
            _event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
            for piece in _split(p.text, p.chunks)
        ]
    preamble = [
        start,
        _event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block_start},
        ),
        _event("ping", {"type": "ping"}),
    ]
    epilogue = [
        _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": ct},
            },
        ),
        _event("message_stop", {"type": "message_stop"}),
    ]
    return _Plan(preamble=preamble, content=content, epilogue=epilogue)


class _Route:
    __slots__ = ("dialect", "method", "plan", "streamable")

    def __init__(
        self,
        method: str,
        dialect: Literal["openai", "anthropic"],
        plan: Callable[[str, dict[str, Any], _Params, bool], _Plan],
        streamable: bool,
    ) -> None:
        self.method = method
        self.dialect = dialect
        self.plan = plan
        self.streamable = streamable


_ROUTES: Final[dict[str, _Route]] = {
    "/v1/chat/completions": _Route("POST", "openai", _plan_chat, True),
    "/v1/completions": _Route("POST", "openai", _plan_completion, True),
    "/v1/embeddings": _Route("POST", "openai", _plan_embeddings, False),
    "/v1/messages": _Route("POST", "anthropic", _plan_messages, True),
}


class _ApiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------------------
# HTTP/1.1
# --------------------------------------------------------------------------------------

_MAX_HEAD: Final = 64 * 1024
_MAX_BODY: Final = 64 * 1024 * 1024
_READ_SIZE: Final = 256 * 1024


def _reason(code: int) -> str:
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return {529: "Site Overloaded"}.get(code, "Unknown")


class _HTTPError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "target")

    def __init__(
        self, method: str, target: str, headers: dict[str, str], body: bytes, keep_alive: bool
    ) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


class _ClientGone(Exception):
    pass


class _Conn:
    """One TCP connection: a read buffer shared by the request parser and the EOF watcher."""

    __slots__ = ("buf", "eof", "reader", "transport", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.buf = bytearray()
        self.eof = False

    async def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = await self.reader.read(_READ_SIZE)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def watch_eof(self) -> None:
        """Return when the peer closes the connection (keeps any pipelined bytes)."""
        while await self._fill():
            if len(self.buf) > _MAX_HEAD + _MAX_BODY:
                return  # flooding while we answer: treat like a close

    async def read_request(self) -> _Request | None:
        buf = self.buf
        while True:
            while buf[:2] == b"\r\n":  # tolerate stray CRLFs between requests
                del buf[:2]
            idx = buf.find(b"\r\n\r\n")
            if idx >= 0:
                break
            if len(buf) > _MAX_HEAD:
                raise _HTTPError(431, "request header too large")
            if not await self._fill():
                return None
        head = bytes(buf[:idx])
        del buf[: idx + 4]
        if len(head) > _MAX_HEAD:
            raise _HTTPError(431, "request header too large")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise _HTTPError(400, "bad request line")
        method = parts[0].decode("latin-1")
        target = parts[1].decode("latin-1")
        version = parts[2]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise _HTTPError(400, "bad header line")
            k = name.decode("latin-1").lower()
            v = value.strip().decode("latin-1")
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        conn_hdr = headers.get("connection", "").lower()
        http10 = version == b"HTTP/1.0"
        keep_alive = "keep-alive" in conn_hdr if http10 else "close" not in conn_hdr
        if "transfer-encoding" in headers:
            raise _HTTPError(501, "chunked request bodies are not supported")
        length = 0
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise _HTTPError(400, "bad content-length") from None
            if length < 0:
                raise _HTTPError(400, "bad content-length")
            if length > _MAX_BODY:
                raise _HTTPError(413, "request body too large")
        if length and len(buf) < length and "100-continue" in headers.get("expect", "").lower():
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(buf) < length:
            if not await self._fill():
                return None
        body = bytes(buf[:length])
        del buf[:length]
        return _Request(method, target, headers, body, keep_alive)

    # writing
    def head(
        self,
        code: int,
        content_type: str | None,
        *,
        length: int | None = None,
        keep_alive: bool = True,
        extra: dict[str, str] | None = None,
    ) -> bytes:
        hdrs: dict[str, str] = {"server": "fake-provider"}
        if content_type is not None:
            hdrs["content-type"] = content_type
        if length is None:
            hdrs["transfer-encoding"] = "chunked"
            if content_type == _SSE:
                hdrs["cache-control"] = "no-cache"
        else:
            hdrs["content-length"] = str(length)
        hdrs["connection"] = "keep-alive" if keep_alive else "close"
        if extra:
            for k, v in extra.items():
                hdrs[k.lower()] = v
        lines = [f"HTTP/1.1 {code} {_reason(code)}"]
        lines.extend(f"{k}: {v}" for k, v in hdrs.items())
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise _ClientGone
        self.writer.write(data)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            raise _ClientGone from None

    def abort_rst(self) -> None:
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def close(self) -> None:
        self.transport.close()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


_LAST_CHUNK: Final = b"0\r\n\r\n"


# --------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------


class _Server:
    def __init__(self, state: _State, host: str, port: int, models: tuple[str, ...]) -> None:
        self.state = state
        self.host = host
        self.port = port
        self.models = models
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._changed_ev: asyncio.Event | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._changed_ev = asyncio.Event()
        self.state.on_change = self._on_change
        self._server = await asyncio.start_server(
            self._on_client, self.host, self.port, backlog=1024, limit=_READ_SIZE
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.transport.abort()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        self.state.on_change = None

    # change notification for /_control/wait (the state lock is held here)
    def _on_change(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            self._bump()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._bump)

    def _bump(self) -> None:
        ev = self._changed_ev
        if ev is not None:
            self._changed_ev = asyncio.Event()
            ev.set()

    # connections
    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Conn(reader, writer)
        if self._stopping:
            conn.transport.abort()
            return
        self._conns.add(conn)
        self._tasks.add(task)
        self.state.connection(+1)
        try:
            while not self._stopping:
                try:
                    req = await conn.read_request()
                except _HTTPError as e:
                    body = _encode(_error_obj("openai", e.code, e.message))
                    conn.write(conn.head(e.code, _JSON, length=len(body), keep_alive=False) + body)
                    await conn.drain()
                    break
                if req is None:
                    break
                if not await self._dispatch(conn, req) or not req.keep_alive:
                    break
        except (_ClientGone, ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            conn.close()
            self._conns.discard(conn)
            self._tasks.discard(task)
            self.state.connection(-1)

    async def _dispatch(self, conn: _Conn, req: _Request) -> bool:
        """Answer one request; return whether the connection may be reused."""
        if req.path.startswith("/_control/"):
            code, obj = await self._control(req)
            body = _encode(obj)
            conn.write(conn.head(code, _JSON, length=len(body), keep_alive=req.keep_alive) + body)
            await conn.drain()
            return True
        route = _ROUTES.get(req.path)
        if route is None or route.method != req.method:
            return await self._simple(conn, req)
        return await self._api(conn, req, route)

    async def _simple(self, conn: _Conn, req: _Request) -> bool:
        """Unscripted endpoints: model listing, token counting, 404/405."""
        code = 200
        obj: Any
        anthropic = "anthropic-version" in req.headers or req.path.startswith("/v1/messages")
        known = self._known_models()
        if req.method == "GET" and req.path == "/v1/models":
            if anthropic:
                data = [
                    {
                        "type": "model",
                        "id": m,
                        "display_name": m,
                        "created_at": "2025-01-01T00:00:00Z",
                    }
                    for m in known
                ]
                obj = {
                    "data": data,
                    "has_more": False,
                    "first_id": known[0] if known else None,
                    "last_id": known[-1] if known else None,
                }
            else:
                obj = {
                    "object": "list",
                    "data": [
                        {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"}
                        for m in known
                    ],
                }
        elif req.method == "GET" and req.path.startswith("/v1/models/"):
            mid = req.path[len("/v1/models/") :]
            if anthropic:
                obj = {
                    "type": "model",
                    "id": mid,
                    "display_name": mid,
                    "created_at": "2025-01-01T00:00:00Z",
                }
            else:
                obj = {"id": mid, "object": "model", "created": 1700000000, "owned_by": "fake"}
        elif req.method == "POST" and req.path == "/v1/messages/count_tokens":
            try:
                body = _decode(req.body) if req.body else {}
            except msgspec.DecodeError:
                body = None
            if isinstance(body, dict):
                obj = {"input_tokens": max(1, _words(body))}
            else:
                code, obj = 400, _error_obj("anthropic", 400, "body must be a JSON object")
        else:
            known_path = req.path in _ROUTES or req.path == "/v1/models"
            code = 405 if known_path else 404
            obj = _error_obj(
                "anthropic" if anthropic else "openai",
                code,
                f"fake provider: no route for {req.method} {req.path}",
            )
        payload = _encode(obj)
        conn.write(conn.head(code, _JSON, length=len(payload), keep_alive=req.keep_alive) + payload)
        await conn.drain()
        return True

    def _known_models(self) -> list[str]:
        st = self.state
        with st.cond:
            names = set(self.models) | set(st.queues) | set(st.defaults)
        names.discard("*")
        return sorted(names)

    async def _api(self, conn: _Conn, req: _Request, route: _Route) -> bool:
        body: Any = None
        bad_json = False
        if req.body:
            try:
                body = _decode(req.body)
            except msgspec.DecodeError:
                bad_json = True
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            model = None
        behaviour = self.state.next_behaviour(model) if model else _OK_DEFAULT
        stream = route.streamable and isinstance(body, dict) and body.get("stream") is True
        rec = self.state.record(
            {
                "method": req.method,
                "path": req.path,
                "query": req.query,
                "headers": req.headers,
                "body": body,
                "model": model,
                "stream": stream,
                "behaviour": behaviour.__struct_config__.tag,
                "received_at": time.monotonic(),
                "outcome": None,
            }
        )
        respond = self._respond(conn, req, route, body, model, behaviour, stream, bad_json, rec)
        resp: asyncio.Task[tuple[bool, str]] = asyncio.ensure_future(respond)
        watch = asyncio.ensure_future(conn.watch_eof())
        outcome = "aborted"
        try:
            await asyncio.wait((resp, watch), return_when=asyncio.FIRST_COMPLETED)
            if resp.done():
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
                exc = resp.exception()
                if exc is None:
                    keep, outcome = resp.result()
                    return keep
                if isinstance(exc, _ClientGone | ConnectionError | OSError):
                    outcome = "cancelled"
                    return False
                outcome = "error"
                raise exc
            # The client closed the connection before the answer was complete.
            outcome = "cancelled"
            resp.cancel()
            with contextlib.suppress(asyncio.CancelledError, _ClientGone, ConnectionError, OSError):
                await resp
            return False
        finally:
            for t in (resp, watch):
                if not t.done():
                    t.cancel()
            self.state.finish(rec, outcome)

    async def _respond(
        self,
        conn: _Conn,
        req: _Request,
        route: _Route,
        body: Any,
        model: str | None,
        b: Behaviour,
        stream: bool,
        bad_json: bool,
        rec: _Record,
    ) -> tuple[bool, str]:
        # The outcome is recorded *before* the last byte goes out (or the connection is
        # closed/aborted), so a client never sees the end of an answer before its record.
        def fin(outcome: str) -> None:
            self.state.finish(rec, outcome)

        keep = req.keep_alive
        dialect = route.dialect
        rid = "req_" + _rid()
        id_headers = {"request-id" if dialect == "anthropic" else "x-request-id": rid}

        def error(code: int, message: str | None, extra: dict[str, str] | None = None) -> None:
            payload = _encode(_error_obj(dialect, code, message))
            hdrs = {**id_headers, **(extra or {})}
            conn.write(conn.head(code, _JSON, length=len(payload), keep_alive=keep, extra=hdrs))
            conn.write(payload)

        if bad_json or not isinstance(body, dict):
            fin("completed")
            error(400, "fake provider: request body must be a JSON object")
            await conn.drain()
            return keep, "completed"
        if model is None:
            fin("completed")
            error(400, "fake provider: 'model' is required")
            await conn.drain()
            return keep, "completed"

        echoed = isinstance(b, Echo) and b.where == "ok" and not stream
        if isinstance(b, Echo):
            b = _echoed(b, req.headers)
        if isinstance(b, Disconnect):
            fin("disconnected")
            conn.close()
            return False, "disconnected"
        if isinstance(b, Reset) and (not stream or b.after_chunks is None):
            fin("reset")
            conn.abort_rst()
            return False, "reset"
        if isinstance(b, Hang) and (not stream or b.after_chunks is None):
            await asyncio.get_running_loop().create_future()  # until cancelled
        if isinstance(b, Status | StreamError) and not (isinstance(b, StreamError) and stream):
            if isinstance(b, Status) and b.delay_s:
                await asyncio.sleep(b.delay_s)
            extra: dict[str, str] = {}
            if isinstance(b, Status):
                if b.retry_after is not None:
                    extra["retry-after"] = b.retry_after
                extra.update(b.headers)
                if b.body is not None:
                    payload = b.body.encode() if isinstance(b.body, str) else _encode(b.body)
                    hdrs = {**id_headers, **extra}
                    fin("completed")
                    conn.write(
                        conn.head(b.status, _JSON, length=len(payload), keep_alive=keep, extra=hdrs)
                        + payload
                    )
                    await conn.drain()
                    return keep, "completed"
            fin("completed")
            error(b.status, b.message, extra)
            await conn.drain()
            return keep, "completed"
        if isinstance(b, Redirect):
            payload = _encode({"redirect": b.location})
            hdrs = {**id_headers, "location": b.location}
            fin("completed")
            conn.write(
                conn.head(b.status, _JSON, length=len(payload), keep_alive=keep, extra=hdrs)
                + payload
            )
            await conn.drain()
            return keep, "completed"
        if isinstance(b, WrongShape):
            fin("completed")
            shaped = _encode(b.body)
            if stream:
                conn.write(conn.head(200, _SSE, keep_alive=keep, extra=id_headers))
                frame = b"data: " + shaped + b"\n\n"
                if dialect == "anthropic":
                    frame = b"event: message_start\n" + frame
                frames = [frame] * b.frames + ([] if dialect == "anthropic" else [_DONE])
                conn.write(b"".join(_chunk(f) for f in frames) + _LAST_CHUNK)
            else:
                conn.write(
                    conn.head(200, _JSON, length=len(shaped), keep_alive=keep, extra=id_headers)
                    + shaped
                )
            await conn.drain()
            return keep, "completed"
        if isinstance(b, Garbage):
            fin("completed")
            if stream:
                conn.write(conn.head(200, _SSE, keep_alive=keep, extra=id_headers))
                frame = (
                    b"event: message_start\ndata: not-json\n\n"
                    if dialect == "anthropic"
                    else b"data: not-json\n\n"
                )
                conn.write(_chunk(frame) + _chunk(frame) + _LAST_CHUNK)
            else:
                payload = b.body.encode()
                conn.write(
                    conn.head(
                        200, b.content_type, length=len(payload), keep_alive=keep, extra=id_headers
                    )
                    + payload
                )
            await conn.drain()
            return keep, "completed"

        # Everything left renders a real answer (possibly truncated or delayed).
        if isinstance(b, Ok) and b.delay_s:
            await asyncio.sleep(b.delay_s)
        try:
            plan = route.plan(model, body, _Params(b, model, body), stream)
        except _ApiError as e:
            fin("completed")
            error(e.code, e.message)
            await conn.drain()
            return keep, "completed"

        if echoed:
            plan.body = _with_echo(plan.body, req.headers)
        if not stream:
            if isinstance(b, SlowDrip):
                conn.write(
                    conn.head(200, _JSON, length=len(plan.body), keep_alive=keep, extra=id_headers)
                )
                pieces = _split_bytes(plan.body, b.chunks)
                for i, piece in enumerate(pieces):
                    if i and b.interval_s:
                        await asyncio.sleep(b.interval_s)
                    if i == len(pieces) - 1:
                        fin("completed")
                    conn.write(piece)
                    await conn.drain()
            else:
                fin("completed")
                conn.write(
                    conn.head(200, _JSON, length=len(plan.body), keep_alive=keep, extra=id_headers)
                    + plan.body
                )
                await conn.drain()
            return keep, "completed"

        # Streams.
        upto: int | None = None
        interval = 0.0
        if isinstance(b, Ok):
            interval = b.chunk_interval_s
        elif isinstance(b, SlowDrip):
            interval = b.interval_s
        elif isinstance(b, Hang | Reset | StreamError):
            upto = b.after_chunks
        conn.write(conn.head(200, _SSE, keep_alive=keep, extra=id_headers))
        content = plan.content if upto is None else plan.content[:upto]
        if interval:
            conn.write(b"".join(_chunk(f) for f in plan.preamble))
            await conn.drain()
            for f in content:
                await asyncio.sleep(interval)
                conn.write(_chunk(f))
                await conn.drain()
        else:
            conn.write(b"".join(_chunk(f) for f in (*plan.preamble, *content)))
            await conn.drain()

        if isinstance(b, Hang):
            await asyncio.get_running_loop().create_future()  # until cancelled
        if isinstance(b, Reset):
            # Make sure the bytes reached the kernel before the RST discards the buffer.
            conn.transport.set_write_buffer_limits(high=0)
            await conn.drain()
            fin("reset")
            conn.abort_rst()
            return False, "reset"
        if isinstance(b, StreamError):
            err = _error_obj(dialect, b.status, b.message)
            frame = _event("error", err) if dialect == "anthropic" else _sse(err)
            fin("completed")
            conn.write(_chunk(frame) + _LAST_CHUNK)
            await conn.drain()
            return keep, "completed"
        fin("completed")
        conn.write(b"".join(_chunk(f) for f in plan.epilogue) + _LAST_CHUNK)
        await conn.drain()
        return keep, "completed"

    # control API
    async def _control(self, req: _Request) -> tuple[int, Any]:
        st = self.state
        path = req.path
        try:
            if req.method == "POST" and path == "/_control/script":
                sreq = msgspec.json.decode(req.body, type=_ScriptReq)
                n = st.script(sreq.model, list(sreq.behaviours))
                return 200, {"ok": True, "queued": n}
            if req.method == "POST" and path == "/_control/default":
                dreq = msgspec.json.decode(req.body, type=_DefaultReq)
                st.set_default(dreq.model, dreq.behaviour)
                return 200, {"ok": True}
            if req.method == "POST" and path == "/_control/reset":
                st.reset()
                return 200, {"ok": True}
            if req.method == "GET" and path == "/_control/requests":
                return 200, st.requests()
            if req.method == "GET" and path == "/_control/stats":
                return 200, st.stats()
            if req.method == "GET" and path == "/_control/health":
                return 200, {"ok": True}
            if req.method == "GET" and path == "/_control/wait":
                return await self._wait(parse_qs(req.query))
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as e:
            return 400, {"error": str(e)}
        return 404, {"error": f"no control endpoint {req.method} {path}"}

    async def _wait(self, q: dict[str, list[str]]) -> tuple[int, Any]:
        want_req = int(q.get("requests", ["0"])[0])
        want_cancel = int(q.get("cancelled", ["0"])[0])
        timeout = min(float(q.get("timeout", ["10"])[0]), 300.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            ev = self._changed_ev
            s = self.state.stats()
            if s["requests"] >= want_req and s["cancelled"] >= want_cancel:
                return 200, s
            remaining = deadline - loop.time()
            if remaining <= 0 or ev is None:
                return 408, s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), remaining)


def _split_bytes(data: bytes, n: int) -> list[bytes]:
    n = max(1, min(n, len(data)))
    q, r = divmod(len(data), n)
    out: list[bytes] = []
    i = 0
    for k in range(n):
        step = q + (1 if k < r else 0)
        out.append(data[i : i + step])
        i += step
    return out


class _ScriptReq(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    behaviours: list[Behaviour]


class _DefaultReq(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    behaviour: Behaviour | None = None


# --------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------


class FakeProvider:
    """The fake provider, served from a daemon thread with its own event loop."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        models: tuple[str, ...] = ("fake-model",),
        record_limit: int = 10_000,
    ) -> None:
        self._state = _State(record_limit)
        self._server = _Server(self._state, host, port, tuple(models))
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False

    # lifecycle
    def start(self) -> FakeProvider:
        if self._thread is not None:
            raise RuntimeError("FakeProvider already started")
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._server.start())
            except BaseException as e:  # report to start()
                errors.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(self._server.stop())
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-provider", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake provider did not start within 10s")
        if errors:
            self._thread.join()
            raise errors[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._stopped or self._thread is None:
            return
        self._stopped = True
        loop = self._loop
        if loop is not None and loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._server.stop(), loop)
            with contextlib.suppress(Exception):
                fut.result(timeout)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeProvider:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    # addresses
    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    # scripting
    def script(self, model: str, *behaviours: Behaviour | dict[str, Any]) -> None:
        """Append behaviours to ``model``'s queue (``"*"``: any model with an empty queue)."""
        self._state.script(model, [_as_behaviour(b) for b in behaviours])

    def set_default(self, model: str, behaviour: Behaviour | dict[str, Any] | None) -> None:
        """Set (None: clear) the behaviour used when ``model``'s queue is empty."""
        self._state.set_default(model, None if behaviour is None else _as_behaviour(behaviour))

    def reset(self) -> None:
        """Clear queues, defaults, recorded requests and counters."""
        self._state.reset()

    # observing
    def requests(self) -> list[dict[str, Any]]:
        """Recorded API requests in arrival order: method, path, query, headers (lowercased
        names), body (parsed JSON or None), model, stream, behaviour (kind), received_at
        (time.monotonic()), outcome (None while in flight, then completed / cancelled /
        reset / disconnected / aborted / error)."""
        return self._state.requests()

    def stats(self) -> dict[str, Any]:
        """requests, completed, cancelled, in_flight, connections_open, connections_total,
        by_kind, by_path, by_outcome, queued."""
        return self._state.stats()

    def wait_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        """Block until ``predicate(stats)`` holds; return the stats or raise TimeoutError."""
        return self._state.wait_until(predicate, timeout)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Block until at least ``n`` API requests arrived; return the recorded requests."""
        self._state.wait_until(lambda s: s["requests"] >= n, timeout)
        return self._state.requests()

    def wait_for_cancelled(self, n: int, timeout: float = 5.0) -> int:
        """Block until at least ``n`` requests were cancelled by their client closing the
        connection before the answer was complete; return the count."""
        return int(self._state.wait_until(lambda s: s["cancelled"] >= n, timeout)["cancelled"])

    async def wait_for_requests_async(
        self,
        n: int,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.wait_for_requests, n, timeout)

    async def wait_for_cancelled_async(self, n: int, timeout: float = 5.0) -> int:  # noqa: ASYNC109
        return await asyncio.to_thread(self.wait_for_cancelled, n, timeout)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


async def _serve_forever(args: argparse.Namespace) -> None:
    state = _State(args.record_limit)
    server = _Server(state, args.host, args.port, tuple(args.models))
    await server.start()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    print(f"listening on http://{args.host}:{server.port}", flush=True)
    await done.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.support.fake_provider", description="Scripted fake LLM provider."
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    ap.add_argument("--record-limit", type=int, default=10_000)
    ap.add_argument("--models", nargs="*", default=["fake-model"], help="for GET /v1/models")
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop if installed")
    args = ap.parse_args(argv)
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            print("uvloop not installed; using asyncio", file=sys.stderr)
        else:
            uvloop.run(_serve_forever(args))
            return 0
    asyncio.run(_serve_forever(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
