"""The Messages API inbound (sidecar.protocols.messages), both ways, against Anthropic's
documented wire examples; what is built is checked with the ``anthropic`` package's own
types. And the Anthropic provider's native stream mode: events relayed unchanged."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import msgspec
import pydantic
import pytest

from sidecar.errors import InvalidRequest, RateLimited, Unavailable
from sidecar.protocols.messages import MessageStream, chat_call, error_body, message_body
from sidecar.providers.anthropic_answers import StreamTranslator
from sidecar.types import ChatRequest

# Anthropic's documented multi-turn tool example (docs: "Tool use", "Handling tool results").
DOC_TOOL_REQUEST: dict[str, Any] = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 1024,
    "system": "You are a helpful assistant.",
    "tools": [{
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "input_schema": {"type": "object", "properties": {
            "location": {"type": "string", "description": "The city and state"}},
            "required": ["location"]},
    }],
    "messages": [
        {"role": "user", "content": "What's the weather like in San Francisco?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "I'll check the current weather in San Francisco."},
            {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9",
             "name": "get_weather", "input": {"location": "San Francisco, CA"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
             "content": "15 degrees"},
            {"type": "text", "text": "And tomorrow?"}]},
    ],
}


def chat_of(raw: dict[str, Any]) -> dict[str, Any]:
    call = chat_call(raw)
    assert isinstance(call.request, ChatRequest)
    assert call.messages is raw
    return call.raw


def test_the_documented_tool_conversation() -> None:
    chat = chat_of(DOC_TOOL_REQUEST)
    assert chat["max_tokens"] == 1024
    assert chat["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather like in San Francisco?"},
        {"role": "assistant", "content": "I'll check the current weather in San Francisco.",
         "tool_calls": [{"id": "toolu_01A09q90qw90lq917835lq9", "type": "function",
                         "function": {"name": "get_weather",
                                      "arguments": '{"location":"San Francisco, CA"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_01A09q90qw90lq917835lq9",
         "content": "15 degrees"},
        {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]},
    ]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a given location",
        "parameters": DOC_TOOL_REQUEST["tools"][0]["input_schema"]}}]


def test_images_system_blocks_stops_and_choices() -> None:
    chat = chat_of({
        "model": "m", "max_tokens": 10, "stream": True, "temperature": 0.2, "top_p": 0.9,
        "top_k": 3, "stop_sequences": ["\n\nHuman:"], "metadata": {"user_id": "u-1"},
        "system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b",
                                                    "cache_control": {"type": "ephemeral"}}],
        "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": True},
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "thinking": {"type": "enabled", "budget_tokens": 2000},
        "messages": [
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
                {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "...", "signature": "s"},
                {"type": "redacted_thinking", "data": "xyz"},
                {"type": "text", "text": "A chart."}]}]})
    assert chat["messages"][0] == {"role": "system", "content": "a\nb"}
    assert chat["messages"][1]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}},
        {"type": "text", "text": "What is this?"}]
    assert chat["messages"][2] == {"role": "assistant", "content": "A chart."}
    assert (chat["stream"], chat["stream_options"]) == (True, {"include_usage": True})
    assert (chat["temperature"], chat["top_p"], chat["stop"], chat["user"]) == (
        0.2, 0.9, ["\n\nHuman:"], "u-1")
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["parallel_tool_calls"] is False
    assert "top_k" not in chat and "thinking" not in chat


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none")])
def test_tool_choices(choice: dict[str, Any], expected: str) -> None:
    raw = {**DOC_TOOL_REQUEST, "tool_choice": choice}
    assert chat_of(raw)["tool_choice"] == expected


def test_structured_output_becomes_a_strict_json_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = chat_of({"model": "m", "max_tokens": 5, "messages": [{"role": "user",
                                                                "content": "x"}],
                    "output_config": {"format": {"type": "json_schema", "schema": schema},
                                      "effort": "low"}})
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "output", "schema": schema, "strict": True}}


def test_an_error_tool_result_says_so() -> None:
    raw = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "is_error": True,
         "content": [{"type": "text", "text": "no such city"}]}]}]}
    assert chat_of(raw)["messages"] == [
        {"role": "tool", "tool_call_id": "t1", "content": "Error: no such city"}]


OK_MESSAGES = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(("change", "where"), [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2**64}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b",
                                                 "input": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "file", "file_id": "f"}}]}]}, "messages[0].content[0].source.type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                 "content": [{"type": "image"}]}]}]},
     "messages[0].content[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "a",
                                                      "name": "b", "input": [1]}]}]},
     "messages[0].content[0].input"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools[0].type"),
    ({"tools": [{"description": "no name"}]}, "tools[0]"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ({"temperature": 1.5}, "temperature"),
    ({"model": "bad\nname"}, "model"),
    ({"system": [{"type": "image"}]}, "system"),
])
def test_bad_requests_name_the_field(change: dict[str, Any], where: str) -> None:
    raw = {"model": "m", "max_tokens": 5, "messages": OK_MESSAGES, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(InvalidRequest) as e:
        chat_call(raw)
    assert e.value.param is not None and e.value.param.startswith(where), e.value.message
    assert where in e.value.message


def test_nesting_and_huge_numbers_are_refused() -> None:
    deep: Any = "x"
    for _ in range(100):
        deep = {"a": deep}
    with pytest.raises(InvalidRequest, match="nested deeper"):
        chat_call({"model": "m", "max_tokens": 5, "messages": OK_MESSAGES, "metadata": deep})


# --- answers --------------------------------------------------------------------------------

_message = pydantic.TypeAdapter(anthropic.types.Message)
_event = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)


def completion(message: dict[str, Any], finish: str, usage: dict[str, Any]) -> bytes:
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                       "model": "gpt-x", "choices": [{"index": 0, "message": message,
                                                      "finish_reason": finish}],
                       "usage": usage}).encode()


def test_a_text_answer() -> None:
    body = message_body(completion(
        {"role": "assistant", "content": "Hello!"}, "stop",
        {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
         "prompt_tokens_details": {"cached_tokens": 4}}))
    msg = _message.validate_json(body)
    assert msg.content[0].text == "Hello!"  # type: ignore[union-attr]
    assert (msg.stop_reason, msg.model, msg.id) == ("end_turn", "gpt-x", "msg_chatcmpl-1")
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens,
            msg.usage.output_tokens) == (6, 4, 2)


@pytest.mark.parametrize(("finish", "reason"), [
    ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal"),
    ("weird", "end_turn")])
def test_stop_reasons(finish: str, reason: str) -> None:
    body = message_body(completion({"role": "assistant", "content": "x"}, finish, {}))
    assert _message.validate_json(body).stop_reason == reason


def test_tool_calls_become_tool_use_blocks() -> None:
    body = message_body(completion({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "oops"}},
    ]}, "tool_calls", {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}))
    msg = _message.validate_json(body)
    assert [(b.type, b.id, b.input) for b in msg.content] == [  # type: ignore[union-attr]
        ("tool_use", "call_1", {"a": 1}), ("tool_use", "call_2", {"arguments": "oops"})]


def frames(*chunks: dict[str, Any]) -> bytes:
    head = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-x"}
    return b"".join(b"data: " + json.dumps({**head, **c}).encode() + b"\n\n" for c in chunks)


def delta(d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


def events(data: bytes) -> list[Any]:
    out = []
    for block in data.decode().split("\n\n"):
        if not block:
            continue
        name, payload = block.split("\n")
        assert name.startswith("event: ") and payload.startswith("data: ")
        event = json.loads(payload[6:])
        assert event["type"] == name[7:]
        plain = event["type"] in ("error", "ping")  # not in the SDK's union of events
        out.append(event if plain else _event.validate_python(event))
    return out


def test_a_stream_of_text_then_two_tool_calls() -> None:
    stream = MessageStream("requested")
    out = stream.feed(frames(delta({"role": "assistant", "content": ""}),
                             delta({"content": "Let me "}), delta({"content": "look."})))
    out += stream.feed(frames(
        delta({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "f", "arguments": ""}}]}),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]}),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
        delta({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "g", "arguments": "{}"}}]}),
        delta({}, "tool_calls")))
    out += stream.feed(frames({"choices": [], "usage": {
        "prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}}))
    out += stream.end(None)
    got = events(out)
    got = [e for e in got if not isinstance(e, dict)]  # the ping
    assert [e.type for e in got] == [
        "message_start", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "content_block_start",
        "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop"]
    assert got[0].message.model == "gpt-x" and got[0].message.id == "msg_chatcmpl-9"
    assert [e.index for e in got if e.type == "content_block_start"] == [0, 1, 2]
    assert got[5].content_block.id == "call_a" and got[5].content_block.name == "f"
    assert "".join(e.delta.partial_json for e in got[6:8]) == '{"x": 1}'
    assert got[-2].delta.stop_reason == "tool_use"
    assert (got[-2].usage.output_tokens, got[-2].usage.input_tokens) == (9, 20)


def test_an_empty_stream_still_starts_and_stops() -> None:
    got = events(MessageStream("m").end(None))
    assert [e["type"] if isinstance(e, dict) else e.type for e in got] == [
        "message_start", "ping", "message_delta", "message_stop"]


def test_errors_in_anthropics_envelope() -> None:
    limited = json.loads(error_body(RateLimited("slow down", retry_after_s=2)))
    assert limited == {"type": "error", "error": {"type": "rate_limit_error",
                                                  "message": "slow down"}}
    assert json.loads(error_body(Unavailable("busy")))["error"]["type"] == "overloaded_error"
    event = events(MessageStream.fail(InvalidRequest("bad")))[0]
    assert event == {"type": "error", "error": {"type": "invalid_request_error",
                                                "message": "bad"}}


# --- the provider's native mode ---------------------------------------------------------------

NATIVE_STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
    b'"type":"message","role":"assistant","model":"claude-x","content":[],'
    b'"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":5,"output_tokens":1}}}'
    b'\n\nevent: ping\ndata: {"type":"ping"}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"thinking","thinking":"","signature":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"thinking_delta","thinking":"Hmm."}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"signature_delta","signature":"EqQB"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":1,'
    b'"content_block":{"type":"text","text":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"text_delta","text":"Yes."}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
    b'"stop_sequence":null},"usage":{"output_tokens":7}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


@pytest.mark.parametrize("piece", [1, 7, 64, len(NATIVE_STREAM)])
def test_native_mode_relays_the_events_unchanged(piece: int) -> None:
    t = StreamTranslator("c/claude-x", native=True)
    out, started_at = b"", None
    for i in range(0, len(NATIVE_STREAM), piece):
        out += t.feed(NATIVE_STREAM[i:i + piece])
        if t.started and started_at is None:
            started_at = out.count(b"\n\n")
    assert out == NATIVE_STREAM
    assert t.finished and t.content_chunks == 1
    assert t.usage.prompt_tokens == 5 and t.usage.completion_tokens == 7
    assert started_at is not None and started_at >= 3  # the thinking block commits it


def test_native_mode_still_raises_an_error_event() -> None:
    from sidecar.errors import UpstreamRateLimited

    t = StreamTranslator("c/x", native=True)
    with pytest.raises(UpstreamRateLimited):
        t.feed(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
               b'"message":"Overloaded"}}\n\n')


def test_message_body_round_trips_through_msgspec() -> None:
    body = message_body(completion({"role": "assistant", "content": "x"}, "stop", {}))
    assert msgspec.json.decode(body)["content"] == [{"type": "text", "text": "x"}]
