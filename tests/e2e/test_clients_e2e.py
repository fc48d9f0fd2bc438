"""Agent and structured-output traffic through the client libraries people use, against a
real ``sidecar serve`` on the real default model: LangChain (``ChatOpenAI.bind_tools`` and
``with_structured_output``) and the Vercel AI SDK (``@ai-sdk/openai-compatible`` and the
default ``@ai-sdk/openai`` provider, which speaks the Responses API: ``generateText`` with a
two-step tool loop, ``streamText``, ``generateObject``), directly and
through a ``[failing remote, local]`` fallback route (the fake provider on loopback).

``make test`` installs both (scripts/client-deps.sh); run alone, the tests skip naming what
is missing."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.e2e.test_local_api_e2e import CONFIG
from tests.support.fake_provider import FakeProvider, status
from tests.support.process import SidecarProcess

NODE_DIR = Path(__file__).resolve().parents[1] / "clients" / "node"
WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]}
INSTALL = "run `make clients` (scripts/client-deps.sh)"


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=150)
    tags: list[str] = Field(max_length=3)


@pytest.fixture(scope="module")
def sc(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(CONFIG.format(url=fake_mod.openai_base_url),
                          tmp_path_factory.mktemp("clients"))
    yield proc
    proc.stop()


def down(fp: FakeProvider) -> None:
    """The fallback route's remote fails every attempt of the test."""
    fp.script("down", *[status(500)] * 8)


# --- LangChain -------------------------------------------------------------------------------


def chat(sc: SidecarProcess, model: str = "local", **kw: Any) -> Any:
    if importlib.util.find_spec("langchain_openai") is None:
        pytest.skip(f"langchain-openai is not installed: {INSTALL}")
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=sc.base_url, api_key="unused", model=model,  # type: ignore[arg-type]
                      temperature=0, max_retries=0, timeout=120, **kw)


def get_weather(city: str) -> str:
    """The weather in a city now."""
    return f"Sunny, 21 C in {city}"


@pytest.mark.parametrize("model", ["local", "fallback"])
def test_langchain_bind_tools_two_step_loop(sc: SidecarProcess, fp: FakeProvider,
                                            model: str) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage

    down(fp)
    llm = chat(sc, model, max_tokens=100)
    history: list[Any] = [HumanMessage("What is the weather in Paris?")]
    first = llm.bind_tools([get_weather], tool_choice="required").invoke(history)
    assert first.tool_calls and not first.invalid_tool_calls
    for call in first.tool_calls:
        assert call["name"] == "get_weather" and call["id"]
        jsonschema.validate(call["args"], WEATHER_ARGS)
    history.append(first)
    history += [ToolMessage(get_weather(**c["args"]), tool_call_id=c["id"])
                for c in first.tool_calls]
    second = llm.bind_tools([get_weather], tool_choice="none").invoke(history)
    assert isinstance(second.content, str) and second.content.strip()
    assert not second.tool_calls
    assert second.response_metadata["finish_reason"] in ("stop", "length")
    if model == "fallback":
        assert len([r for r in fp.requests() if r.get("model") == "down"]) >= 2


def test_langchain_streamed_tool_call_chunks_add_up(sc: SidecarProcess) -> None:
    llm = chat(sc, max_tokens=100).bind_tools([get_weather], tool_choice="get_weather")
    chunks = list(llm.stream("What is the weather in Paris?"))
    assert any(c.tool_call_chunks for c in chunks)
    whole = chunks[0]
    for c in chunks[1:]:
        whole = whole + c
    [call] = whole.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER_ARGS)
    assert whole.response_metadata["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(sc: SidecarProcess, method: str) -> None:
    ask = "Describe a person called Ada."
    if method == "json_mode":  # the schema is not sent: the prompt has to carry it
        ask += f" Answer in JSON with this schema: {json.dumps(Person.model_json_schema())}"
    llm = chat(sc, max_tokens=120).with_structured_output(Person, method=method,
                                                          include_raw=True)
    out = llm.invoke(ask)
    if method == "json_mode":  # only JSON is enforced
        raw = out["raw"].content
        assert isinstance(raw, str) and isinstance(json.loads(raw), dict)
        return
    assert out["parsing_error"] is None
    person = out["parsed"]
    assert isinstance(person, Person)
    assert 0 <= person.age <= 150 and len(person.tags) <= 3


# --- the Vercel AI SDK -----------------------------------------------------------------------


def vercel(sc: SidecarProcess, case: str, model: str = "local") -> dict[str, Any]:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "ai").is_dir():
        pytest.skip(f"Node.js or the AI SDK is not installed: {INSTALL}")
    run = subprocess.run([node, "vercel.mjs", sc.url, model, case], cwd=NODE_DIR,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    return result


API = pytest.mark.parametrize("api", ["", "responses-"], ids=["chat", "responses"])
"""``@ai-sdk/openai-compatible`` (chat completions) or the default ``@ai-sdk/openai``
provider (the Responses API)."""


@API
@pytest.mark.parametrize("model", ["local", "fallback"])
def test_vercel_generate_text_two_step_tool_loop(sc: SidecarProcess, fp: FakeProvider,
                                                 model: str, api: str) -> None:
    down(fp)
    out = vercel(sc, api + "tool-loop", model)
    first, second = out["steps"]
    assert first["finishReason"] == "tool-calls"
    assert first["toolCalls"] and len(first["toolResults"]) == len(first["toolCalls"])
    for call in first["toolCalls"]:
        assert call["name"] == "get_weather" and call["id"].startswith("call_")
        jsonschema.validate(call["input"], WEATHER_ARGS)
    assert second["finishReason"] in ("stop", "length") and not second["toolCalls"]
    assert out["text"] == second["text"] and out["text"].strip()
    assert out["usage"]["inputTokens"] > 0 and out["usage"]["outputTokens"] > 0


@API
def test_vercel_stream_text_with_a_tool(sc: SidecarProcess, api: str) -> None:
    out = vercel(sc, api + "stream-tool")
    parts = out["parts"]
    for kind in ("tool-input-start", "tool-input-delta", "tool-call", "tool-result",
                 "text-delta", "finish"):
        assert kind in parts
    assert parts.index("tool-result") < parts.index("text-delta")
    jsonschema.validate(json.loads(out["inputDeltas"]), WEATHER_ARGS)
    assert next(s["finishReason"] for s in out["steps"]) == "tool-calls"
    assert out["text"].strip()


@pytest.mark.parametrize("case", ["object", "output-object", "responses-object"])
def test_vercel_generate_object_with_a_zod_schema(sc: SidecarProcess, case: str) -> None:
    out = vercel(sc, case)
    person = out["object"]
    assert set(person) == {"name", "age", "tags"}
    assert isinstance(person["age"], int) and isinstance(person["name"], str)
    assert len(person["tags"]) <= 3
