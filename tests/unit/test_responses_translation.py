"""Unit tests of the pure OpenAI Responses <-> chat translation in sidecar.protocols.responses.

Requests are the documented Responses shapes (and are checked against the openai package's
own request types); every body and stream event built is checked against the openai
package's ``Response`` and ``ResponseStreamEvent`` types, and every chat body against its
chat request types."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from openai.types.chat import completion_create_params as chat_params
from openai.types.responses import Response, ResponseStreamEvent
from openai.types.responses import response_create_params as responses_params
from pydantic import TypeAdapter

from sidecar.errors import InvalidRequest, RateLimited, UpstreamMalformed, UpstreamServerError
from sidecar.protocols.responses import chat_call
from sidecar.protocols.responses_answers import ResponseStream, response_body
from sidecar.types import ChatRequest, Op, PromptTokensDetails, Usage

_REQUEST = TypeAdapter(responses_params.ResponseCreateParamsNonStreaming)
_CHAT = TypeAdapter(chat_params.CompletionCreateParamsNonStreaming)
_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get current temperature for a given location.",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string",
                                    "description": "City and country e.g. Bogotá, Colombia"}},
        "required": ["location"],
        "additionalProperties": False,
    },
    "strict": True,
}
CALENDAR_FORMAT = {
    "type": "json_schema",
    "name": "calendar_event",
    "schema": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "date": {"type": "string"},
                       "participants": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "date", "participants"],
        "additionalProperties": False,
    },
    "strict": True,
}
IMAGE_URL = "https://upload.wikimedia.org/wikipedia/commons/a/a7/Camponotus_flavomarginatus_ant.jpg"


def _materialize(value: Any) -> Any:
    """pydantic validates an ``Iterable`` field lazily: walk it to validate everything."""
    if isinstance(value, dict):
        return {k: _materialize(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "ValidatorIterator":
        return [_materialize(v) for v in value]
    return value


def documented(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw``, after checking it is a valid Responses request for the openai package."""
    _materialize(_REQUEST.validate_python({k: v for k, v in raw.items() if k != "stream"}))
    return raw


def chat(raw: dict[str, Any]) -> dict[str, Any]:
    """The chat body chat_call builds for a documented request (itself a valid chat body)."""
    call = chat_call(documented(raw))
    assert call.op is Op.CHAT
    assert isinstance(call.request, ChatRequest)
    _materialize(_CHAT.validate_python({k: v for k, v in call.raw.items()
                                        if k not in ("stream", "stream_options")}))
    return call.raw


def refused(raw: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        chat_call(raw)
    err = info.value
    assert err.status == 400
    assert str(err).startswith("Invalid request")
    return err


# --- requests -------------------------------------------------------------------------------


def test_string_input_and_instructions() -> None:
    body = chat({"model": "gpt-4.1", "instructions": "Talk like a pirate.",
                 "input": "Are semicolons optional in JavaScript?"})
    assert body == {"model": "gpt-4.1", "messages": [
        {"role": "system", "content": "Talk like a pirate."},
        {"role": "user", "content": "Are semicolons optional in JavaScript?"},
    ]}


def test_item_list_messages_and_parts() -> None:
    body = chat({"model": "gpt-4.1", "input": [
        {"role": "developer", "content": "Talk like a pirate."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "what's in this image?"},
            {"type": "input_image", "image_url": IMAGE_URL, "detail": "high"},
        ]},
        {"type": "message", "role": "assistant", "id": "msg_67b73f697ba4819183a15cc17d011509",
         "status": "completed",
         "content": [{"type": "output_text", "text": "An ant.", "annotations": []}]},
        {"role": "system", "content": "Be brief."},
    ]})
    assert body["messages"] == [
        {"role": "developer", "content": "Talk like a pirate."},
        {"role": "user", "content": [
            {"type": "text", "text": "what's in this image?"},
            {"type": "image_url", "image_url": {"url": IMAGE_URL, "detail": "high"}},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "An ant."}]},
        {"role": "system", "content": "Be brief."},
    ]


def test_function_calls_and_outputs() -> None:
    args = '{"location":"Paris, France"}'
    body = chat({"model": "gpt-4.1", "tools": [WEATHER_TOOL], "input": [
        {"role": "user", "content": "What is the weather like in Paris and Bogotá today?"},
        {"type": "reasoning", "id": "rs_6890e972fa7c819ca8bc561526b989a0", "summary": []},
        {"type": "message", "role": "assistant", "content": "Let me check."},
        {"type": "function_call", "id": "fc_12345xyz", "call_id": "call_12345xyz",
         "name": "get_weather", "arguments": args, "status": "completed"},
        {"type": "function_call", "call_id": "call_67890abc", "name": "get_weather",
         "arguments": '{"location":"Bogotá, Colombia"}'},
        {"type": "function_call_output", "call_id": "call_12345xyz", "output": "14°C"},
        {"type": "function_call_output", "call_id": "call_67890abc",
         "output": [{"type": "input_text", "text": "18°C"}]},
        {"type": "function_call", "call_id": "call_3", "name": "get_weather", "arguments": "{}"},
    ]})
    assert body["messages"] == [
        {"role": "user", "content": "What is the weather like in Paris and Bogotá today?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "call_12345xyz", "type": "function",
             "function": {"name": "get_weather", "arguments": args}},
            {"id": "call_67890abc", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"location":"Bogotá, Colombia"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_12345xyz", "content": "14°C"},
        {"role": "tool", "tool_call_id": "call_67890abc",
         "content": [{"type": "text", "text": "18°C"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_3", "type": "function",
             "function": {"name": "get_weather", "arguments": "{}"}}]},
    ]


def test_tools_and_tool_choice() -> None:
    bare = {"type": "function", "name": "ping", "parameters": None, "strict": None}
    body = chat({"model": "gpt-4.1", "input": "hi", "tools": [WEATHER_TOOL, bare],
                 "tool_choice": {"type": "function", "name": "get_weather"},
                 "parallel_tool_calls": False})
    assert body["tools"] == [
        {"type": "function", "function": {
            "name": "get_weather", "description": WEATHER_TOOL["description"],
            "parameters": WEATHER_TOOL["parameters"], "strict": True}},
        {"type": "function", "function": {"name": "ping"}},
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    for choice in ("auto", "none", "required"):
        assert chat({"model": "m", "input": "hi", "tools": [WEATHER_TOOL],
                     "tool_choice": choice})["tool_choice"] == choice
    assert "tools" not in chat({"model": "m", "input": "hi", "tools": []})


def test_text_format() -> None:
    body = chat({"model": "gpt-4o-2024-08-06", "input": "Alice and Bob go to a fair on Friday.",
                 "text": {"format": CALENDAR_FORMAT}})
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "calendar_event", "schema": CALENDAR_FORMAT["schema"], "strict": True}}
    described = chat({"model": "m", "input": "x", "text": {"format": {
        "type": "json_schema", "name": "n", "schema": {"type": "object"},
        "description": "d"}}})
    assert described["response_format"]["json_schema"] == {
        "name": "n", "schema": {"type": "object"}, "description": "d"}
    assert chat({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}})[
        "response_format"] == {"type": "json_object"}
    assert "response_format" not in chat({"model": "m", "input": "x",
                                          "text": {"format": {"type": "text"},
                                                   "verbosity": "low"}})


def test_options_passed_on() -> None:
    body = chat({"model": "gpt-4.1", "input": "hi", "max_output_tokens": 256,
                 "temperature": 0.2, "top_p": 0.9, "user": "user-1234",
                 "metadata": {"session": "abc"}, "top_logprobs": 3})
    assert body == {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}],
                    "max_completion_tokens": 256, "temperature": 0.2, "top_p": 0.9,
                    "user": "user-1234", "metadata": {"session": "abc"},
                    "top_logprobs": 3, "logprobs": True}
    streamed = chat_call({"model": "m", "input": "hi", "stream": True, "seed": 7})
    assert streamed.stream
    assert streamed.raw["stream_options"] == {"include_usage": True}
    assert streamed.raw["seed"] == 7
    logprobs = chat({"model": "m", "input": "hi", "include": ["message.output_text.logprobs"]})
    assert logprobs["logprobs"] is True


def test_stateless_and_ignored_fields_are_accepted() -> None:
    body = chat({"model": "gpt-4.1", "input": "hi", "store": True, "truncation": "disabled",
                 "include": ["reasoning.encrypted_content"], "service_tier": "auto",
                 "reasoning": {"effort": "low"}, "previous_response_id": None,
                 "background": False, "prompt_cache_key": "k", "safety_identifier": "s",
                 "stream_options": {"include_obfuscation": False}})
    assert body == {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("field", "value", "words"), [
    ("previous_response_id", "resp_68af4030592c81938ec0a5fbab4a3e9f", "does not store responses"),
    ("conversation", "conv_689667905b048191b4740501625afd940c7533ace33a2dab", "conversations"),
    ("background", True, "stores nothing"),
    ("prompt", {"id": "pmpt_123", "version": "2"}, "stored prompts"),
    ("truncation", "auto", "only 'disabled'"),
])
def test_stateful_fields_are_refused(field: str, value: Any, words: str) -> None:
    err = refused({"model": "gpt-4.1", "input": "hi", field: value})
    assert err.param == field
    assert words in str(err)


def test_unknown_fields_are_ignored() -> None:
    assert chat_call({"model": "m", "input": "hi", "max_tool_calls": 3, "future": {}}).raw == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_previous_response_id_says_what_to_do() -> None:
    err = refused({"model": "m", "input": "hi", "previous_response_id": "resp_1"})
    assert "send the whole conversation in input" in str(err)


@pytest.mark.parametrize(("raw", "param"), [
    ({"model": "m"}, "input"),
    ({"model": "m", "input": []}, "input"),
    ({"model": "m", "input": 3}, "input"),
    ({"model": "m", "input": ["hi"]}, "input[0]"),
    ({"model": "m", "input": [{"content": "hi"}]}, "input[0].role"),
    ({"model": "m", "input": [{"role": "tool", "content": "hi"}]}, "input[0].role"),
    ({"model": "m", "input": [{"role": "user"}]}, "input[0].content"),
    ({"model": "m", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"model": "m", "input": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                              {"role": "user", "content": [{"type": "input_video"}]}]},
     "input[2].content[0].type"),
    ({"model": "m", "input": [{"role": "user", "content": ["hi"]}]}, "input[0].content[0]"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text"}]}]},
     "input[0].content[0].text"),
    ({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file-abc", "detail": "auto"}]}]},
     "input[0].content[0].file_id"),
    ({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "detail": "auto"}]}]}, "input[0].content[0].image_url"),
    ({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": IMAGE_URL, "detail": "huge"}]}]},
     "input[0].content[0].detail"),
    ({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_file", "file_id": "file-abc"}]}]}, "input[0].content[0].type"),
    ({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]},
     "input[0].content[0].type"),
    ({"model": "m", "input": [{"type": "function_call", "call_id": 5, "name": "f",
                               "arguments": "{}"}]}, "input[0].call_id"),
    ({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
     "input[0].arguments"),
    ({"model": "m", "input": [{"type": "function_call_output", "call_id": "c"}]},
     "input[0].output"),
    ({"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": [
        {"type": "input_image", "image_url": IMAGE_URL}]}]}, "input[0].output[0].type"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"model": "m", "input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
    ({"model": "m", "input": [{"type": True}]}, "input[0].type"),
    ({"model": "m", "input": "hi", "instructions": 3}, "instructions"),
    ({"model": "m", "input": "hi", "tools": {"type": "function"}}, "tools"),
    ({"model": "m", "input": "hi", "tools": [WEATHER_TOOL, {"type": "web_search"}]},
     "tools[1].type"),
    ({"model": "m", "input": "hi", "tools": [{"type": "mcp", "server_label": "x"}]},
     "tools[0].type"),
    ({"model": "m", "input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"model": "m", "input": "hi", "tools": [{"type": "function", "name": "f",
                                               "parameters": "{}"}]}, "tools[0].parameters"),
    ({"model": "m", "input": "hi", "tool_choice": "any"}, "tool_choice"),
    ({"model": "m", "input": "hi", "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"model": "m", "input": "hi", "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"model": "m", "input": "hi", "text": "json"}, "text"),
    ({"model": "m", "input": "hi", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"model": "m", "input": "hi", "text": {"format": {"type": "json_schema", "schema": {}}}},
     "text.format.name"),
    ({"model": "m", "input": "hi", "text": {"format": {"type": "json_schema", "name": "n"}}},
     "text.format.schema"),
    ({"model": "m", "input": "hi", "include": [3]}, "include[0]"),
    ({"model": "m", "input": "hi", "stream": "true"}, "stream"),
    ({"model": "m", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "m", "input": "hi", "temperature": 5}, "temperature"),
    ({"model": "m", "input": "hi", "top_logprobs": 50}, "top_logprobs"),
    ({"model": "bad\nname", "input": "hi"}, "model"),
    ({"model": "m", "input": [{"role": "user", "content": "x", "extra": 2**70}]},
     "input[0].extra"),
])
def test_bad_input_names_the_field(raw: dict[str, Any], param: str) -> None:
    err = refused(raw)
    assert err.param == param, str(err)
    assert f"'{param}'" in str(err)


def test_non_object_body_and_missing_model() -> None:
    refused(["not", "an", "object"])
    assert "model" in str(refused({"input": "hi"}))


def test_deep_schema_is_refused_with_its_responses_path() -> None:
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(70):
        schema = {"type": "object", "properties": {"x": schema}}
    err = refused({"model": "m", "input": "hi", "tools": [
        {"type": "function", "name": "f", "parameters": schema}]})
    assert err.param is not None and err.param.startswith("tools[0].parameters")


# --- answers --------------------------------------------------------------------------------

RAW = {"model": "gpt-4.1", "instructions": "Be helpful.", "input": "Tell me a story.",
       "tools": [WEATHER_TOOL], "tool_choice": "auto", "temperature": 0.7,
       "max_output_tokens": 300, "metadata": {"session": "s1"},
       "text": {"format": CALENDAR_FORMAT}}


def chat_body(message: dict[str, Any] | None = None, finish: str | None = "stop",
              **extra: Any) -> bytes:
    choice: dict[str, Any] = {"index": 0, "message": message or {
        "role": "assistant", "content": "Once upon a time...", "refusal": None},
        "logprobs": None, "finish_reason": finish}
    body = {"id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "object": "chat.completion",
            "created": 1741570283, "model": "gpt-4.1-2025-04-14", "choices": [choice],
            "usage": {"prompt_tokens": 36, "completion_tokens": 87, "total_tokens": 123,
                      "prompt_tokens_details": {"cached_tokens": 12, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0}},
            "service_tier": "default", "system_fingerprint": "fp_fc9f1d7035"} | extra
    return json.dumps(body).encode()


def answer(body: bytes, raw: dict[str, Any] = RAW) -> dict[str, Any]:
    out = response_body(body, raw, "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b")
    Response.model_validate_json(out)
    decoded: dict[str, Any] = json.loads(out)
    return decoded


def test_text_answer() -> None:
    out = answer(chat_body())
    assert out["id"] == "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b"
    assert (out["object"], out["status"], out["created_at"]) == ("response", "completed",
                                                                 1741570283)
    assert out["model"] == "gpt-4.1-2025-04-14"
    assert out["error"] is None and out["incomplete_details"] is None
    [item] = out["output"]
    assert item["type"] == "message" and item["id"].startswith("msg_")
    assert (item["role"], item["status"]) == ("assistant", "completed")
    assert item["content"] == [{"type": "output_text", "text": "Once upon a time...",
                                "annotations": [], "logprobs": []}]
    assert out["usage"] == {"input_tokens": 36, "output_tokens": 87, "total_tokens": 123,
                            "input_tokens_details": {"cached_tokens": 12,
                                                     "cache_write_tokens": 0},
                            "output_tokens_details": {"reasoning_tokens": 0}}
    assert Response.model_validate_json(response_body(chat_body(), RAW, "resp_1")).output_text \
        == "Once upon a time..."


def test_answer_echoes_the_request() -> None:
    out = answer(chat_body())
    assert out["instructions"] == "Be helpful."
    assert out["tools"] == [WEATHER_TOOL]
    assert (out["tool_choice"], out["parallel_tool_calls"]) == ("auto", True)
    assert (out["temperature"], out["top_p"], out["max_output_tokens"]) == (0.7, None, 300)
    assert out["metadata"] == {"session": "s1"}
    assert out["text"] == {"format": CALENDAR_FORMAT}
    assert (out["previous_response_id"], out["store"], out["truncation"]) == (None, False,
                                                                              "disabled")
    bare = answer(chat_body(), {"model": "m", "input": "hi", "store": True})
    assert bare["store"] is False
    assert (bare["tools"], bare["tool_choice"], bare["text"], bare["metadata"]) == (
        [], "auto", {"format": {"type": "text"}}, {})


def test_tool_call_answer() -> None:
    calls = [{"id": "call_12345xyz", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"location":"Paris, France"}'}},
        {"id": "call_67890abc", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"location":"Bogotá, Colombia"}'}}]
    out = answer(chat_body({"role": "assistant", "content": None, "tool_calls": calls},
                           "tool_calls"))
    assert out["status"] == "completed"
    assert [i["type"] for i in out["output"]] == ["function_call", "function_call"]
    first = out["output"][0]
    assert first["id"].startswith("fc_")
    assert {k: first[k] for k in ("call_id", "name", "arguments", "status")} == {
        "call_id": "call_12345xyz", "name": "get_weather",
        "arguments": '{"location":"Paris, France"}', "status": "completed"}
    with_text = answer(chat_body({"role": "assistant", "content": "Checking.",
                                  "tool_calls": calls[:1]}, "tool_calls"))
    assert [i["type"] for i in with_text["output"]] == ["message", "function_call"]


@pytest.mark.parametrize(("finish", "reason"), [("length", "max_output_tokens"),
                                                ("content_filter", "content_filter")])
def test_incomplete_answer(finish: str, reason: str) -> None:
    out = answer(chat_body(finish=finish))
    assert out["status"] == "incomplete"
    assert out["incomplete_details"] == {"reason": reason}
    assert out["output"][0]["status"] == "incomplete"


def test_refusal_and_logprobs() -> None:
    refusal = answer(chat_body({"role": "assistant", "content": None,
                                "refusal": "I can't help with that."}))
    assert refusal["output"][0]["content"] == [{"type": "refusal",
                                                "refusal": "I can't help with that."}]
    logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
                             "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": None},
                                              {"token": "Yo", "logprob": -2.5}]}],
                "refusal": None}
    body = json.loads(chat_body({"role": "assistant", "content": "Hi"}))
    body["choices"][0]["logprobs"] = logprobs
    out = answer(json.dumps(body).encode())
    assert out["output"][0]["content"][0]["logprobs"] == [{
        "token": "Hi", "bytes": [72, 105], "logprob": -0.1, "top_logprobs": [
            {"token": "Hi", "bytes": [72, 105], "logprob": -0.1},
            {"token": "Yo", "bytes": [89, 111], "logprob": -2.5}]}]


def test_sparse_answer_and_first_choice_only() -> None:
    sparse = answer(b'{"choices": [{"message": {"content": "ok"}}]}',
                    {"model": "local/smollm2", "input": "hi"})
    assert sparse["model"] == "local/smollm2"
    assert sparse["usage"] is None and sparse["status"] == "completed"
    assert sparse["output"][0]["content"][0]["text"] == "ok"
    assert answer(b"{}")["output"] == []
    two = json.loads(chat_body())
    two["choices"].append({"index": 1, "message": {"role": "assistant", "content": "other"},
                           "finish_reason": "stop"})
    [item] = answer(json.dumps(two).encode())["output"]
    assert item["content"][0]["text"] == "Once upon a time..."


# --- streams --------------------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
          usage: dict[str, Any] | None = None, logprobs: Any = None) -> bytes:
    body: dict[str, Any] = {"id": "chatcmpl-123", "object": "chat.completion.chunk",
                            "created": 1694268190, "model": "gpt-4.1-2025-04-14",
                            "system_fingerprint": "fp_44709d6fcb"}
    if delta is None and finish is None:
        body |= {"choices": [], "usage": usage}
    else:
        body |= {"choices": [{"index": 0, "delta": delta or {}, "logprobs": logprobs,
                              "finish_reason": finish}], "usage": None}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def events(stream_bytes: bytes) -> list[dict[str, Any]]:
    """Each SSE event's data, after checking its ``event:`` line and its openai type."""
    out = []
    for block in stream_bytes.decode().split("\n\n")[:-1]:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        event = json.loads(data[6:])
        assert event["type"] == name[7:]
        _EVENT.validate_python(event)
        out.append(event)
    assert stream_bytes.endswith(b"\n\n") or not stream_bytes
    return out


def run(raw: dict[str, Any], frames: list[bytes], usage: Usage | None = None,
        model: str = "gpt-4.1") -> list[dict[str, Any]]:
    stream = ResponseStream(raw, "resp_1")
    data = stream.start(model) + b"".join(stream.feed(f) for f in frames) + stream.end(usage)
    assert stream.end(usage) == b""
    out = events(data)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def kinds(out: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in out]


def test_text_stream() -> None:
    frames = [chunk({"role": "assistant", "content": "", "refusal": None}),
              chunk({"content": "Hi"}) + chunk({"content": " there"}),
              chunk({}, "stop"), chunk(usage=USAGE)]
    out = run(RAW | {"stream": True}, frames)
    assert kinds(out) == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    created = out[0]["response"]
    assert (created["status"], created["output"], created["model"]) == ("in_progress", [],
                                                                        "gpt-4.1")
    added = out[2]["item"]
    assert (added["type"], added["status"], added["content"]) == ("message", "in_progress", [])
    assert out[3]["part"]["text"] == ""
    deltas = out[4:6]
    assert [d["delta"] for d in deltas] == ["Hi", " there"]
    assert all((d["item_id"], d["output_index"], d["content_index"], d["logprobs"])
               == (added["id"], 0, 0, []) for d in deltas)
    assert out[6]["text"] == "Hi there"
    assert out[7]["part"]["text"] == "Hi there"
    done_item = out[8]["item"]
    assert done_item["status"] == "completed"
    final = out[-1]["response"]
    assert final["status"] == "completed"
    assert final["output"] == [done_item]
    assert final["usage"]["input_tokens"] == 9 and final["usage"]["total_tokens"] == 12
    assert final["instructions"] == "Be helpful." and final["tools"] == [WEATHER_TOOL]


def test_stream_final_object_matches_the_non_stream_body() -> None:
    frames = [chunk({"content": "Once upon a time..."}), chunk({}, "stop")]
    final = run(RAW, frames, Usage(36, 87, 123, PromptTokensDetails(12)),
                model="gpt-4.1-2025-04-14")[-1]["response"]
    body = answer(chat_body())
    for item in (*final["output"], *body["output"]):
        item.pop("id")
    for obj in (final, body):
        for key in ("id", "created_at", "completed_at"):
            obj.pop(key)
    assert final == body


def test_tool_call_stream() -> None:
    frames = [
        chunk({"role": "assistant", "content": "Checking."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                               "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"location":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                               "function": {"name": "get_weather",
                                            "arguments": '{"location":"Rome"}'}}]}),
        chunk({}, "tool_calls"), chunk(usage=USAGE),
    ]
    out = run(RAW, frames)
    assert kinds(out) == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    added = out[8]["item"]
    assert (added["type"], added["call_id"], added["name"], added["arguments"],
            added["status"]) == ("function_call", "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                                 "get_weather", "", "in_progress")
    assert out[9]["item_id"] == added["id"] and out[9]["output_index"] == 1
    assert out[11]["arguments"] == '{"location":"Paris"}'
    assert out[12]["item"]["arguments"] == '{"location":"Paris"}'
    assert out[13]["output_index"] == 2
    final = out[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "function_call"]
    assert [i.get("call_id") for i in final["output"]] == [None, "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                                                           "call_2"]
    assert final["output"][2]["arguments"] == '{"location":"Rome"}'
    assert all(i["status"] == "completed" for i in final["output"])


def test_text_after_tool_call_opens_a_new_message() -> None:
    frames = [chunk({"tool_calls": [{"index": 0, "id": "c", "function": {
        "name": "f", "arguments": "{}"}}]}), chunk({"content": "Done."}), chunk({}, "stop")]
    out = run({"model": "m", "input": "hi"}, frames)
    assert kinds(out)[2:] == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [i["type"] for i in out[-1]["response"]["output"]] == ["function_call", "message"]


def test_truncated_stream_is_incomplete() -> None:
    out = run({"model": "m", "input": "hi", "max_output_tokens": 2},
              [chunk({"content": "Once upon"}), chunk({}, "length")], Usage(5, 2, 7))
    assert out[-1]["type"] == "response.incomplete"
    final = out[-1]["response"]
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"
    assert out[-2]["item"]["status"] == "incomplete"
    assert final["usage"]["output_tokens"] == 2


def test_stream_without_output() -> None:
    out = run({"model": "m", "input": "hi"}, [chunk({"role": "assistant"}), chunk({}, "stop")])
    assert kinds(out) == ["response.created", "response.in_progress", "response.completed"]
    assert out[-1]["response"]["output"] == [] and out[-1]["response"]["usage"] is None


def test_feed_returns_nothing_for_preamble_usage_and_comments() -> None:
    stream = ResponseStream({"model": "m", "input": "hi"}, "resp_1")
    stream.start("m")
    assert stream.feed(chunk({"role": "assistant", "content": ""})) == b""
    assert stream.feed(b": keep-alive\n\n" + chunk(usage=USAGE)) == b""
    out = events(stream.feed(b": ping\n\n" + chunk({"content": "a"})[:20]))
    assert out == []
    assert kinds(events(stream.feed(chunk({"content": "a"})[20:]))) == [
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta"]
    final = events(stream.end(Usage(1, 1, 2)))[-1]["response"]
    assert final["usage"]["total_tokens"] == 2  # end's usage wins over the chunk's
    assert stream.feed(chunk({"content": "late"})) == b""


def test_stream_refusal_and_logprobs() -> None:
    lp = {"content": [{"token": "No", "logprob": -0.5, "bytes": [78, 111], "top_logprobs": []}]}
    out = run({"model": "m", "input": "hi"}, [
        chunk({"content": "No"}, logprobs=lp), chunk({"refusal": "I can't"}),
        chunk({"refusal": " do that."}), chunk({}, "stop")])
    assert kinds(out)[2:] == [
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.content_part.added",
        "response.refusal.delta", "response.refusal.delta", "response.refusal.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert out[4]["logprobs"][0]["token"] == "No"
    assert out[10]["refusal"] == "I can't do that." and out[10]["content_index"] == 1
    [item] = out[-1]["response"]["output"]
    assert [p["type"] for p in item["content"]] == ["output_text", "refusal"]
    assert item["content"][0]["logprobs"][0]["bytes"] == [78, 111]


@pytest.mark.parametrize(("err", "code"), [
    (UpstreamServerError("the provider failed", target="openai/gpt-4.1"), "server_error"),
    (RateLimited("rate limit reached"), "rate_limit_exceeded"),
])
def test_failed_stream(err: Any, code: str) -> None:
    stream = ResponseStream({"model": "m", "input": "hi"}, "resp_1")
    data = stream.start("m") + stream.feed(chunk({"content": "partial"})) + stream.fail(err)
    assert stream.fail(err) == b"" and stream.end(None) == b""
    out = events(data)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    assert kinds(out)[-2:] == ["error", "response.failed"]
    assert out[-2] == {"type": "error", "code": err.code, "message": str(err),
                       "param": None, "sequence_number": len(out) - 2}
    failed = out[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": code, "message": str(err)}
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "partial"


def test_malformed_stream_chunks() -> None:
    stream = ResponseStream({"model": "m", "input": "hi"}, "resp_1")
    stream.start("m")
    with pytest.raises(UpstreamMalformed):
        stream.feed(b"data: {not json\n\n")
    call = {"index": 0, "id": "c", "function": {"name": "f", "arguments": "{"}}
    stream.feed(chunk({"tool_calls": [call]}))
    stream.feed(chunk({"tool_calls": [{"index": 1, "id": "d", "function": {"name": "g"}}]}))
    with pytest.raises(UpstreamMalformed):
        stream.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}))


def test_stream_tool_call_without_id_or_index() -> None:
    out = run({"model": "m", "input": "hi"}, [
        chunk({"tool_calls": [{"function": {"name": "f", "arguments": '{"a":'}}]}),
        chunk({"tool_calls": [{"function": {"arguments": "1}"}}]}), chunk({}, "tool_calls")])
    [item] = out[-1]["response"]["output"]
    assert item["call_id"].startswith("call_") and item["arguments"] == '{"a":1}'


def test_stream_encodes_with_msgspec_types() -> None:
    """Usage chunk fields the Struct does not model are ignored, not fatal."""
    extra = {**USAGE, "completion_tokens_details": {"reasoning_tokens": 0}}
    out = run({"model": "m", "input": "hi"}, [chunk({"content": "x"}), chunk(usage=extra)])
    assert out[-1]["response"]["usage"]["output_tokens"] == 3
    assert msgspec.json.decode(json.dumps(out[-1]).encode())["type"] == "response.completed"
