"""One sequence's sampling: the llama.cpp sampler chain, an optional grammar, log-probabilities.

Used by the engine on its one llama.cpp thread (:mod:`local_models.engine`). A
:class:`SeqSampler` is made per sequence and freed with it.

Contract:

* The chain is llama.cpp's: logit bias, penalties, then greedy (temperature 0) or top-k,
  top-p, min-p, temperature and a seeded draw. The same seed, prompt and settings give the
  same tokens. Greedy alone (temperature 0, no bias or penalties) is read off the logits
  with numpy's argmax, the same first best token as llama.cpp's greedy sampler gives, for
  about a tenth of its cost (it copies the whole vocabulary first: 145 µs a token on
  SmolLM2's 49k, 3% of a decode step of 8 sequences).
* A grammar (GBNF, root rule ``root``) constrains every token. As llama.cpp's own server does,
  the token is first drawn without it and then checked against the grammar alone (one
  candidate, cheap); only when the grammar rejects it is the token drawn again from the
  tokens the grammar allows. That second draw filters the best-scored tokens by the grammar,
  the :data:`SHORTLISTS` in turn (the 32 best, then the 1,024 best), where that gives exactly
  the draw over the whole vocabulary (greedy: the best logits; temperature alone: the logits
  over the temperature plus Gumbel noise, whose best allowed one is a draw from the
  grammar-masked softmax, the Gumbel-max trick): the best allowed token of a shortlist is
  the best allowed one of the vocabulary. The whole vocabulary is filtered otherwise (logit
  bias, penalties, top-k, top-p or min-p, or no allowed token in the longer shortlist).
  The grammar's filter costs per token it checks, and more right after a decode, whose
  weights have pushed the grammar out of the CPU's caches: about 4 ms for SmolLM2's 49k
  tokens, 0.5 ms for 1,024, 20 µs for 32 (docs/benchmarks.md, "Grammar redraw: shortlists
  in turn"). With a JSON schema the grammar rejects a fifth to a half of a small model's
  first choices, and four times in five the 32 best hold an allowed one. So a sequence
  that follows its grammar costs the others in the batch little. A token the grammar
  rejected is never accepted into it (llama.cpp aborts the process on that), and an
  end-of-generation token is never accepted (it ends the sequence).
* Log-probabilities are of the model's own distribution (softmax of the raw logits, before
  penalties, bias, temperature or grammar), as OpenAI reports them.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from local_models import protocol as p

__all__ = ["GrammarError", "SeqSampler", "Vocab"]


class GrammarError(Exception):
    """The grammar does not compile in llama.cpp."""


#: numpy's view of ``llama_token_data`` (id int32, logit float, p float).
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])

SHORTLISTS = (32, 1024)
"""How many of the best-scored tokens a grammar's second draw filters, in turn."""


@dataclass(eq=False)
class Vocab:
    """What every sampler of one model shares: the library, the vocabulary, a scratch
    candidate array of the vocabulary's size, one per shortlist (``shortlists``: their
    sizes, :data:`SHORTLISTS` unless measuring others), and the token ids in order."""

    ll: Any
    vocab: Any
    n_vocab: int
    shortlists: tuple[int, ...] = SHORTLISTS

    def __post_init__(self) -> None:
        self.ids = np.arange(self.n_vocab, dtype=np.int32)
        self.scratch = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)
        sizes = sorted({min(k, self.n_vocab) for k in self.shortlists})
        self.shorts = [np.zeros(k, dtype=_TOKEN_DATA) for k in sizes]
        self.one = (self.ll.llama_token_data * 1)()

    def logits(self, ctx: Any, index: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        """The logits of batch row ``index`` (a view: valid until the next decode)."""
        ptr = self.ll.llama_get_logits_ith(ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def candidates(self, logits: np.ndarray[Any, np.dtype[np.float32]]) -> Any:
        """The whole vocabulary as a ``llama_token_data_array`` over the scratch array."""
        ll, data = self.ll, self.scratch
        data["id"] = self.ids
        data["logit"] = logits
        data["p"] = 0.0
        ptr = data.ctypes.data_as(ctypes.POINTER(ll.llama_token_data))
        return ll.llama_token_data_array(ptr, self.n_vocab, -1, False)

    def shortlist(self, logits: np.ndarray[Any, np.dtype[np.float32]],
                  scores: np.ndarray[Any, Any], data: np.ndarray[Any, Any]) -> Any:
        """The ``len(data)`` tokens of the highest ``scores`` (their ``logits``) as a
        ``llama_token_data_array`` over ``data``, one of the scratch :attr:`shorts`."""
        ll = self.ll
        k = len(data)
        best = np.argpartition(scores, -k)[-k:] if k < self.n_vocab else self.ids
        data["id"] = best
        data["logit"] = logits[best]
        data["p"] = 0.0
        ptr = data.ctypes.data_as(ctypes.POINTER(ll.llama_token_data))
        return ll.llama_token_data_array(ptr, k, -1, False)


class SeqSampler:
    """The sampler chain (and grammar) of one sequence. Not thread-safe; free with
    :meth:`free` exactly once."""

    def __init__(self, v: Vocab, s: p.Sampling, grammar: str | None = None, *,
                 seed_offset: int = 0) -> None:
        """Build the chain for ``s``; ``seed_offset`` varies the seed of the n-th choice of
        one request. Raises :class:`GrammarError` when ``grammar`` does not compile and
        ``ValueError`` for a logit bias on a token the vocabulary lacks."""
        ll = v.ll
        self.v = v
        for token, _ in s.logit_bias:
            if not 0 <= token < v.n_vocab:
                raise ValueError(f"logit_bias names token {token}; this model's vocabulary "
                                 f"has tokens 0 to {v.n_vocab - 1}")
        self.grammar: Any = None
        # Where a cheaper draw is the chain's own (see the module's contract): "greedy"
        # (the chain is greedy alone: argmax, and a rejected token redrawn from the
        # shortlist), "gumbel" (a rejected token redrawn from the shortlist), or None.
        plain = not s.logit_bias and not s.presence_penalty and not s.frequency_penalty
        self._short: str | None = None
        if plain and s.temperature <= 0:
            self._short = "greedy"
        elif plain and s.top_k == 0 and s.top_p >= 1.0 and s.min_p <= 0:
            self._short = "gumbel"
        self._inv_temp = 1.0 / s.temperature if s.temperature > 0 else 0.0
        self._rng: np.random.Generator | None = None
        if grammar is not None:
            self.grammar = ll.llama_sampler_init_grammar(v.vocab, grammar.encode(), b"root")
            if not self.grammar:
                raise GrammarError("the grammar does not compile")
        self.chain = chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = ll.llama_sampler_chain_add
        if s.logit_bias:
            biases = (ll.llama_logit_bias * len(s.logit_bias))(
                *(ll.llama_logit_bias(t, b) for t, b in s.logit_bias))
            add(chain, ll.llama_sampler_init_logit_bias(v.n_vocab, len(s.logit_bias), biases))
        if s.presence_penalty or s.frequency_penalty:
            add(chain, ll.llama_sampler_init_penalties(
                v.n_vocab, 64, 1.0, s.frequency_penalty, s.presence_penalty))
        if s.temperature <= 0:
            add(chain, ll.llama_sampler_init_greedy())
            return
        if s.top_k > 0:
            add(chain, ll.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            add(chain, ll.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            add(chain, ll.llama_sampler_init_min_p(s.min_p, 1))
        add(chain, ll.llama_sampler_init_temp(s.temperature))
        seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(4), "little")
        add(chain, ll.llama_sampler_init_dist((seed + seed_offset) & 0xFFFFFFFF))
        if self._short == "gumbel":
            self._rng = np.random.default_rng((seed + seed_offset) & 0xFFFFFFFF)

    def sample(self, ctx: Any, index: int) -> int | None:
        """Draw the next token from batch row ``index`` and accept it into the chain (and
        the grammar, unless it ends the generation). None: the grammar allows no token at
        all (the sequence must end)."""
        ll, v = self.v.ll, self.v
        if self._short == "greedy":  # llama.cpp's greedy pick, without its vocabulary copy
            logits = v.logits(ctx, index)
            token = int(np.argmax(logits))
            if self.grammar is None:
                return token
        elif self.grammar is None:
            return int(ll.llama_sampler_sample(self.chain, ctx, index))
        else:
            logits = v.logits(ctx, index)
            cur = v.candidates(logits)
            ll.llama_sampler_apply(self.chain, ctypes.byref(cur))
            token = int(cur.data[cur.selected].id)
        if not self._allows(token):
            short = self._redraw_short(logits)
            if short is not None:
                token = short
            else:
                cur = v.candidates(logits)
                ll.llama_sampler_apply(self.grammar, ctypes.byref(cur))
                ll.llama_sampler_apply(self.chain, ctypes.byref(cur))
                token = int(cur.data[cur.selected].id)
            if ll.llama_vocab_is_eog(v.vocab, token):
                return token
            if not self._allows(token):
                return None
        ll.llama_sampler_accept(self.chain, token)
        if not ll.llama_vocab_is_eog(v.vocab, token):
            ll.llama_sampler_accept(self.grammar, token)
        return token

    def _redraw_short(self, logits: np.ndarray[Any, np.dtype[np.float32]]) -> int | None:
        """The second draw from the shortlists in turn, or None where that would not be
        the same draw as over the whole vocabulary (the caller then filters the whole of
        it). The Gumbel draw never returns None: where no allowed token made the longest
        shortlist, it filters the whole vocabulary itself, under the same noise (a fresh
        draw there would bias the result)."""
        if self._short is None:
            return None
        ll, v = self.v.ll, self.v
        scores: np.ndarray[Any, Any] = logits
        if self._rng is not None:  # Gumbel-max: argmax(logit / T + Gumbel) is a draw
            scores = logits * self._inv_temp + self._rng.gumbel(size=v.n_vocab)
        for data in v.shorts:
            cur = v.shortlist(logits, scores, data)
            ll.llama_sampler_apply(self.grammar, ctypes.byref(cur))
            allowed = np.isfinite(data["logit"])
            if allowed.any():
                break
        else:
            if self._rng is None:
                return None
            # The same scores over the whole vocabulary.
            cur = v.candidates(logits)
            ll.llama_sampler_apply(self.grammar, ctypes.byref(cur))
            data, allowed = v.scratch, np.isfinite(v.scratch["logit"])
        return int(data["id"][np.argmax(np.where(allowed, scores[data["id"]], -np.inf))])

    def _allows(self, token: int) -> bool:
        one = self.v.one
        one[0].id, one[0].logit, one[0].p = token, 0.0, 0.0
        cur = self.v.ll.llama_token_data_array(one, 1, -1, False)
        self.v.ll.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        return bool(math.isfinite(one[0].logit))

    def free(self) -> None:
        self.v.ll.llama_sampler_free(self.chain)
        if self.grammar:
            self.v.ll.llama_sampler_free(self.grammar)


def top_logprobs(v: Vocab, logits: np.ndarray[Any, np.dtype[np.float32]], token: int,
                 k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` and the ``k`` most likely tokens with theirs, under
    the softmax of ``logits``."""
    x = logits.astype(np.float64)
    top = float(x.max())
    log_z = top + math.log(float(np.exp(x - top).sum()))
    chosen = float(x[token]) - log_z
    if k <= 0:
        return chosen, []
    best = np.argpartition(-x, k - 1)[:k]
    best = best[np.argsort(-x[best], kind="stable")]
    return chosen, [(int(t), float(x[t]) - log_z) for t in best]
