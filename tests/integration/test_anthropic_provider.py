"""AnthropicMessages against the fake provider over real HTTP on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from sidecar.config import AnthropicProvider
from sidecar.errors import (
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamUnreachable,
    UpstreamUnsupported,
)
from sidecar.providers.anthropic import AnthropicMessages
from sidecar.types import Call, ChatChunk, ChatCompletion, ChatRequest, Op
from tests.support.fake_provider import FakeProvider, garbage, ok, reset, status, stream_error

MODEL = "claude-test"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


@pytest.fixture
async def provider(fake: FakeProvider) -> AsyncIterator[AnthropicMessages]:
    config = msgspec.convert(
        {
            "name": "claude",
            "base_url": fake.anthropic_base_url,
            "api_key": "sk-ant-test",
            "headers": {"anthropic-beta": "test-beta"},
        },
        AnthropicProvider,
    )
    p = AnthropicMessages(config)
    yield p
    await p.aclose()


def chat(**fields: Any) -> Call:
    raw: dict[str, Any] = {
        "model": "chat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ],
        **fields,
    }
    return Call(Op.CHAT, msgspec.convert(raw, ChatRequest), raw)


async def collect(p: AnthropicMessages, call: Call) -> list[dict[str, Any]]:
    out = b"".join([piece async for piece in p.stream(call, MODEL, 10.0)])
    chunks = []
    for frame in out.split(b"\n\n")[:-1]:
        assert frame.startswith(b"data: ")
        msgspec.json.decode(frame[6:], type=ChatChunk)
        chunks.append(json.loads(frame[6:]))
    return chunks


def test_only_chat_is_supported(provider: AnthropicMessages):
    assert provider.supports(Op.CHAT)
    assert not provider.supports(Op.COMPLETIONS)
    assert not provider.supports(Op.EMBEDDINGS)


async def test_send_translates_request_and_answer(provider: AnthropicMessages, fake: FakeProvider):
    fake.script(MODEL, ok("Hi there, friend.", prompt_tokens=9, completion_tokens=4))
    reply = await provider.send(chat(temperature=1.5), MODEL, 10.0)

    completion = msgspec.json.decode(reply.body, type=ChatCompletion)
    assert completion.id.startswith("msg_")
    assert completion.model == MODEL
    assert completion.choices[0].message.content == "Hi there, friend."
    assert completion.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        9,
        4,
        13,
    )

    [request] = fake.requests()
    assert request["method"] == "POST"
    assert request["path"] == "/v1/messages"
    headers = request["headers"]
    assert headers["x-api-key"] == "sk-ant-test"
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == "test-beta"
    assert headers["content-type"] == "application/json"
    assert "authorization" not in headers
    assert request["body"] == {
        "model": MODEL,
        "max_tokens": 4096,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        "temperature": 1.0,
    }


async def test_send_tool_call(provider: AnthropicMessages, fake: FakeProvider):
    fake.script(MODEL, ok(tool_call=True, tool_arguments={"query": "weather in Paris"}))
    reply = await provider.send(chat(tools=TOOLS, tool_choice="required"), MODEL, 10.0)

    choice = msgspec.json.decode(reply.body, type=ChatCompletion).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.id.startswith("toolu_")
    assert call.function.name == "search"
    assert json.loads(call.function.arguments) == {"query": "weather in Paris"}
    [raw] = json.loads(reply.body)["choices"][0]["message"]["tool_calls"]
    assert raw["type"] == "function"  # OpenAI's format has it on every tool call

    body = fake.requests()[0]["body"]
    assert body["tools"][0]["input_schema"]["properties"] == {"query": {"type": "string"}}
    assert body["tool_choice"] == {"type": "any"}


async def test_stream_text_with_usage(provider: AnthropicMessages, fake: FakeProvider):
    fake.script(
        MODEL, ok("one two three four five", chunks=5, prompt_tokens=11, completion_tokens=5)
    )
    chunks = await collect(provider, chat(stream=True, stream_options={"include_usage": True}))

    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == "one two three four five"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    assert fake.requests()[0]["body"]["stream"] is True


async def test_stream_tool_call(provider: AnthropicMessages, fake: FakeProvider):
    fake.script(MODEL, ok(tool_call=True, tool_arguments={"query": "streams"}, chunks=4))
    chunks = await collect(provider, chat(stream=True, tools=TOOLS))

    deltas = [t for c in chunks for t in c["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["id"].startswith("toolu_")
    assert deltas[0]["function"]["name"] == "search"
    assert {d["index"] for d in deltas} == {0}
    arguments = "".join(d["function"]["arguments"] for d in deltas)
    assert json.loads(arguments) == {"query": "streams"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
async def test_429_is_rate_limited_with_retry_after(
    provider: AnthropicMessages, fake: FakeProvider, stream: bool
):
    fake.script(MODEL, status(429, retry_after="3", message="slow down"))
    with pytest.raises(UpstreamRateLimited) as info:
        if stream:
            await collect(provider, chat(stream=True))
        else:
            await provider.send(chat(), MODEL, 10.0)
    err = info.value
    assert err.retryable is True
    assert err.retry_after_s == 3.0
    assert err.status == 429
    assert "slow down" in err.message


@pytest.mark.parametrize("stream", [False, True])
async def test_400_is_rejected_and_final(
    provider: AnthropicMessages, fake: FakeProvider, stream: bool
):
    fake.script(MODEL, status(400, message="max_tokens: too large"))
    with pytest.raises(UpstreamRejected) as info:
        if stream:
            await collect(provider, chat(stream=True))
        else:
            await provider.send(chat(), MODEL, 10.0)
    err = info.value
    assert err.retryable is False
    assert err.status == 400
    assert err.code == "invalid_request_error"
    assert "max_tokens: too large" in err.message


async def test_untranslatable_request_is_rejected_before_sending(
    provider: AnthropicMessages, fake: FakeProvider
):
    call = chat(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
                ],
            }
        ]
    )
    with pytest.raises(UpstreamUnsupported) as info:
        await provider.send(call, MODEL, 10.0)
    assert info.value.status == 400
    assert info.value.retryable is True  # another target may take it
    assert fake.requests() == []


async def test_5xx_is_retryable_server_error(provider: AnthropicMessages, fake: FakeProvider):
    fake.script(MODEL, status(500))
    with pytest.raises(UpstreamServerError):
        await provider.send(chat(), MODEL, 10.0)


@pytest.mark.parametrize(
    ("code", "error"), [(529, UpstreamRateLimited), (500, UpstreamServerError)]
)
async def test_error_event_mid_stream(
    provider: AnthropicMessages, fake: FakeProvider, code: int, error: type[Exception]
):
    fake.script(MODEL, stream_error(after_chunks=2, code=code))
    seen: list[bytes] = []
    with pytest.raises(error):
        async for piece in provider.stream(chat(stream=True), MODEL, 10.0):
            seen.append(piece)
    assert b"".join(seen).count(b"data: ") >= 1  # the first tokens did arrive


@pytest.mark.parametrize("stream", [False, True])
async def test_garbage_is_malformed(provider: AnthropicMessages, fake: FakeProvider, stream: bool):
    fake.script(MODEL, garbage())
    with pytest.raises(UpstreamMalformed):
        if stream:
            await collect(provider, chat(stream=True))
        else:
            await provider.send(chat(), MODEL, 10.0)


async def test_stream_cut_short_is_unreachable(provider: AnthropicMessages, fake: FakeProvider):
    fake.script(MODEL, reset(after_chunks=2))
    with pytest.raises(UpstreamUnreachable):
        await collect(provider, chat(stream=True))
