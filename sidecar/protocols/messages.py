"""Anthropic's Messages API inbound (``POST /v1/messages``), translated once, here.

* :func:`chat_call` validates a Messages body and returns the OpenAI chat
  :class:`~sidecar.types.Call` every target can serve, carrying the body itself as
  ``Call.messages``: a provider that speaks the Messages API sends that body unchanged and
  answers in Anthropic's format (no double translation), every other one serves the
  translation.
* :func:`message_body` turns a ``chat.completion`` into an Anthropic ``message``.
* :class:`MessageStream` turns ``chat.completion.chunk`` frames into Anthropic's event
  sequence (``message_start``, ``ping``, ``content_block_start`` / ``_delta`` (``text_delta``,
  ``input_json_delta``) / ``_stop``, ``message_delta`` with usage and ``stop_reason``,
  ``message_stop``; ``error`` when the stream breaks).
* :func:`error_body` is Anthropic's error envelope.

``output_config.format`` (structured output) becomes ``response_format`` ``json_schema``
(strict). What the translation drops for targets that are not Anthropic: ``top_k``,
``thinking`` (and thinking blocks in the history), ``cache_control``,
``output_config.effort``, ``service_tier`` and other fields it does not read. What it refuses
(400 naming the block or field, for every target, since the gateway decides a request's
translation before it knows its target): content blocks other than text, image, tool_use,
tool_result, thinking and redacted_thinking (``document``, ``search_result``, ...), images
inside tool results, and server tools (``web_search_*``, ``bash_*``, ...; a tool's ``type``
other than ``custom``).

Pure (no I/O).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import msgspec

from sidecar.errors import InvalidRequest, SidecarError, UpstreamMalformed
from sidecar.providers.sse import SSEDecoder
from sidecar.types import (
    Call,
    ChatChunk,
    ChatCompletion,
    MaxTokens,
    ModelName,
    Op,
    Usage,
    check_bounds,
    validate_call,
)

_encoder = msgspec.json.Encoder()

# --- request: Messages -> OpenAI chat --------------------------------------------------------


class _Message(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class _Tool(msgspec.Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    input_schema: dict[str, Any] | None = None
    description: str | None = None
    type: str | None = None


class _ToolChoice(msgspec.Struct, kw_only=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class _Metadata(msgspec.Struct):
    user_id: str | None = None


class _TextBlock(msgspec.Struct):
    text: str
    type: Literal["text"] = "text"


class _Format(msgspec.Struct):
    schema: dict[str, Any]
    type: Literal["json_schema"] = "json_schema"


class _OutputConfig(msgspec.Struct):
    format: _Format | None = None


class MessagesRequest(msgspec.Struct, kw_only=True):
    """The fields of a Messages body the translation reads; others are kept for Anthropic
    targets (``Call.messages``) and otherwise ignored."""

    model: ModelName
    max_tokens: MaxTokens
    messages: Annotated[list[_Message], msgspec.Meta(min_length=1)]
    system: str | list[_TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    metadata: _Metadata | None = None
    tools: list[_Tool] | None = None
    tool_choice: _ToolChoice | None = None
    output_config: _OutputConfig | None = None


_DROPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})


def _invalid(message: str, param: str | None) -> InvalidRequest:
    where = f" at '{param}'" if param else ""
    return InvalidRequest(f"Invalid request: {message}{where}.", param=param)


def _decode(raw: dict[str, Any], kind: type[Any]) -> Any:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as e:
        message, _, path = str(e).partition(" - at `$.")
        param = path.rstrip("`")
        if message.startswith("Object missing required field `"):
            field = message.split("`")[1]
            param = f"{param}.{field}" if param else field
        raise _invalid(message, param or None) from None


def chat_call(raw: dict[str, Any]) -> Call:
    """The OpenAI chat call for a decoded Messages body (``count_tokens`` bodies too: pass
    ``max_tokens``). Raises :class:`~sidecar.errors.InvalidRequest` naming the field."""
    check_bounds(raw)
    req: MessagesRequest = _decode(raw, MessagesRequest)
    messages: list[dict[str, Any]] = []
    if req.system:
        system = (req.system if isinstance(req.system, str)
                  else "\n".join(b.text for b in req.system))
        messages.append({"role": "system", "content": system})
    for i, msg in enumerate(req.messages):
        messages.extend(_chat_messages(msg, f"messages[{i}]"))
    chat: dict[str, Any] = {"model": req.model, "messages": messages,
                            "max_tokens": req.max_tokens}
    if req.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    for name in ("temperature", "top_p"):
        if getattr(req, name) is not None:
            chat[name] = getattr(req, name)
    if req.stop_sequences:
        chat["stop"] = req.stop_sequences
    if req.metadata is not None and req.metadata.user_id:
        chat["user"] = req.metadata.user_id
    if req.tools:
        chat["tools"] = [_chat_tool(t, f"tools[{i}]") for i, t in enumerate(req.tools)]
    if req.tool_choice is not None:
        chat.update(_chat_tool_choice(req.tool_choice))
    if req.output_config is not None and req.output_config.format is not None:
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": req.output_config.format.schema, "strict": True}}
    call = validate_call(Op.CHAT, chat)
    return msgspec.structs.replace(call, messages=raw)


def _chat_messages(msg: _Message, where: str) -> list[dict[str, Any]]:
    """One Messages turn as OpenAI messages: a user turn's tool results become ``tool``
    messages (first, as OpenAI wants them right after the calls), its other blocks one
    user message; an assistant turn's ``tool_use`` blocks become ``tool_calls``."""
    if isinstance(msg.content, str):
        return [{"role": msg.role, "content": msg.content}]
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for k, block in enumerate(msg.content):
        path = f"{where}.content[{k}]"
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _string(block, "text", path)})
        elif kind == "image" and msg.role == "user":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, path)}})
        elif kind == "tool_use" and msg.role == "assistant":
            tool_input = block.get("input", {})
            if not isinstance(tool_input, dict):
                raise _invalid("a tool_use block's input must be an object", f"{path}.input")
            calls.append({"id": _string(block, "id", path), "type": "function",
                          "function": {"name": _string(block, "name", path),
                                       "arguments": _encoder.encode(tool_input).decode()}})
        elif kind == "tool_result" and msg.role == "user":
            results.append(_tool_message(block, path))
        elif kind in _DROPPED_BLOCKS and msg.role == "assistant":
            continue
        else:
            raise _invalid(f"content block type {kind!r} is not supported in a {msg.role} "
                           "message", f"{path}.type")
    out = results
    if msg.role == "assistant":
        turn: dict[str, Any] = {"role": "assistant", "content": _joined(parts)}
        if calls:
            turn["tool_calls"] = calls
        if parts or calls:
            out.append(turn)
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _joined(parts: list[dict[str, Any]]) -> str | None:
    return "".join(p["text"] for p in parts) if parts else None


def _string(block: dict[str, Any], key: str, path: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise _invalid(f"'{key}' must be a string", f"{path}.{key}")
    return value


def _image_url(block: dict[str, Any], path: str) -> str:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _invalid("an image block needs a source", f"{path}.source")
    if source.get("type") == "base64":
        media = _string(source, "media_type", f"{path}.source")
        return f"data:{media};base64,{_string(source, 'data', f'{path}.source')}"
    if source.get("type") == "url":
        return _string(source, "url", f"{path}.source")
    raise _invalid("an image source is 'base64' or 'url'", f"{path}.source.type")


def _tool_message(block: dict[str, Any], path: str) -> dict[str, Any]:
    content = block.get("content", "")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _invalid("a tool_result's content may only hold text blocks",
                               f"{path}.content[{j}]")
            texts.append(_string(part, "text", f"{path}.content[{j}]"))
        content = "\n".join(texts)
    elif not isinstance(content, str):
        raise _invalid("a tool_result's content is a string or text blocks", f"{path}.content")
    if block.get("is_error") is True:
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": _string(block, "tool_use_id", path),
            "content": content}


def _chat_tool(tool: _Tool, path: str) -> dict[str, Any]:
    if tool.type not in (None, "custom"):
        raise _invalid(f"tool type {tool.type!r} (a server tool) is not supported",
                       f"{path}.type")
    function: dict[str, Any] = {"name": tool.name,
                                "parameters": tool.input_schema or {"type": "object"}}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: _ToolChoice) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if choice.type == "tool":
        if not choice.name:
            raise _invalid("tool_choice of type 'tool' needs a name", "tool_choice.name")
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if choice.disable_parallel_tool_use:
        out["parallel_tool_calls"] = False
    return out


# --- answers: OpenAI chat -> Messages --------------------------------------------------------

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "function_call": "tool_use", "content_filter": "refusal"}
_completion_decoder = msgspec.json.Decoder(ChatCompletion)
_chunk_decoder = msgspec.json.Decoder(ChatChunk)


def stop_reason(finish_reason: str | None) -> str:
    """Anthropic's ``stop_reason`` for an OpenAI ``finish_reason`` (unknown: ``end_turn``)."""
    return _STOP_REASONS.get(finish_reason or "", "end_turn")


def anthropic_usage(usage: Usage | None) -> dict[str, int]:
    """Anthropic's usage: cached prompt tokens are ``cache_read_input_tokens``, not input."""
    usage = usage or Usage()
    cached = usage.cached_tokens
    return {"input_tokens": max(0, usage.prompt_tokens - cached),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
            "output_tokens": usage.completion_tokens}


def _message_id(chat_id: str | None) -> str:
    if chat_id and chat_id.startswith("msg_"):
        return chat_id
    return "msg_" + (chat_id or uuid.uuid4().hex)


def _tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic's ``input`` is; a provider's text
    that is not a JSON object is kept whole, under ``arguments``."""
    try:
        value = msgspec.json.decode(arguments or "{}")
    except msgspec.DecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def message_body(chat: bytes) -> bytes:
    """A ``chat.completion`` (as the gateway validated it) as an Anthropic ``message``:
    its first choice's text as one text block, then one ``tool_use`` block per call."""
    completion = _completion_decoder.decode(chat)
    choice = completion.choices[0] if completion.choices else None
    message = choice.message if choice is not None else None
    content: list[dict[str, Any]] = []
    if message is not None and message.content:
        content.append({"type": "text", "text": message.content})
    for tc in (message.tool_calls or []) if message is not None else []:
        content.append({"type": "tool_use", "id": tc.id, "name": tc.function.name,
                        "input": _tool_input(tc.function.arguments)})
    return _encoder.encode({
        "id": _message_id(completion.id), "type": "message", "role": "assistant",
        "model": completion.model or "", "content": content,
        "stop_reason": stop_reason(choice.finish_reason if choice is not None else None),
        "stop_sequence": None, "usage": anthropic_usage(completion.usage),
    })


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encoder.encode(data) + b"\n\n"


class MessageStream:
    """OpenAI ``chat.completion.chunk`` frames in, Anthropic's stream events out.

    One per stream, not safe for concurrent use. :meth:`feed` takes whole ``data: {...}``
    events (what the gateway relays) and returns the events they make, joined; the usage
    chunk and the finish reason are kept for :meth:`end`, which closes the open block and
    sends ``message_delta`` and ``message_stop``. :meth:`fail` ends it with an ``error``
    event instead. Text and each tool call are content blocks in the order they come."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._sse = SSEDecoder()
        self._started = False
        self._block = -1
        """Index of the open content block, -1 when none is open."""
        self._next = 0
        self._tool: int | None = None
        """OpenAI index of the tool call whose block is open."""
        self._finish: str | None = None
        self._usage: Usage | None = None

    def feed(self, frame: bytes) -> bytes:
        """Raises :class:`~sidecar.errors.UpstreamMalformed` for a frame that is not a
        chunk (the gateway relays only valid ones)."""
        out: list[bytes] = []
        for event in self._sse.feed(frame):
            if event.data == b"[DONE]":
                continue
            try:
                chunk = _chunk_decoder.decode(event.data)
            except msgspec.DecodeError:
                raise UpstreamMalformed("The answer's stream held an invalid chunk.") from None
            self._start(out, chunk.id, chunk.model)
            if isinstance(chunk.usage, Usage):
                self._usage = chunk.usage
            for choice in chunk.choices or []:
                if choice.index != 0:
                    continue
                delta = choice.delta
                if delta is not None and delta.content:
                    if self._tool is not None or self._block < 0:
                        self._open(out, {"type": "text", "text": ""}, tool=None)
                    out.append(self._delta({"type": "text_delta", "text": delta.content}))
                for call in (delta.tool_calls if delta is not None else None) or []:
                    index = call.index if isinstance(call.index, int) else 0
                    fn = call.function
                    if index != self._tool:
                        self._open(out, {"type": "tool_use", "id": call.id or f"toolu_{index}",
                                         "name": (fn.name if fn else None) or "", "input": {}},
                                   tool=index)
                    if fn is not None and fn.arguments:
                        out.append(self._delta({"type": "input_json_delta",
                                                "partial_json": fn.arguments}))
                if choice.finish_reason:
                    self._finish = choice.finish_reason
        return b"".join(out)

    def _start(self, out: list[bytes], chat_id: str | None, model: str | None) -> None:
        if self._started:
            return
        self._started = True
        self._model = model or self._model
        out.append(_event("message_start", {"type": "message_start", "message": {
            "id": _message_id(chat_id), "type": "message", "role": "assistant",
            "model": self._model, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}}))
        out.append(_event("ping", {"type": "ping"}))

    def _open(self, out: list[bytes], block: dict[str, Any], *, tool: int | None) -> None:
        self._close(out)
        self._block, self._tool = self._next, tool
        self._next += 1
        out.append(_event("content_block_start", {"type": "content_block_start",
                                                  "index": self._block,
                                                  "content_block": block}))

    def _close(self, out: list[bytes]) -> None:
        if self._block >= 0:
            out.append(_event("content_block_stop", {"type": "content_block_stop",
                                                     "index": self._block}))
        self._block, self._tool = -1, None

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta",
                                              "index": self._block, "delta": delta})

    def end(self, usage: Usage | None) -> bytes:
        """The events that end a stream that ended well."""
        out: list[bytes] = []
        self._start(out, None, None)
        self._close(out)
        out.append(_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(self._finish), "stop_sequence": None},
            "usage": anthropic_usage(usage or self._usage)}))
        out.append(_event("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    @staticmethod
    def fail(err: SidecarError) -> bytes:
        """The ``error`` event of a stream that broke (nothing may follow it)."""
        return _event("error", _envelope(err))


# --- errors ----------------------------------------------------------------------------------

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                402: "billing_error", 403: "permission_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


def _envelope(err: SidecarError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(err.status, "api_error" if err.status >= 500
                            else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def error_body(err: SidecarError) -> bytes:
    """Anthropic's error envelope for ``err`` (its status stays the HTTP status)."""
    return _encoder.encode(_envelope(err))


def count_body(input_tokens: int) -> bytes:
    """The answer of ``POST /v1/messages/count_tokens``."""
    return _encoder.encode({"input_tokens": input_tokens})
