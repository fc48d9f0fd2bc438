"""Bounds on the work one request may ask of a worker, checked in the gateway process before
anything is sent (pure functions; the pool raises ``InvalidRequest`` with the message).

The bounds are cheap and derived from the model's context per sequence ``n_ctx`` (tokens):
a prompt that cannot fit is refused without rendering or tokenizing it.

* Chat: at most ``n_ctx // 2`` messages (every template spends tokens on each message) and
  at most ``n_ctx * MAX_CHARS_PER_TOKEN`` characters of content and roles in all.
* Text completion: at most ``n_ctx * MAX_CHARS_PER_TOKEN`` characters of prompt.
* Embeddings: at most :data:`MAX_EMBEDDING_INPUTS` inputs, each at most
  ``n_ctx * MAX_CHARS_PER_TOKEN`` characters or ``n_ctx`` token ids.

What passes is bounded again in the worker: tokenized in slices and refused at ``n_ctx``
tokens (:mod:`local_models.engine`).
"""

from __future__ import annotations

from collections.abc import Sequence

from local_models.protocol import ChatMessage

#: Characters a token may stand for on average before a prompt is refused unread (English
#: text is about 4; runs of spaces or digits tokenize longer, whole prompts rarely over 8).
MAX_CHARS_PER_TOKEN = 16

#: Inputs of one embedding request.
MAX_EMBEDDING_INPUTS = 256

#: Largest seed and token count passed on (the worker's sampler seed is 32 bits; a count
#: past the context ends at the context anyway).
SEED_MASK = 0xFFFFFFFF
MAX_TOKENS_CAP = 2**31 - 1


def max_messages(n_ctx: int) -> int:
    return max(n_ctx // 2, 1)


def max_chars(n_ctx: int) -> int:
    return n_ctx * MAX_CHARS_PER_TOKEN


def generate_refusal(n_ctx: int, messages: Sequence[ChatMessage] | None,
                     prompt: str | None) -> str | None:
    """Why a generation is refused unread (naming the limit), or None when it may be sent."""
    limit = max_chars(n_ctx)
    if messages is not None:
        if len(messages) > max_messages(n_ctx):
            return (f"{len(messages)} messages is more than this model takes "
                    f"(at most {max_messages(n_ctx)} for a context of {n_ctx} tokens)")
        size = sum(len(m.content) + len(m.role) for m in messages)
        if size > limit:
            return (f"the messages are {size} characters; this model's context of {n_ctx} "
                    f"tokens takes at most {limit} characters")
    if prompt is not None and len(prompt) > limit:
        return (f"the prompt is {len(prompt)} characters; this model's context of {n_ctx} "
                f"tokens takes at most {limit} characters")
    return None


def embed_refusal(n_ctx: int, inputs: Sequence[str | tuple[int, ...]]) -> str | None:
    """Why an embedding request is refused unread (naming the limit), or None."""
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        return (f"{len(inputs)} embedding inputs is more than the {MAX_EMBEDDING_INPUTS} "
                "a local model takes in one request")
    limit = max_chars(n_ctx)
    for i, text in enumerate(inputs):
        if isinstance(text, tuple):
            if len(text) > n_ctx:
                return (f"input[{i}] is {len(text)} tokens; this model's embeddings take at "
                        f"most {n_ctx}")
        elif len(text) > limit:
            return (f"input[{i}] is {len(text)} characters; this model's embeddings take at "
                    f"most {limit} characters ({n_ctx} tokens)")
    return None


def clamp_max_tokens(max_tokens: int | None) -> int | None:
    return None if max_tokens is None else max(0, min(max_tokens, MAX_TOKENS_CAP))


def mask_seed(seed: int | None) -> int | None:
    return None if seed is None else seed & SEED_MASK
