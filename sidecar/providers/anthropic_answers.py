"""Anthropic's answers as OpenAI ones: Messages API messages into ``chat.completion``
bodies (:func:`translate_message`), and its SSE events into ``chat.completion.chunk`` frames
(:class:`StreamTranslator`).

Pure (no I/O), so tested without a network; :mod:`sidecar.providers.anthropic` builds the
requests and adds the HTTP exchange. The Structs below are Anthropic's wire shapes (what
the OpenAI side is built of is declared once, in :mod:`sidecar.types`).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from msgspec import UNSET

from sidecar.errors import (
    UpstreamError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamServerError,
)
from sidecar.providers.sse import Event, SSEDecoder
from sidecar.types import (
    ChatChunk,
    ChatCompletion,
    Choice,
    ChunkChoice,
    Delta,
    FunctionCall,
    FunctionDelta,
    PromptTokensDetails,
    ResponseMessage,
    ToolCall,
    ToolCallDelta,
    Usage,
)

_encoder = msgspec.json.Encoder()

# --- Anthropic -> OpenAI ---------------------------------------------------------------------

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Block(msgspec.Struct):
    """Any content block; types other than text and tool_use (thinking...) are skipped."""

    type: str
    text: str = ""
    id: str = ""
    name: str = ""
    input: dict[str, Any] | None = None


class _Message(msgspec.Struct):
    id: str
    model: str
    content: list[_Block] = []
    stop_reason: str | None = None
    usage: _Usage = msgspec.field(default_factory=_Usage)


_message_decoder = msgspec.json.Decoder(_Message)


def finish_reason(stop_reason: str | None) -> str:
    """OpenAI's ``finish_reason`` for an Anthropic ``stop_reason`` (unknown ones: ``stop``)."""
    return _FINISH_REASONS.get(stop_reason or "", "stop")


def usage_of(usage: _Usage) -> Usage:
    """OpenAI usage; cache writes and reads are input tokens too, so they count as prompt;
    cache reads are also ``prompt_tokens_details.cached_tokens`` (priced as cached input)."""
    prompt = ((usage.input_tokens or 0) + (usage.cache_creation_input_tokens or 0)
              + (usage.cache_read_input_tokens or 0))
    completion = usage.output_tokens or 0
    cached = usage.cache_read_input_tokens or 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached) if cached else None)


def translate_message(body: bytes, *, target: str, created: int | None = None) -> ChatCompletion:
    """Translate a Messages API answer into a ``chat.completion``.

    Text blocks are joined into ``content`` (``None`` when the answer is only tool calls),
    ``tool_use`` blocks become ``tool_calls`` with their input as a JSON string. Raises
    :class:`UpstreamMalformed` if ``body`` is not an Anthropic message.
    """
    try:
        msg = _message_decoder.decode(body)
    except msgspec.DecodeError:
        raise UpstreamMalformed(f"{target} answered with an invalid message",
                                target=target) from None
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in msg.content:
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "tool_use":
            arguments = _encoder.encode(block.input or {}).decode()
            function = FunctionCall(name=block.name, arguments=arguments)
            calls.append(ToolCall(id=block.id, function=function))
    message = ResponseMessage(content="".join(texts) if texts or not calls else None,
                              tool_calls=calls or UNSET)
    return ChatCompletion(
        id=msg.id,
        created=int(time.time()) if created is None else created,
        model=msg.model,
        choices=[Choice(index=0, message=message, finish_reason=finish_reason(msg.stop_reason))],
        usage=usage_of(msg.usage),
    )


# --- streams ---------------------------------------------------------------------------------


class _Delta(msgspec.Struct):
    type: str = ""
    text: str = ""
    partial_json: str = ""


class _StopDelta(msgspec.Struct):
    stop_reason: str | None = None


class _ErrorDetail(msgspec.Struct):
    type: str = ""
    message: str = ""


class _MessageStart(msgspec.Struct, tag="message_start"):
    message: _Message


class _BlockStart(msgspec.Struct, tag="content_block_start"):
    index: int
    content_block: _Block


class _BlockDelta(msgspec.Struct, tag="content_block_delta"):
    index: int
    delta: _Delta


class _BlockStop(msgspec.Struct, tag="content_block_stop"):
    index: int


class _MessageDelta(msgspec.Struct, tag="message_delta"):
    delta: _StopDelta
    usage: _Usage | None = None


class _MessageStop(msgspec.Struct, tag="message_stop"):
    pass


class _Ping(msgspec.Struct, tag="ping"):
    pass


class _Error(msgspec.Struct, tag="error"):
    error: _ErrorDetail


_StreamEvent = (_MessageStart | _BlockStart | _BlockDelta | _BlockStop | _MessageDelta
                | _MessageStop | _Ping | _Error)
_event_decoder = msgspec.json.Decoder(_StreamEvent)
_KNOWN_EVENTS = frozenset({
    b"message_start", b"content_block_start", b"content_block_delta", b"content_block_stop",
    b"message_delta", b"message_stop", b"ping", b"error",
})
_OVERLOADED = frozenset({"overloaded_error", "rate_limit_error"})


class StreamTranslator:
    """Anthropic stream events in, OpenAI ``chat.completion.chunk`` SSE frames out.

    One per stream; not safe for concurrent use. :meth:`feed` takes bytes as they came off
    the network and returns every frame they complete, joined (``b""`` when none). The first
    frame carries ``delta.role``; each ``tool_use`` block becomes a ``tool_calls`` entry (id,
    name, then argument fragments); ``message_delta`` gives the frame with ``finish_reason``;
    with ``include_usage`` a last frame has ``choices: []`` and ``usage``. :attr:`finished`
    turns true at ``message_stop``, after which input is ignored. Event types this module
    does not know are skipped, as Anthropic's versioning policy asks.

    ``native``: :meth:`feed` returns Anthropic's own events, whole and unchanged (the
    client speaks the Messages API), and translates them only to keep the same state, usage
    and errors; :attr:`started` then turns true at the first event after ``message_start``
    other than ``ping`` (a thinking block counts).
    """

    def __init__(self, target: str, *, include_usage: bool = False,
                 created: int | None = None, native: bool = False) -> None:
        self.native = native
        self.finished = False
        self.started = False
        """Whether a frame with a token (text, tool call or finish) has been produced."""
        self.content_chunks = 0
        self.content_chars = 0
        self._target = target
        self._include_usage = include_usage
        self._created = int(time.time()) if created is None else created
        self._sse = SSEDecoder()
        self._id = ""
        self._model = ""
        self._usage = _Usage()
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self._no_args: set[int] = set()  # tool blocks that have sent no argument text yet

    @property
    def usage(self) -> Usage:
        """Usage so far; final once :attr:`finished`."""
        return usage_of(self._usage)

    def feed(self, piece: bytes) -> bytes:
        """The frames completed by ``piece``, joined.

        Raises :class:`UpstreamRateLimited` (overloaded, rate limited) or
        :class:`UpstreamServerError` for an ``error`` event, and :class:`UpstreamMalformed`
        for an event that is not valid Anthropic JSON.
        """
        out: list[bytes] = []
        for event in self._sse.feed(piece):
            if self.finished:
                continue
            frames: list[bytes] = []
            token = self._translate(event, frames)
            if self.native:
                out.append(_event_bytes(event))
                token = token and event.name not in (b"ping", b"message_start")
            else:
                token = token and bool(frames)
                out.extend(frames)
            self.started = self.started or token
        return b"".join(out)

    def _translate(self, event: Event, out: list[bytes]) -> bool:
        """Append the frames for ``event``; return False for the role preamble."""
        if event.name and event.name not in _KNOWN_EVENTS:
            return False
        try:
            decoded = _event_decoder.decode(event.data)
        except msgspec.DecodeError:
            raise UpstreamMalformed(f"{self._target} sent an invalid stream event",
                                    target=self._target) from None
        match decoded:
            case _MessageStart(message=msg):
                self._id, self._model = msg.id, msg.model
                self._add_usage(msg.usage)
                out.append(self._chunk(Delta(role="assistant", content="")))
                return False
            case _BlockStart(index=i, content_block=block):
                if block.type == "text" and block.text:
                    out.append(self._chunk(Delta(content=block.text)))
                elif block.type == "tool_use":
                    n = self._tools[i] = len(self._tools)
                    args = _encoder.encode(block.input).decode() if block.input else ""
                    if not args:
                        self._no_args.add(i)
                    function = FunctionDelta(name=block.name, arguments=args)
                    out.append(self._tool_delta(ToolCallDelta(
                        index=n, id=block.id, type="function", function=function)))
            case _BlockDelta(index=i, delta=delta):
                if delta.type == "text_delta" and delta.text:
                    self.content_chunks += 1
                    self.content_chars += len(delta.text)
                    out.append(self._chunk(Delta(content=delta.text)))
                elif delta.type == "input_json_delta" and delta.partial_json and i in self._tools:
                    self._no_args.discard(i)
                    out.append(self._arguments(i, delta.partial_json))
            case _BlockStop(index=i):
                if i in self._no_args:  # a call without parameters: still parseable JSON
                    self._no_args.discard(i)
                    out.append(self._arguments(i, "{}"))
            case _MessageDelta(delta=delta, usage=usage):
                if usage is not None:
                    self._add_usage(usage)
                out.append(self._chunk(Delta(), finish_reason(delta.stop_reason)))
            case _MessageStop():
                self.finished = True
                if self._include_usage:
                    out.append(_frame(ChatChunk(id=self._id, created=self._created,
                                                model=self._model, choices=[],
                                                usage=self.usage)))
            case _Error(error=error):
                raise _stream_error(error, self._target)
            case _Ping():
                pass
        return True

    def _add_usage(self, usage: _Usage) -> None:
        # message_delta counts are cumulative; a field it leaves out keeps its earlier value
        for field in _Usage.__struct_fields__:
            value = getattr(usage, field)
            if value is not None:
                setattr(self._usage, field, value)

    def _chunk(self, delta: Delta, finish: str | None = None) -> bytes:
        choice = ChunkChoice(index=0, delta=delta, finish_reason=finish)
        return _frame(ChatChunk(id=self._id, created=self._created, model=self._model,
                                choices=[choice]))

    def _tool_delta(self, call: ToolCallDelta) -> bytes:
        return self._chunk(Delta(tool_calls=[call]))

    def _arguments(self, block: int, fragment: str) -> bytes:
        return self._tool_delta(ToolCallDelta(index=self._tools[block],
                                              function=FunctionDelta(arguments=fragment)))


def _event_bytes(event: Event) -> bytes:
    """``event`` as one whole SSE event again."""
    data = b"data: " + event.data.replace(b"\n", b"\ndata: ") + b"\n\n"
    return b"event: " + event.name + b"\n" + data if event.name else data


def _frame(chunk: ChatChunk) -> bytes:
    return b"data: " + _encoder.encode(chunk) + b"\n\n"


def _stream_error(error: _ErrorDetail, target: str) -> UpstreamError:
    message = f"{target}: {error.message or error.type or 'error'} (mid-stream)"
    if error.type in _OVERLOADED:
        return UpstreamRateLimited(message, target=target)
    return UpstreamServerError(message, target=target)
