"""Tests of the scripted fake provider, driven by the official SDKs and httpx."""

from __future__ import annotations

import base64
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import msgspec
import openai
import pytest

from tests.support.fake_provider import (
    FakeProvider,
    Hang,
    Ok,
    Status,
    disconnect,
    garbage,
    hang,
    ok,
    redirect,
    reset,
    slow_drip,
    status,
    stream_error,
    wrong_shape,
)

ROOT = Path(__file__).resolve().parents[2]
MSGS = [{"role": "user", "content": "say hello"}]
WEATHER_TOOL_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture
def fp() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider


@pytest.fixture
def oai(fp: FakeProvider) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fp.openai_base_url, api_key="sk-test", max_retries=0) as client:
        yield client


@pytest.fixture
def ant(fp: FakeProvider) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=fp.url, api_key="ak-test", max_retries=0) as client:
        yield client


def chat_url(fp: FakeProvider) -> str:
    return fp.openai_base_url + "/chat/completions"


# --------------------------------------------------------------------------------------
# OpenAI wire format
# --------------------------------------------------------------------------------------


def test_openai_chat_non_stream(fp: FakeProvider, oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="gpt-test", messages=MSGS)  # type: ignore[arg-type]
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == "gpt-test"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Hello from fake/gpt-test"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert r.usage.prompt_tokens == 2  # "say hello"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    [req] = fp.requests()
    assert req["method"] == "POST"
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == "Bearer sk-test"
    assert req["body"]["messages"] == MSGS
    assert req["model"] == "gpt-test"
    assert req["behaviour"] == "ok"
    assert req["outcome"] == "completed"


def test_openai_chat_stream_include_usage(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.script("gpt-test", ok(text="abcdef", chunks=3))
    stream = oai.chat.completions.create(
        model="gpt-test",
        messages=MSGS,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    assert pieces == ["", "ab", "cd", "ef", None]
    assert all(c.id.startswith("chatcmpl-") and c.model == "gpt-test" for c in chunks)
    assert chunks[-2].choices[0].finish_reason == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.prompt_tokens == 2
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_chat_stream_without_usage(fp: FakeProvider, oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(model="m", messages=MSGS, stream=True))  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "Hello from fake/m"
    assert len(chunks) == 1 + 5 + 1  # role chunk, 5 content chunks, finish chunk
    assert all(c.usage is None and c.choices for c in chunks)


def test_openai_tool_call(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.script("m", ok(tool_call=True, tool_arguments={"city": "Paris"}))
    r = oai.chat.completions.create(model="m", messages=MSGS, tools=[WEATHER_TOOL_OPENAI])  # type: ignore[arg-type, list-item]
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert msgspec.json.decode(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]


def test_openai_tool_call_stream(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.script("m", ok(tool_call=True, tool_arguments={"city": "Paris"}, chunks=4))
    chunks = list(
        oai.chat.completions.create(
            model="m",
            messages=MSGS,  # type: ignore[arg-type]
            tools=[WEATHER_TOOL_OPENAI],  # type: ignore[list-item]
            stream=True,
        )
    )
    name = ""
    args = ""
    for c in chunks:
        for tc in c.choices[0].delta.tool_calls or []:
            assert tc.index == 0
            name += (tc.function and tc.function.name) or ""
            args += (tc.function and tc.function.arguments) or ""
    assert name == "get_weather"
    assert msgspec.json.decode(args) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_call_flag_without_tools_answers_text(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.script("m", ok(tool_call=True))
    r = oai.chat.completions.create(model="m", messages=MSGS)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "Hello from fake/m"
    assert r.choices[0].finish_reason == "stop"


def test_openai_completions(fp: FakeProvider, oai: openai.OpenAI) -> None:
    r = oai.completions.create(model="davinci-fake", prompt="one two three")
    assert r.id.startswith("cmpl-")
    assert r.object == "text_completion"
    assert r.choices[0].text == "Hello from fake/davinci-fake"
    assert r.usage is not None and r.usage.prompt_tokens == 3

    fp.script("davinci-fake", ok(text="xyz", chunks=3))
    chunks = list(
        oai.completions.create(
            model="davinci-fake",
            prompt="hi",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert [c.choices[0].text for c in chunks if c.choices] == ["x", "y", "z", ""]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 1


def test_openai_embeddings(fp: FakeProvider, oai: openai.OpenAI) -> None:
    as_floats = oai.embeddings.create(model="emb", input=["a", "b c"], encoding_format="float")
    assert as_floats.object == "list"
    assert as_floats.model == "emb"
    assert [d.index for d in as_floats.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in as_floats.data)
    assert as_floats.data[0].embedding != as_floats.data[1].embedding
    assert as_floats.usage.prompt_tokens == 3
    assert as_floats.usage.total_tokens == 3
    # The SDK asks for base64 by default and decodes it: same (deterministic) vectors.
    default = oai.embeddings.create(model="emb", input=["a", "b c"])
    assert [d.embedding for d in default.data] == [d.embedding for d in as_floats.data]
    assert fp.requests()[1]["body"]["encoding_format"] == "base64"

    raw = httpx.post(
        fp.openai_base_url + "/embeddings",
        json={"model": "emb", "input": "a", "encoding_format": "base64", "dimensions": 4},
    ).json()
    vec = struct.unpack("<4f", base64.b64decode(raw["data"][0]["embedding"]))
    assert len(vec) == 4


def test_models_list(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.set_default("gpt-extra", ok())
    ids = [m.id for m in oai.models.list()]
    assert ids == ["fake-model", "gpt-extra"]
    assert oai.models.retrieve("gpt-extra").id == "gpt-extra"
    assert fp.requests() == []  # not scripted, not recorded


def test_openai_status_error_via_sdk(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.script("m", status(429, retry_after="7"))
    with pytest.raises(openai.RateLimitError) as ei:
        oai.chat.completions.create(model="m", messages=MSGS)  # type: ignore[arg-type]
    assert ei.value.status_code == 429
    assert ei.value.response.headers["retry-after"] == "7"
    assert ei.value.code == "rate_limit_exceeded"
    assert ei.value.body == {
        "message": "fake provider: scripted 429 error",
        "type": "requests",
        "code": "rate_limit_exceeded",
        "param": None,
    }


# --------------------------------------------------------------------------------------
# Anthropic wire format
# --------------------------------------------------------------------------------------


def test_anthropic_non_stream(fp: FakeProvider, ant: anthropic.Anthropic) -> None:
    msg = ant.messages.create(model="claude-fake", max_tokens=50, messages=MSGS)  # type: ignore[arg-type]
    assert msg.id.startswith("msg_")
    assert msg.type == "message"
    assert msg.role == "assistant"
    assert msg.model == "claude-fake"
    assert msg.content[0].type == "text"
    assert msg.content[0].text == "Hello from fake/claude-fake"
    assert msg.stop_reason == "end_turn"
    assert msg.stop_sequence is None
    assert msg.usage.input_tokens == 2
    assert msg.usage.output_tokens == 3
    [req] = fp.requests()
    assert req["path"] == "/v1/messages"
    # anthropic SDK 2.x sends the key as a bearer token (1.x sent x-api-key).
    headers = req["headers"]
    assert "ak-test" in (headers.get("x-api-key"), headers.get("authorization", "")[7:])
    assert "anthropic-version" in req["headers"]


def test_anthropic_stream(fp: FakeProvider, ant: anthropic.Anthropic) -> None:
    fp.script("claude-fake", ok(text="streamed text", chunks=4))
    with ant.messages.stream(model="claude-fake", max_tokens=50, messages=MSGS) as stream:  # type: ignore[arg-type]
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content[0].text == "streamed text"  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 2
    assert final.usage.output_tokens == 2

    # The raw event sequence is exactly Anthropic's.
    fp.script("claude-fake", ok(text="ab", chunks=2))
    raw = [
        e.type
        for e in ant.messages.create(
            model="claude-fake",
            max_tokens=50,
            messages=MSGS,  # type: ignore[arg-type]
            stream=True,
        )
    ]
    assert raw == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert "message_stop" in events
    with httpx.Client() as h:
        fp.script("claude-fake", ok(text="ab", chunks=2))
        body = h.post(
            fp.url + "/v1/messages",
            json={"model": "claude-fake", "max_tokens": 5, "messages": MSGS, "stream": True},
        ).text
    names = [line[len("event: ") :] for line in body.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]


def test_anthropic_tool_use(fp: FakeProvider, ant: anthropic.Anthropic) -> None:
    fp.script("c", ok(tool_call=True, tool_arguments={"city": "Oslo"}))
    msg = ant.messages.create(
        model="c",
        max_tokens=50,
        messages=MSGS,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL_ANTHROPIC],  # type: ignore[list-item]
    )
    assert msg.stop_reason == "tool_use"
    block = msg.content[0]
    assert block.type == "tool_use"
    assert block.id.startswith("toolu_")
    assert block.name == "get_weather"
    assert block.input == {"city": "Oslo"}

    fp.script("c", ok(tool_call=True, tool_arguments={"city": "Oslo", "days": 3}, chunks=5))
    with ant.messages.stream(
        model="c",
        max_tokens=50,
        messages=MSGS,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL_ANTHROPIC],  # type: ignore[list-item]
    ) as stream:
        deltas = [
            e.delta.type  # type: ignore[union-attr]
            for e in stream
            if e.type == "content_block_delta"
        ]
        final = stream.get_final_message()
    assert deltas == ["input_json_delta"] * 5
    assert final.stop_reason == "tool_use"
    assert final.content[0].input == {"city": "Oslo", "days": 3}  # type: ignore[union-attr]


def test_anthropic_error_envelope(fp: FakeProvider, ant: anthropic.Anthropic) -> None:
    fp.script("c", status(529), status(429, retry_after="2"))
    with pytest.raises(anthropic.APIStatusError) as ei:
        ant.messages.create(model="c", max_tokens=5, messages=MSGS)  # type: ignore[arg-type]
    assert ei.value.status_code == 529
    assert ei.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "fake provider: scripted 529 error"},
    }
    with pytest.raises(anthropic.RateLimitError) as ei2:
        ant.messages.create(model="c", max_tokens=5, messages=MSGS)  # type: ignore[arg-type]
    assert ei2.value.response.headers["retry-after"] == "2"
    assert ei2.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_anthropic_stream_error_event(fp: FakeProvider, ant: anthropic.Anthropic) -> None:
    fp.script("c", stream_error(after_chunks=2, code=529, message="busy"))
    got: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError, match="overloaded_error"),
        ant.messages.stream(model="c", max_tokens=5, messages=MSGS) as stream,  # type: ignore[arg-type]
    ):
        got.extend(stream.text_stream)
    assert "".join(got) == "Hello fr"  # 2 of the 5 deltas "Hell", "o fr", "om f", "ake", "/c"


# --------------------------------------------------------------------------------------
# Fault behaviours (httpx)
# --------------------------------------------------------------------------------------


def test_status_with_retry_after(fp: FakeProvider) -> None:
    fp.script("m", status(503, retry_after="1"))
    r = httpx.post(chat_url(fp), json={"model": "m", "messages": MSGS})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["type"] == "server_error"
    assert set(err) == {"message", "type", "code", "param"}
    # The queue is empty again: back to ok.
    assert httpx.post(chat_url(fp), json={"model": "m"}).status_code == 200


def test_status_custom_body_and_headers(fp: FakeProvider) -> None:
    fp.script(
        "m",
        status(400, body={"custom": True}, headers={"x-extra": "1"}),
        status(502, body="upstream <b>down</b>"),
    )
    r = httpx.post(chat_url(fp), json={"model": "m"})
    assert (r.status_code, r.json(), r.headers["x-extra"]) == (400, {"custom": True}, "1")
    r = httpx.post(chat_url(fp), json={"model": "m"})
    assert (r.status_code, r.text) == (502, "upstream <b>down</b>")


def test_status_on_stream_request_is_plain_json(fp: FakeProvider) -> None:
    fp.script("m", status(500))
    r = httpx.post(chat_url(fp), json={"model": "m", "stream": True})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"


def test_hang_then_client_timeout_counts_as_cancelled(fp: FakeProvider) -> None:
    fp.script("m", hang())
    with httpx.Client(timeout=0.2) as h, pytest.raises(httpx.ReadTimeout):
        h.post(chat_url(fp), json={"model": "m"})
    assert fp.wait_for_cancelled(1, timeout=5) == 1
    stats = fp.wait_until(lambda s: s["connections_open"] == 0)
    assert stats["by_outcome"] == {"cancelled": 1}
    assert fp.requests()[0]["outcome"] == "cancelled"


def test_hang_after_chunks_stream(fp: FakeProvider) -> None:
    fp.script("m", hang(after_chunks=1))
    lines: list[str] = []
    with (
        httpx.Client(timeout=httpx.Timeout(5, read=0.3)) as h,
        pytest.raises(httpx.ReadTimeout),
        h.stream("POST", chat_url(fp), json={"model": "m", "stream": True}) as r,
    ):
        assert r.status_code == 200
        lines.extend(line for line in r.iter_lines() if line)
    assert len(lines) == 2  # role chunk + 1 content chunk, then silence
    fp.wait_for_cancelled(1)


def test_slow_drip_stream_and_cancel(fp: FakeProvider) -> None:
    fp.script("m", slow_drip(interval_s=0.02, chunks=5), slow_drip(interval_s=0.05, chunks=100))
    with httpx.Client() as h:
        t0 = time.monotonic()
        text = h.post(chat_url(fp), json={"model": "m", "stream": True}).text
        assert time.monotonic() - t0 >= 0.09
        assert text.count("data: ") == 1 + 5 + 1 + 1  # role, 5 content, finish, [DONE]
        with h.stream("POST", chat_url(fp), json={"model": "m", "stream": True}) as r:
            it = r.iter_lines()
            got = [next(it) for _ in range(4)]  # role + blank + first content + blank
            assert got[2].startswith("data: ")
    # Leaving the stream early closed the connection while the fake was still dripping.
    assert fp.wait_for_cancelled(1) == 1
    assert [r["outcome"] for r in fp.requests()] == ["completed", "cancelled"]


def test_slow_drip_non_stream(fp: FakeProvider) -> None:
    fp.script("m", slow_drip(interval_s=0.01, chunks=4, text="dripped"))
    r = httpx.post(chat_url(fp), json={"model": "m"})
    assert r.json()["choices"][0]["message"]["content"] == "dripped"


def test_reset_mid_stream_raises_on_client(fp: FakeProvider) -> None:
    fp.script("m", reset(after_chunks=2))
    lines: list[str] = []
    with (
        httpx.Client() as h,
        pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)),
        h.stream("POST", chat_url(fp), json={"model": "m", "stream": True}) as r,
    ):
        assert r.status_code == 200
        lines.extend(line for line in r.iter_lines() if line)
    assert len(lines) <= 3  # never the finish chunk or [DONE]
    assert fp.requests()[0]["outcome"] == "reset"


def test_reset_mid_stream_openai_sdk(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.script("m", reset(after_chunks=1))
    with pytest.raises(openai.APIConnectionError):
        for _ in oai.chat.completions.create(model="m", messages=MSGS, stream=True):  # type: ignore[arg-type]
            pass


def test_reset_non_stream(fp: FakeProvider) -> None:
    fp.script("m", reset())
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.post(chat_url(fp), json={"model": "m"})


def test_garbage(fp: FakeProvider) -> None:
    fp.script("m", garbage(), garbage(content_type="application/json"), garbage())
    r = httpx.post(chat_url(fp), json={"model": "m"})
    assert (r.status_code, r.content) == (200, b"<html>oops</html>")
    r = httpx.post(chat_url(fp), json={"model": "m"})
    assert r.headers["content-type"] == "application/json"
    with pytest.raises(ValueError):
        r.json()
    r = httpx.post(chat_url(fp), json={"model": "m", "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text == "data: not-json\n\ndata: not-json\n\n"


def test_disconnect(fp: FakeProvider) -> None:
    fp.script("m", disconnect())
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        httpx.post(chat_url(fp), json={"model": "m"})
    assert fp.requests()[0]["outcome"] == "disconnected"


def test_openai_stream_error_event(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.script("m", stream_error(after_chunks=1, message="boom"))
    got: list[str] = []
    with pytest.raises(openai.APIError, match="boom"):
        for c in oai.chat.completions.create(model="m", messages=MSGS, stream=True):  # type: ignore[arg-type]
            got.append(c.choices[0].delta.content or "")
    assert "".join(got) == "Hell"  # the first of 5 deltas of "Hello from fake/m"


def test_negative_and_absurd_usage(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.script("m", ok(prompt_tokens=-1000, completion_tokens=2**62), ok(completion_tokens=-7))
    r = oai.chat.completions.create(model="m", messages=MSGS)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "Hello from fake/m"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (-1000, 2**62)
    chunks = list(
        oai.chat.completions.create(
            model="m", messages=MSGS, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == -7
    with pytest.raises(msgspec.ValidationError):
        fp.script("m", {"kind": "ok", "prompt_tokens": 2**63})


def test_redirect_is_not_followed_by_the_fake(fp: FakeProvider) -> None:
    with FakeProvider() as other:
        target = other.openai_base_url + "/chat/completions"
        fp.script("m", redirect(target), redirect(target, code=307))
        r = httpx.post(chat_url(fp), json={"model": "m"})
        assert (r.status_code, r.headers["location"]) == (302, target)
        r = httpx.post(chat_url(fp), json={"model": "m", "stream": True},
                       follow_redirects=True)  # a client that follows gets the other server
        assert r.status_code == 200 and len(other.requests()) == 1
    with pytest.raises(msgspec.ValidationError):
        fp.script("m", {"kind": "redirect", "location": "x", "status": 200})


def test_wrong_shape(fp: FakeProvider) -> None:
    fp.script("m", wrong_shape(), wrong_shape([1, 2]), wrong_shape({"choices": "x"}, frames=3))
    r = httpx.post(chat_url(fp), json={"model": "m"})
    assert (r.status_code, r.json()) == (200, {"unexpected": "shape"})
    assert r.headers["content-type"] == "application/json"
    assert httpx.post(chat_url(fp), json={"model": "m"}).json() == [1, 2]
    r = httpx.post(chat_url(fp), json={"model": "m", "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text == 'data: {"choices":"x"}\n\n' * 3 + "data: [DONE]\n\n"
    fp.script("m", wrong_shape(frames=1))
    r = httpx.post(fp.url + "/v1/messages", json={"model": "m", "stream": True})
    assert r.text == 'event: message_start\ndata: {"unexpected":"shape"}\n\n'


def test_delay(fp: FakeProvider) -> None:
    fp.script("m", ok(delay_s=0.05))
    t0 = time.monotonic()
    assert httpx.post(chat_url(fp), json={"model": "m"}).status_code == 200
    assert time.monotonic() - t0 >= 0.05


def test_bad_requests(fp: FakeProvider) -> None:
    with httpx.Client() as h:
        r = h.post(chat_url(fp), content=b"{not json")
        assert r.status_code == 400 and "error" in r.json()
        r = h.post(chat_url(fp), json={"messages": []})
        assert r.status_code == 400 and "model" in r.json()["error"]["message"]
        assert h.get(fp.url + "/v1/nope").status_code == 404
        assert h.get(chat_url(fp)).status_code == 405
        r = h.post(fp.url + "/v1/messages", json={"max_tokens": 1})
        assert r.status_code == 400 and r.json()["type"] == "error"


# --------------------------------------------------------------------------------------
# Scripting, control API, lifecycle
# --------------------------------------------------------------------------------------


def test_queues_are_per_model_with_defaults(fp: FakeProvider) -> None:
    fp.script("a", status(500), status(502))
    fp.set_default("b", status(418))
    fp.script("*", status(401))
    with httpx.Client() as h:

        def code(model: str) -> int:
            return h.post(chat_url(fp), json={"model": model}).status_code

        assert [code("a"), code("b"), code("a"), code("a"), code("c")] == [500, 401, 502, 200, 200]
        assert [code("b"), code("b")] == [418, 418]
        fp.set_default("b", None)
        assert code("b") == 200
    assert fp.stats()["by_kind"] == {"status": 5, "ok": 3}


def test_behaviours_as_dicts_and_validation(fp: FakeProvider) -> None:
    fp.script("m", {"kind": "ok", "text": "from dict"}, {"kind": "status", "status": 404})
    assert fp.stats()["queued"] == {"m": 2}
    r = httpx.post(chat_url(fp), json={"model": "m"})
    assert r.json()["choices"][0]["message"]["content"] == "from dict"
    assert httpx.post(chat_url(fp), json={"model": "m"}).status_code == 404
    with pytest.raises(msgspec.ValidationError):
        fp.script("m", {"kind": "nope"})
    assert ok(text="x") == Ok(text="x")
    assert status(429, retry_after="1") == Status(status=429, retry_after="1")
    assert hang() == Hang()


def test_control_api_over_http(fp: FakeProvider) -> None:
    with httpx.Client(base_url=fp.url) as h:
        r = h.post(
            "/_control/script",
            json={
                "model": "m",
                "behaviours": [
                    {"kind": "status", "status": 429, "retry_after": "3"},
                    {"kind": "ok"},
                ],
            },
        )
        assert r.json() == {"ok": True, "queued": 2}
        r = h.post("/_control/default", json={"model": "d", "behaviour": {"kind": "garbage"}})
        assert r.status_code == 200
        bad = h.post("/_control/script", json={"model": "m", "behaviours": [{"kind": "x"}]})
        assert bad.status_code == 400

        r = h.post("/v1/chat/completions", json={"model": "m"}, headers={"X-Trace": "t1"})
        assert (r.status_code, r.headers["retry-after"]) == (429, "3")
        assert h.post("/v1/chat/completions", json={"model": "m"}).status_code == 200
        assert h.post("/v1/chat/completions", json={"model": "d"}).text == "<html>oops</html>"

        reqs = h.get("/_control/requests").json()
        assert [q["model"] for q in reqs] == ["m", "m", "d"]
        assert reqs[0]["headers"]["x-trace"] == "t1"
        assert reqs[0]["body"] == {"model": "m"}
        stats = h.get("/_control/stats").json()
        assert stats["requests"] == 3
        assert stats["connections_open"] == 1  # this keep-alive connection
        assert stats["connections_total"] == 1
        assert stats["by_kind"] == {"status": 1, "ok": 1, "garbage": 1}

        r = h.get("/_control/wait", params={"requests": 3, "timeout": 1})
        assert r.status_code == 200
        r = h.get("/_control/wait", params={"requests": 4, "timeout": 0.05})
        assert r.status_code == 408

        assert h.post("/_control/reset").json() == {"ok": True}
        assert h.get("/_control/requests").json() == []
        assert h.get("/_control/stats").json()["requests"] == 0
        assert h.post("/v1/chat/completions", json={"model": "d"}).status_code == 200


def test_control_wait_long_polls(fp: FakeProvider) -> None:
    results: list[int] = []

    def waiter() -> None:
        r = httpx.get(fp.url + "/_control/wait", params={"requests": 2, "timeout": 5})
        results.append(r.status_code)

    t = threading.Thread(target=waiter)
    t.start()
    httpx.post(chat_url(fp), json={"model": "m"})
    httpx.post(chat_url(fp), json={"model": "m"})
    t.join(5)
    assert results == [200]


def test_wait_for_requests_times_out(fp: FakeProvider) -> None:
    with pytest.raises(TimeoutError):
        fp.wait_for_requests(1, timeout=0.05)


def test_keep_alive_and_many_requests(fp: FakeProvider) -> None:
    with httpx.Client() as h:
        for i in range(300):
            r = h.post(chat_url(fp), json={"model": f"m{i % 3}", "messages": MSGS})
            assert r.status_code == 200
    reqs = fp.wait_for_requests(300)
    assert len(reqs) == 300
    stats = fp.wait_until(lambda s: s["connections_open"] == 0)
    assert stats["connections_total"] == 1
    assert stats["completed"] == 300


async def test_concurrent_async_clients_and_async_waits(fp: FakeProvider) -> None:
    async with httpx.AsyncClient(timeout=5) as h:
        import asyncio

        rs = await asyncio.gather(
            *(h.post(chat_url(fp), json={"model": "m", "stream": i % 2 == 0}) for i in range(100))
        )
        assert all(r.status_code == 200 for r in rs)
        assert len(await fp.wait_for_requests_async(100)) == 100

    fp.script("m", hang())
    async with httpx.AsyncClient(timeout=5) as h:
        task = asyncio.ensure_future(h.post(chat_url(fp), json={"model": "m"}))
        await fp.wait_for_requests_async(101)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await fp.wait_for_cancelled_async(1) == 1


def test_stop_ends_hangs_and_closes_connections() -> None:
    fp = FakeProvider().start()
    fp.script("m", hang())
    errors: list[BaseException] = []

    def client() -> None:
        try:
            httpx.post(chat_url(fp), json={"model": "m"}, timeout=30)
        except httpx.HTTPError as e:
            errors.append(e)

    t = threading.Thread(target=client)
    t.start()
    fp.wait_for_requests(1)
    t0 = time.monotonic()
    fp.stop()
    t.join(5)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 3
    assert len(errors) == 1
    assert fp.requests()[0]["outcome"] == "aborted"
    assert fp.stats()["cancelled"] == 0  # the server stopping is not a client cancel
    fp.stop()  # idempotent


def test_cli_runs_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_provider", "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ")
        httpx.post(
            url + "/_control/script",
            json={"model": "m", "behaviours": [{"kind": "ok", "text": "cli"}]},
        )
        r = httpx.post(url + "/v1/chat/completions", json={"model": "m"})
        assert r.json()["choices"][0]["message"]["content"] == "cli"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
