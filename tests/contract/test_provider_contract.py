"""One suite every :class:`~sidecar.providers.base.Provider` passes.

Run against each implementation for real: the OpenAI-compatible and the Anthropic provider
over HTTP on loopback (tests/support/fake_provider.py, which can be scripted to fail), and
the local provider over a real model pool and llama.cpp with the default model (kept to few,
short generations). What every provider promises:

* ``send`` returns a :class:`~sidecar.providers.base.Reply`: an OpenAI-shaped JSON body and
  the usage it reports;
* ``stream`` yields whole ``data: {...}\\n\\n`` frames, never ``[DONE]``, and leaves the usage
  in the meter when it ends;
* ``supports(op)`` is true for what it serves; what it does not raises
  :class:`~sidecar.errors.UpstreamUnsupported` before anything is sent;
* the client's token limit (``max_tokens`` or the gateway's ``token_cap``) is honoured;
* ``timeout_s`` bounds the attempt (:class:`~sidecar.errors.UpstreamTimeout`);
* cancelling the caller (or closing the stream) ends the call upstream;
* failures are :class:`~sidecar.errors.UpstreamError` subclasses, translated once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio

from local_models.catalog import build_catalog
from local_models.pool import ModelPool, PoolSettings
from sidecar.config import AnthropicProvider, OpenAIProvider
from sidecar.errors import (
    UpstreamError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnsupported,
)
from sidecar.providers.anthropic import AnthropicMessages
from sidecar.providers.base import Provider, Reply
from sidecar.providers.local import LocalProvider
from sidecar.providers.openai import OpenAICompatible
from sidecar.types import (
    Call,
    ChatChunk,
    ChatCompletion,
    Meter,
    Op,
    Usage,
    validate_call,
)
from tests.support.fake_provider import (
    FakeProvider,
    garbage,
    hang,
    reset,
    status,
)
from tests.support.process import local_spec, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

REMOTE = ("openai", "anthropic")
ALL = (*REMOTE, "local")


@dataclasses.dataclass
class Subject:
    """One provider under test, and the means to look behind it."""

    kind: str
    provider: Provider
    model: str
    ops: frozenset[Op]
    fake: FakeProvider | None = None
    pool: ModelPool | None = None

    @property
    def target(self) -> str:
        return f"{self.provider.name}/{self.model}"

    def script(self, *behaviours: Any) -> None:
        assert self.fake is not None
        self.fake.script(self.model, *behaviours)

    def sent(self) -> list[dict[str, Any]]:
        """The bodies the provider sent upstream (remote ones)."""
        assert self.fake is not None
        return [r["body"] for r in self.fake.requests()]

    async def ended_upstream(self) -> None:
        """Check that the upstream saw its one call end before the answer was complete:
        the fake counts a client that closed the connection early (waited for: it learns
        over the network); the pool frees the generation's slot as the call ends (no wait:
        a generation left running would still hold it)."""
        if self.fake is not None:
            assert await self.fake.wait_for_cancelled_async(1) == 1
            return
        assert self.pool is not None
        st = self.pool.model_status(self.model)
        assert st is not None and (st.in_flight, st.queued) == (0, 0)

    async def started_upstream(self) -> None:
        """Wait until the call reached the upstream."""
        if self.fake is not None:
            await self.fake.wait_for_requests_async(1)
        else:
            pool = self.pool
            assert pool is not None

            def busy() -> bool:
                st = pool.model_status(self.model)
                return st is not None and st.in_flight > 0

            await wait_until(busy, within=60)


# --- the implementations ----------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def openai_provider(fake_mod: FakeProvider) -> AsyncIterator[OpenAICompatible]:
    p = OpenAICompatible(msgspec.convert(
        {"name": "oai", "base_url": fake_mod.openai_base_url, "api_key": "sk-test"},
        OpenAIProvider))
    yield p
    await p.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def anthropic_provider(fake_mod: FakeProvider) -> AsyncIterator[AnthropicMessages]:
    p = AnthropicMessages(msgspec.convert(
        {"name": "claude", "base_url": fake_mod.anthropic_base_url, "api_key": "sk-ant-test"},
        AnthropicProvider))
    yield p
    await p.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def local_provider(default_model_path: Path) -> AsyncIterator[LocalProvider]:
    """One pool for the module (the default model, which must be installed): it loads once."""
    pool = ModelPool(build_catalog((local_spec(),)).entries,
                     PoolSettings(memory_budget_bytes=8 << 30))
    pool.start()
    p = LocalProvider(pool)
    yield p
    await p.aclose()


@pytest.fixture
def subject(request: pytest.FixtureRequest) -> Subject:
    kind = request.param
    if kind == "local":
        local: LocalProvider = request.getfixturevalue("local_provider")
        return Subject(kind, local, "m", frozenset(Op), pool=local.pool)
    fake: FakeProvider = request.getfixturevalue("fp")  # reset for each test
    if kind == "openai":
        return Subject(kind, request.getfixturevalue("openai_provider"), "gpt-test",
                       frozenset(Op), fake=fake)
    return Subject(kind, request.getfixturevalue("anthropic_provider"), "claude-test",
                   frozenset({Op.CHAT}), fake=fake)


def every(*kinds: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("subject", kinds, indirect=True)


# --- calls ------------------------------------------------------------------------------------

HI = [{"role": "user", "content": "Say hi."}]


def chat(**fields: Any) -> Call:
    return validate_call(Op.CHAT, {"model": "chat", "messages": HI, "temperature": 0,
                                   "max_tokens": 4, **fields})


def call_for(op: Op) -> Call:
    if op is Op.CHAT:
        return chat()
    if op is Op.COMPLETIONS:
        return validate_call(op, {"model": "m", "prompt": "1, 2, 3,", "max_tokens": 3,
                                  "temperature": 0})
    return validate_call(op, {"model": "m", "input": "hello"})


def data_frames(pieces: list[bytes]) -> list[bytes]:
    """The JSON payloads of the frames, checking the framing: whole ``data:`` frames."""
    out = []
    for piece in pieces:
        assert piece.endswith(b"\n\n"), piece
        for block in piece.split(b"\n\n")[:-1]:
            assert block.startswith(b"data: "), block
            payload = block[len(b"data: "):]
            assert payload != b"[DONE]"
            out.append(payload)
    return out


async def stream_all(s: Subject, call: Call, meter: Meter | None = None,
                     timeout_s: float = 30.0) -> list[bytes]:
    return [p async for p in s.provider.stream(call, s.model, timeout_s, meter)]


def check_usage(usage: Usage | None) -> Usage:
    assert usage is not None and usage.problem() is None
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    return usage


# --- answers -----------------------------------------------------------------------------------


@every(*ALL)
async def test_supports_what_it_serves(subject: Subject) -> None:
    assert {op for op in Op if subject.provider.supports(op)} == subject.ops


@every(*ALL)
async def test_chat_answer_in_openai_shape_with_usage(subject: Subject) -> None:
    reply = await subject.provider.send(chat(), subject.model, 30)
    assert isinstance(reply, Reply)
    body = msgspec.json.decode(reply.body, type=ChatCompletion)
    assert body.object == "chat.completion" and len(body.choices) == 1
    assert body.choices[0].message.role == "assistant" and body.choices[0].message.content
    usage = check_usage(reply.usage)
    assert body.usage == usage  # the usage is the body's


@every(*ALL)
async def test_stream_of_whole_data_frames(subject: Subject) -> None:
    meter = Meter()
    pieces = await stream_all(subject, chat(stream=True), meter)
    chunks = [msgspec.json.decode(p, type=ChatChunk) for p in data_frames(pieces)]
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text
    assert any(ch.finish_reason for c in chunks for ch in c.choices)
    # the client did not ask for the usage: no chunk carries one
    assert all(c.usage is None or c.usage is msgspec.UNSET for c in chunks)


@every(*ALL)
async def test_stream_meter_counts_content_and_usage(subject: Subject) -> None:
    meter = Meter()
    pieces = await stream_all(subject, chat(stream=True), meter)
    text = "".join(ch.delta.content or "" for p in data_frames(pieces)
                   for ch in msgspec.json.decode(p, type=ChatChunk).choices)
    assert meter.content_chars == len(text) and meter.content_chunks > 0
    check_usage(meter.usage)


@every(*ALL)
async def test_stream_usage_chunk_when_asked(subject: Subject) -> None:
    call = chat(stream=True, stream_options={"include_usage": True})
    chunks = [msgspec.json.decode(p, type=ChatChunk)
              for p in data_frames(await stream_all(subject, call))]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    check_usage(last.usage)


@every(*ALL)
@pytest.mark.parametrize("op", [Op.COMPLETIONS, Op.EMBEDDINGS], ids=["completions", "embeddings"])
async def test_other_operations_where_supported(subject: Subject, op: Op) -> None:
    call = call_for(op)
    if not subject.provider.supports(op):
        with pytest.raises(UpstreamUnsupported) as e:
            await subject.provider.send(call, subject.model, 30)
        assert e.value.status == 400 and e.value.retryable
        assert not e.value.counts_against_health
        assert subject.sent() == []  # refused before anything was sent
        return
    reply = await subject.provider.send(call, subject.model, 30)
    body = json.loads(reply.body)
    if op is Op.COMPLETIONS:
        assert body["object"] == "text_completion"
        [choice] = body["choices"]
        assert isinstance(choice["text"], str) and choice["text"]
        check_usage(reply.usage)
    else:
        assert body["object"] == "list"
        [item] = body["data"]
        assert item["object"] == "embedding" and len(item["embedding"]) > 0
        assert reply.usage is not None and reply.usage.prompt_tokens > 0
        assert body["usage"]["prompt_tokens"] == reply.usage.prompt_tokens


@every(*ALL)
async def test_max_tokens_and_token_cap_are_honoured(subject: Subject) -> None:
    asked = await subject.provider.send(chat(max_tokens=3), subject.model, 30)
    capped_call = msgspec.structs.replace(chat(max_tokens=None), token_cap=2)
    capped = await subject.provider.send(capped_call, subject.model, 30)
    if subject.fake is not None:
        limits = [b.get("max_tokens") for b in subject.sent()]
        assert limits == [3, 2]  # sent upstream, where the provider enforces it
    else:
        assert asked.usage is not None and 1 <= asked.usage.completion_tokens <= 3
        assert capped.usage is not None and 1 <= capped.usage.completion_tokens <= 2


# --- time and cancellation ---------------------------------------------------------------------


@every(*ALL)
async def test_timeout_bounds_a_send(subject: Subject) -> None:
    # Remote: the upstream hangs after reading the request. Local: any generation takes
    # more than a millisecond.
    timeout_s = 0.2 if subject.fake is not None else 0.001
    if subject.fake is not None:
        subject.script(hang())
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(UpstreamTimeout) as e:
        await subject.provider.send(chat(max_tokens=16), subject.model, timeout_s)
    assert e.value.target == subject.target and e.value.retryable
    assert loop.time() - start < 5
    if subject.fake is not None:
        assert len(subject.fake.requests()) == 1  # sent, then the answer was waited for


@every(*REMOTE)
async def test_timeout_bounds_each_wait_of_a_stream(subject: Subject) -> None:
    subject.script(hang(after_chunks=1))
    with pytest.raises(UpstreamTimeout):
        await stream_all(subject, chat(stream=True), timeout_s=0.3)


@every(*ALL)
async def test_cancelling_a_send_ends_the_call(subject: Subject) -> None:
    if subject.fake is not None:
        subject.script(hang())
    task = asyncio.create_task(subject.provider.send(chat(max_tokens=200), subject.model, 60))
    await subject.started_upstream()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await subject.ended_upstream()


@every(*ALL)
async def test_closing_a_stream_ends_the_call(subject: Subject) -> None:
    if subject.fake is not None:
        subject.script(hang(after_chunks=2))
    stream = subject.provider.stream(chat(stream=True, max_tokens=200), subject.model, 60)
    first = await anext(stream)
    assert data_frames([first])
    await stream.aclose()
    await subject.ended_upstream()


# --- remote failures ---------------------------------------------------------------------------


@every(*REMOTE)
@pytest.mark.parametrize("stream", [False, True], ids=["send", "stream"])
async def test_5xx_is_a_server_error(subject: Subject, stream: bool) -> None:
    subject.script(status(500))
    with pytest.raises(UpstreamServerError) as e:
        if stream:
            await stream_all(subject, chat(stream=True))
        else:
            await subject.provider.send(chat(), subject.model, 30)
    assert e.value.retryable and e.value.target == subject.target


@every(*REMOTE)
@pytest.mark.parametrize("stream", [False, True], ids=["send", "stream"])
async def test_429_carries_retry_after(subject: Subject, stream: bool) -> None:
    subject.script(status(429, retry_after="7"))
    with pytest.raises(UpstreamRateLimited) as e:
        if stream:
            await stream_all(subject, chat(stream=True))
        else:
            await subject.provider.send(chat(), subject.model, 30)
    assert e.value.retry_after_s == 7.0 and e.value.status == 429


@every(*REMOTE)
async def test_4xx_is_a_final_rejection(subject: Subject) -> None:
    subject.script(status(422, message="no such parameter"))
    with pytest.raises(UpstreamRejected) as e:
        await subject.provider.send(chat(), subject.model, 30)
    assert e.value.status == 422 and not e.value.retryable
    assert "no such parameter" in e.value.message


@every(*REMOTE)
@pytest.mark.parametrize("stream", [False, True], ids=["send", "stream"])
async def test_garbage_is_malformed(subject: Subject, stream: bool) -> None:
    subject.script(garbage())
    with pytest.raises(UpstreamMalformed) as e:
        if stream:
            await stream_all(subject, chat(stream=True))
        else:
            await subject.provider.send(chat(), subject.model, 30)
    assert e.value.retryable and e.value.target == subject.target


@every(*REMOTE)
async def test_reset_mid_stream_fails_the_stream(subject: Subject) -> None:
    subject.script(reset(after_chunks=2))
    seen: list[bytes] = []
    with pytest.raises(UpstreamError) as e:
        async for piece in subject.provider.stream(chat(stream=True), subject.model, 30):
            seen.append(piece)
    assert data_frames(seen)  # the first tokens arrived before the failure
    assert e.value.retryable and e.value.target == subject.target


@every(*REMOTE)
async def test_a_stream_reset_before_its_first_token_yields_nothing(subject: Subject) -> None:
    subject.script(reset(after_chunks=0))  # headers and the role preamble, then RST
    seen: list[bytes] = []
    with pytest.raises(UpstreamError) as e:
        async for piece in subject.provider.stream(chat(stream=True), subject.model, 30):
            seen.append(piece)
    assert seen == []  # the preamble alone never commits a stream
    assert e.value.retryable
