"""Any OpenAI-compatible API: the client's body is forwarded with only ``model`` changed.

Answers are validated (garbage becomes :class:`UpstreamMalformed`, so routing can fall back)
but relayed as the provider's own bytes: non-stream bodies whole, stream frames as they came.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator

import msgspec
from msgspec import UNSET

from sidecar.config import OpenAIProvider as OpenAIConfig
from sidecar.errors import UpstreamMalformed, UpstreamServerError, UpstreamUnreachable
from sidecar.providers.base import Reply, Upstream, check_shape, check_usage
from sidecar.providers.sse import SSEDecoder
from sidecar.types import (
    BodyShape,
    Call,
    ChatChunk,
    EmbeddingRequest,
    Meter,
    Op,
    TextCompletion,
    Usage,
)

_DONE = b"[DONE]"
_REASONING = re.compile(r"^(o\d|gpt-5)")
_body_decoder = msgspec.json.Decoder(BodyShape)
# Stream events are checked against their op's answer shape: chat chunks (deltas), or
# text completion chunks (text).
_chat_chunk_decoder = msgspec.json.Decoder(ChatChunk)
_text_chunk_decoder = msgspec.json.Decoder(TextCompletion)
_encoder = msgspec.json.Encoder()


class OpenAICompatible:
    """Provider for any OpenAI-compatible ``/v1`` API. Safe for concurrent use."""

    native_messages = False

    def __init__(self, config: OpenAIConfig) -> None:
        self.name = config.name
        auth = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._http = Upstream(config, auth)
        self._stream_usage = config.stream_usage

    def supports(self, op: Op) -> bool:
        return True

    def _body(self, call: Call, model: str) -> bytes:
        raw = dict(call.raw)
        raw["model"] = model
        if call.token_cap is not None:
            # Reasoning models refuse max_tokens; most other servers only know max_tokens.
            raw["max_completion_tokens" if _REASONING.match(model) else "max_tokens"] = (
                call.token_cap)
        if call.stream and self._stream_usage:
            options = raw.get("stream_options")
            raw["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                     "include_usage": True}
        return _encoder.encode(raw)

    async def send(self, call: Call, model: str, timeout_s: float,
                   meter: Meter | None = None) -> Reply:
        target = f"{self.name}/{model}"
        body = await self._http.post("/" + call.op.value, self._body(call, model), timeout_s,
                                     target, meter)
        try:
            shape = _body_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise UpstreamMalformed(f"{target} answered with invalid JSON", target=target) from None
        check_shape(call.op, shape, target)
        check_usage(shape.usage, target, meter)
        return Reply(body, shape.usage)

    async def stream(self, call: Call, model: str, timeout_s: float,
                     meter: Meter | None = None) -> AsyncGenerator[bytes, None]:
        target = f"{self.name}/{model}"
        meter = meter or Meter()
        options = call.request.stream_options if not isinstance(
            call.request, EmbeddingRequest) else None
        client_wants_usage = bool(options and options.include_usage)
        async with self._http.open_stream(
            "/" + call.op.value, self._body(call, model), timeout_s, target, meter
        ) as pieces:
            decoder = SSEDecoder()
            done = finished = started = False
            out: list[bytes] = []
            async for piece in pieces:
                if done:
                    continue  # drain to the end so the connection can be reused
                for event in decoder.feed(piece):
                    if event.data == _DONE:
                        done = True
                        break
                    if not event.data:
                        continue
                    shape = _check_chunk(call.op, event.data, target)
                    chars = sum(c.content_chars for c in shape.choices or ())
                    if chars:
                        meter.content_chunks += 1
                        meter.content_chars += chars
                    started |= any(c.has_token for c in shape.choices or ())
                    finished |= any(c.finish_reason for c in shape.choices or ())
                    if isinstance(shape.usage, Usage):  # not UNSET or null
                        check_usage(shape.usage, target, meter)
                        meter.usage = shape.usage
                        started = True
                        if not shape.choices and not client_wants_usage:
                            continue  # asked for the ledger, not for this client
                    out.append(b"data: " + event.data + b"\n\n")
                # Frames before the first token (the role preamble) are held back, so
                # a failure before the first token can still be replaced by another target.
                if out and (started or done):
                    yield out[0] if len(out) == 1 else b"".join(out)
                    out = []
            if out:
                yield b"".join(out)
            if not (done or finished):
                raise UpstreamUnreachable(f"{target} ended the stream early", target=target)

    async def aclose(self) -> None:
        await self._http.aclose()


def _check_chunk(op: Op, data: bytes, target: str) -> ChatChunk | TextCompletion:
    """Validate one stream event of ``op``: a chunk with ``choices``. Raises
    :class:`UpstreamServerError` for an error event, :class:`UpstreamMalformed` for
    anything else."""
    try:
        decoder = _text_chunk_decoder if op is Op.COMPLETIONS else _chat_chunk_decoder
        shape = decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise UpstreamMalformed(f"{target} sent an invalid stream event", target=target) from None
    if shape.error is not None and shape.error is not UNSET:
        raise UpstreamServerError(f"{target} reported an error mid-stream", target=target)
    if shape.choices is None:
        raise UpstreamMalformed(f"{target} sent a stream event without 'choices'", target=target)
    return shape
