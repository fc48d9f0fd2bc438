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
  chain and grammar (:mod:`local_models.sampling`), stop sequences and token limit.
* A request for ``n`` choices takes ``n`` sequences at once: the prompt is prefilled in the
  first, whose KV cache is then copied to the others (one copy, no second prefill), and every
  choice draws its first token from the same logits with its own seed (``seed + index``).
  It is answered with one :class:`~local_models.protocol.Done` once every choice has ended.
* Prompt-prefix reuse (``Load.prefix_cache``; :mod:`local_models.slots`): a slot keeps its
  KV cache when its sequence ends. ``"exact"`` (default): a chat prompt's part before its
  last message is prefilled in batches of its own, always cut the same way, and a later
  prompt with the very same part reuses a slot holding it, so its answer is the one it gets
  with nothing cached. ``True`` (llama-server's ``cache_prompt``): the free slot with the
  longest common prefix (ties: the lowest), cut there, the rest prefilled (a prompt matched
  whole re-decodes its last token); answers can differ, as llama.cpp's results depend on
  the batches. ``Done.cached_tokens`` counts the reused tokens. Memory that cannot be cut there
  (recurrent models) or that lost early positions (sliding-window attention) is cleared and
  the prompt prefilled whole. The other choices of ``n > 1`` take the lowest free slots.
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
* Embeddings (:mod:`local_models.embedder`) use a second, lazily created context on the same
  thread: one input per loop iteration, between decode steps; a cancel stops the rest.
* :meth:`Engine.run` returns on :class:`~local_models.protocol.Shutdown` or at the end of
  its input (``None``). A model that cannot be loaded raises :class:`LoadError`; a request
  that fails is answered with :class:`~local_models.protocol.Failed`, never raised.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import queue
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from local_models import protocol as p
from local_models.chat_template import ChatTemplate, TemplateError
from local_models.embedder import Embedder
from local_models.loading import LoadError, load_model, meta, quiet_logs
from local_models.sampling import GrammarError, SeqSampler, Vocab, top_logprobs
from local_models.slots import Slots, canonical_take
from local_models.text_cuts import cut, cut_at_stop, held_back

__all__ = ["TOKENIZE_SLICE_CHARS", "Engine", "LoadError", "Send"]

#: Characters of prompt text tokenized per loop iteration, over all prompts (llama.cpp's BPE
#: is superlinear in the length of one text, so long ones are cut, at whitespace if it can).
TOKENIZE_SLICE_CHARS = 8192

Send = Callable[[p.FromWorker], None]

SPLIT: tuple[str, bool] = ("", False)  # a piece of its own, compared by identity
"""In a prompt's pieces (exact prefix reuse): the last message starts here."""


class _RequestError(Exception):
    """One request cannot be served; answered as :class:`~local_models.protocol.Failed`."""

    def __init__(self, kind: p.ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: p.ErrorKind = kind


def _llama() -> Any:
    import llama_cpp  # imported here: loading the shared library is the worker's job only

    return llama_cpp


@dataclass(eq=False)
class _Request:
    """One generation request: its prompt (tokenized in slices) and its choices."""

    req: p.Generate
    max_tokens: int | None
    """As asked; set to what fits the context once the prompt is tokenized."""
    pieces: deque[tuple[str, bool]]
    """Prompt text still to tokenize: (text, special)."""
    prompt: list[int] = field(default_factory=list)
    seqs: list[_Seq] = field(default_factory=list)
    reasons: list[p.FinishReason | None] = field(default_factory=list)
    generated: int = 0
    cached: int = 0
    """Prompt tokens whose KV cache the first choice's slot already held."""
    marks: list[int] = field(default_factory=list)
    """Exact reuse: where the prompt's last message starts, in tokens (its split)."""
    split = property(lambda self: self.marks[0] if self.marks else 0)

    @property
    def id(self) -> int:
        return self.req.id

    @property
    def tokenizing(self) -> bool:
        return bool(self.pieces)


@dataclass(eq=False)
class _Seq:
    """One choice of a request, generating in a sequence slot of the shared context."""

    request: _Request
    index: int
    sampler: SeqSampler
    slot: int = -1
    """-1 while the prompt is being tokenized (the request holds a reservation)."""
    n_past: int = 0
    n_generated: int = 0
    next_token: int | None = None
    batch_index: int = -1
    pending: str = ""
    logprobs: list[p.TokenLogprob] = field(default_factory=list)
    cancelled: bool = False
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    @property
    def id(self) -> int:
        return self.request.req.id

    @property
    def forking(self) -> bool:
        """A later choice still waiting for the first one's prompt to be prefilled."""
        return self.index > 0 and self.n_past == 0

    @property
    def prefilling(self) -> bool:
        r = self.request
        return self.index == 0 and not r.pieces and self.n_past < len(r.prompt)


class Engine:
    """One loaded model and its batch loop. Not thread-safe: main thread only."""

    def __init__(self, load: p.Load) -> None:
        self.ll = ll = _llama()
        self._piece_buf = ctypes.create_string_buffer(256)
        self._log_cb = quiet_logs(ll)
        ll.llama_backend_init()
        self.gpu_offload = bool(ll.llama_supports_gpu_offload())
        self.n_parallel = load.n_parallel
        self.n_batch = max(load.n_batch, load.n_parallel)
        self.n_threads = self.load_threads = load.n_threads
        self.model, self.ctx, self.n_gpu_layers = load_model(
            ll, load, n_batch=self.n_batch, gpu_offload=self.gpu_offload)
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.n_embd = ll.llama_model_n_embd(self.model)
        self.n_ctx_seq = ll.llama_n_ctx_seq(self.ctx)
        self.memory = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self.template = ChatTemplate(
            meta(ll, self.model, "tokenizer.chat_template"),
            bos_token=self._piece(ll.llama_vocab_bos(self.vocab), special=True),
            eos_token=self._piece(ll.llama_vocab_eos(self.vocab), special=True),
        )
        self.bos = ll.llama_vocab_bos(self.vocab)
        self.prefix_cache = load.prefix_cache
        self.slots = Slots(load.n_parallel, keep=load.prefix_cache is not False)
        self.chunk = max(1, self.n_batch - self.n_parallel)  # fits beside every decode row
        self.vocab_info = Vocab(ll, self.vocab, self.n_vocab)
        self.requests: dict[int, _Request] = {}
        self.seqs: list[_Seq] = []
        self.fed = 0
        """Tokens given to llama_decode so far (prompts and generated), for tests and stats."""
        self.waiting: deque[p.Generate] = deque()
        # One input per decode, as long as a generation's context.
        self.embedder = Embedder(ll, self.model, n_ctx=self.n_ctx_seq, n_embd=self.n_embd,
                                 n_vocab=self.n_vocab, n_threads=self.n_threads,
                                 tokenize=self._tokens_within)

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
                      budget: int, marks: list[int] | None = None) -> int:
        """Tokenize about ``budget`` characters of ``pieces`` (``(text, special)``, consumed
        from the left) onto ``prompt``; returns the characters used (at most one slice more
        than ``budget``). Only a text longer than a slice is cut (at whitespace when it can),
        so the template's markers stay whole. BOS goes before the first text only. The
        :data:`SPLIT` piece is not text: it appends the prompt's length so far to ``marks``.
        Raises :class:`_RequestError` once the prompt fills the context."""
        used = 0
        while pieces and used < budget:
            if pieces[0] is SPLIT:
                pieces.popleft()
                if marks is not None:
                    marks.append(len(prompt))
                continue
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
        message contents and text prompts as plain text. When the template refuses a
        ``tool`` message (many allow only system, user and assistant), tool results are
        given as user turns, consecutive turns of one role joined."""
        if req.messages is None:
            return deque([(req.prompt or "", False)])
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        try:
            try:
                parts = self.template.render_parts(messages)
            except TemplateError:
                if not any(m["role"] == "tool" for m in messages):
                    raise
                parts = self.template.render_parts(_without_tool_role(messages))
        except TemplateError as e:
            raise _RequestError("invalid", str(e)) from None
        pieces = deque((text, not is_content) for text, is_content in parts)
        if self.prefix_cache == "exact":
            last = max((i for i, (_, is_content) in enumerate(parts) if is_content), default=0)
            pieces.insert(last, SPLIT)
        return pieces

    def tokenize_all(self, pieces: deque[tuple[str, bool]], tokens: list[int]) -> None:
        """Tokenize all of ``pieces`` onto ``tokens``, slice by slice, at once; raises like
        :meth:`tokenize_some` (what is left stays in ``pieces``)."""
        while pieces:
            self.tokenize_some(tokens, pieces, TOKENIZE_SLICE_CHARS)

    def _tokens_within(self, text: str, limit: int) -> tuple[list[int], bool]:
        """Tokens of plain ``text`` in slices, stopping past ``limit``; and whether all of
        it was tokenized."""
        tokens: list[int] = []
        pieces = deque([(text, False)])
        while pieces and len(tokens) <= limit:
            with contextlib.suppress(_RequestError):  # at the context: reported by the caller
                self.tokenize_some(tokens, pieces, TOKENIZE_SLICE_CHARS)
        return tokens, not pieces

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

    def admit(self, req: p.Generate, send: Send) -> None:
        """Start a generation in ``req.n`` free slots (the caller checked there are); its
        prompt is tokenized by the following steps."""
        samplers: list[SeqSampler] = []
        try:
            if req.n > self.n_parallel:
                raise _RequestError("invalid", f"n = {req.n} is more than this model's "
                                    f"{self.n_parallel} parallel sequences")
            pieces = self.prompt_pieces(req)
            if not pieces:
                raise _RequestError("invalid", "the prompt is empty")
            for i in range(req.n):
                samplers.append(SeqSampler(self.vocab_info, req.sampling, req.grammar,
                                           seed_offset=i))
        except (_RequestError, GrammarError, ValueError) as e:
            for sampler in samplers:
                sampler.free()
            kind: p.ErrorKind = e.kind if isinstance(e, _RequestError) else "invalid"
            send(p.Failed(req.id, kind, str(e)))
            return
        r = _Request(req, req.max_tokens, pieces, reasons=[None] * req.n)
        for i, sampler in enumerate(samplers):
            r.seqs.append(_Seq(r, i, sampler))
        self.slots.reserve(req.n)
        self.requests[req.id] = r
        self.seqs.extend(r.seqs)

    def _tokenize_slice(self, out: list[p.FromWorker]) -> None:
        """Tokenize one slice of the prompts still being tokenized, in arrival order."""
        budget = TOKENIZE_SLICE_CHARS
        for r in [r for r in self.requests.values() if r.tokenizing]:
            if budget <= 0:
                return
            try:
                budget -= self.tokenize_some(r.prompt, r.pieces, budget, r.marks)
                if not r.pieces and not r.prompt:
                    raise _RequestError("invalid", "the prompt is empty")
            except _RequestError as e:
                out.append(p.Failed(r.id, e.kind, str(e)))
                self._drop(r)
                continue
            if not r.pieces:
                room = self.n_ctx_seq - len(r.prompt)
                r.max_tokens = room if r.max_tokens is None else min(r.max_tokens, room)
                self._place(r)

    def _place(self, r: _Request) -> None:
        """``r``'s prompt is whole: its first choice takes the free slot whose KV cache
        shares the longest prefix with it, cut there; the other choices the lowest free
        slots (their KV cache is replaced by the first's at the fork)."""
        first = r.seqs[0]
        if self.prefix_cache == "exact":
            first.slot, common = self.slots.take_exact(r.prompt, r.split)
        else:
            first.slot, common = self.slots.take_best(r.prompt)
        reuse = min(common, len(r.prompt) - 1)  # at least the last token, for its logits
        if not self._cut(first.slot, reuse):
            reuse = 0
        first.n_past = r.cached = reuse
        for seq in r.seqs[1:]:
            seq.slot = self.slots.take_lowest()

    def _cut(self, slot: int, keep: int) -> bool:
        """Remove ``slot``'s KV cache from position ``keep`` on; False (and the slot's
        whole cache removed) when that cannot keep the first ``keep`` positions: recurrent
        memory refuses partial removal, sliding-window attention has dropped early cells."""
        ll, kept = self.ll, self.slots.kept[slot]
        if not kept:
            return keep == 0
        if keep > 0 and ll.llama_memory_seq_pos_min(self.memory, slot) == 0 and (
                len(kept) == keep or ll.llama_memory_seq_rm(self.memory, slot, keep, -1)):
            self.slots.cut(slot, keep)
            return True
        ll.llama_memory_seq_rm(self.memory, slot, -1, -1)
        self.slots.cut(slot, 0)
        return keep == 0

    def cancel(self, request_id: int, send: Send) -> None:
        r = self.requests.get(request_id)
        if r is not None:
            for seq in r.seqs:
                seq.cancelled = True
            return
        for req in self.waiting:
            if req.id == request_id:
                self.waiting.remove(req)
                send(p.Done(req.id, "cancelled", 0, 0))
                return
        if self.embedder.cancel(request_id):
            send(p.Done(request_id, "cancelled", 0, 0))

    def _finish(self, seq: _Seq, reason: p.FinishReason, out: list[p.FromWorker]) -> None:
        """End one choice; the request's Done once it was the last."""
        r = seq.request
        if reason != "cancelled":
            tail = seq.pending + seq.decoder.decode(b"", final=True)
            if reason == "stop" and r.req.stop:
                tail = cut_at_stop(tail, r.req.stop)[0]
            if tail or seq.logprobs:
                out.append(p.Tokens(r.id, tail, seq.index, tuple(seq.logprobs)))
        r.reasons[seq.index] = reason
        r.generated += seq.n_generated
        self._release(seq)
        if all(why is not None for why in r.reasons):
            reasons = tuple(why for why in r.reasons if why is not None)
            out.append(p.Done(r.id, reasons[0], len(r.prompt), r.generated,
                              reasons if len(reasons) > 1 else (), r.cached))
            del self.requests[r.id]

    def _release(self, seq: _Seq) -> None:
        """Free ``seq``'s sampler and slot (or its reservation), and its KV cells unless
        the slot keeps them for prefix reuse."""
        if seq.slot < 0:
            self.slots.unreserve(1)
        else:
            if not self.slots.keep:
                self.ll.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
            self.slots.release(seq.slot)
        seq.sampler.free()
        self.seqs.remove(seq)

    def _drop(self, r: _Request) -> None:
        """Forget a failed request and free all its sequences."""
        for seq in list(r.seqs):
            if seq in self.seqs:
                self._release(seq)
        self.requests.pop(r.id, None)

    def _accept(self, seq: _Seq, token: int | None, out: list[p.FromWorker]) -> None:
        """Handle one sampled token (None: the grammar allows none): emit text, or finish."""
        if token is None or self.ll.llama_vocab_is_eog(self.vocab, token):
            self._finish(seq, "stop", out)
            return
        r = seq.request
        seq.n_generated += 1
        piece = self._piece_bytes(token)
        if r.req.logprobs is not None:
            seq.logprobs.append(self._logprob(seq, token, piece))
        seq.pending += seq.decoder.decode(piece)
        stop = r.req.stop
        if stop:
            text, hit = cut_at_stop(seq.pending, stop)
            if hit:
                seq.pending = text
                self._finish(seq, "stop", out)
                return
            keep = len(seq.pending) - held_back(seq.pending, stop)
            emit, seq.pending = seq.pending[:keep], seq.pending[keep:]
        else:
            emit, seq.pending = seq.pending, ""
        if emit:
            out.append(p.Tokens(seq.id, emit, seq.index, tuple(seq.logprobs)))
            seq.logprobs.clear()
        if r.max_tokens is not None and seq.n_generated >= r.max_tokens:
            self._finish(seq, "length", out)
        else:
            seq.next_token = token

    def _logprob(self, seq: _Seq, token: int, piece: bytes) -> p.TokenLogprob:
        k = seq.request.req.logprobs or 0
        logits = self.vocab_info.logits(self.ctx, seq.batch_index)
        chosen, top = top_logprobs(self.vocab_info, logits, token, k)
        return p.TokenLogprob(piece, chosen, tuple((self._piece_bytes(t), lp) for t, lp in top))

    # --- the batch loop -----------------------------------------------------------------

    def step(self, out: list[p.FromWorker]) -> None:
        """One decode step over every active sequence."""
        ll, batch = self.ll, self.batch
        for seq in [s for s in self.seqs if s.cancelled]:
            self._finish(seq, "cancelled", out)
        while self.waiting and self.slots.available() >= min(self.waiting[0].n,
                                                             self.n_parallel):
            self.admit(self.waiting.popleft(), out.append)
        self._tokenize_slice(out)
        n = 0
        kept = self.slots.kept

        def add(token: int, pos: int, slot: int, logits: bool) -> None:
            nonlocal n
            kept[slot].append(token)
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot
            batch.logits[n] = logits
            n += 1

        # Ascending slot order, and slots handed out lowest first: with one KV stream per
        # sequence llama.cpp splits a batch into one sub-batch per run of consecutive,
        # increasing sequence ids, so any other order doubles the cost of a step.
        ordered = sorted(self.seqs, key=lambda q: q.slot)
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
            prompt, split = seq.request.prompt, seq.request.split
            take = min(len(prompt) - seq.n_past, self.n_batch - n)
            if seq.n_past < split:
                take = canonical_take(seq.n_past, split, self.chunk, self.n_batch - n)
                if seq.n_past + take == split:
                    self.slots.sealed[seq.slot] = split
            for i in range(seq.n_past, seq.n_past + take):
                last = i == len(prompt) - 1
                if last:
                    seq.batch_index = n
                add(prompt[i], i, seq.slot, last)
            seq.n_past += take
        if n == 0:
            return
        batch.n_tokens = n
        self.fed += n
        rc = ll.llama_decode(self.ctx, batch)
        if rc != 0:
            ll.llama_memory_clear(self.memory, True)  # what it holds is not known now
            for slot in range(self.n_parallel):
                self.slots.cut(slot, 0)
            for r in list(self.requests.values()):
                out.append(p.Failed(r.id, "internal", f"llama_decode failed ({rc})"))
                self._drop(r)
            return
        for seq in [s for s in self.seqs if s.batch_index >= 0]:
            if seq.index == 0 and len(seq.request.seqs) > 1 and seq.n_past == len(
                    seq.request.prompt) and seq.n_generated == 0:
                self._fork(seq, out)
            if seq in self.seqs:
                self._accept(seq, seq.sampler.sample(self.ctx, seq.batch_index), out)

    def _fork(self, first: _Seq, out: list[p.FromWorker]) -> None:
        """The first choice's prompt is in its KV cache: copy it to the other choices (the
        copy is made before the next decode) and draw their first tokens from its logits."""
        for seq in first.request.seqs[1:]:
            if seq not in self.seqs or not seq.forking:
                continue
            self.ll.llama_memory_seq_cp(self.memory, first.slot, seq.slot, -1, -1)
            self.slots.kept[seq.slot][:] = self.slots.kept[first.slot]
            self.slots.sealed[seq.slot] = self.slots.sealed[first.slot]
            seq.n_past = first.n_past
            seq.batch_index = first.batch_index
            self._accept(seq, seq.sampler.sample(self.ctx, first.batch_index), out)

    def set_threads(self, n: int) -> None:
        """Use ``n`` threads (0: the number given at load) for later decodes. Fewer threads
        under CPU contention: llama.cpp's threads meet at every step, so one that is
        descheduled stalls the others."""
        n = n if n > 0 else self.load_threads
        self.n_threads = n
        self.ll.llama_set_n_threads(self.ctx, n, n)
        self.embedder.set_threads(n)

    # --- main loop ----------------------------------------------------------------------

    def run(self, inbox: queue.SimpleQueue[p.ToWorker | None], send_all: Callable[
            [list[p.FromWorker]], None]) -> None:
        """Serve requests until Shutdown or the end of the input pipe."""
        while True:
            out: list[p.FromWorker] = []
            block = not self.seqs and not self.waiting and not self.embedder.jobs
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
                    self.embedder.submit(msg)
            self.step(out)
            self.embedder.turn(out)
            if out:
                send_all(out)


def _without_tool_role(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``tool`` turns as ``user`` turns, and consecutive turns of one role joined."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "user" if m["role"] == "tool" else m["role"]
        if out and out[-1]["role"] == role:
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append({"role": role, "content": m["content"]})
    return out
