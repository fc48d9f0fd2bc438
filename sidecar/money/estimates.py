"""What a request may use before any provider has seen it: the counting behind budgets and
token limits.

:func:`estimate` is pure and cheap (one JSON encoding of the input): the prompt bound is the
JSON byte length of the input (every token is at least one byte) plus a fixed amount per
image, so a reservation made from it can only overestimate.
"""

from __future__ import annotations

from typing import Any

import msgspec

from sidecar.types import Call, ChatRequest, CompletionRequest, EmbeddingRequest

#: Extra prompt tokens assumed per image part (its bytes say nothing about its tokens).
IMAGE_TOKENS = 1600

_encoder = msgspec.json.Encoder()


class Estimate(msgspec.Struct, frozen=True):
    """What a request may use before any provider has seen it."""

    prompt_max: int
    """An upper bound of its prompt tokens: the JSON bytes of its input (a token is at
    least one byte) plus a fixed amount per image."""
    prompt_guess: int
    """A realistic guess (a quarter of that), for token rate limits."""
    max_tokens: int | None
    """The client's completion limit per choice, if any."""
    choices: int = 1
    """Completions the provider generates (and bills): ``n``, or ``best_of`` for text
    completions."""


def estimate(call: Call) -> Estimate:
    req = call.request
    choices = 1
    if isinstance(req, ChatRequest):
        data: Any = [call.raw.get("messages"), call.raw.get("tools")]
        images = sum(
            1 for m in req.messages if isinstance(m.content, list)
            for part in m.content if part.get("type") in ("image_url", "input_image", "image")
        )
        limit, choices = req.token_limit, req.n or 1
    elif isinstance(req, CompletionRequest):
        data, images, limit = req.prompt, 0, req.max_tokens
        choices = max(_count(call.raw.get("n")), _count(call.raw.get("best_of")))
    else:
        assert isinstance(req, EmbeddingRequest)
        data, images, limit = req.input, 0, 0
    size = len(_encoder.encode(data)) + images * IMAGE_TOKENS
    return Estimate(size, max(1, size // 4), limit, choices)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1
