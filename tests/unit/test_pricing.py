"""Unit tests of :mod:`sidecar.money.pricing`: integer micro-dollar costs, the price table."""

from __future__ import annotations

import pytest

from sidecar.money.pricing import FREE, LIST_PRICES, MILLION, Price, PriceTable, cost, format_usd

# --- Price and cost ---------------------------------------------------------------------------


def test_price_from_usd_per_million_tokens() -> None:
    p = Price.usd(0.15, 0.60, 0.075)
    assert p == Price(150_000, 600_000, 75_000)
    assert Price.usd(2.5, 10.0).cached_input is None
    # Float noise never leaks into the integer price.
    assert Price.usd(0.1 + 0.2, 0.0).input == 300_000


def test_cost_is_exact_in_micro_dollars() -> None:
    # 1000 prompt tokens at $2/M + 500 completion tokens at $10/M = $0.002 + $0.005.
    assert cost(Price.usd(2.0, 10.0), 1000, 500) == 7000
    assert cost(Price.usd(2.0, 10.0), 1_000_000, 0) == 2 * MILLION


def test_cost_rounds_up_to_the_next_micro_dollar() -> None:
    p = Price.usd(0.15, 0.60)
    # 7 x 0.15 + 3 x 0.60 = 2.85 µ$ -> 3 µ$: never less than what can be billed.
    assert cost(p, 7, 3) == 3
    assert cost(p, 1, 0) == 1  # 0.15 µ$
    assert cost(p, 0, 0) == 0
    # Exactly representable sums are not rounded up further.
    assert cost(Price(1_000_000, 0), 5, 0) == 5


def test_cached_tokens_are_priced_at_the_cached_price() -> None:
    p = Price.usd(1.0, 4.0, cached_input=0.25)
    # 1000 prompt tokens of which 800 cached: 200 x 1 + 800 x 0.25 + 100 x 4 = 800 µ$.
    assert cost(p, 1000, 100, cached_tokens=800) == 800
    assert cost(p, 1000, 100) == 1400


def test_cached_tokens_without_a_cached_price_cost_the_input_price() -> None:
    p = Price.usd(1.0, 4.0)
    assert cost(p, 1000, 100, cached_tokens=800) == cost(p, 1000, 100) == 1400


def test_cached_tokens_are_clamped_to_the_prompt() -> None:
    p = Price.usd(1.0, 4.0, cached_input=0.0)
    assert cost(p, 100, 0, cached_tokens=5000) == 0  # at most every prompt token is cached
    assert cost(p, 100, 0, cached_tokens=-7) == 100  # a negative count counts as none


def test_free_costs_nothing() -> None:
    assert cost(FREE, 10**9, 10**9, 10**6) == 0


def test_large_usages_stay_exact() -> None:
    p = Price.usd(15.0, 75.0)
    assert cost(p, 10**9, 10**9) == 15_000 * MILLION + 75_000 * MILLION


@pytest.mark.parametrize(
    ("micro", "text"),
    [
        (0, "0.000000"),
        (1, "0.000001"),
        (150, "0.000150"),
        (1_000_000, "1.000000"),
        (12_345_678, "12.345678"),
        (-2_500, "-0.002500"),
    ],
)
def test_format_usd(micro: int, text: str) -> None:
    assert format_usd(micro) == text


# --- PriceTable -------------------------------------------------------------------------------


def test_local_and_free_providers_are_free() -> None:
    table = PriceTable({"gpt-4o": Price.usd(9, 9)}, free_providers=["ollama"])
    assert table.lookup("local", "anything") == FREE
    assert table.lookup("ollama", "gpt-4o") == FREE


def test_exact_provider_model_override_wins() -> None:
    table = PriceTable({"openai/gpt-4o": Price.usd(1, 2), "gpt-4o": Price.usd(3, 4)})
    assert table.lookup("openai", "gpt-4o") == Price.usd(1, 2)
    # Another provider serving the same model gets the model-name override.
    assert table.lookup("azure", "gpt-4o") == Price.usd(3, 4)


def test_model_name_override_beats_the_list_price() -> None:
    table = PriceTable({"gpt-4o-mini": Price.usd(1, 1)})
    assert table.lookup("openai", "gpt-4o-mini") == Price.usd(1, 1)


def test_list_prices() -> None:
    table = PriceTable()
    assert table.lookup("openai", "gpt-4o-mini") == Price.usd(0.15, 0.60, 0.075)
    assert table.lookup("claude", "claude-3-5-haiku") == LIST_PRICES["claude-3-5-haiku"]


@pytest.mark.parametrize(
    ("model", "base"),
    [
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("openai/gpt-4o-mini", "gpt-4o-mini"),  # routers name models vendor/model
        ("GPT-4O-MINI", "gpt-4o-mini"),
    ],
)
def test_snapshots_aliases_and_router_names_price_as_their_base(model: str, base: str) -> None:
    assert PriceTable().lookup("p", model) == LIST_PRICES[base]


def test_override_keys_are_case_insensitive() -> None:
    table = PriceTable({"MyProv/Model-X": Price.usd(1, 1)})
    assert table.lookup("myprov", "model-x") == Price.usd(1, 1)


def test_unknown_model_has_no_price() -> None:
    assert PriceTable().lookup("openai", "totally-unknown-model") is None
    assert PriceTable({"other": Price.usd(1, 1)}).lookup("p", "unknown") is None
