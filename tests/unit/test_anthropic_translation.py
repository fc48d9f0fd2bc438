"""Unit tests of the pure OpenAI <-> Anthropic translation in sidecar.providers.anthropic
(requests) and sidecar.providers.anthropic_answers (answers, streams)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from sidecar.errors import (
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamServerError,
    UpstreamUnsupported,
)
from sidecar.providers.anthropic import build_request
from sidecar.providers.anthropic_answers import StreamTranslator, finish_reason, translate_message
from sidecar.types import ChatChunk, ChatRequest

TARGET = "claude/claude-test"


def req(**fields: Any) -> ChatRequest:
    fields.setdefault("model", "chat")
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return msgspec.convert(fields, ChatRequest)


def build(**fields: Any) -> dict[str, Any]:
    return build_request(req(**fields), "claude-test", default_max_tokens=1024, target=TARGET)


def rejected_by(**fields: Any) -> UpstreamUnsupported:
    with pytest.raises(UpstreamUnsupported) as info:
        build(**fields)
    err = info.value
    assert err.status == 400
    assert err.retryable is True  # the next target may take it
    assert err.target == TARGET
    return err


# --- request ---------------------------------------------------------------------------------


def test_minimal_request_defaults():
    body = build()
    assert body == {
        "model": "claude-test",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }


def test_system_and_developer_messages_become_top_level_system():
    body = build(
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "developer",
                "content": [
                    {"type": "text", "text": "Answer in French."},
                    {"type": "text", "text": "No emoji."},
                ],
            },
            {"role": "user", "content": "hello"},
            {"role": "system", "content": ""},
        ]
    )
    assert body["system"] == "Be brief.\n\nAnswer in French.\nNo emoji."
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]


def test_consecutive_same_role_messages_are_merged_and_empty_ones_dropped():
    body = build(
        messages=[
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "three"},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": None},
            {"role": "assistant", "content": "four"},
            {"role": "user", "content": "five"},
        ]
    )
    assert body["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "three"}, {"type": "text", "text": "four"}],
        },
        {"role": "user", "content": [{"type": "text", "text": "five"}]},
    ]


def test_images_data_url_and_http_url():
    body = build(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"},
                    },
                ],
            }
        ]
    )
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What is in these?"},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png,rawbytes",  # not base64
        "data:image/bmp;base64,Qk0=",  # a type Anthropic does not take
        "data:image/png;base64,",  # no data
        "ftp://example.com/cat.png",
        "file:///etc/passwd",
    ],
)
def test_bad_image_urls_are_rejected(url: str):
    err = rejected_by(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    )
    assert err.param == "messages[0].content[0]"


def test_unsupported_content_parts_are_rejected_with_their_path():
    err = rejected_by(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yes?"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "listen"},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                ],
            },
        ]
    )
    assert err.param == "messages[2].content[1]"
    assert "input_audio" in err.message


def test_malformed_parts_and_images_outside_user_messages_are_rejected():
    rejected_by(messages=[{"role": "user", "content": [{"type": "text"}]}])
    rejected_by(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    rejected_by(
        messages=[{"role": "system", "content": [image]}, {"role": "user", "content": "hi"}]
    )
    rejected_by(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": [image]}]
    )


def test_assistant_tool_calls_become_tool_use_and_tool_results_are_merged():
    body = build(
        messages=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    },
                    {
                        "id": "call_3",
                        "type": "function",
                        "function": {"name": "now", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "22C"}],
            },
            {"role": "tool", "tool_call_id": "call_3", "content": ""},
            {"role": "user", "content": "Thanks, and tomorrow?"},
        ]
    )
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "call_2",
                    "name": "get_weather",
                    "input": {"city": "Rome"},
                },
                {"type": "tool_use", "id": "call_3", "name": "now", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_1",
                    "content": [{"type": "text", "text": "18C"}],
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": [{"type": "text", "text": "22C"}],
                },
                {"type": "tool_result", "tool_use_id": "call_3"},
                {"type": "text", "text": "Thanks, and tomorrow?"},
            ],
        },
    ]


@pytest.mark.parametrize("arguments", ['{"city": "Par', "[1, 2]", '"text"'])
def test_tool_call_arguments_that_are_not_a_json_object_are_rejected(arguments: str):
    err = rejected_by(
        messages=[
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "tool_calls": [{"id": "call_1", "function": {"name": "f", "arguments": arguments}}],
            },
        ]
    )
    assert err.param == "messages[1].tool_calls[0].function.arguments"


def test_tool_message_without_id_and_function_role_are_rejected():
    err = rejected_by(
        messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]
    )
    assert err.param == "messages[1].tool_call_id"
    err = rejected_by(messages=[{"role": "function", "name": "f", "content": "x"}])
    assert err.param == "messages[0].role"


def test_only_system_messages_is_rejected():
    rejected_by(messages=[{"role": "system", "content": "You are helpful."}])


def test_tools_are_translated():
    body = build(
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                },
            },
            {"type": "function", "function": {"name": "now"}},
        ]
    )
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather",
            "input_schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in body


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        ({"type": "function", "function": {"name": "now"}}, {"type": "tool", "name": "now"}),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any]):
    tools = [{"type": "function", "function": {"name": "now"}}]
    assert build(tools=tools, tool_choice=choice)["tool_choice"] == expected


@pytest.mark.parametrize("choice", ["sometimes", {"type": "function"}, {"name": "now"}])
def test_bad_tool_choice_is_rejected(choice: Any):
    err = rejected_by(tools=[{"type": "function", "function": {"name": "now"}}], tool_choice=choice)
    assert err.param == "tool_choice"


def test_sampling_limits_and_flags():
    body = build(max_tokens=50, temperature=1.7, top_p=0.9, stop="END", stream=True, user="u-42")
    assert body["max_tokens"] == 50
    assert body["temperature"] == 1.0
    assert body["top_p"] == 0.9
    assert body["stop_sequences"] == ["END"]
    assert body["stream"] is True
    assert body["metadata"] == {"user_id": "u-42"}

    body = build(max_tokens=50, max_completion_tokens=70, temperature=0.3, stop=["a", "b"])
    assert body["max_tokens"] == 70
    assert body["temperature"] == 0.3
    assert body["stop_sequences"] == ["a", "b"]
    assert "stream" not in body


def test_n_greater_than_one_is_rejected():
    assert rejected_by(n=2).param == "n"
    assert "n" not in build(n=1)


# --- response --------------------------------------------------------------------------------


def message(**fields: Any) -> bytes:
    body: dict[str, Any] = {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "Hello!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 6},
    }
    body.update(fields)
    return json.dumps(body).encode()


def test_text_message_translates_to_chat_completion():
    completion = translate_message(message(), target=TARGET, created=1700000000)
    wire = json.loads(msgspec.json.encode(completion))
    # "object" and "role" are checked in test_wire_format_names_object_and_role
    wire.pop("object", None)
    wire["choices"][0]["message"].pop("role", None)
    assert wire == {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "created": 1700000000,
        "model": "claude-sonnet-4-5-20250929",
        "choices": [{"index": 0, "message": {"content": "Hello!", "refusal": None},
                         "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    }


def test_wire_format_names_object_and_role():
    wire = json.loads(msgspec.json.encode(translate_message(message(), target=TARGET)))
    assert wire["object"] == "chat.completion"
    assert wire["choices"][0]["message"]["role"] == "assistant"
    chunk = frames(StreamTranslator(TARGET, created=1).feed(RECORDED))[0]
    assert chunk["object"] == "chat.completion.chunk"


def test_created_defaults_to_now():
    completion = translate_message(message(), target=TARGET)
    assert completion.created > 1700000000


def test_tool_use_message_translates_to_tool_calls():
    completion = translate_message(
        message(
            content=[
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Checking "},
                {"type": "text", "text": "the weather."},
                {
                    "type": "tool_use",
                    "id": "toolu_01A",
                    "name": "get_weather",
                    "input": {"city": "Paris", "unit": "c"},
                },
                {"type": "tool_use", "id": "toolu_01B", "name": "now", "input": {}},
            ],
            stop_reason="tool_use",
        ),
        target=TARGET,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking the weather."
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.id, c.type, c.function.name) for c in calls] == [
        ("toolu_01A", "function", "get_weather"),
        ("toolu_01B", "function", "now"),
    ]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "c"}
    assert calls[1].function.arguments == "{}"


def test_tool_only_message_has_null_content_and_empty_message_has_empty_content():
    only_tools = translate_message(
        message(content=[{"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}]),
        target=TARGET,
    )
    assert only_tools.choices[0].message.content is None
    empty = translate_message(message(content=[]), target=TARGET)
    assert empty.choices[0].message.content == ""
    assert empty.choices[0].message.tool_calls is msgspec.UNSET


@pytest.mark.parametrize(
    ("stop_reason", "expected"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
        (None, "stop"),
    ],
)
def test_stop_reasons(stop_reason: str | None, expected: str):
    assert finish_reason(stop_reason) == expected
    completion = translate_message(message(stop_reason=stop_reason), target=TARGET)
    assert completion.choices[0].finish_reason == expected


def test_usage_counts_cache_tokens_as_prompt():
    completion = translate_message(
        message(
            usage={
                "input_tokens": 10,
                "output_tokens": 20,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 1000,
            }
        ),
        target=TARGET,
    )
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (1110, 20, 1130)
    assert usage.cached_tokens == 1000  # cache reads are priced as cached input
    completion = translate_message(
        message(
            usage={
                "input_tokens": 5,
                "output_tokens": 1,
                "cache_creation_input_tokens": None,
                "cache_read_input_tokens": None,
            }
        ),
        target=TARGET,
    )
    assert completion.usage is not None
    assert completion.usage.total_tokens == 6


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"choices": []}',
        b'{"id": "msg_1", "model": "m", "content": "text"}',
        b'{"type": "error", "error": {"type": "api_error", "message": "boom"}}',
    ],
)
def test_malformed_messages_raise_upstream_malformed(body: bytes):
    with pytest.raises(UpstreamMalformed) as info:
        translate_message(body, target=TARGET)
    assert info.value.retryable is True


# --- streams ---------------------------------------------------------------------------------

# An Anthropic stream as the API sends it (shape from the Messages streaming docs): text,
# a ping, then a tool call whose input arrives as JSON fragments.
RECORDED = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U",'
    b'"type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929",'
    b'"stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2,'
    b'"cache_creation_input_tokens":10,"cache_read_input_tokens":100},'
    b'"content":[],"stop_reason":null}}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}'
    b"\n\n"
    b"event: ping\n"
    b'data: {"type": "ping"}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
    b'"text":"Okay, let\'s check"}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
    b'"text":" the weather."}}\n\n'
    b"event: content_block_stop\n"
    b'data: {"type":"content_block_stop","index":0}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use",'
    b'"id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta",'
    b'"partial_json":""}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta",'
    b'"partial_json":"{\\"location\\": \\"San Fra"}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta",'
    b'"partial_json":"ncisco, CA\\"}"}}\n\n'
    b"event: content_block_stop\n"
    b'data: {"type":"content_block_stop","index":1}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use",'
    b'"id":"toolu_02","name":"now","input":{}}}\n\n'
    b"event: content_block_stop\n"
    b'data: {"type":"content_block_stop","index":2}\n\n'
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},'
    b'"usage":{"output_tokens":89}}\n\n'
    b"event: message_stop\n"
    b'data: {"type":"message_stop"}\n\n'
)


def frames(data: bytes) -> list[dict[str, Any]]:
    """Parse ``data: {...}\\n\\n`` frames, checking each is a valid ChatChunk."""
    assert data.endswith(b"\n\n")
    out = []
    for frame in data.split(b"\n\n")[:-1]:
        assert frame.startswith(b"data: ")
        msgspec.json.decode(frame[6:], type=ChatChunk)
        out.append(json.loads(frame[6:]))
    return out


def test_recorded_stream_translates_to_openai_chunks():
    translator = StreamTranslator(TARGET, include_usage=True, created=1700000000)
    chunks = frames(translator.feed(RECORDED))
    assert translator.finished

    for chunk in chunks:
        assert chunk["id"] == "msg_014p7gG3wDgGV9EUtLvnow3U"
        assert chunk["created"] == 1700000000
        assert chunk["model"] == "claude-sonnet-4-5-20250929"

    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
         "logprobs": None}
    ]

    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    text = "".join(d.get("content", "") for d in deltas)
    assert text == "Okay, let's check the weather."

    tool_deltas = [t for d in deltas for t in d.get("tool_calls", [])]
    assert tool_deltas[0] == {
        "index": 0,
        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert tool_deltas[3] == {
        "index": 1,
        "id": "toolu_02",
        "type": "function",
        "function": {"name": "now", "arguments": ""},
    }
    calls: dict[int, str] = {}
    for t in tool_deltas:
        calls[t["index"]] = calls.get(t["index"], "") + t["function"]["arguments"]
    assert json.loads(calls[0]) == {"location": "San Francisco, CA"}
    assert json.loads(calls[1]) == {}  # a call without parameters still gets parseable JSON

    finish = chunks[-2]["choices"][0]
    assert finish == {"index": 0, "delta": {}, "finish_reason": "tool_calls",
                      "logprobs": None}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-2]] == [None] * (len(chunks) - 2)

    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 582,
        "completion_tokens": 89,
        "total_tokens": 671,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    assert translator.usage.total_tokens == 671


def test_stream_split_at_every_byte_gives_the_same_frames():
    whole = StreamTranslator(TARGET, include_usage=True, created=1).feed(RECORDED)
    translator = StreamTranslator(TARGET, include_usage=True, created=1)
    pieces = [translator.feed(RECORDED[i : i + 1]) for i in range(len(RECORDED))]
    assert b"".join(pieces) == whole
    assert translator.finished


def test_frames_of_one_read_come_back_as_one_bytes_object():
    translator = StreamTranslator(TARGET, created=1)
    first = RECORDED.index(b"event: content_block_stop")
    out = translator.feed(RECORDED[:first])
    assert isinstance(out, bytes)
    assert len(frames(out)) == 3  # role, two text deltas; the empty text block and ping: none
    assert translator.feed(b"") == b""
    assert not translator.finished


def test_no_usage_chunk_unless_asked():
    chunks = frames(StreamTranslator(TARGET, created=1).feed(RECORDED))
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all("usage" not in c for c in chunks)


def test_events_after_message_stop_and_unknown_events_are_ignored():
    translator = StreamTranslator(TARGET, created=1)
    extra = b'event: brand_new_event\ndata: {"type":"brand_new_event","x":1}\n\n'
    start = RECORDED.index(b"event: ping")
    out = translator.feed(RECORDED[:start] + extra + RECORDED[start:])
    assert out == StreamTranslator(TARGET, created=1).feed(RECORDED)
    assert translator.feed(b'event: error\ndata: {"type":"error"}\n\n') == b""


def test_thinking_blocks_are_skipped():
    translator = StreamTranslator(TARGET, created=1)
    start = RECORDED.index(b"event: content_block_start")
    thinking = (
        b'event: content_block_start\ndata: {"type":"content_block_start","index":5,'
        b'"content_block":{"type":"thinking","thinking":""}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":5,'
        b'"delta":{"type":"thinking_delta","thinking":"Let me think"}}\n\n'
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":5}\n\n'
    )
    out = translator.feed(RECORDED[:start] + thinking + RECORDED[start:])
    assert out == StreamTranslator(TARGET, created=1).feed(RECORDED)


def test_stop_reason_in_stream():
    translator = StreamTranslator(TARGET, created=1)
    events = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
        b'"model":"m","content":[],"usage":{"input_tokens":3,"output_tokens":1}}}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"text","text":"Hel"}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"max_tokens"},"usage":{"input_tokens":3,"output_tokens":4}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    chunks = frames(translator.feed(events))
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hel"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert translator.usage.total_tokens == 7


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("overloaded_error", UpstreamRateLimited),
        ("rate_limit_error", UpstreamRateLimited),
        ("api_error", UpstreamServerError),
    ],
)
def test_error_event_mid_stream(kind: str, error: type[Exception]):
    translator = StreamTranslator(TARGET, created=1)
    cut = RECORDED.index(b"event: content_block_stop")
    assert translator.feed(RECORDED[:cut])
    event = (
        b'event: error\ndata: {"type": "error", "error": {"type": "'
        + kind.encode()
        + b'", "message": "Overloaded"}}\n\n'
    )
    with pytest.raises(error) as info:
        translator.feed(event)
    assert getattr(info.value, "retryable", False) is True
    assert "Overloaded" in str(info.value)
    assert not translator.finished


@pytest.mark.parametrize(
    "event",
    [
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{}}\n\n',
        b'data: {"type":"no_such_type"}\n\n',
        b"data: [1, 2]\n\n",
    ],
)
def test_malformed_stream_events(event: bytes):
    translator = StreamTranslator(TARGET, created=1)
    with pytest.raises(UpstreamMalformed):
        translator.feed(RECORDED[: RECORDED.index(b"event: ping")] + event)


def test_truncated_stream_is_not_finished():
    translator = StreamTranslator(TARGET, created=1)
    translator.feed(RECORDED[: RECORDED.index(b"event: message_stop")])
    assert not translator.finished
