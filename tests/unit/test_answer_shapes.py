"""The OpenAI answer shapes of sidecar.types: what the gateway builds encodes exactly as
OpenAI's answers look (the bytes clients get), what providers relay decodes leniently where
real providers differ, and garbage is refused."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from sidecar.types import (
    ChatChunk,
    ChatCompletion,
    Choice,
    ChunkChoice,
    Delta,
    Embedding,
    EmbeddingList,
    ErrorDetail,
    ErrorEnvelope,
    FunctionDelta,
    ResponseMessage,
    TextChoice,
    TextCompletion,
    ToolCallDelta,
    Usage,
)

H = '{"id":"c1","created":7,"model":"m",'


@pytest.mark.parametrize(("built", "wire"), [
    (ChatCompletion("c1", 7, "m", [Choice(0, ResponseMessage(content="hi"), "stop")],
                    Usage(3, 2, 5)),
     H + '"choices":[{"index":0,"message":{"role":"assistant","content":"hi","refusal":null},'
     '"finish_reason":"stop","logprobs":null}],"usage":{"prompt_tokens":3,"completion_tokens":2,'
     '"total_tokens":5},"object":"chat.completion"}'),
    (ChatChunk("c1", 7, "m", [ChunkChoice(0, Delta(role="assistant", content=""))]),
     H + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
     '"finish_reason":null,"logprobs":null}],"object":"chat.completion.chunk"}'),
    (ChatChunk("c1", 7, "m", [], Usage(3, 2, 5)),
     H + '"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},'
     '"object":"chat.completion.chunk"}'),
    (ChatChunk("c1", 7, "m", [ChunkChoice(0, Delta(tool_calls=[ToolCallDelta(
        index=0, id="t1", type="function", function=FunctionDelta(name="f", arguments=""))]))]),
     H + '"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"t1","type":"function",'
     '"function":{"name":"f","arguments":""}}]},"finish_reason":null,"logprobs":null}],'
     '"object":"chat.completion.chunk"}'),
    (ChatChunk("c1", 7, "m", [ChunkChoice(0, Delta(tool_calls=[ToolCallDelta(
        index=0, function=FunctionDelta(arguments='{"a"'))]))]),
     H + '"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
     '{"arguments":"{\\"a\\""}}]},"finish_reason":null,"logprobs":null}],"object":"chat.completion.chunk"}'),
    (TextCompletion("c1", 7, "m", [TextChoice(0, "hi", None)]),
     H + '"choices":[{"index":0,"text":"hi","finish_reason":null,"logprobs":null}],'
     '"object":"text_completion"}'),
    (EmbeddingList([Embedding(0, [0.5])], "m", Usage(2, 0, 2)),
     '{"data":[{"index":0,"embedding":[0.5],"object":"embedding"}],"model":"m",'
     '"usage":{"prompt_tokens":2,"total_tokens":2},"object":"list"}'),
])
def test_built_answers_encode_as_openai_sends_them(built: msgspec.Struct, wire: str) -> None:
    assert msgspec.json.encode(built).decode() == wire


def _chunk(**fields: Any) -> bytes:
    return json.dumps({"id": "c1", "created": 7, "model": "m", **fields}).encode()


def test_relayed_chunks_decode_where_providers_differ() -> None:
    # OpenAI's "usage": null on every chunk but the last; a float "created"; a tool call
    # delta without its index and with null id and name (seen from some servers)
    data = _chunk(created=7.5, usage=None, choices=[{"delta": {"tool_calls": [
        {"id": None, "function": {"name": None, "arguments": "{}"}}]}}])
    chunk = msgspec.json.decode(data, type=ChatChunk)
    assert chunk.usage is None and chunk.created == 7.5
    assert chunk.choices is not None
    choice = chunk.choices[0]
    assert choice.index == 0 and choice.delta is not None and choice.delta.tool_calls
    call = choice.delta.tool_calls[0]
    assert call.index is msgspec.UNSET and call.function == FunctionDelta(None, "{}")
    assert choice.has_token and choice.content_chars == 0
    # a usage-only chunk leaves choices empty; no usage at all is UNSET
    assert msgspec.json.decode(_chunk(choices=[]), type=ChatChunk).usage is msgspec.UNSET


@pytest.mark.parametrize(("shape", "data"), [
    (ChatChunk, _chunk(choices={"index": 0})),
    (ChatChunk, _chunk(choices=[{"delta": {"content": 5}}])),
    (ChatChunk, _chunk(choices=[{"delta": {"content": "x"}, "finish_reason": 1}])),
    (ChatChunk, _chunk(choices=[{"delta": {"tool_calls": [{"index": "0"}]}}])),
    (ChatChunk, _chunk(choices=[], usage={"prompt_tokens": "3"})),
    (ChatChunk, b"[1, 2]"),
    (TextCompletion, _chunk(choices=[{"text": ["x"]}])),
    (ChatCompletion, _chunk(choices=[{"message": 5}])),
    (ChatCompletion, _chunk(choices=[{"message": {"tool_calls": [{"function": {}}]}}])),
    (EmbeddingList, b'{"data": [{"embedding": {"x": 1}}]}'),
])
def test_garbage_is_refused(shape: type[msgspec.Struct], data: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(data, type=shape)


def test_tokens_and_characters_of_a_chunk() -> None:
    preamble = ChunkChoice(0, Delta(role="assistant", content=""))
    assert not preamble.has_token and preamble.content_chars == 0
    text = ChunkChoice(0, Delta(content="héllo"))
    assert text.has_token and text.content_chars == 5
    assert ChunkChoice(0, Delta(), "stop").has_token
    assert ChunkChoice(0, Delta(function_call=FunctionDelta("f"))).has_token
    assert ChunkChoice(0, None).content_chars == 0 and not ChunkChoice(0, None).has_token
    assert TextChoice(0, "abc").has_token and TextChoice(0, "abc").content_chars == 3
    assert not TextChoice(0, "").has_token and TextChoice(0, "", "length").has_token


@pytest.mark.parametrize(("body", "error"), [
    (b'{"error": {"message": "slow down", "type": "rate", "code": 429}}',
     ErrorDetail("slow down", "rate", 429)),
    (b'{"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}',
     ErrorDetail("busy", "overloaded_error")),
    (b'{"error": "no such model"}', "no such model"),
    (b"{}", None),
])
def test_error_envelopes_decode(body: bytes, error: ErrorDetail | str | None) -> None:
    assert msgspec.json.decode(body, type=ErrorEnvelope).error == error
