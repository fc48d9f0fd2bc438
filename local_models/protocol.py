"""Messages between the model pool (in the gateway process) and one worker process.

Contract:

* A frame is a 4-byte big-endian length followed by that many bytes of msgpack, one
  message of the :data:`ToWorker` or :data:`FromWorker` tagged unions. Frames larger than
  :data:`MAX_FRAME` are a protocol error (the reader closes the pipe).
* The pool sends :class:`Load` first and waits for :class:`Loaded` or :class:`LoadFailed`.
  Then any number of :class:`Generate`, :class:`Embed` and :class:`Cancel`, and finally
  :class:`Shutdown`. Every request id gets exactly one terminal answer (:class:`Done`,
  :class:`Embeddings` or :class:`Failed`) unless the worker dies, which the pool detects as
  the end of the pipe.
* A :class:`Generate` answers with zero or more :class:`Tokens` (text deltas of one choice,
  already cut at stop sequences and on UTF-8 boundaries, with log-probabilities when asked)
  and then one :class:`Done` with the exact usage, once every choice has ended.
* :class:`Cancel` of an unknown or finished id is ignored; a cancelled generation ends with
  ``Done(finish_reason="cancelled")`` at the next decode step, a cancelled embedding with
  the same before its next input.
"""

from __future__ import annotations

import struct
from typing import Literal

import msgspec

MAX_FRAME = 64 * 1024 * 1024
HEADER = struct.Struct(">I")


PrefixCache = bool | Literal["exact"]
"""How a model reuses a prompt's prefix: ``"exact"``, ``True`` (any) or ``False`` (none)."""


class _Msg(msgspec.Struct, frozen=True, tag=True, array_like=True):
    pass


# --- pool -> worker -------------------------------------------------------------------------


class Load(_Msg, frozen=True):
    path: str
    n_ctx: int
    """Context per sequence, in tokens."""
    n_parallel: int
    """Sequences decoded together in one batch."""
    n_gpu_layers: int | None
    """None: offload what fits when the build supports a GPU, else 0."""
    n_threads: int
    n_layers: int = 0
    """From the GGUF metadata; sizes the steps of partial GPU offload."""
    n_batch: int = 512
    prefix_cache: PrefixCache = "exact"
    """Keep each sequence slot's KV cache after its request for a later prompt:
    ``"exact"`` reuses only a prompt's part before its last message, prefilled the same way
    whether it is reused or not (so answers do not depend on it); ``True`` the longest
    common prefix (faster, answers may differ); ``False`` none."""


class ChatMessage(msgspec.Struct, frozen=True, array_like=True):
    role: str
    content: str
    name: str | None = None


class Sampling(msgspec.Struct, frozen=True, array_like=True):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias added to its logit); -100 bans a token, 100 all but forces it."""


class Generate(_Msg, frozen=True):
    id: int
    messages: tuple[ChatMessage, ...] | None
    """Chat: rendered with the model's chat template in the worker."""
    prompt: str | None
    """Text completion: tokenized as is (with BOS when the model wants one)."""
    max_tokens: int | None
    """None: up to the end of the sequence's context."""
    stop: tuple[str, ...] = ()
    sampling: Sampling = Sampling()
    grammar: str | None = None
    """GBNF (root rule ``root``) every choice's output must follow."""
    n: int = 1
    """Choices: sequences that share the prompt's KV cache (prefilled once)."""
    logprobs: int | None = None
    """None: no log-probabilities; k: each token's, with the k most likely alternatives."""


Pooling = Literal["mean", "last"]


class Embed(_Msg, frozen=True):
    id: int
    inputs: tuple[str | tuple[int, ...], ...]
    """Texts, or token ids as they are (no BOS added)."""
    pooling: Pooling = "mean"
    """mean: the average of every token's state (the embeddings API); last: the last
    token's state (for prompts written to end in their meaning, as the semantic cache's)."""


class Cancel(_Msg, frozen=True):
    id: int


class Shutdown(_Msg, frozen=True):
    pass


class SetThreads(_Msg, frozen=True):
    """Decode with ``n`` threads from the next step on (0: as many as at load)."""

    n: int


ToWorker = Load | Generate | Embed | Cancel | Shutdown | SetThreads

# --- worker -> pool -------------------------------------------------------------------------


class Loaded(_Msg, frozen=True):
    n_ctx: int
    """Context per sequence the worker actually got."""
    n_parallel: int
    n_gpu_layers: int
    """Layers actually offloaded (0 on a CPU-only build)."""
    gpu_offload: bool
    """Whether this llama.cpp build can offload to a GPU at all."""
    n_vocab: int
    n_embd: int


class LoadFailed(_Msg, frozen=True):
    message: str


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One generated token: its bytes (a piece may be part of a UTF-8 character), its
    log-probability, and the most likely alternatives as (bytes, log-probability)."""

    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


class Tokens(_Msg, frozen=True):
    id: int
    text: str
    index: int = 0
    """The choice this text belongs to (0 unless the request asked for n > 1)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """The tokens generated since the last :class:`Tokens` of this choice (only when asked;
    text held back at a stop sequence is reported with the token that completed it)."""


FinishReason = Literal["stop", "length", "cancelled"]


class Done(_Msg, frozen=True):
    id: int
    finish_reason: FinishReason
    """The first choice's (the only one's, unless n > 1)."""
    prompt_tokens: int
    completion_tokens: int
    """All choices together."""
    finish_reasons: tuple[FinishReason, ...] = ()
    """Each choice's, by index, when n > 1."""
    cached_tokens: int = 0
    """Of ``prompt_tokens``, those whose KV cache was kept from an earlier request (not
    prefilled again)."""


class Embeddings(_Msg, frozen=True):
    id: int
    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


ErrorKind = Literal["invalid", "internal"]


class Failed(_Msg, frozen=True):
    id: int
    kind: ErrorKind
    """``invalid``: the request cannot be served by this model (too long, bad input);
    ``internal``: llama.cpp failed."""
    message: str


FromWorker = Loaded | LoadFailed | Tokens | Done | Embeddings | Failed

_encoder = msgspec.msgpack.Encoder()
to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)


def frame(message: ToWorker | FromWorker) -> bytes:
    """Encode one message as a length-prefixed frame."""
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body
