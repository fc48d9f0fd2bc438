"""The ``local`` provider: OpenAI requests translated into calls on a real model pool, and
pool answers and errors translated back (OpenAI JSON bodies, SSE frames, upstream errors)."""

from __future__ import annotations

import base64
import json
import os
import signal
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from local_models import ModelPool, ModelSpec
from sidecar.errors import (
    UpstreamOverloaded,
    UpstreamServerError,
    UpstreamUnreachable,
    UpstreamUnsupported,
)
from sidecar.providers.local import LocalProvider
from sidecar.types import REQUEST_TYPES, Call, Op
from tests.support.gguf_files import write_not_gguf
from tests.support.process import local_spec

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"
HI = [{"role": "user", "content": "hi"}]


def call(op: Op, **raw: Any) -> Call:
    raw = {"model": "m", **raw}
    return Call(op, msgspec.convert(raw, REQUEST_TYPES[op]), raw)


def chat_call(**raw: Any) -> Call:
    return call(Op.CHAT, **{"messages": HI, "temperature": 0, **raw})


def text_call(**raw: Any) -> Call:
    return call(Op.COMPLETIONS, **{"prompt": COUNTING, "temperature": 0, **raw})


def frames(data: bytes) -> list[dict[str, Any]]:
    """The JSON objects of SSE ``data:`` lines."""
    out = []
    for block in data.decode().split("\n\n"):
        if block:
            assert block.startswith("data: ") and block != "data: [DONE]", block
            out.append(json.loads(block[len("data: "):]))
    return out


async def stream_frames(provider: LocalProvider, c: Call, model: str = "m"
                        ) -> list[dict[str, Any]]:
    data = b""
    async for piece in provider.stream(c, model, 60):
        assert piece.endswith(b"\n\n")
        data += piece
    return frames(data)


@pytest.fixture
async def make_provider(make_pool: Callable[..., ModelPool]) -> Callable[..., LocalProvider]:
    """Providers over real pools (built on the running loop, closed at teardown)."""

    def make(*specs: ModelSpec, **settings: Any) -> LocalProvider:
        return LocalProvider(make_pool(*specs, **settings))

    return make


@pytest.fixture
async def provider(make_provider: Callable[..., LocalProvider]) -> LocalProvider:
    return make_provider()


def _loaded(provider: LocalProvider) -> bool:
    return any(s.pid is not None for s in provider.pool.status())


# --- what local models cannot express ------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ({"functions": [TOOL["function"]]}, "functions"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"x": 5}}, "logit_bias"),
        ({"logit_bias": {"42": 101}}, "logit_bias"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
         "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "number", "maximum": 3}}}},
         "response_format.json_schema.schema"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
         "tool_choice"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, IMAGE]}]},
         "messages"),
        ({"messages": [{"role": "user", "content": [AUDIO]}]}, "messages"),
    ],
    ids=["functions", "top_logprobs_alone", "logit_bias_key", "logit_bias_value", "audio",
         "prediction", "format_type", "schema_name", "schema_keyword", "unknown_tool_choice",
         "image", "input_audio"],
)
async def test_unsupported_chat_requests_are_refused_before_anything_runs(
    provider: LocalProvider, raw: dict[str, Any], param: str
) -> None:
    c = chat_call(**raw)
    with pytest.raises(UpstreamUnsupported) as e:
        await provider.send(c, "m", 30)
    assert e.value.param == param and e.value.status == 400 and e.value.retryable
    assert e.value.target == "local/m" and "local/m" in e.value.message
    stream = provider.stream(c, "m", 30)
    with pytest.raises(UpstreamUnsupported):
        await anext(stream)
    assert not _loaded(provider)  # no model was even loaded


@pytest.mark.parametrize(
    "prompt", [["one", "two"], [1, 2, 3], [[1, 2, 3]], []], ids=["two", "tokens", "batch", "none"]
)
async def test_unsupported_completion_prompts(provider: LocalProvider, prompt: Any) -> None:
    with pytest.raises(UpstreamUnsupported) as e:
        await provider.send(text_call(prompt=prompt), "m", 30)
    assert e.value.param == "prompt"
    assert not _loaded(provider)


async def test_unsupported_embedding_requests(provider: LocalProvider) -> None:
    for raw, param in [({"input": [1, "x"]}, "input"), ({"input": []}, "input"),
                       ({"input": [[]]}, "input"),
                       ({"input": "x", "dimensions": 100}, "dimensions")]:
        with pytest.raises(UpstreamUnsupported) as e:
            await provider.send(call(Op.EMBEDDINGS, **raw), "m", 30)
        assert e.value.param == param
    with pytest.raises(UpstreamUnsupported, match="streamed"):
        await anext(provider.stream(call(Op.EMBEDDINGS, input="x"), "m", 30))
    assert not _loaded(provider)


async def test_harmless_fields_are_accepted(provider: LocalProvider) -> None:
    c = chat_call(tools=[], logprobs=False, response_format={"type": "text"}, n=1, seed=3,
                  user="u", max_tokens=2, presence_penalty=0.5, frequency_penalty=0.5)
    body = json.loads((await provider.send(c, "m", 30)).body)
    assert body["usage"]["completion_tokens"] <= 2


def counts(usage: dict[str, Any]) -> dict[str, Any]:
    """A usage without ``prompt_tokens_details``: how many prompt tokens the worker found in
    its KV cache depends on the requests before."""
    return {k: v for k, v in usage.items() if k != "prompt_tokens_details"}


# --- translation of answers -----------------------------------------------------------------


async def test_chat_send_body(provider: LocalProvider) -> None:
    reply = await provider.send(chat_call(max_tokens=8), "m", 30)
    body = json.loads(reply.body)
    assert body["object"] == "chat.completion" and body["model"] == "m"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] and choice["finish_reason"] in ("stop", "length")
    assert reply.usage is not None
    usage = body["usage"]
    assert counts(usage) == {"prompt_tokens": reply.usage.prompt_tokens,
                             "completion_tokens": reply.usage.completion_tokens,
                             "total_tokens": reply.usage.prompt_tokens
                             + reply.usage.completion_tokens}
    assert usage.get("prompt_tokens_details", {"cached_tokens": 0}) == {
        "cached_tokens": reply.usage.cached_tokens}
    assert 0 < usage["completion_tokens"] <= 8


async def test_messages_translation(make_provider: Callable[..., LocalProvider]) -> None:
    provider = make_provider(local_spec(prefix_cache=True))

    async def answer(messages: list[dict[str, Any]], **raw: Any) -> dict[str, Any]:
        c = chat_call(messages=messages, max_tokens=6, **raw)
        return json.loads((await provider.send(c, "m", 30)).body)  # type: ignore[no-any-return]

    system = await answer([{"role": "system", "content": "Be terse."}, *HI])
    developer = await answer([{"role": "developer", "content": "Be terse."}, *HI])
    assert counts(developer["usage"]) == counts(system["usage"])  # developer is the system role
    # the second prefilled only what the first left in the slot's KV cache did not cover
    assert developer["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert developer["choices"] == system["choices"]
    joined = await answer([{"role": "user", "content": "Say\nhi"}])
    parts = await answer([{"role": "user", "content": [{"type": "text", "text": "Say"},
                                                        {"type": "text", "text": "hi"}]}])
    assert counts(parts["usage"]) == counts(joined["usage"])
    assert parts["choices"] == joined["choices"]
    # max_completion_tokens wins over max_tokens; an assistant turn without content is fine
    history = [*HI, {"role": "assistant", "content": None}, *HI]
    capped = await answer(history, max_completion_tokens=2)
    assert capped["usage"]["completion_tokens"] <= 2


async def test_chat_stream_frames_match_send(provider: LocalProvider) -> None:
    c = chat_call(max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = await stream_frames(provider, c)
    sent = json.loads((await provider.send(chat_call(max_tokens=12), "m", 30)).body)
    assert len({ch["id"] for ch in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(ch["object"] == "chat.completion.chunk" and ch["model"] == "m" for ch in chunks)
    *content, last, tail = chunks
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in ch["choices"][0]["delta"] for ch in content[1:])
    assert all(ch["choices"][0]["finish_reason"] is None for ch in content)
    text = "".join(ch["choices"][0]["delta"]["content"] for ch in content)
    assert text == sent["choices"][0]["message"]["content"]
    assert last["choices"][0]["finish_reason"] == sent["choices"][0]["finish_reason"]
    assert "content" not in last["choices"][0]["delta"]
    assert tail["choices"] == [] and counts(tail["usage"]) == counts(sent["usage"])
    # without include_usage there is no usage chunk
    plain = await stream_frames(provider, chat_call(max_tokens=12, stream=True))
    assert len(plain) == len(chunks) - 1 and all("usage" not in ch for ch in plain)


async def test_completion_send_and_stream(provider: LocalProvider) -> None:
    body = json.loads((await provider.send(text_call(), "m", 30)).body)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    # OpenAI's default max_tokens for completions is 16; counting never stops by itself
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 16
    assert choice["text"].startswith(" 9, 10,") and choice["logprobs"] is None
    chunks = await stream_frames(
        provider, text_call(stream=True, stream_options={"include_usage": True})
    )
    *content, last, tail = chunks
    assert "".join(ch["choices"][0]["text"] for ch in content) == choice["text"]
    assert last["choices"][0] == {"index": 0, "text": "", "finish_reason": "length",
                                  "logprobs": None}
    assert tail["choices"] == [] and counts(tail["usage"]) == counts(body["usage"])
    one = json.loads((await provider.send(text_call(prompt=[COUNTING], max_tokens=3), "m", 30)
                      ).body)
    assert one["choices"][0]["text"] == choice["text"][: len(one["choices"][0]["text"])]


async def test_stop_and_seed(provider: LocalProvider) -> None:
    body = json.loads((await provider.send(text_call(stop="12,"), "m", 30)).body)
    assert body["choices"][0] == {"index": 0, "text": " 9, 10, 11, ", "finish_reason": "stop",
                                  "logprobs": None}
    sampled = [json.loads((await provider.send(
        chat_call(temperature=1.0, seed=1234, max_tokens=12), "m", 30)).body)
        for _ in range(2)]
    assert sampled[0]["choices"] == sampled[1]["choices"]  # a seed makes sampling repeatable


async def test_embeddings_float_and_base64(provider: LocalProvider) -> None:
    entry = provider.pool.entry("m")
    assert entry is not None and entry.info is not None
    n_embd = entry.info.n_embd
    texts = ["hello world", "another text"]
    floats = json.loads((await provider.send(
        call(Op.EMBEDDINGS, input=texts, encoding_format="float", dimensions=n_embd), "m", 30
    )).body)
    b64 = json.loads((await provider.send(
        call(Op.EMBEDDINGS, input=texts, encoding_format="base64"), "m", 30)).body)
    single = json.loads((await provider.send(call(Op.EMBEDDINGS, input="hello world"), "m", 30)
                         ).body)
    assert floats["object"] == "list" and floats["model"] == "m"
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in floats["data"])
    assert floats["usage"]["prompt_tokens"] > 0 and "completion_tokens" not in floats["usage"]
    assert floats["usage"]["total_tokens"] == floats["usage"]["prompt_tokens"]
    for f, b in zip(floats["data"], b64["data"], strict=True):
        decoded = struct.unpack(f"<{n_embd}f", base64.b64decode(b["embedding"]))
        assert len(f["embedding"]) == n_embd
        assert max(abs(x - y) for x, y in zip(f["embedding"], decoded, strict=True)) < 1e-6
    assert single["data"][0]["embedding"] == floats["data"][0]["embedding"]


# --- translation of pool errors ------------------------------------------------------------


async def test_pool_errors_become_upstream_errors(
    make_provider: Callable[..., LocalProvider], tmp_path: Path
) -> None:
    bad = write_not_gguf(tmp_path / "bad.gguf")
    provider = make_provider(local_spec(n_ctx=256, n_parallel=1),
                             ModelSpec(name="bad", path=str(bad)), max_queue=0)
    with pytest.raises(UpstreamUnreachable, match="local/nope"):
        await provider.send(chat_call(), "nope", 30)
    with pytest.raises(UpstreamUnreachable) as unreachable:
        await provider.send(chat_call(), "bad", 30)
    assert str(bad) in unreachable.value.message and unreachable.value.retryable
    with pytest.raises(UpstreamUnsupported) as long:
        await provider.send(chat_call(messages=[{"role": "user", "content": "word " * 400}]),
                            "m", 30)
    assert long.value.status == 400 and "context" in long.value.message
    # one running stream fills the model (n_parallel 1, no queue): the next is overloaded
    running = provider.stream(text_call(stream=True, max_tokens=200), "m", 30)
    await anext(running)
    with pytest.raises(UpstreamOverloaded) as busy:
        await provider.send(chat_call(), "m", 30)
    assert busy.value.status == 503 and (busy.value.retry_after_s or 0) >= 1
    # the worker dies mid-stream: a retryable server error, then a new worker serves
    pid = provider.pool.status()[0].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(UpstreamServerError, match="SIGKILL") as crashed:
        async for _ in running:
            pass
    assert crashed.value.retryable and crashed.value.target == "local/m"
    assert json.loads((await provider.send(chat_call(max_tokens=2), "m", 30)).body)["choices"]


async def test_aclose_stops_the_workers(make_pool: Callable[..., ModelPool]) -> None:
    provider = LocalProvider(make_pool())
    await provider.send(chat_call(max_tokens=1), "m", 30)
    [status] = provider.pool.status()
    assert status.pid is not None
    await provider.aclose()
    assert not provider.pool.status()[0].loaded
    with pytest.raises(ProcessLookupError):
        os.kill(status.pid, 0)
