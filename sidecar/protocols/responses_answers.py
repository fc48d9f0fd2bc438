"""OpenAI's Responses API: the gateway's chat answers as ``response`` objects
(:func:`response_body`) and its chunk frames as the Responses stream events
(:class:`ResponseStream`). Pure (no I/O); the requests are translated in
:mod:`sidecar.protocols.responses`, whose docstring states what is supported.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec

from sidecar.errors import SidecarError, UpstreamMalformed
from sidecar.protocols.responses import field, function_tools
from sidecar.providers.sse import SSEDecoder
from sidecar.types import (
    ChatChunk,
    ChatCompletion,
    ChunkChoice,
    ResponseMessage,
    ToolCallDelta,
    Usage,
)

_encode = msgspec.json.Encoder().encode
_decode_chat = msgspec.json.Decoder(ChatCompletion).decode
_decode_chunk = msgspec.json.Decoder(ChatChunk).decode

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
    text = dict(field(raw, "text", dict) or {})
    text.setdefault("format", {"type": "text"})
    parallel = raw.get("parallel_tool_calls")
    return ResponseObject(
        id=response_id, created_at=created_at, model=model,
        instructions=field(raw, "instructions", str), tools=function_tools(raw),
        tool_choice=raw.get("tool_choice") or "auto",
        parallel_tool_calls=parallel if isinstance(parallel, bool) else True,
        temperature=raw.get("temperature"), top_p=raw.get("top_p"),
        max_output_tokens=raw.get("max_output_tokens"), top_logprobs=raw.get("top_logprobs"),
        text=text, metadata=field(raw, "metadata", dict) or {}, user=field(raw, "user", str),
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

