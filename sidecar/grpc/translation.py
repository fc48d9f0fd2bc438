"""Translation between the gRPC messages (``sidecar.v1``) and the gateway's OpenAI shapes.

Requests go proto -> the OpenAI-shaped JSON object an HTTP client would send -> the same
``msgspec.convert`` into :mod:`sidecar.types` request Structs that the HTTP front end uses,
so validation, error messages (with the offending field's path) and pass-through of
unmodelled fields are identical over both front ends.

Answers come back from the gateway as OpenAI JSON bytes (non-stream) or SSE frames
(streams); they are decoded with msgspec into the answer Structs of :mod:`sidecar.types`
(whose fields a provider may leave out or send as null are optional: providers' answers
are relayed as they sent them, e.g. OpenAI's ``"usage": null`` on every stream chunk) and
copied into proto messages.

Every function here is pure (no I/O) and raises only :class:`~sidecar.errors.SidecarError`.
"""

from __future__ import annotations

import base64
import struct as _struct
from collections.abc import Iterator
from typing import Any

import msgspec
from google.protobuf import struct_pb2

from sidecar.errors import InvalidRequest, UpstreamMalformed
from sidecar.grpc.v1 import sidecar_pb2 as pb
from sidecar.money import format_usd
from sidecar.providers.sse import SSEDecoder
from sidecar.types import (
    Call,
    ChatChunk,
    ChatCompletion,
    Delta,
    EmbeddingList,
    FunctionDelta,
    Op,
    ResponseMessage,
    ToolCall,
    Usage,
    validate_call,
)

_ROLES = {
    pb.ROLE_SYSTEM: "system",
    pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant",
    pb.ROLE_TOOL: "tool",
    pb.ROLE_DEVELOPER: "developer",
}

# --- requests -------------------------------------------------------------------------------


def chat_call(req: pb.ChatRequest, *, stream: bool) -> Call:
    """The :class:`Call` an HTTP client sending the same request would make. Raises
    :class:`InvalidRequest` with the offending field's path."""
    raw: dict[str, Any] = struct_to_dict(req.extra) if req.HasField("extra") else {}
    raw.pop("stream_options", None)
    raw["model"] = req.model
    raw["messages"] = [_message(i, m) for i, m in enumerate(req.messages)]
    if stream:
        raw["stream"] = True
        if req.include_usage:
            raw["stream_options"] = {"include_usage": True}
    else:
        raw.pop("stream", None)
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                 "max_tokens", "n", "parallel_tool_calls"):
        if req.HasField(name):
            raw[name] = getattr(req, name)
    if req.stop:
        raw["stop"] = list(req.stop)
    if req.HasField("response_format"):
        raw["response_format"] = _response_format(req.response_format)
    if req.tools:
        raw["tools"] = [_tool(t) for t in req.tools]
    choice = req.tool_choice.WhichOneof("choice") if req.HasField("tool_choice") else None
    if choice == "mode":
        raw["tool_choice"] = req.tool_choice.mode
    elif choice == "function":
        raw["tool_choice"] = {"type": "function",
                              "function": {"name": req.tool_choice.function}}
    if req.user:
        raw["user"] = req.user
    if req.metadata:
        raw["metadata"] = dict(req.metadata)
    return validate_call(Op.CHAT, raw)


def embed_call(req: pb.EmbedRequest) -> Call:
    raw: dict[str, Any] = {"model": req.model, "input": list(req.input)}
    if req.HasField("dimensions"):
        raw["dimensions"] = req.dimensions
    if req.user:
        raw["user"] = req.user
    return validate_call(Op.EMBEDDINGS, raw)


def _message(i: int, m: pb.Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    role = _ROLES.get(m.role)
    if role is not None:  # else the request Struct reports the missing role with its path
        out["role"] = role
    if m.HasField("content"):
        if m.parts:
            raise InvalidRequest(
                f"Invalid request: set content or parts, not both at 'messages[{i}]'.",
                param=f"messages[{i}].content",
            )
        out["content"] = m.content
    elif m.parts:
        out["content"] = [_part(i, j, p) for j, p in enumerate(m.parts)]
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _part(i: int, j: int, p: pb.ContentPart) -> dict[str, Any]:
    kind = p.WhichOneof("part")
    if kind == "text":
        return {"type": "text", "text": p.text}
    if kind == "image_url":
        image: dict[str, Any] = {"url": p.image_url.url}
        if p.image_url.detail:
            image["detail"] = p.image_url.detail
        return {"type": "image_url", "image_url": image}
    raise InvalidRequest(
        f"Invalid request: a content part needs text or image_url at "
        f"'messages[{i}].content[{j}]'.",
        param=f"messages[{i}].content[{j}]",
    )


def _response_format(f: pb.ResponseFormat) -> dict[str, Any]:
    out: dict[str, Any] = {"type": f.type or "text"}
    if f.HasField("json_schema"):
        s = f.json_schema
        schema: dict[str, Any] = {"name": s.name}
        if s.description:
            schema["description"] = s.description
        if s.HasField("schema"):
            schema["schema"] = struct_to_dict(s.schema)
        if s.HasField("strict"):
            schema["strict"] = s.strict
        out["json_schema"] = schema
    return out


def _tool(t: pb.Tool) -> dict[str, Any]:
    f = t.function
    fn: dict[str, Any] = {"name": f.name}
    if f.description:
        fn["description"] = f.description
    if f.HasField("parameters"):
        fn["parameters"] = struct_to_dict(f.parameters)
    if f.HasField("strict"):
        fn["strict"] = f.strict
    return {"type": "function", "function": fn}


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as the JSON object it stands for. Struct has only doubles: whole numbers
    become ints again, so a JSON Schema's ``"maxItems": 3`` is not sent as ``3.0``."""
    return {k: _value(v) for k, v in s.fields.items()}


def _value(v: struct_pb2.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        n = v.number_value
        return int(n) if n.is_integer() and abs(n) < 2**53 else n
    if kind == "bool_value":
        return v.bool_value
    if kind == "struct_value":
        return struct_to_dict(v.struct_value)
    if kind == "list_value":
        return [_value(x) for x in v.list_value.values]
    return None


# --- answers --------------------------------------------------------------------------------


_chat_decoder = msgspec.json.Decoder(ChatCompletion)
_chunk_decoder = msgspec.json.Decoder(ChatChunk)
_embeddings_decoder = msgspec.json.Decoder(EmbeddingList)


def _fill_usage(out: pb.Usage, u: Usage) -> None:
    out.prompt_tokens = u.prompt_tokens
    out.completion_tokens = u.completion_tokens
    out.total_tokens = u.total_tokens
    if u.prompt_tokens_details is not None:
        out.cached_tokens = u.cached_tokens


def _tool_call(c: ToolCall) -> pb.ToolCall:
    return pb.ToolCall(id=c.id, function=pb.FunctionCall(name=c.function.name,
                                                         arguments=c.function.arguments))


def chat_response(body: bytes, target: str) -> pb.ChatResponse:
    """A non-stream chat answer (OpenAI JSON) as a :class:`pb.ChatResponse` (the
    sidecar's own fields are left to the caller). Raises :class:`UpstreamMalformed`."""
    try:
        a = _chat_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise UpstreamMalformed(f"{target} sent an answer that cannot be translated",
                                target=target) from None
    out = pb.ChatResponse(id=a.id or "", model=a.model or "", created=int(a.created or 0))
    for c in a.choices or ():
        m = c.message or ResponseMessage()
        choice = out.choices.add(index=c.index, finish_reason=c.finish_reason or "")
        if m.content is not None:
            choice.message.content = m.content
        if isinstance(m.refusal, str):
            choice.message.refusal = m.refusal
        if m.tool_calls:
            choice.message.tool_calls.extend(_tool_call(t) for t in m.tool_calls)
    if a.usage is not None:
        _fill_usage(out.usage, a.usage)
    return out


def embed_response(body: bytes, target: str) -> pb.EmbedResponse:
    """An embeddings answer (float lists or base64 little-endian float32) as a
    :class:`pb.EmbedResponse`. Raises :class:`UpstreamMalformed`."""
    try:
        a = _embeddings_decoder.decode(body)
        data = [pb.Embedding(index=v.index, values=_floats(v.embedding)) for v in a.data]
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, _struct.error):
        raise UpstreamMalformed(f"{target} sent embeddings that cannot be translated",
                                target=target) from None
    out = pb.EmbedResponse(data=data, model=a.model or "")
    if a.usage is not None:
        _fill_usage(out.usage, a.usage)
    return out


def _floats(e: list[float] | str) -> list[float]:
    if isinstance(e, list):
        return e
    raw = base64.b64decode(e, validate=True)
    return list(_struct.unpack(f"<{len(raw) // 4}f", raw))


class ChunkReader:
    """Turns a stream's relayed frames (:class:`~sidecar.gateway.events.Relayed`: the
    provider's ``data: {...}`` events, split by the one SSE parser,
    :class:`~sidecar.providers.sse.SSEDecoder`) into :class:`pb.ChatChunk` messages, and
    writes the closing chunk with the stream's cost.

    One per stream; not safe for concurrent use. Raises :class:`UpstreamMalformed` for an
    event that is not a chunk.
    """

    __slots__ = ("_created", "_decoder", "_id", "_model", "_target")

    def __init__(self, target: str) -> None:
        self._target = target
        self._decoder = SSEDecoder()
        self._id = self._model = ""
        self._created = 0

    def feed(self, frame: bytes) -> Iterator[pb.ChatChunk]:
        """The chunks of the events ``frame`` completes."""
        for event in self._decoder.feed(frame):
            if event.data:
                yield self._chunk(event.data)

    def last_chunk(self, cost: int | None) -> pb.ChatChunk:
        """The stream's closing chunk: no choices, the stream's ids and its cost (µ$;
        None when the target's price is unknown)."""
        out = pb.ChatChunk(id=self._id, model=self._model, created=self._created)
        if cost is not None:
            out.cost_micro_usd, out.cost_usd = cost, format_usd(cost)
        return out

    def _chunk(self, data: bytes) -> pb.ChatChunk:
        try:
            a = _chunk_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise UpstreamMalformed(f"{self._target} sent a stream event that cannot be "
                                    "translated", target=self._target) from None
        self._id = a.id or self._id
        self._model = a.model or self._model
        self._created = int(a.created or self._created)
        out = pb.ChatChunk(id=self._id, model=self._model, created=self._created)
        for c in a.choices or ():
            d = c.delta or Delta()
            choice = out.choices.add(index=c.index, finish_reason=c.finish_reason or "")
            delta = choice.delta
            if d.role:
                delta.role = d.role
            if d.content is not None:
                delta.content = d.content
            if d.refusal is not None:
                delta.refusal = d.refusal
            for t in d.tool_calls or ():
                f = t.function or FunctionDelta()
                delta.tool_calls.add(index=t.index or 0, id=t.id or "", name=f.name or "",
                                     arguments=f.arguments or "")
        if isinstance(a.usage, Usage):
            _fill_usage(out.usage, a.usage)
        return out
