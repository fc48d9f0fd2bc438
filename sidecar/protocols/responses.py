"""OpenAI's Responses API (``POST /v1/responses``), stateless, to and from OpenAI chat.

Three entry points, all pure (no I/O); the HTTP front end decodes the body, calls these, and
runs the gateway in between:

* :func:`chat_call` turns a decoded Responses request into an :data:`~sidecar.types.Op.CHAT`
  :class:`~sidecar.types.Call` (the chat body it builds goes through
  :func:`~sidecar.types.validate_call`, so every usual check applies). Anything it cannot
  express raises :class:`~sidecar.errors.InvalidRequest` (400) naming the Responses field
  (``param``), e.g. ``input[2].content[0].type``.
* :func:`response_body` turns the gateway's ``chat.completion`` answer into a ``response``
  object.
* :class:`ResponseStream` turns the gateway's ``chat.completion.chunk`` SSE frames into the
  Responses stream events (``response.created`` ... ``response.completed``).

Stateless: this gateway stores nothing. A response is never kept, so ``previous_response_id``
is refused with a 400 saying so (the client sends the whole conversation in ``input``), and
so are ``conversation``, ``background: true``, stored ``prompt`` templates, ``item_reference``
items, ``file_id`` images and ``truncation: "auto"`` (which needs the stored context). ``store``
is accepted because SDKs send it, and ignored: every response says ``"store": false``.
``include``, ``truncation: "disabled"``, ``service_tier``, ``reasoning``, ``stream_options``,
``prompt_cache_key``, ``prompt_cache_retention``, ``safety_identifier`` and ``text.verbosity``
are accepted and ignored (``include: ["message.output_text.logprobs"]`` and ``top_logprobs``
ask the chat call for logprobs, which come back on the ``output_text`` parts). Other
top-level fields are ignored, so a newer SDK's additions do not break every request.

Only function tools exist here (Responses' flat ``{"type": "function", "name", ...}``
shape); built-in tools (web search, file search, computer use, MCP, ...) are refused naming
``tools[i].type``. Only the chat answer's first choice is used.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal, TypeVar

import msgspec

from sidecar.errors import InvalidRequest, SidecarError, UpstreamMalformed
from sidecar.providers.sse import SSEDecoder
from sidecar.types import (
    Call,
    ChatChunk,
    ChatCompletion,
    ChunkChoice,
    Op,
    ResponseMessage,
    ToolCallDelta,
    Usage,
    check_bounds,
    validate_call,
)

_encode = msgspec.json.Encoder().encode
_decode_chat = msgspec.json.Decoder(ChatCompletion).decode
_decode_chunk = msgspec.json.Decoder(ChatChunk).decode

T = TypeVar("T")

# --- request: Responses -> chat -------------------------------------------------------------

_STATEFUL = {
    "previous_response_id": "this gateway does not store responses; send the whole "
                            "conversation in input",
    "conversation": "this gateway does not store conversations; send the whole conversation "
                    "in input",
    "prompt": "stored prompts are not supported by this gateway; send instructions and input "
              "themselves",
}
_PASSED = ("temperature", "top_p", "user", "metadata", "seed")
_ROLES = frozenset({"user", "system", "developer", "assistant"})
_TOOL_CHOICES = frozenset({"auto", "none", "required"})
_IMAGE_DETAILS = frozenset({"auto", "low", "high"})
_LOGPROBS_INCLUDE = "message.output_text.logprobs"
_KINDS: dict[type, str] = {str: "a string", dict: "an object", list: "an array", bool: "a boolean"}

# chat paths in validate_call's errors, back to the Responses fields they came from
_CHAT_PARAMS = (
    (re.compile(r"^max_completion_tokens"), "max_output_tokens"),
    (re.compile(r"^tools\[(\d+)\]\.function"), r"tools[\1]"),
    (re.compile(r"^response_format\.json_schema"), "text.format"),
    (re.compile(r"^response_format"), "text.format"),
    (re.compile(r"^messages(\[\d+\].*)?$"), "input"),
)


def _bad(param: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid request at '{param}': {problem}.", param=param)


def _at(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _get(obj: dict[str, Any], key: str, kind: type[T], path: str = "") -> T | None:
    """``obj[key]`` when it is a ``kind`` (never a bool for another kind), None when absent
    or null; else InvalidRequest naming ``path.key``."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _bad(_at(path, key), f"must be {_KINDS.get(kind, kind.__name__)}")
    return value


def _need(obj: dict[str, Any], key: str, kind: type[T], path: str = "") -> T:
    """:func:`_get`, and the field is required."""
    value = _get(obj, key, kind, path)
    if value is None:
        raise _bad(_at(path, key), f"'{key}' is required")
    return value


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(path, "must be an object")
    return value


def _check_top_level(raw: dict[str, Any]) -> None:
    """Refuse what needs stored state."""
    for key, why in _STATEFUL.items():
        if raw.get(key) is not None:
            raise _bad(key, why)
    if _get(raw, "background", bool):
        raise _bad("background", "background responses are stored and polled, and this "
                                 "gateway stores nothing; send the request without background")
    truncation = raw.get("truncation")
    if truncation not in (None, "disabled"):
        raise _bad("truncation", "only 'disabled' is supported: send input that fits the "
                                 "model's context")


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _image_part(part: dict[str, Any], path: str) -> dict[str, Any]:
    if part.get("file_id") is not None:
        raise _bad(_at(path, "file_id"), "this gateway stores no files; send the image as "
                                         "a URL or a data URL in image_url")
    url = _need(part, "image_url", str, path)
    image: dict[str, Any] = {"url": url}
    detail = _get(part, "detail", str, path)
    if detail is not None:
        if detail not in _IMAGE_DETAILS:
            raise _bad(_at(path, "detail"), "must be 'auto', 'low' or 'high'")
        image["detail"] = detail
    return {"type": "image_url", "image_url": image}


def _content_part(part: Any, path: str, *, text_only: bool) -> dict[str, Any]:
    """One Responses content part as a chat content part."""
    part = _object(part, path)
    kind = _need(part, "type", str, path)
    if kind in ("input_text", "output_text"):
        return _text_part(_need(part, "text", str, path))
    if kind == "refusal":
        return _text_part(_need(part, "refusal", str, path))
    if kind == "input_image" and not text_only:
        return _image_part(part, path)
    allowed = "text parts" if text_only else "text and image parts"
    raise _bad(_at(path, "type"), f"content part type '{kind}' is not supported here "
                                  f"(only {allowed})")


def _content(value: Any, path: str, *, text_only: bool = False) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(path, "must be a string or an array of content parts")
    return [_content_part(p, _at(path, j), text_only=text_only) for j, p in enumerate(value)]


def _message(item: dict[str, Any], path: str) -> dict[str, Any]:
    role = _need(item, "role", str, path)
    if role not in _ROLES:
        raise _bad(_at(path, "role"), "must be 'user', 'system', 'developer' or 'assistant'")
    if "content" not in item:
        raise _bad(_at(path, "content"), "'content' is required")
    return {"role": role, "content": _content(item["content"], _at(path, "content"))}


def _tool_call(item: dict[str, Any], path: str) -> dict[str, Any]:
    return {"id": _need(item, "call_id", str, path), "type": "function",
            "function": {"name": _need(item, "name", str, path),
                         "arguments": _need(item, "arguments", str, path)}}


def _tool_result(item: dict[str, Any], path: str) -> dict[str, Any]:
    if "output" not in item:
        raise _bad(_at(path, "output"), "'output' is required")
    return {"role": "tool", "tool_call_id": _need(item, "call_id", str, path),
            "content": _content(item["output"], _at(path, "output"), text_only=True)}


def _add_call(messages: list[dict[str, Any]], call: dict[str, Any]) -> None:
    """Calls join the assistant turn they follow (consecutive calls are one chat turn)."""
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _add_item(messages: list[dict[str, Any]], item: Any, path: str) -> None:
    item = _object(item, path)
    kind = _get(item, "type", str, path)
    if kind in (None, "message"):
        messages.append(_message(item, path))
    elif kind == "function_call":
        _add_call(messages, _tool_call(item, path))
    elif kind == "function_call_output":
        messages.append(_tool_result(item, path))
    elif kind == "item_reference":
        raise _bad(_at(path, "type"), "this gateway stores no items; send the item itself")
    elif kind != "reasoning":  # reasoning items are the model's own notes: dropped
        raise _bad(_at(path, "type"), f"input item type '{kind}' is not supported (only "
                                      "message, function_call, function_call_output, reasoning)")


def _messages(raw: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    instructions = _get(raw, "instructions", str)
    if instructions:
        messages.append({"role": "system", "content": instructions})
    items = raw.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages
    if items is None:
        raise _bad("input", "'input' is required")
    if not isinstance(items, list):
        raise _bad("input", "must be a string or an array of input items")
    if not items:
        raise _bad("input", "must not be empty")
    for i, item in enumerate(items):
        _add_item(messages, item, _at("input", i))
    return messages


def _function_tool(tool: Any, path: str) -> dict[str, Any]:
    """A Responses function tool, whole: ``{"type", "name", "description", "parameters",
    "strict"}`` (absent ones null), as the response object echoes it."""
    tool = _object(tool, path)
    kind = _need(tool, "type", str, path)
    if kind != "function":
        raise _bad(_at(path, "type"), f"tool type '{kind}' is not supported: this gateway "
                                      "has function tools only")
    return {"type": "function", "name": _need(tool, "name", str, path),
            "description": _get(tool, "description", str, path),
            "parameters": _get(tool, "parameters", dict, path),
            "strict": _get(tool, "strict", bool, path)}


def _tools(raw: dict[str, Any]) -> list[dict[str, Any]]:
    return [_function_tool(t, _at("tools", i))
            for i, t in enumerate(_get(raw, "tools", list) or [])]


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {k: v for k, v in tool.items() if k != "type" and v is not None}
    return {"type": "function", "function": function}


def _tool_choice(value: Any) -> str | dict[str, Any]:
    if isinstance(value, str) and value in _TOOL_CHOICES:
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": _need(value, "name", str,
                                                                "tool_choice")}}
    raise _bad("tool_choice", "must be 'auto', 'none', 'required' or "
                              "{\"type\": \"function\", \"name\": ...}")


def _response_format(raw: dict[str, Any]) -> dict[str, Any] | None:
    text = _get(raw, "text", dict)
    fmt = _get(text, "format", dict, "text") if text is not None else None
    if fmt is None:
        return None
    kind = _need(fmt, "type", str, "text.format")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise _bad("text.format.type", "must be 'text', 'json_object' or 'json_schema'")
    spec: dict[str, Any] = {"name": _need(fmt, "name", str, "text.format"),
                            "schema": _need(fmt, "schema", dict, "text.format")}
    for key, kind_ in (("strict", bool), ("description", str)):
        value = _get(fmt, key, kind_, "text.format")
        if value is not None:
            spec[key] = value
    return {"type": "json_schema", "json_schema": spec}


def _wants_logprobs(raw: dict[str, Any]) -> bool:
    include = _get(raw, "include", list) or []
    for i, name in enumerate(include):
        if not isinstance(name, str):
            raise _bad(_at("include", i), "must be a string")
    top = raw.get("top_logprobs")
    return _LOGPROBS_INCLUDE in include or (isinstance(top, int) and top > 0)


def _options(raw: dict[str, Any], chat: dict[str, Any]) -> None:
    """The sampling and output options, onto the chat body."""
    for key in _PASSED:
        if raw.get(key) is not None:
            chat[key] = raw[key]
    if raw.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = raw["max_output_tokens"]
    if raw.get("top_logprobs") is not None:
        chat["top_logprobs"] = raw["top_logprobs"]
    if _wants_logprobs(raw):
        chat["logprobs"] = True
    if _get(raw, "stream", bool):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    fmt = _response_format(raw)
    if fmt is not None:
        chat["response_format"] = fmt


def _tool_options(raw: dict[str, Any], chat: dict[str, Any]) -> None:
    tools = _tools(raw)
    if tools:
        chat["tools"] = [_chat_tool(t) for t in tools]
    if raw.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(raw["tool_choice"])
    parallel = _get(raw, "parallel_tool_calls", bool)
    if parallel is not None:
        chat["parallel_tool_calls"] = parallel


def _renamed(err: InvalidRequest) -> InvalidRequest:
    """A chat validation error, naming the Responses field instead of the chat one."""
    param = err.param
    if param is None:
        return err
    for pattern, name in _CHAT_PARAMS:
        new = pattern.sub(name, param, count=1)
        if new != param:
            message = err.message.replace(f"'{param}'", f"'{new}'")
            return InvalidRequest(message, param=new)
    return err


def chat_call(raw: dict[str, Any]) -> Call:
    """Validate a decoded Responses request body; return the chat :class:`Call` it asks for.

    Raises :class:`~sidecar.errors.InvalidRequest` naming the offending Responses field
    (see the module docstring for what is refused)."""
    if not isinstance(raw, dict):
        raise InvalidRequest("Invalid request: the body must be a JSON object.")
    check_bounds(raw)
    _check_top_level(raw)
    chat: dict[str, Any] = {"model": raw.get("model"), "messages": _messages(raw)}
    _tool_options(raw, chat)
    _options(raw, chat)
    if chat["model"] is None:
        del chat["model"]
    try:
        return validate_call(Op.CHAT, chat)
    except InvalidRequest as e:
        raise _renamed(e) from None


# --- answer: chat -> Responses --------------------------------------------------------------

Status = Literal["completed", "incomplete", "in_progress", "failed"]
ItemStatus = Literal["completed", "incomplete", "in_progress"]
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


class TopLogprob(msgspec.Struct):
    token: str
    bytes: list[int]
    logprob: float


class Logprob(msgspec.Struct):
    token: str
    bytes: list[int]
    logprob: float
    top_logprobs: list[TopLogprob]


class OutputText(msgspec.Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = []
    logprobs: list[Logprob] = []


class Refusal(msgspec.Struct, tag_field="type", tag="refusal"):
    refusal: str


ContentPart = OutputText | Refusal


class MessageItem(msgspec.Struct, tag_field="type", tag="message"):
    id: str
    status: ItemStatus
    content: list[ContentPart]
    role: str = "assistant"


class FunctionCallItem(msgspec.Struct, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = MessageItem | FunctionCallItem


class InputTokensDetails(msgspec.Struct):
    """``cache_write_tokens`` is required by the openai types: 0, chat usage has no count."""

    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(msgspec.Struct):
    code: str
    message: str


class IncompleteDetails(msgspec.Struct):
    reason: str


class ResponseObject(msgspec.Struct, kw_only=True):
    """A Responses ``response`` object; the request fields it echoes come from
    :func:`_template`."""

    id: str
    object: str = "response"
    created_at: int
    status: Status = "in_progress"
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem] = []
    usage: ResponseUsage | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] = []
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    top_logprobs: int | None = None
    text: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    user: str | None = None
    truncation: str = "disabled"
    reasoning: Any = None
    previous_response_id: str | None = None
    background: bool = False
    store: bool = False


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _template(raw: dict[str, Any], response_id: str, model: str,
              created_at: int) -> ResponseObject:
    """An in-progress response to ``raw`` (already accepted by :func:`chat_call`), with
    the request fields a response echoes; the others are set by :func:`_finished`."""
    text = dict(_get(raw, "text", dict) or {})
    text.setdefault("format", {"type": "text"})
    parallel = raw.get("parallel_tool_calls")
    return ResponseObject(
        id=response_id, created_at=created_at, model=model,
        instructions=_get(raw, "instructions", str), tools=_tools(raw),
        tool_choice=raw.get("tool_choice") or "auto",
        parallel_tool_calls=parallel if isinstance(parallel, bool) else True,
        temperature=raw.get("temperature"), top_p=raw.get("top_p"),
        max_output_tokens=raw.get("max_output_tokens"), top_logprobs=raw.get("top_logprobs"),
        text=text, metadata=_get(raw, "metadata", dict) or {}, user=_get(raw, "user", str),
    )


def _usage(usage: Usage | None) -> ResponseUsage | None:
    if usage is None:
        return None
    total = usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
    return ResponseUsage(input_tokens=usage.prompt_tokens,
                         input_tokens_details=InputTokensDetails(usage.cached_tokens),
                         output_tokens=usage.completion_tokens,
                         output_tokens_details=OutputTokensDetails(),
                         total_tokens=total)


def _outcome(finish_reason: str | None) -> tuple[Status, IncompleteDetails | None]:
    """The response status a chat ``finish_reason`` means, and why it is incomplete."""
    reason = _INCOMPLETE.get(finish_reason or "")
    return ("incomplete", IncompleteDetails(reason)) if reason else ("completed", None)


def _finished(template: ResponseObject, status: Status, incomplete: IncompleteDetails | None,
              output: list[OutputItem], usage: Usage | None,
              error: ResponseError | None = None) -> ResponseObject:
    """The one builder of a final response object (non-stream and stream alike)."""
    return msgspec.structs.replace(
        template, status=status, incomplete_details=incomplete, output=output,
        usage=_usage(usage), error=error,
        completed_at=int(time.time()) if status == "completed" else None,
    )


def _top_logprob(value: Any) -> TopLogprob | None:
    if not isinstance(value, dict):
        return None
    token, logprob = value.get("token"), value.get("logprob")
    if not isinstance(token, str) or not isinstance(logprob, int | float):
        return None
    raw_bytes = value.get("bytes")
    data = raw_bytes if isinstance(raw_bytes, list) else list(token.encode())
    return TopLogprob(token=token, bytes=data, logprob=float(logprob))


def _logprob(value: Any) -> Logprob | None:
    top = _top_logprob(value)
    if top is None:
        return None
    tops = value.get("top_logprobs")
    alternatives = [t for t in map(_top_logprob, tops if isinstance(tops, list) else ()) if t]
    return Logprob(token=top.token, bytes=top.bytes, logprob=top.logprob,
                   top_logprobs=alternatives)


def _logprobs(value: Any) -> list[Logprob]:
    """A chat choice's ``logprobs`` (any shape) as an ``output_text`` part's."""
    content = value.get("content") if isinstance(value, dict) else None
    if not isinstance(content, list):
        return []
    return [lp for lp in map(_logprob, content) if lp is not None]


def _message_item(item_id: str, parts: list[ContentPart], status: ItemStatus) -> MessageItem:
    return MessageItem(id=item_id, status=status, content=parts)


def _call_item(item_id: str, call_id: str, name: str, arguments: str,
               status: ItemStatus) -> FunctionCallItem:
    return FunctionCallItem(id=item_id, call_id=call_id, name=name, arguments=arguments,
                            status=status)


def _answer_items(message: ResponseMessage | None, logprobs: Any,
                  last_status: ItemStatus) -> list[OutputItem]:
    """A chat answer's message as output items: the text (and refusal) in one message
    item, then one function call item per tool call; the last item gets ``last_status``."""
    if message is None:
        return []
    items: list[OutputItem] = []
    parts: list[ContentPart] = []
    if message.content:
        parts.append(OutputText(text=message.content, logprobs=_logprobs(logprobs)))
    if message.refusal:
        parts.append(Refusal(refusal=message.refusal))
    if parts:
        items.append(_message_item(_new_id("msg"), parts, "completed"))
    for call in message.tool_calls or ():
        items.append(_call_item(_new_id("fc"), call.id, call.function.name,
                                call.function.arguments, "completed"))
    if items and last_status != "completed":
        items[-1].status = last_status
    return items


def _model(raw: dict[str, Any]) -> str:
    model = raw.get("model")
    return model if isinstance(model, str) else ""


def response_body(chat: bytes, raw: dict[str, Any], response_id: str) -> bytes:
    """A non-stream ``chat.completion`` body as the Responses ``response`` object (JSON)
    answering ``raw`` (the request :func:`chat_call` accepted). Only the first choice is
    used; a finish reason of ``length`` or ``content_filter`` makes it ``incomplete``."""
    answer = _decode_chat(chat)
    choice = answer.choices[0] if answer.choices else None
    status, incomplete = _outcome(choice.finish_reason if choice else None)
    created = int(answer.created) if answer.created is not None else int(time.time())
    template = _template(raw, response_id, answer.model or _model(raw), created)
    output = _answer_items(choice.message if choice else None,
                           choice.logprobs if choice else None,
                           "completed" if status == "completed" else "incomplete")
    return _encode(_finished(template, status, incomplete, output, answer.usage))


# --- stream: chat chunks -> Responses events ------------------------------------------------


class _Part:
    """A content part being streamed: its kind, text so far, logprobs so far."""

    __slots__ = ("kind", "logprobs", "pieces")

    def __init__(self, kind: Literal["output_text", "refusal"]) -> None:
        self.kind = kind
        self.pieces: list[str] = []
        self.logprobs: list[Logprob] = []

    def build(self) -> ContentPart:
        text = "".join(self.pieces)
        if self.kind == "refusal":
            return Refusal(refusal=text)
        return OutputText(text=text, logprobs=list(self.logprobs))


class _OpenMessage:
    __slots__ = ("id", "output_index", "parts")

    def __init__(self, output_index: int) -> None:
        self.id = _new_id("msg")
        self.output_index = output_index
        self.parts: list[_Part] = []

    def build(self, status: ItemStatus) -> MessageItem:
        return _message_item(self.id, [p.build() for p in self.parts], status)


class _OpenCall:
    __slots__ = ("call_id", "id", "index", "name", "output_index", "pieces")

    def __init__(self, output_index: int, index: int, delta: ToolCallDelta) -> None:
        self.id = _new_id("fc")
        self.output_index = output_index
        self.index = index
        self.call_id = delta.id or _new_id("call")
        self.name = (delta.function.name if delta.function else None) or ""
        self.pieces: list[str] = []

    def build(self, status: ItemStatus) -> FunctionCallItem:
        return _call_item(self.id, self.call_id, self.name, "".join(self.pieces), status)


class ResponseStream:
    """One Responses stream, translated from one chat stream.

    Call :meth:`start` once, :meth:`feed` with each piece of the chat SSE stream (whole
    events of ``chat.completion.chunk`` JSON; no ``[DONE]``), then :meth:`end` or
    :meth:`fail` once. Each returns the SSE bytes to send (``event:`` and ``data:`` lines),
    ``b""`` when there is nothing; every event carries a ``sequence_number`` from 0. Text
    goes into a message item, each tool call into a function call item; a new tool call, or
    text after a tool call, closes the item before it. Not safe for concurrent use."""

    __slots__ = ("_closed_calls", "_done", "_finish", "_items", "_open", "_seq", "_sse",
                 "_template", "_usage")

    def __init__(self, raw: dict[str, Any], response_id: str) -> None:
        self._template = _template(raw, response_id, _model(raw), int(time.time()))
        self._seq = 0
        self._sse = SSEDecoder()
        self._items: list[OutputItem] = []
        self._open: _OpenMessage | _OpenCall | None = None
        self._closed_calls: set[int] = set()
        self._finish: str | None = None
        self._usage: Usage | None = None
        self._done = False

    # -- events

    def _event(self, kind: str, **fields: Any) -> bytes:
        fields = {"type": kind, **fields, "sequence_number": self._seq}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + _encode(fields) + b"\n\n"

    def _response_event(self, kind: str, response: ResponseObject) -> bytes:
        return self._event(kind, response=response)

    # -- public

    def start(self, model: str) -> bytes:
        """``response.created`` then ``response.in_progress``, for the model serving it."""
        self._template = msgspec.structs.replace(self._template, model=model)
        return (self._response_event("response.created", self._template)
                + self._response_event("response.in_progress", self._template))

    def feed(self, frame: bytes) -> bytes:
        """The events for one or more whole chat SSE events. Raises
        :class:`~sidecar.errors.UpstreamMalformed` for a chunk that is not JSON, or a
        fragment of a tool call already closed."""
        if self._done:
            return b""
        out: list[bytes] = []
        for event in self._sse.feed(frame):
            if event.data.strip() == b"[DONE]":
                continue
            try:
                chunk = _decode_chunk(event.data)
            except msgspec.DecodeError:
                raise UpstreamMalformed("a stream chunk is not a chat.completion.chunk") from None
            self._chunk(chunk, out)
        return b"".join(out)

    def end(self, usage: Usage | None) -> bytes:
        """Close the open item; ``response.completed`` (``response.incomplete`` when the
        chat stream ended for ``length`` or ``content_filter``) with the whole response,
        its usage ``usage`` or else the stream's own usage chunk's."""
        if self._done:
            return b""
        self._done = True
        status, incomplete = _outcome(self._finish)
        out: list[bytes] = []
        self._close(out, "completed" if status == "completed" else "incomplete")
        final = _finished(self._template, status, incomplete, self._items, usage or self._usage)
        out.append(self._response_event(f"response.{status}", final))
        return b"".join(out)

    def fail(self, err: SidecarError) -> bytes:
        """An ``error`` event then ``response.failed`` (the output so far, the open item
        ``incomplete``)."""
        if self._done:
            return b""
        self._done = True
        error = self._event("error", code=err.code, message=str(err), param=err.param)
        output = list(self._items)
        if self._open is not None:
            output.append(self._open.build("incomplete"))
        code = "rate_limit_exceeded" if err.status == 429 else "server_error"
        final = _finished(self._template, "failed", None, output, self._usage,
                          ResponseError(code=code, message=str(err)))
        return error + self._response_event("response.failed", final)

    # -- chunks

    def _chunk(self, chunk: ChatChunk, out: list[bytes]) -> None:
        if isinstance(chunk.usage, Usage):
            self._usage = chunk.usage
        choice = next((c for c in chunk.choices or () if c.index == 0), None)
        if choice is None:
            return
        delta = choice.delta
        if delta is not None:
            if delta.content:
                self._text(out, "output_text", delta.content, choice)
            if delta.refusal:
                self._text(out, "refusal", delta.refusal, choice)
            for call in delta.tool_calls or ():
                self._call(out, call)
        if choice.finish_reason:
            self._finish = choice.finish_reason

    def _next_index(self) -> int:
        return len(self._items) + (self._open is not None)

    def _text(self, out: list[bytes], kind: Literal["output_text", "refusal"], text: str,
              choice: ChunkChoice) -> None:
        message = self._open
        if not isinstance(message, _OpenMessage):
            self._close(out, "completed")
            message = self._open = _OpenMessage(self._next_index())
            out.append(self._event("response.output_item.added", output_index=message.output_index,
                                   item=message.build("in_progress")))
        part = message.parts[-1] if message.parts else None
        if part is None or part.kind != kind:
            if part is not None:
                self._close_part(out, message)
            part = _Part(kind)
            message.parts.append(part)
            out.append(self._part_event("response.content_part.added", message, part))
        part.pieces.append(text)
        where = self._where(message)
        if kind == "refusal":
            out.append(self._event("response.refusal.delta", **where, delta=text))
            return
        logprobs = _logprobs(choice.logprobs)
        part.logprobs.extend(logprobs)
        out.append(self._event("response.output_text.delta", **where, delta=text,
                               logprobs=logprobs))

    def _call(self, out: list[bytes], delta: ToolCallDelta) -> None:
        index = delta.index if isinstance(delta.index, int) else 0
        call = self._open
        if not isinstance(call, _OpenCall) or call.index != index:
            if index in self._closed_calls:
                raise UpstreamMalformed(f"a fragment of tool call {index} came after it ended")
            self._close(out, "completed")
            call = self._open = _OpenCall(self._next_index(), index, delta)
            out.append(self._event("response.output_item.added", output_index=call.output_index,
                                   item=call.build("in_progress")))
        elif delta.function is not None and delta.function.name and not call.name:
            call.name = delta.function.name
        arguments = delta.function.arguments if delta.function else None
        if arguments:
            call.pieces.append(arguments)
            out.append(self._event("response.function_call_arguments.delta", item_id=call.id,
                                   output_index=call.output_index, delta=arguments))

    # -- closing

    @staticmethod
    def _where(message: _OpenMessage) -> dict[str, Any]:
        return {"item_id": message.id, "output_index": message.output_index,
                "content_index": len(message.parts) - 1}

    def _part_event(self, kind: str, message: _OpenMessage, part: _Part) -> bytes:
        return self._event(kind, **self._where(message), part=part.build())

    def _close_part(self, out: list[bytes], message: _OpenMessage) -> None:
        part = message.parts[-1]
        built = part.build()
        where = self._where(message)
        if isinstance(built, Refusal):
            out.append(self._event("response.refusal.done", **where, refusal=built.refusal))
        else:
            out.append(self._event("response.output_text.done", **where, text=built.text,
                                   logprobs=built.logprobs))
        out.append(self._event("response.content_part.done", **where, part=built))

    def _close(self, out: list[bytes], status: ItemStatus) -> None:
        """Emit the done events of the open item, if any, and keep it in the output."""
        item = self._open
        if item is None:
            return
        self._open = None
        if isinstance(item, _OpenMessage):
            if item.parts:
                self._close_part(out, item)
        else:
            self._closed_calls.add(item.index)
            out.append(self._event("response.function_call_arguments.done", item_id=item.id,
                                   output_index=item.output_index,
                                   arguments="".join(item.pieces)))
        built = item.build(status)
        self._items.append(built)
        out.append(self._event("response.output_item.done", output_index=item.output_index,
                               item=built))

