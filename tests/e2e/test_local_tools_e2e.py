"""Tool calling on the local model, end to end: the official ``openai`` SDK against a real
``sidecar serve`` running the real default model, two-step tool loops stream and not, every
``tool_choice``, bad tool requests, and fallback from a failing remote (the fake provider)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.e2e.test_local_api_e2e import CONFIG
from tests.support.fake_provider import FakeProvider, status
from tests.support.process import SidecarProcess

WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": WEATHER_ARGS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now."}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def sc(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(CONFIG.format(url=fake_mod.openai_base_url),
                          tmp_path_factory.mktemp("tools"))
    yield proc
    proc.stop()


@pytest.fixture
def client(sc: SidecarProcess) -> openai.OpenAI:
    return sc.sdk()


def streamed(client: openai.OpenAI, **kw: Any) -> tuple[str, dict[int, dict[str, str]],
                                                         str | None]:
    """(content, {index: {"id", "name", "arguments"}}, finish_reason) of a stream."""
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for t in delta.tool_calls or []:
                call = calls.setdefault(t.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += t.id or ""
                if t.function is not None:
                    call["name"] += t.function.name or ""
                    call["arguments"] += t.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, calls, reason


def test_required_tool_call_and_the_second_step(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model="local", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        temperature=0, max_tokens=100)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in ("get_weather", "get_time")
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            jsonschema.validate(args, WEATHER_ARGS)
    # step two: the results go back, the answer is text
    history: list[Any] = [*ASK, choice.message.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": c.id, "content": "Sunny, 21 C"} for c in calls]
    second = client.chat.completions.create(
        model="local", messages=history, tools=[WEATHER, TIME], tool_choice="none",
        temperature=0, max_tokens=40)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls


def test_auto_may_answer_with_text_or_calls_and_both_are_well_formed(
        client: openai.OpenAI) -> None:
    for seed in range(4):
        answer = client.chat.completions.create(
            model="local", messages=[{"role": "user", "content": "Say hello."}], seed=seed,
            tools=[WEATHER], temperature=1.0, max_tokens=120)
        choice = answer.choices[0]
        if choice.finish_reason == "tool_calls":
            for call in choice.message.tool_calls or []:
                jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)
        else:
            assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
            assert isinstance(choice.message.content, str)


def test_named_tool_choice_calls_exactly_that_tool(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="local", messages=ASK, tools=[WEATHER, TIME], temperature=0.8, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=60)
    [call] = answer.choices[0].message.tool_calls or []
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}


def test_parallel_tool_calls_false_gives_at_most_one(client: openai.OpenAI) -> None:
    for seed in range(3):
        answer = client.chat.completions.create(
            model="local", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
            parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=100)
        assert len(answer.choices[0].message.tool_calls or []) == 1


def test_tool_choice_none_answers_with_text(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="local", messages=ASK, tools=[WEATHER], tool_choice="none", temperature=0,
        max_tokens=20)
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_calls_concatenate_to_valid_json(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="local", messages=ASK, tools=[WEATHER, TIME],
                              tool_choice="required", temperature=0, max_tokens=100)
    content, calls, reason = streamed(client, **kw)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls or []
    assert reason == "tool_calls" and content == "" and calls
    assert [c["name"] for c in calls.values()] == [c.function.name for c in whole]
    for call, same in zip(calls.values(), whole, strict=True):
        assert call["id"].startswith("call_")
        assert json.loads(call["arguments"]) == json.loads(same.function.arguments)


def test_streamed_text_answer_in_tool_mode_streams_as_content(client: openai.OpenAI) -> None:
    # tool_choice auto and a question without a tool: a text answer, streamed as content.
    # Judged on the stream itself, not against a second, non-streamed request with the
    # same seed: with prompt-prefix reuse the repeat's prompt is cut into other batches
    # than the first's, and llama.cpp's logits (so a seeded draw) may differ slightly
    # (docs/local-api.md, "Prompt-prefix reuse").
    for seed in range(6):
        kw: dict[str, Any] = dict(model="local", tools=[WEATHER], temperature=1.0, seed=seed,
                                  max_tokens=60,
                                  messages=[{"role": "user", "content": "Tell me a joke."}])
        content, calls, reason = streamed(client, **kw)
        if reason != "stop" or calls:
            continue
        assert content.strip() and not content.lstrip().startswith("{\"tool_calls\"")
        return
    pytest.skip("no seed gave a complete text answer")


def test_tool_results_in_history_without_tools_field(client: openai.OpenAI) -> None:
    # a conversation that used tools, continued without them: still served
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    answer = client.chat.completions.create(model="local", messages=history,  # type: ignore[arg-type]
                                            temperature=0, max_tokens=20)
    assert answer.choices[0].message.content


@pytest.mark.parametrize(("tools", "choice", "param", "words"), [
    ([{"type": "function", "function": {"name": ""}}], None, "tools[0].function.name",
     "letters, digits"),
    ([{"type": "function", "function": {"name": "has space"}}], None,
     "tools[0].function.name", "letters, digits"),
    ([WEATHER, WEATHER], None, "tools[1].function.name", "two tools"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice",
     "'nope'"),
    ([WEATHER], "sometimes", "tool_choice", "tool_choice is"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "number", "minimum": 1}}}}}],
     None, "tools[0].function.parameters", "'minimum'"),
])
def test_bad_tool_requests_get_400_naming_the_field(
        client: openai.OpenAI, tools: list[Any], choice: Any, param: str, words: str) -> None:
    extra = {} if choice is None else {"tool_choice": choice}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="local", messages=ASK, tools=tools,
                                       max_tokens=8, **extra)
    body = e.value.body
    assert isinstance(body, dict) and body.get("param") == param, body
    assert words in str(e.value.message)


@pytest.mark.parametrize("stream", [False, True])
def test_remote_failure_falls_back_to_local_tools(sc: SidecarProcess, fp: FakeProvider,
                                                  stream: bool) -> None:
    fp.script("down", *[status(500)] * 4)
    client = sc.sdk()
    kw: dict[str, Any] = dict(model="fallback", messages=ASK, tools=[WEATHER],
                              tool_choice="required", temperature=0, max_tokens=100)
    if stream:
        with client.chat.completions.with_streaming_response.create(stream=True, **kw) as r:
            assert r.headers["x-sidecar-target"] == "local/smollm2"
        _, calls, reason = streamed(client, **kw)
        assert reason == "tool_calls"
        args = [json.loads(c["arguments"]) for c in calls.values()]
    else:
        r = client.chat.completions.with_raw_response.create(**kw)
        assert r.headers["x-sidecar-target"] == "local/smollm2"
        answer = r.parse()
        assert answer.choices[0].finish_reason == "tool_calls"
        args = [json.loads(c.function.arguments)
                for c in answer.choices[0].message.tool_calls or []]
    assert args
    for a in args:
        jsonschema.validate(a, WEATHER_ARGS)
