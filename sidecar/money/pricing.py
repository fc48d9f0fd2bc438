"""Prices per model and the cost of a usage, in integer micro-dollars (µ$).

A :class:`Price` is µ$ per million tokens for input, output and cached input. The table
shipped here (:data:`LIST_PRICES`, public list prices; no network fetch, ever) is looked up
by model name; ``[prices]`` in the config overrides or extends it by ``provider/model`` or
by model name; local models and providers marked ``free`` cost nothing.

:func:`cost` rounds up: a request never costs less than what the provider can bill for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import msgspec

MILLION = 1_000_000


class Price(msgspec.Struct, frozen=True):
    """µ$ per million tokens (equivalently: USD per million tokens x 10^6)."""

    input: int
    output: int
    cached_input: int | None = None
    """Cached prompt tokens; None means they cost the same as ``input``."""

    @classmethod
    def usd(cls, input: float, output: float, cached_input: float | None = None) -> Price:
        """From USD per million tokens (the way providers publish prices)."""
        return cls(_micro(input), _micro(output),
                   None if cached_input is None else _micro(cached_input))


FREE = Price(0, 0, 0)


def _micro(usd: float) -> int:
    return round(usd * MILLION)


def cost(price: Price, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
         ) -> int:
    """µ$ for a usage, rounded up. ``cached_tokens`` are part of ``prompt_tokens``."""
    cached = min(max(cached_tokens, 0), prompt_tokens)
    cached_price = price.input if price.cached_input is None else price.cached_input
    total = ((prompt_tokens - cached) * price.input + cached * cached_price
             + completion_tokens * price.output)
    return -(-total // MILLION)


def format_usd(micro: int) -> str:
    """µ$ as a decimal dollar string with six places (``0.000150``)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MILLION)
    return f"{sign}{whole}.{frac:06d}"


# Public list prices in USD per million tokens (input, output, cached input), as published
# by the providers in 2025. Override or extend them in [prices]; unknown models have no
# price (see PriceTable.lookup).
_LIST: dict[str, tuple[float, float, float | None]] = {
    # OpenAI
    "gpt-5": (1.25, 10.00, 0.125),
    "gpt-5-mini": (0.25, 2.00, 0.025),
    "gpt-5-nano": (0.05, 0.40, 0.005),
    "gpt-4.1": (2.00, 8.00, 0.50),
    "gpt-4.1-mini": (0.40, 1.60, 0.10),
    "gpt-4.1-nano": (0.10, 0.40, 0.025),
    "gpt-4o": (2.50, 10.00, 1.25),
    "gpt-4o-mini": (0.15, 0.60, 0.075),
    "gpt-4-turbo": (10.00, 30.00, None),
    "gpt-3.5-turbo": (0.50, 1.50, None),
    "o1": (15.00, 60.00, 7.50),
    "o1-mini": (1.10, 4.40, 0.55),
    "o3": (2.00, 8.00, 0.50),
    "o3-mini": (1.10, 4.40, 0.55),
    "o4-mini": (1.10, 4.40, 0.275),
    "text-embedding-3-small": (0.02, 0.0, None),
    "text-embedding-3-large": (0.13, 0.0, None),
    "text-embedding-ada-002": (0.10, 0.0, None),
    # Anthropic (cached input = cache reads)
    "claude-opus-4-5": (5.00, 25.00, 0.50),
    "claude-opus-4-1": (15.00, 75.00, 1.50),
    "claude-opus-4": (15.00, 75.00, 1.50),
    "claude-sonnet-4-5": (3.00, 15.00, 0.30),
    "claude-sonnet-4": (3.00, 15.00, 0.30),
    "claude-3-7-sonnet": (3.00, 15.00, 0.30),
    "claude-3-5-sonnet": (3.00, 15.00, 0.30),
    "claude-haiku-4-5": (1.00, 5.00, 0.10),
    "claude-3-5-haiku": (0.80, 4.00, 0.08),
    "claude-3-haiku": (0.25, 1.25, 0.03),
    "claude-3-opus": (15.00, 75.00, 1.50),
    # Google (OpenAI-compatible endpoint), prompts up to 200k tokens
    "gemini-2.5-pro": (1.25, 10.00, 0.31),
    "gemini-2.5-flash": (0.30, 2.50, 0.075),
    "gemini-2.5-flash-lite": (0.10, 0.40, 0.025),
    "gemini-2.0-flash": (0.10, 0.40, 0.025),
    # Mistral
    "mistral-large-latest": (2.00, 6.00, None),
    "mistral-medium-latest": (0.40, 2.00, None),
    "mistral-small-latest": (0.10, 0.30, None),
    # DeepSeek
    "deepseek-chat": (0.27, 1.10, 0.07),
    "deepseek-reasoner": (0.55, 2.19, 0.14),
    # Groq
    "llama-3.1-8b-instant": (0.05, 0.08, None),
    "llama-3.3-70b-versatile": (0.59, 0.79, None),
}

LIST_PRICES: Mapping[str, Price] = {k: Price.usd(*v) for k, v in _LIST.items()}

# Dated snapshots and aliases: "claude-3-5-haiku-20241022", "gpt-4o-2024-08-06",
# "claude-3-5-haiku-latest" all price as their base name.
_SUFFIX = re.compile(r"(-latest|-\d{8}|-\d{4}-\d{2}-\d{2}|-preview)$")


def _candidates(model: str) -> Iterable[str]:
    name = model.lower()
    yield name
    if "/" in name:  # routers such as OpenRouter name models "vendor/model"
        name = name.rsplit("/", 1)[1]
        yield name
    while (stripped := _SUFFIX.sub("", name)) != name:
        name = stripped
        yield name


class PriceTable:
    """Looks up the price of a ``provider/model`` target. Immutable; safe to share."""

    def __init__(self, overrides: Mapping[str, Price] | None = None,
                 free_providers: Iterable[str] = ()) -> None:
        """``overrides`` are keyed by ``provider/model`` or by model name;
        ``free_providers`` (``local`` always) cost nothing."""
        self._overrides = {k.lower(): v for k, v in (overrides or {}).items()}
        self._free = frozenset(free_providers) | {"local"}

    def lookup(self, provider: str, model: str) -> Price | None:
        """The price, or None when nothing is known about this model."""
        if provider in self._free:
            return FREE
        exact = self._overrides.get(f"{provider}/{model}".lower())
        if exact is not None:
            return exact
        for table in (self._overrides, LIST_PRICES):
            for name in _candidates(model):
                price = table.get(name)
                if price is not None:
                    return price
        return None
