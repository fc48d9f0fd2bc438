"""Embeddings of one model: llama.cpp contexts of their own, one input per turn.

Used by the engine on its one llama.cpp thread (:mod:`local_models.engine`), between decode
steps: :meth:`Embedder.turn` embeds one input of the oldest request, so a large request never
holds up generations for more than one input. Each pooling has its own context, made on
first use: mean pooling (the embeddings API) as long as a generation's context (its compute
buffer grows with the square of that), last-token pooling (the semantic cache's short
prompts) at most :data:`LAST_N_CTX` tokens. Vectors are L2-normalised. An input is a text
(tokenized as plain text) or token ids (used as they are, each checked against the
vocabulary).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from local_models import protocol as p

__all__ = ["LAST_N_CTX", "Embedder", "Tokenize"]

LAST_N_CTX = 512
"""The longest input last-token pooling takes."""

Tokenize = Callable[[str, int], tuple[list[int], bool]]
"""(text, at most this many tokens) -> (tokens, whether the whole text fit)."""


class _Refused(Exception):
    def __init__(self, kind: p.ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: p.ErrorKind = kind


@dataclass(eq=False)
class _Job:
    """An embedding request being computed, one input per turn."""

    req: p.Embed
    vectors: list[tuple[float, ...]] = field(default_factory=list)
    used: int = 0


class Embedder:
    """The embedding requests of one model and their context. Not thread-safe."""

    def __init__(self, ll: Any, model: Any, *, n_ctx: int, n_embd: int, n_vocab: int,
                 n_threads: int, tokenize: Tokenize) -> None:
        self.ll, self.model = ll, model
        self.n_ctx, self.n_embd, self.n_vocab = n_ctx, n_embd, n_vocab
        self.n_threads = n_threads
        self.tokenize = tokenize
        self.jobs: deque[_Job] = deque()
        self.contexts: dict[p.Pooling, Any] = {}

    def submit(self, req: p.Embed) -> None:
        self.jobs.append(_Job(req))

    def cancel(self, request_id: int) -> bool:
        """Drop a waiting or running request; whether there was one."""
        for job in self.jobs:
            if job.req.id == request_id:
                self.jobs.remove(job)
                return True
        return False

    def set_threads(self, n: int) -> None:
        self.n_threads = n
        for ctx in self.contexts.values():
            self.ll.llama_set_n_threads(ctx, n, n)

    def turn(self, out: list[p.FromWorker]) -> None:
        """Embed one input of the oldest request; its answer (or failure) once done."""
        if not self.jobs:
            return
        job = self.jobs[0]
        try:
            done = self._embed_one(job) if job.req.inputs else p.Embeddings(job.req.id, (), 0)
        except _Refused as e:
            out.append(p.Failed(job.req.id, e.kind, str(e)))
            self.jobs.popleft()
            return
        if done is not None:
            out.append(done)
            self.jobs.popleft()

    def _n_ctx(self, pooling: p.Pooling) -> int:
        return self.n_ctx if pooling == "mean" else min(self.n_ctx, LAST_N_CTX)

    def _context(self, pooling: p.Pooling) -> Any:
        ll = self.ll
        ctx = self.contexts.get(pooling)
        if ctx is None:
            params = ll.llama_context_default_params()
            params.n_ctx = params.n_batch = params.n_ubatch = self._n_ctx(pooling)
            params.n_seq_max = 1
            params.n_threads = params.n_threads_batch = self.n_threads
            params.embeddings = True
            params.pooling_type = (ll.LLAMA_POOLING_TYPE_MEAN if pooling == "mean"
                                   else ll.LLAMA_POOLING_TYPE_LAST)
            params.no_perf = True
            ctx = ll.llama_init_from_model(self.model, params) or None
            if ctx is None:
                raise _Refused("internal", "llama.cpp could not create an embedding context")
            self.contexts[pooling] = ctx
        return ctx

    def _tokens(self, i: int, item: str | tuple[int, ...], n_ctx: int) -> list[int]:
        if isinstance(item, str):
            tokens, whole = self.tokenize(item, n_ctx)
        else:
            tokens, whole = list(item), True
            bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
            if bad is not None:
                raise _Refused("invalid", f"input[{i}] has token {bad}; this model's "
                               f"vocabulary has tokens 0 to {self.n_vocab - 1}")
        if not tokens or len(tokens) > n_ctx or not whole:
            raise _Refused("invalid", f"input[{i}] is {len(tokens)}{'' if whole else '+'} "
                           f"tokens; embeddings take 1 to {n_ctx}")
        return tokens

    def _embed_one(self, job: _Job) -> p.Embeddings | None:
        ll = self.ll
        ctx = self._context(job.req.pooling)
        n_ctx = self._n_ctx(job.req.pooling)
        i = len(job.vectors)
        tokens = self._tokens(i, job.req.inputs[i], n_ctx)
        batch = ll.llama_batch_init(n_ctx, 0, 1)
        try:
            ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
            for j, token in enumerate(tokens):
                batch.token[j] = token
                batch.pos[j] = j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = True
            batch.n_tokens = len(tokens)
            if ll.llama_decode(ctx, batch) != 0:
                raise _Refused("internal", "llama_decode failed for embeddings")
            ptr = ll.llama_get_embeddings_seq(ctx, 0)
            vec = [ptr[k] for k in range(self.n_embd)]
        finally:
            ll.llama_batch_free(batch)
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        job.vectors.append(tuple(v / norm for v in vec))
        job.used += len(tokens)
        if len(job.vectors) < len(job.req.inputs):
            return None
        return p.Embeddings(job.req.id, tuple(job.vectors), job.used)
