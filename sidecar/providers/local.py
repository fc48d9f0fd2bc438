"""The ``local`` provider: OpenAI requests served by the local model pool.

Requests are translated into pool calls (chat messages, a text prompt, or embedding inputs)
and answers into OpenAI JSON bodies and SSE frames. What a local model cannot express
(tools, images, several choices, token-array prompts, structured output) raises
:class:`UpstreamUnsupported` before anything runs, so a route can fall over to a remote
target. Pool errors are translated here, once:

    InvalidRequest   -> UpstreamUnsupported (400 if no target is left: the prompt does not
                        fit this model or passes a limit of local_models.limits; another
                        target may take it)
    Overloaded       -> UpstreamOverloaded  (503 with Retry-After when no target is left)
    NoRoom           -> UpstreamOverloaded  (it does not fit in memory now; not a health matter)
    ModelUnavailable -> UpstreamUnreachable (bad file, failed start; counts against health)
    WorkerLost       -> LocalWorkerLost     (the same death again: retryable, no health verdict)
    WorkerCrashed    -> UpstreamServerError (retryable; the next request gets a new worker)

``send`` is bounded by its ``timeout_s`` (UpstreamTimeout); a stream fills the ``Meter``
(content chunks and characters as they go, the usage at the end), so its tokens count
against rate limits like a remote stream's.

A worker death under many requests is one health event: only the first request to see it
counts against the target's circuit, so the next request gets the new worker at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import msgspec

from local_models import (
    ChatMessage,
    Done,
    InvalidRequest,
    ModelPool,
    ModelUnavailable,
    NoRoom,
    Overloaded,
    Sampling,
    UnknownModel,
    WorkerCrashed,
    WorkerLost,
)
from sidecar.errors import (
    UpstreamOverloaded,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnreachable,
    UpstreamUnsupported,
)
from sidecar.host import LocalLoad
from sidecar.providers.base import Reply
from sidecar.types import (
    Call,
    ChatChunk,
    ChatCompletion,
    ChatRequest,
    Choice,
    ChunkChoice,
    CompletionRequest,
    Delta,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    Meter,
    Op,
    ResponseMessage,
    TextChoice,
    TextCompletion,
    Usage,
)

NAME = "local"

# Sampling defaults for fields the client leaves out (llama.cpp's own defaults; OpenAI's
# temperature 1.0 without top-k makes small models ramble).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05

#: Retry-After for a model that does not fit in memory now (the monitor samples every second,
#: idle models unload after a while): a guess, not a promise.
NO_ROOM_RETRY_S = 10.0

_UNSUPPORTED_FIELDS = ("tools", "functions", "logprobs", "top_logprobs", "logit_bias",
                       "audio", "prediction")

_encoder = msgspec.json.Encoder()


class _Job(msgspec.Struct, frozen=True):
    """What to ask the pool for one chat or completion call."""

    messages: tuple[ChatMessage, ...] | None
    prompt: str | None
    max_tokens: int | None
    stop: tuple[str, ...]
    sampling: Sampling
    include_usage: bool


class LocalWorkerLost(UpstreamServerError):
    """A local worker died under this request and another request already counted that
    death against the target: retryable elsewhere, no verdict on health."""

    counts_against_health = False


class LocalProvider:
    """Serves ``local/<model>`` targets from a :class:`~local_models.ModelPool`."""

    name = NAME

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    def supports(self, op: Op) -> bool:
        return True

    def load(self, model: str) -> LocalLoad | None:
        """The model's queue and measured speed now (None: no such model)."""
        st = self.pool.model_status(model)
        if st is None:
            return None
        return LocalLoad(loaded=st.loaded, in_flight=st.in_flight, queued=st.queued,
                         n_parallel=st.n_parallel, ttft_s=st.ttft_s, decode_tps=st.decode_tps,
                         avg_completion_tokens=st.avg_completion_tokens,
                         avg_duration_s=st.avg_duration_s, load_s=st.load_s)

    async def send(self, call: Call, model: str, timeout_s: float,
                   meter: Meter | None = None) -> Reply:
        target = f"{NAME}/{model}"
        if call.op is Op.EMBEDDINGS:
            return await self._embed(call, model, target)
        job = _job(call, target)
        parts: list[str] = []
        done: Done | None = None
        try:
            with _translated(target):
                async with asyncio.timeout(timeout_s), \
                        contextlib.aclosing(self._generate(model, job)) as items:
                    async for item in items:
                        if isinstance(item, Done):
                            done = item
                        else:
                            parts.append(item)
        except TimeoutError:
            raise UpstreamTimeout(f"{target} did not answer within {timeout_s:g} s",
                                  target=target) from None
        assert done is not None
        usage = _usage(done)
        text, reason, rid, created = "".join(parts), done.finish_reason, _id(call), int(time.time())
        body: ChatCompletion | TextCompletion
        if call.op is Op.CHAT:
            body = ChatCompletion(rid, created, model,
                                  [Choice(0, ResponseMessage(content=text), reason)], usage)
        else:
            body = TextCompletion(rid, created, model, [TextChoice(0, text, reason)], usage)
        return Reply(_encoder.encode(body), usage)

    async def stream(self, call: Call, model: str, timeout_s: float,
                     meter: Meter | None = None) -> AsyncGenerator[bytes, None]:
        target = f"{NAME}/{model}"
        if call.op is Op.EMBEDDINGS:
            raise UpstreamUnsupported("embeddings cannot be streamed", target=target)
        job = _job(call, target)
        rid, created, chat = _id(call), int(time.time()), call.op is Op.CHAT
        first = True

        def frame(text: str | None, reason: str | None) -> bytes:
            nonlocal first
            body: ChatChunk | TextCompletion
            if chat:
                delta = Delta(role="assistant" if first else None, content=text)
                body = ChatChunk(rid, created, model, [ChunkChoice(0, delta, reason)])
            else:
                body = TextCompletion(rid, created, model, [TextChoice(0, text or "", reason)])
            first = False
            return b"data: " + _encoder.encode(body) + b"\n\n"

        with _translated(target):
            async with contextlib.aclosing(self._generate(model, job)) as items:
                async for item in items:
                    if not isinstance(item, Done):
                        if meter is not None and item:
                            meter.content_chunks += 1
                            meter.content_chars += len(item)
                        yield frame(item, None)
                        continue
                    if meter is not None:
                        meter.usage = _usage(item)
                    out = frame(None if chat else "", item.finish_reason)
                    if job.include_usage:
                        usage = _usage(item)
                        tail: ChatChunk | TextCompletion = (
                            ChatChunk(rid, created, model, [], usage) if chat
                            else TextCompletion(rid, created, model, [], usage))
                        out += b"data: " + _encoder.encode(tail) + b"\n\n"
                    yield out

    def _generate(self, model: str, job: _Job) -> AsyncGenerator[str | Done, None]:
        return self.pool.generate(model, messages=job.messages, prompt=job.prompt,
                                  max_tokens=job.max_tokens, stop=job.stop,
                                  sampling=job.sampling)

    async def _embed(self, call: Call, model: str, target: str) -> Reply:
        req = call.request
        assert isinstance(req, EmbeddingRequest)
        inputs = [req.input] if isinstance(req.input, str) else req.input
        if not inputs or not all(isinstance(i, str) for i in inputs):
            raise UpstreamUnsupported(
                f"{target}: local embeddings take a string or a list of strings",
                target=target, param="input",
            )
        entry = self.pool.entry(model)
        if req.dimensions is not None and entry is not None and entry.info is not None \
                and req.dimensions != entry.info.n_embd:
            raise UpstreamUnsupported(
                f"{target}: this model's embeddings have {entry.info.n_embd} dimensions",
                target=target, param="dimensions",
            )
        with _translated(target):
            result = await self.pool.embed(model, [str(i) for i in inputs])
        b64 = req.encoding_format == "base64"
        data = [
            Embedding(i, base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
                       if b64 else list(v))
            for i, v in enumerate(result.vectors)
        ]
        usage = Usage(result.prompt_tokens, 0, result.prompt_tokens)
        return Reply(_encoder.encode(EmbeddingList(data, model, usage)), usage)

    async def aclose(self) -> None:
        await self.pool.aclose()


def _id(call: Call) -> str:
    prefix = "chatcmpl" if call.op is Op.CHAT else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


def _usage(done: Done) -> Usage:
    return Usage(done.prompt_tokens, done.completion_tokens,
                 done.prompt_tokens + done.completion_tokens)


def _job(call: Call, target: str) -> _Job:
    """Translate a chat or completion call; raise UpstreamUnsupported for what cannot be."""
    req = call.request
    assert not isinstance(req, EmbeddingRequest)
    for name in _UNSUPPORTED_FIELDS:
        if call.raw.get(name) not in (None, False, [], {}):
            raise UpstreamUnsupported(f"{target}: '{name}' is not supported by local models",
                                      target=target, param=name)
    fmt = call.raw.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise UpstreamUnsupported(f"{target}: structured output is not supported by local "
                                  "models", target=target, param="response_format")
    raw_seed = call.raw.get("seed")
    sampling = Sampling(
        temperature=req.temperature if req.temperature is not None else DEFAULT_TEMPERATURE,
        top_p=req.top_p if req.top_p is not None else DEFAULT_TOP_P,
        top_k=DEFAULT_TOP_K,
        min_p=DEFAULT_MIN_P,
        seed=raw_seed if isinstance(raw_seed, int) and not isinstance(raw_seed, bool) else None,
        presence_penalty=_number(call.raw.get("presence_penalty")),
        frequency_penalty=_number(call.raw.get("frequency_penalty")),
    )
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if isinstance(req, ChatRequest):
        if (req.n or 1) > 1:
            raise UpstreamUnsupported(f"{target}: local models return one choice (n=1)",
                                      target=target, param="n")
        messages = tuple(_message(m.role, m.content, target) for m in req.messages)
        limit = req.token_limit or call.token_cap
        return _Job(messages, None, limit, stop, sampling, include_usage)
    assert isinstance(req, CompletionRequest)
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise UpstreamUnsupported(f"{target}: local completions take one text prompt",
                                      target=target, param="prompt")
        prompt = prompt[0]
    return _Job(None, prompt, req.max_tokens or call.token_cap or 16, stop, sampling,
                include_usage)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _message(role: str, content: Any, target: str) -> ChatMessage:
    if role in ("tool", "function"):
        raise UpstreamUnsupported(f"{target}: tool messages are not supported by local models",
                                  target=target, param="messages")
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UpstreamUnsupported(
                    f"{target}: only text content parts are supported by local models",
                    target=target, param="messages",
                )
            texts.append(part["text"])
        text = "\n".join(texts)
    return ChatMessage("system" if role == "developer" else role, text)


@contextlib.contextmanager
def _translated(target: str) -> Iterator[None]:
    """Translate pool errors into upstream errors, once."""
    try:
        yield
    except InvalidRequest as e:
        raise UpstreamUnsupported(f"{target}: {e}", target=target) from None
    except Overloaded as e:
        raise UpstreamOverloaded(f"{target}: {e}", target=target,
                                 retry_after_s=e.retry_after_s) from None
    except NoRoom as e:
        raise UpstreamOverloaded(f"{target}: {e}", target=target,
                                 retry_after_s=NO_ROOM_RETRY_S) from None
    except (ModelUnavailable, UnknownModel) as e:
        raise UpstreamUnreachable(f"{target}: {e}", target=target) from None
    except WorkerLost as e:
        raise LocalWorkerLost(f"{target}: {e}", target=target) from None
    except WorkerCrashed as e:
        raise UpstreamServerError(f"{target}: {e}", target=target) from None
