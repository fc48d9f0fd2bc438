"""The engine: one model's llama.cpp objects and the loop that runs its generations.

Used by the worker process (:mod:`local_models.worker`), which feeds it decoded frames and
sends what it answers; llama_cpp is imported when an :class:`Engine` is made, never at import.

Contract:

* Not thread-safe: every llama.cpp call happens on the thread that made the engine (the
  worker's main thread; the OpenMP build loses about two thirds of its speed once a second
  thread has called into it).
* Continuous batching: one llama.cpp context holds ``n_parallel`` sequences of ``n_ctx``
  tokens each. Each decode step carries one token of every generating sequence plus prompt
  tokens of newly admitted ones (prefill in chunks up to ``n_batch``), so a request joins
  between steps and never waits for others to finish. Each sequence has its own sampler
  chain, stop sequences and token limit.
* A cancelled sequence is freed at the start of the next step. Requests beyond the free
  sequences wait in arrival order (the pool bounds how many it sends; this only absorbs the
  moment between a cancel and the slot being freed).
* Only the chat template's own text is tokenized with special tokens; message contents and
  text prompts are plain text (:meth:`~local_models.chat_template.ChatTemplate.render_parts`).
* Bounded slices: a prompt is tokenized at most :data:`TOKENIZE_SLICE_CHARS` characters per
  loop iteration (all prompts together) and prefilled at most ``n_batch`` tokens per step,
  interleaved with the decode steps of the other sequences; a prompt is refused as soon as
  it reaches the context, and a cancel stops it between slices. The pool bounds what it
  sends (:mod:`local_models.limits`), so rendering one request is bounded too.
* Embeddings use a second, lazily created context with mean pooling, on the same thread:
  one input per loop iteration, between decode steps; a cancel stops the rest.
* :meth:`Engine.run` returns on :class:`~local_models.protocol.Shutdown` or at the end of
  its input (``None``). A model that cannot be loaded raises :class:`LoadError`; a request
  that fails is answered with :class:`~local_models.protocol.Failed`, never raised.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import heapq
import math
import os
import queue
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from local_models import protocol as p
from local_models.chat_template import ChatTemplate, TemplateError
from local_models.text_cuts import cut, cut_at_stop, held_back

__all__ = ["TOKENIZE_SLICE_CHARS", "Engine", "LoadError", "Send"]

#: Characters of prompt text tokenized per loop iteration, over all prompts (llama.cpp's BPE
#: is superlinear in the length of one text, so long ones are cut, at whitespace if it can).
TOKENIZE_SLICE_CHARS = 8192

Send = Callable[[p.FromWorker], None]


class LoadError(Exception):
    """The model cannot be loaded; ``str(err)`` names the file and why."""


class _RequestError(Exception):
    """One request cannot be served; answered as :class:`~local_models.protocol.Failed`."""

    def __init__(self, kind: p.ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: p.ErrorKind = kind


def _llama() -> Any:
    import llama_cpp  # imported here: loading the shared library is the worker's job only

    return llama_cpp


@dataclass(eq=False)
class _Seq:
    """One generating request in a sequence slot of the shared context."""

    id: int
    slot: int
    prompt: list[int]
    max_tokens: int | None
    """As asked; set to what fits the context once the prompt is tokenized."""
    stop: tuple[str, ...]
    sampler: Any
    pieces: deque[tuple[str, bool]] = field(default_factory=deque)
    """Prompt text still to tokenize: (text, special)."""
    n_past: int = 0
    n_generated: int = 0
    next_token: int | None = None
    batch_index: int = -1
    pending: str = ""
    cancelled: bool = False
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    @property
    def tokenizing(self) -> bool:
        return bool(self.pieces)

    @property
    def prefilling(self) -> bool:
        return not self.pieces and self.n_past < len(self.prompt)


@dataclass(eq=False)
class _EmbedJob:
    """An embedding request being computed, one input per loop iteration."""

    req: p.Embed
    vectors: list[tuple[float, ...]] = field(default_factory=list)
    used: int = 0


class Engine:
    """One loaded model and its batch loop. Not thread-safe: main thread only."""

    def __init__(self, load: p.Load) -> None:
        self.ll = ll = _llama()
        self._piece_buf = ctypes.create_string_buffer(256)
        self._log_cb = _quiet_logs(ll)
        ll.llama_backend_init()
        self.gpu_offload = bool(ll.llama_supports_gpu_offload())
        self.n_parallel = load.n_parallel
        self.n_batch = max(load.n_batch, load.n_parallel)
        self.n_threads = self.load_threads = load.n_threads
        self.model, self.ctx, self.n_gpu_layers = self._load(load)
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.n_embd = ll.llama_model_n_embd(self.model)
        self.n_ctx_seq = ll.llama_n_ctx_seq(self.ctx)
        self.memory = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self.template = ChatTemplate(
            _meta(ll, self.model, "tokenizer.chat_template"),
            bos_token=self._piece(ll.llama_vocab_bos(self.vocab), special=True),
            eos_token=self._piece(ll.llama_vocab_eos(self.vocab), special=True),
        )
        self.bos = ll.llama_vocab_bos(self.vocab)
        self.free_slots = list(range(load.n_parallel))  # a heap: the lowest slot first
        self.active: dict[int, _Seq] = {}
        self.waiting: deque[p.Generate] = deque()
        self.embeds: deque[_EmbedJob] = deque()
        self._embed_ctx: Any = None
        self._embed_n_ctx = 0

    def _load(self, load: p.Load) -> tuple[Any, Any, int]:
        """Load the weights and create the batch context; returns (model, context, layers
        offloaded). With a GPU build and no n_gpu_layers, offload what fits: all layers
        first, then fewer, then none, until both the weights and the context fit."""
        ll = self.ll
        if not self.gpu_offload:
            candidates = [0]
        elif load.n_gpu_layers is not None:
            candidates = [load.n_gpu_layers]
        else:
            n = max(load.n_layers, 1)
            candidates = [-1, *sorted({n * 3 // 4, n // 2, n // 4} - {0}, reverse=True), 0]
        why = "llama.cpp could not load the model"
        for layers in candidates:
            mparams = ll.llama_model_default_params()
            mparams.n_gpu_layers = layers
            model = ll.llama_model_load_from_file(load.path.encode(), mparams)
            if not model:
                continue
            n_ctx_seq = min(load.n_ctx, ll.llama_model_n_ctx_train(model) or load.n_ctx)
            params = ll.llama_context_default_params()
            params.n_ctx = n_ctx_seq * load.n_parallel
            params.n_batch = self.n_batch
            params.n_ubatch = min(self.n_batch, 512)
            params.n_seq_max = load.n_parallel
            params.n_threads = params.n_threads_batch = load.n_threads
            params.kv_unified = False  # one KV stream per sequence, n_ctx_seq cells each
            params.no_perf = True
            ctx = ll.llama_init_from_model(model, params)
            if ctx:
                total = ll.llama_model_n_layer(model)
                return model, ctx, total if layers < 0 else min(layers, total)
            ll.llama_model_free(model)
            why = (f"llama.cpp could not create a context of {params.n_ctx} tokens "
                   f"({load.n_parallel} x {n_ctx_seq}); lower n_ctx or n_parallel")
        raise LoadError(f"{load.path}: {why}")

    # --- requests -----------------------------------------------------------------------

    def tokenize(self, text: str, special: bool, add_bos: bool = True) -> list[int]:
        """Tokens of ``text`` (one llama.cpp call: keep ``text`` short, see
        :data:`TOKENIZE_SLICE_CHARS`); ``special``: control-token text becomes control
        tokens; ``add_bos``: with BOS first when the model wants one."""
        ll = self.ll
        data = text.encode("utf-8", errors="replace")
        n_max = len(data) + 8
        buf = (ll.llama_token * n_max)()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            n_max = -n
            buf = (ll.llama_token * n_max)()
            n = ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
        tokens = list(buf[:n])
        if len(tokens) > 1 and tokens[0] == self.bos and tokens[1] == self.bos:
            tokens.pop(0)  # the template wrote BOS itself and the tokenizer added another
        return tokens

    def tokenize_some(self, prompt: list[int], pieces: deque[tuple[str, bool]],
                      budget: int) -> int:
        """Tokenize about ``budget`` characters of ``pieces`` (``(text, special)``, consumed
        from the left) onto ``prompt``; returns the characters used (at most one slice more
        than ``budget``). Only a text longer than a slice is cut (at whitespace when it can),
        so the template's markers stay whole. BOS goes before the first text only. Raises
        :class:`_RequestError` once the prompt fills the context."""
        used = 0
        while pieces and used < budget:
            text, special = pieces[0]
            if used and len(text) > budget - used:
                break  # the next slice takes it whole: a cut would change its tokens
            pieces.popleft()
            head, tail = cut(text, TOKENIZE_SLICE_CHARS)  # only texts longer than a slice
            if tail:
                pieces.appendleft((tail, special))
            prompt.extend(self.tokenize(head, special, add_bos=not prompt and used == 0))
            used += len(head)
            if len(prompt) >= self.n_ctx_seq:
                more = "+" if pieces else ""
                raise _RequestError(
                    "invalid",
                    f"the prompt is {len(prompt)}{more} tokens; this model's context per "
                    f"request is {self.n_ctx_seq} tokens",
                )
        return used

    def prompt_pieces(self, req: p.Generate) -> deque[tuple[str, bool]]:
        """What to tokenize for ``req``: the chat template's own text with special tokens,
        message contents and text prompts as plain text."""
        if req.messages is None:
            return deque([(req.prompt or "", False)])
        try:
            parts = self.template.render_parts(
                [{"role": m.role, "content": m.content} for m in req.messages]
            )
        except TemplateError as e:
            raise _RequestError("invalid", str(e)) from None
        return deque((text, not is_content) for text, is_content in parts)

    def tokenize_all(self, pieces: deque[tuple[str, bool]], tokens: list[int]) -> None:
        """Tokenize all of ``pieces`` onto ``tokens``, slice by slice, at once; raises like
        :meth:`tokenize_some` (what is left stays in ``pieces``)."""
        while pieces:
            self.tokenize_some(tokens, pieces, TOKENIZE_SLICE_CHARS)

    def prompt_tokens(self, req: p.Generate) -> list[int]:
        """The whole prompt of ``req`` at once (what the loop does in slices)."""
        tokens: list[int] = []
        self.tokenize_all(self.prompt_pieces(req), tokens)
        return tokens

    def _piece(self, token: int, special: bool = False) -> str:
        return self._piece_bytes(token, special).decode("utf-8", errors="replace")

    def _piece_bytes(self, token: int, special: bool = False) -> bytes:
        buf = self._piece_buf
        n = self.ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return bytes(buf.raw[:n])

    def _sampler(self, s: p.Sampling) -> Any:
        ll = self.ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if s.presence_penalty or s.frequency_penalty:
            ll.llama_sampler_chain_add(
                chain,
                ll.llama_sampler_init_penalties(
                    self.n_vocab, 64, 1.0, s.frequency_penalty, s.presence_penalty
                ),
            )
        if s.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(s.min_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(s.temperature))
        seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(4), "little")
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def admit(self, req: p.Generate, send: Send) -> None:
        """Start a generation in a free slot (the caller checked there is one); its prompt
        is tokenized by the following steps."""
        try:
            pieces = self.prompt_pieces(req)
            if not pieces:
                raise _RequestError("invalid", "the prompt is empty")
        except _RequestError as e:
            send(p.Failed(req.id, e.kind, str(e)))
            return
        seq = _Seq(req.id, heapq.heappop(self.free_slots), [], req.max_tokens, req.stop,
                   self._sampler(req.sampling), pieces=pieces)
        self.active[req.id] = seq

    def _tokenize_slice(self, out: list[p.FromWorker]) -> None:
        """Tokenize one slice of the prompts still being tokenized, in arrival order."""
        budget = TOKENIZE_SLICE_CHARS
        for seq in [s for s in self.active.values() if s.tokenizing]:
            if budget <= 0:
                return
            try:
                budget -= self.tokenize_some(seq.prompt, seq.pieces, budget)
                if not seq.pieces and not seq.prompt:
                    raise _RequestError("invalid", "the prompt is empty")
            except _RequestError as e:
                out.append(p.Failed(seq.id, e.kind, str(e)))
                self._release(seq)
                continue
            if not seq.pieces:
                room = self.n_ctx_seq - len(seq.prompt)
                seq.max_tokens = room if seq.max_tokens is None else min(seq.max_tokens, room)

    def cancel(self, request_id: int, send: Send) -> None:
        seq = self.active.get(request_id)
        if seq is not None:
            seq.cancelled = True
            return
        for req in self.waiting:
            if req.id == request_id:
                self.waiting.remove(req)
                send(p.Done(req.id, "cancelled", 0, 0))
                return
        for job in self.embeds:
            if job.req.id == request_id:
                self.embeds.remove(job)
                send(p.Done(request_id, "cancelled", 0, 0))
                return

    def _finish(self, seq: _Seq, reason: p.FinishReason, out: list[p.FromWorker]) -> None:
        if reason != "cancelled":
            tail = seq.pending + seq.decoder.decode(b"", final=True)
            if reason == "stop" and seq.stop:
                tail = cut_at_stop(tail, seq.stop)[0]
            if tail:
                out.append(p.Tokens(seq.id, tail))
        out.append(p.Done(seq.id, reason, len(seq.prompt), seq.n_generated))
        self._release(seq)

    def _release(self, seq: _Seq) -> None:
        """Free ``seq``'s KV cells, sampler and slot."""
        self.ll.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
        self.ll.llama_sampler_free(seq.sampler)
        del self.active[seq.id]
        heapq.heappush(self.free_slots, seq.slot)

    def _accept(self, seq: _Seq, token: int, out: list[p.FromWorker]) -> None:
        """Handle one sampled token: emit text, or finish the sequence."""
        if self.ll.llama_vocab_is_eog(self.vocab, token):
            self._finish(seq, "stop", out)
            return
        seq.n_generated += 1
        seq.pending += seq.decoder.decode(self._piece_bytes(token))
        if seq.stop:
            text, hit = cut_at_stop(seq.pending, seq.stop)
            if hit:
                seq.pending = text
                self._finish(seq, "stop", out)
                return
            keep = held_back(seq.pending, seq.stop)
            emit, seq.pending = seq.pending[: len(seq.pending) - keep], seq.pending[
                len(seq.pending) - keep :
            ]
        else:
            emit, seq.pending = seq.pending, ""
        if emit:
            out.append(p.Tokens(seq.id, emit))
        if seq.max_tokens is not None and seq.n_generated >= seq.max_tokens:
            self._finish(seq, "length", out)
        else:
            seq.next_token = token

    # --- the batch loop -----------------------------------------------------------------

    def step(self, out: list[p.FromWorker]) -> None:
        """One decode step over every active sequence."""
        ll, batch = self.ll, self.batch
        for seq in [s for s in self.active.values() if s.cancelled]:
            self._finish(seq, "cancelled", out)
        while self.waiting and self.free_slots:
            self.admit(self.waiting.popleft(), out.append)
        self._tokenize_slice(out)
        n = 0

        def add(token: int, pos: int, slot: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot
            batch.logits[n] = logits
            n += 1

        # Ascending slot order, and slots handed out lowest first: with one KV stream per
        # sequence llama.cpp splits a batch into one sub-batch per run of consecutive,
        # increasing sequence ids, so any other order doubles the cost of a step.
        ordered = sorted(self.active.values(), key=lambda q: q.slot)
        for seq in ordered:
            seq.batch_index = -1
            if seq.next_token is not None:
                seq.batch_index = n
                add(seq.next_token, seq.n_past, seq.slot, True)
                seq.n_past += 1
                seq.next_token = None
        for seq in ordered:
            if not seq.prefilling or n >= self.n_batch:
                continue
            take = min(len(seq.prompt) - seq.n_past, self.n_batch - n)
            for i in range(seq.n_past, seq.n_past + take):
                last = i == len(seq.prompt) - 1
                if last:
                    seq.batch_index = n
                add(seq.prompt[i], i, seq.slot, last)
            seq.n_past += take
        if n == 0:
            return
        batch.n_tokens = n
        rc = ll.llama_decode(self.ctx, batch)
        if rc != 0:
            for seq in list(self.active.values()):
                out.append(p.Failed(seq.id, "internal", f"llama_decode failed ({rc})"))
                self._release(seq)
            return
        for seq in list(self.active.values()):
            if seq.batch_index >= 0:
                token = ll.llama_sampler_sample(seq.sampler, self.ctx, seq.batch_index)
                self._accept(seq, token, out)

    # --- embeddings ---------------------------------------------------------------------

    def _embedding_context(self) -> Any:
        ll = self.ll
        if self._embed_ctx is None:
            # One input per decode, as long as a generation's context: the compute buffer
            # grows with the square of this, so it is not the model's full training context.
            n_ctx = self.n_ctx_seq
            params = ll.llama_context_default_params()
            params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
            params.n_seq_max = 1
            params.n_threads = params.n_threads_batch = self.n_threads
            params.embeddings = True
            params.pooling_type = ll.LLAMA_POOLING_TYPE_MEAN
            params.no_perf = True
            self._embed_ctx = ll.llama_init_from_model(self.model, params)
            if not self._embed_ctx:
                self._embed_ctx = None
                raise _RequestError("internal", "llama.cpp could not create an embedding context")
            self._embed_n_ctx = n_ctx
        return self._embed_ctx

    def embed_one(self, job: _EmbedJob) -> p.Embeddings | None:
        """Embed the next input of ``job``; its answer once the last one is done."""
        ll = self.ll
        ctx = self._embedding_context()
        i = len(job.vectors)
        tokens: list[int] = []
        pieces = deque([(job.req.inputs[i], False)])
        with contextlib.suppress(_RequestError):  # too long: reported below, with the limit
            self.tokenize_all(pieces, tokens)
        if not tokens or len(tokens) > self._embed_n_ctx or pieces:
            raise _RequestError(
                "invalid",
                f"input[{i}] is {len(tokens)}{'+' if pieces else ''} tokens; "
                f"embeddings take 1 to {self._embed_n_ctx}",
            )
        batch = ll.llama_batch_init(self._embed_n_ctx, 0, 1)
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
                raise _RequestError("internal", "llama_decode failed for embeddings")
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

    def _embed_slice(self, out: list[p.FromWorker]) -> None:
        """One input of the oldest embedding request."""
        if not self.embeds:
            return
        job = self.embeds[0]
        try:
            done = self.embed_one(job) if job.req.inputs else p.Embeddings(job.req.id, (), 0)
        except _RequestError as e:
            out.append(p.Failed(job.req.id, e.kind, str(e)))
            self.embeds.popleft()
            return
        if done is not None:
            out.append(done)
            self.embeds.popleft()

    def set_threads(self, n: int) -> None:
        """Use ``n`` threads (0: the number given at load) for later decodes. Fewer threads
        under CPU contention: llama.cpp's threads meet at every step, so one that is
        descheduled stalls the others."""
        n = n if n > 0 else self.load_threads
        self.n_threads = n
        for ctx in (self.ctx, self._embed_ctx):
            if ctx is not None:
                self.ll.llama_set_n_threads(ctx, n, n)

    # --- main loop ----------------------------------------------------------------------

    def run(self, inbox: queue.SimpleQueue[p.ToWorker | None], send_all: Callable[
            [list[p.FromWorker]], None]) -> None:
        """Serve requests until Shutdown or the end of the input pipe."""
        while True:
            out: list[p.FromWorker] = []
            block = not self.active and not self.waiting and not self.embeds
            while True:
                try:
                    msg = inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if msg is None or isinstance(msg, p.Shutdown):
                    return
                if isinstance(msg, p.Generate):
                    self.waiting.append(msg)  # admitted at the start of the next step
                elif isinstance(msg, p.Cancel):
                    self.cancel(msg.id, out.append)
                elif isinstance(msg, p.SetThreads):
                    self.set_threads(msg.n)
                elif isinstance(msg, p.Embed):
                    self.embeds.append(_EmbedJob(msg))
            self.step(out)
            self._embed_slice(out)
            if out:
                send_all(out)


def _meta(ll: Any, model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(1 << 16)
    n = ll.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        ll.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return bytes(buf.value).decode("utf-8", errors="replace")


def _quiet_logs(ll: Any) -> Any:
    """Route llama.cpp's log to stderr, errors only unless SIDECAR_LLAMA_LOG=1."""
    verbose = os.environ.get("SIDECAR_LLAMA_LOG") == "1"

    last = [0]

    @ll.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, _user: Any) -> None:
        if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous message
            last[0] = level
        if verbose or last[0] >= 4:  # GGML_LOG_LEVEL_ERROR
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    ll.llama_log_set(callback, None)
    return callback
