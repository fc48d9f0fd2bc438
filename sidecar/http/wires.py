"""The wire protocols the HTTP front end speaks, each: a client body -> a
:class:`~sidecar.types.Call`, and what the gateway returns -> that protocol's answer.

    OpenAIWire     /v1/chat/completions, /v1/completions, /v1/embeddings (relayed as they are)
    MessagesWire   /v1/messages: Anthropic's Messages API (:mod:`sidecar.protocols.messages`)
    ResponsesWire  /v1/responses: OpenAI's Responses API (:mod:`sidecar.protocols.responses`)

A wire object serves one request (the Responses one keeps its id). :meth:`decode` may run
off the event loop (big bodies); the others run on it. The error envelope of each path is
chosen by :func:`error_envelope`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from typing import Any, Protocol

import msgspec

from sidecar.errors import InvalidRequest, SidecarError
from sidecar.gateway import Completed, Ended, Failed, Relayed, Streaming, error_body
from sidecar.http.sse import cost_comment, sse
from sidecar.protocols import messages, responses, responses_answers
from sidecar.types import MAX_DEPTH, Call, Op, validate_call

_object_decoder = msgspec.json.Decoder(dict[str, Any])


def decode_object(body: bytes) -> dict[str, Any]:
    """A client body as a JSON object. Raises :class:`InvalidRequest`."""
    try:
        return _object_decoder.decode(body)
    except msgspec.ValidationError as e:
        if str(e).startswith("Expected `object`"):
            raise InvalidRequest("The request body must be a JSON object.") from None
        raise InvalidRequest(f"The request body is not valid: {e}") from None  # 1e999
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}") from None
    except RecursionError:  # thousands of nested brackets: never a real request
        raise InvalidRequest(f"The request body nests deeper than {MAX_DEPTH} levels.") from None


class Wire(Protocol):
    def decode(self, raw: dict[str, Any]) -> Call:
        """Validate a client's JSON object. Raises :class:`InvalidRequest`."""
        ...

    def body(self, done: Completed) -> bytes:
        """A non-stream answer's body."""
        ...

    def events(self, streaming: Streaming) -> AsyncGenerator[bytes, None]:
        """A stream's SSE bytes; closing it closes ``streaming.events``."""
        ...


class OpenAIWire:
    """OpenAI's own paths: answers and frames are relayed as the gateway returns them."""

    def __init__(self, op: Op) -> None:
        self._op = op

    def decode(self, raw: dict[str, Any]) -> Call:
        return validate_call(self._op, raw)

    def body(self, done: Completed) -> bytes:
        return done.reply.body

    def events(self, streaming: Streaming) -> AsyncGenerator[bytes, None]:
        return sse(streaming.events)


class MessagesWire:
    """``POST /v1/messages``: answers from an Anthropic target are its own (``native``),
    others are translated."""

    def __init__(self) -> None:
        self._model = ""

    def decode(self, raw: dict[str, Any]) -> Call:
        call = messages.chat_call(raw)
        self._model = call.request.model
        return call

    def body(self, done: Completed) -> bytes:
        return done.reply.body if done.reply.native else messages.message_body(done.reply.body)

    async def events(self, streaming: Streaming) -> AsyncGenerator[bytes, None]:
        translator = None if streaming.native else messages.MessageStream(self._model)
        try:
            async for event in streaming.events:
                match event:
                    case Relayed(frame=frame):
                        out = frame if translator is None else translator.feed(frame)
                    case Ended(usage=usage):
                        out = b"" if translator is None else translator.end(usage)
                        out += cost_comment(event)
                    case Failed(error=error):
                        out = messages.MessageStream.fail(error)
                if out:
                    yield out
        except SidecarError as e:  # a frame the translation could not read
            yield messages.MessageStream.fail(e)
        finally:
            await streaming.events.aclose()


class ResponsesWire:
    """``POST /v1/responses``, stateless (see :mod:`sidecar.protocols.responses`)."""

    def __init__(self) -> None:
        self._raw: dict[str, Any] = {}
        self._id = "resp_" + uuid.uuid4().hex
        self._model = ""

    def decode(self, raw: dict[str, Any]) -> Call:
        call = responses.chat_call(raw)
        self._raw, self._model = raw, call.request.model
        return call

    def body(self, done: Completed) -> bytes:
        return responses_answers.response_body(done.reply.body, self._raw, self._id)

    async def events(self, streaming: Streaming) -> AsyncGenerator[bytes, None]:
        stream = responses_answers.ResponseStream(self._raw, self._id)
        try:
            yield stream.start(self._model)
            async for event in streaming.events:
                match event:
                    case Relayed(frame=frame):
                        out = stream.feed(frame)
                    case Ended(usage=usage):
                        out = stream.end(usage) + cost_comment(event)
                    case Failed(error=error):
                        out = stream.fail(error)
                if out:
                    yield out
        except SidecarError as e:  # a frame the translation could not read
            yield stream.fail(e)
        finally:
            await streaming.events.aclose()


def error_envelope(path: str, err: SidecarError) -> bytes:
    """``err`` in the envelope of the protocol served at ``path``: Anthropic's under
    ``/v1/messages``, OpenAI's elsewhere."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return messages.error_body(err)
    return error_body(err)
