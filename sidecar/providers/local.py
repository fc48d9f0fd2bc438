"""The ``local`` provider: OpenAI requests served by the local model pool.

Requests are translated into pool calls by :mod:`sidecar.providers.local_requests`
(messages or a prompt, sampling, the grammar of structured output or tools, ``n``,
log-probabilities) and the pool's output into OpenAI bodies and SSE frames by
:mod:`sidecar.providers.local_answers`. What a local model cannot express (images, audio,
a schema keyword its grammar cannot enforce) raises :class:`UpstreamUnsupported` before
anything runs, so a route can fall over to a remote
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
    Done,
    InvalidRequest,
    ModelPool,
    ModelUnavailable,
    NoRoom,
    Overloaded,
    Tokens,
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
from sidecar.providers.local_answers import (
    Collected,
    StreamFrames,
    chat_body,
    completion_body,
    usage_of,
)
from sidecar.providers.local_requests import Job, translate
from sidecar.types import (
    Call,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    Meter,
    Op,
    Usage,
)

NAME = "local"

#: Retry-After for a model that does not fit in memory now (the monitor samples every second,
#: idle models unload after a while): a guess, not a promise.
NO_ROOM_RETRY_S = 10.0

_encoder = msgspec.json.Encoder()


class LocalWorkerLost(UpstreamServerError):
    """A local worker died under this request and another request already counted that
    death against the target: retryable elsewhere, no verdict on health."""

    counts_against_health = False


class LocalProvider:
    """Serves ``local/<model>`` targets from a :class:`~local_models.ModelPool`."""

    name = NAME
    native_messages = False

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
        job = self._translate(call, model, target)
        got = Collected(job.n)
        done: Done | None = None
        try:
            with _translated(target):
                async with asyncio.timeout(timeout_s), \
                        contextlib.aclosing(self._generate(model, job)) as items:
                    async for item in items:
                        if isinstance(item, Done):
                            done = item
                        else:
                            got.add(item)
        except TimeoutError:
            raise UpstreamTimeout(f"{target} did not answer within {timeout_s:g} s",
                                  target=target) from None
        assert done is not None
        rid, created = _id(call), int(time.time())
        body = (chat_body(rid, created, model, job, got, done) if call.op is Op.CHAT
                else completion_body(rid, created, model, job, got, done))
        return Reply(_encoder.encode(body), usage_of(done))

    async def stream(self, call: Call, model: str, timeout_s: float,
                     meter: Meter | None = None) -> AsyncGenerator[bytes, None]:
        target = f"{NAME}/{model}"
        if call.op is Op.EMBEDDINGS:
            raise UpstreamUnsupported("embeddings cannot be streamed", target=target)
        job = self._translate(call, model, target)
        frames = StreamFrames(_id(call), int(time.time()), model, job, call.op is Op.CHAT,
                              meter)
        with _translated(target):
            async with contextlib.aclosing(self._generate(model, job)) as items:
                async for item in items:
                    if not isinstance(item, Done):
                        out = frames.tokens(item)
                        if out:
                            yield out
                        continue
                    if meter is not None:
                        meter.usage = usage_of(item)
                    yield frames.end(item)

    def _translate(self, call: Call, model: str, target: str) -> Job:
        job = translate(call, target)
        entry = self.pool.entry(model)
        if entry is not None and job.n > entry.spec.n_parallel:
            raise UpstreamUnsupported(
                f"{target}: n = {job.n} is more than this model's {entry.spec.n_parallel} "
                "parallel sequences", target=target, param="n")
        return job

    def _generate(self, model: str, job: Job) -> AsyncGenerator[Tokens | Done, None]:
        return self.pool.generate(model, messages=job.messages, prompt=job.prompt,
                                  max_tokens=job.max_tokens, stop=job.stop,
                                  sampling=job.sampling, grammar=job.grammar, n=job.n,
                                  logprobs=job.logprobs)

    async def _embed(self, call: Call, model: str, target: str) -> Reply:
        req = call.request
        assert isinstance(req, EmbeddingRequest)
        inputs = _embedding_inputs(req.input)
        if not inputs:
            raise UpstreamUnsupported(
                f"{target}: 'input' is a string, a list of strings, a list of token ids, "
                "or a list of lists of token ids (none empty)", target=target, param="input",
            )
        entry = self.pool.entry(model)
        if req.dimensions is not None and entry is not None and entry.info is not None \
                and req.dimensions != entry.info.n_embd:
            raise UpstreamUnsupported(
                f"{target}: this model's embeddings have {entry.info.n_embd} dimensions",
                target=target, param="dimensions",
            )
        with _translated(target):
            result = await self.pool.embed(model, inputs)
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


def _embedding_inputs(value: str | list[Any]) -> list[str | tuple[int, ...]] | None:
    """The inputs of OpenAI's four forms (a text, texts, one token array, token arrays),
    or None when ``value`` is none of them or holds an empty one."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [tuple(value)]
    out: list[str | tuple[int, ...]] = []
    for v in value:
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list) and v and all(isinstance(t, int) for t in v):
            out.append(tuple(v))
        else:
            return None
    return out or None


def _id(call: Call) -> str:
    prefix = "chatcmpl" if call.op is Op.CHAT else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


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
