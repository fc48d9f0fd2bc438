"""Unit tests of :mod:`sidecar.money.accountant`: the request estimate, the token cap, which
budgets apply, free targets, unknown prices, exhausted budgets, views, settle/release and
the inbound/outbound rate limits, with in-memory stores and fake clocks."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from sidecar.config import Config, parse_config
from sidecar.errors import (
    BudgetExhausted,
    BudgetRejected,
    LedgerDown,
    RateLimited,
    RetryAfterHeld,
    TargetLimited,
    Unavailable,
    UpstreamError,
)
from sidecar.limits import LimiterUnavailable, MemoryRateLimiter, Rate
from sidecar.money import (
    Accountant,
    BudgetKey,
    Estimate,
    LedgerUnavailable,
    MemoryBudgetStore,
    Reserved,
    Shortfall,
    Ticket,
    Totals,
    estimate,
)
from sidecar.money.accountant import DEFAULT_MAX_TOKENS, MIN_COMPLETION_TOKENS
from sidecar.money.estimates import IMAGE_TOKENS
from sidecar.money.pricing import FREE, Price, cost
from sidecar.routing.routes import Route, Target
from sidecar.types import (
    Call,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Meter,
    Op,
    PromptTokensDetails,
    Usage,
)

NOW = datetime.datetime(2026, 3, 10, 12, 0, 0, tzinfo=datetime.UTC).timestamp()
DAY = "2026-03-10"
MIDNIGHT = datetime.datetime(2026, 3, 11, tzinfo=datetime.UTC).timestamp()

PAID = Target("p1", "m1")
# 1 µ$ per prompt token, 10 µ$ per completion token.
PRICES = {"p1/m1": {"input": 1.0, "output": 10.0}, "p2/m2": {"input": 1.0, "output": 10.0}}


def config(**sections: Any) -> Config:
    data: dict[str, Any] = {
        "providers": [
            {"name": "p1", "type": "openai", "base_url": "http://127.0.0.1:1/v1"},
            {"name": "p2", "type": "openai", "base_url": "http://127.0.0.1:1/v1"},
            {"name": "ollama", "type": "openai", "base_url": "http://127.0.0.1:1/v1",
             "free": True},
        ],
        "prices": PRICES,
        **sections,
    }
    return parse_config(data, env={})


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def accountant(cfg: Config, store: Any = None, limiter: Any = None,
               clock: Clock | None = None) -> Accountant:
    clock = clock or Clock(NOW)
    if store is None and cfg.budgets:
        store = MemoryBudgetStore(clock)
    return Accountant(cfg, store, limiter or MemoryRateLimiter(Clock(1000.0)), clock=clock)


def chat(content: Any = "hi", **fields: Any) -> Call:
    raw = {"model": "chat", "messages": [{"role": "user", "content": content}], **fields}
    return Call(Op.CHAT, msgspec.convert(raw, ChatRequest), raw)


def completion(prompt: Any = "hello", **fields: Any) -> Call:
    raw = {"model": "c", "prompt": prompt, **fields}
    return Call(Op.COMPLETIONS, msgspec.convert(raw, CompletionRequest), raw)


def budget(name: str = "b", limit_usd: float = 100.0, **kw: Any) -> dict[str, Any]:
    return {"name": name, "limit_usd": limit_usd, **kw}


async def totals(acc: Accountant, *keys: BudgetKey) -> dict[BudgetKey, Totals]:
    store = acc._store
    assert store is not None
    return await store.totals(list(keys))


ROUTE = Route("chat", "priority", (PAID,), 0)


# --- estimate -------------------------------------------------------------------------------


def test_estimate_of_a_chat_is_the_json_bytes_of_its_messages() -> None:
    call = chat("hello world")
    size = len(msgspec.json.encode([call.raw["messages"], None]))
    est = estimate(call)
    assert est == Estimate(size, size // 4, None)
    # A token is at least one byte: the bound is never below the text's length.
    assert est.prompt_max >= len("hello world")


def test_estimate_counts_tools_and_images() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    plain = estimate(chat("x"))
    with_tools = estimate(chat("x", tools=tools))
    assert with_tools.prompt_max - plain.prompt_max == len(msgspec.json.encode(tools)) - 4
    parts = [{"type": "text", "text": "what is this"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,BBBB"}}]
    call = chat(parts)
    size = len(msgspec.json.encode([call.raw["messages"], None]))
    assert estimate(call).prompt_max == size + 2 * IMAGE_TOKENS


def test_estimate_token_limit_prefers_max_completion_tokens() -> None:
    assert estimate(chat(max_tokens=7)).max_tokens == 7
    assert estimate(chat(max_tokens=7, max_completion_tokens=9)).max_tokens == 9


def test_estimate_of_completions_and_embeddings() -> None:
    est = estimate(completion("hello", max_tokens=5))
    assert est == Estimate(len(b'"hello"'), 1, 5)
    assert estimate(completion("")).prompt_guess == 1  # never zero
    raw = {"model": "e", "input": ["a", "bb"]}
    emb = Call(Op.EMBEDDINGS, msgspec.convert(raw, EmbeddingRequest), raw)
    assert estimate(emb) == Estimate(len(b'["a","bb"]'), 2, 0)


# --- reserve: the token cap -----------------------------------------------------------------


async def test_client_limit_reserves_the_exact_worst_case() -> None:
    acc = accountant(config(budgets=[budget()]))
    call = chat(max_tokens=50)
    est = estimate(call)
    ticket = await acc.reserve(call, PAID, None, est)
    assert ticket.cap is None
    assert ticket.amount == est.prompt_max * 1 + 50 * 10
    assert ticket.price == Price.usd(1.0, 10.0)
    t = await totals(acc, BudgetKey("b", "*", DAY))
    assert t[BudgetKey("b", "*", DAY)] == Totals(0, ticket.amount)


async def test_without_a_client_limit_a_rich_budget_caps_at_the_default() -> None:
    acc = accountant(config(budgets=[budget()]))
    call = chat()
    est = estimate(call)
    ticket = await acc.reserve(call, PAID, None, est)
    assert ticket.cap == DEFAULT_MAX_TOKENS
    assert ticket.amount == est.prompt_max + DEFAULT_MAX_TOKENS * 10


@pytest.mark.parametrize("limit_micro", [2_000, 1_234, 777, 500])
async def test_without_a_client_limit_the_cap_is_what_the_budget_can_pay(
    limit_micro: int,
) -> None:
    acc = accountant(config(budgets=[budget(limit_usd=limit_micro / 1e6)]))
    call = chat()
    est = estimate(call)
    ticket = await acc.reserve(call, PAID, None, est)
    assert ticket.amount == limit_micro  # the whole room
    assert ticket.cap == (limit_micro - est.prompt_max) // 10
    assert MIN_COMPLETION_TOKENS <= ticket.cap < DEFAULT_MAX_TOKENS
    # The worst case of the capped call fits in what was reserved.
    assert cost(ticket.price, est.prompt_max, ticket.cap) <= ticket.amount


async def test_cap_with_a_price_that_does_not_divide_evenly() -> None:
    cfg = config(budgets=[budget(limit_usd=0.001)],
                 prices={"p1/m1": {"input": 0.15, "output": 0.6}})
    acc = accountant(cfg)
    call = chat()
    est = estimate(call)
    ticket = await acc.reserve(call, PAID, None, est)
    assert ticket.cap is not None and ticket.cap < DEFAULT_MAX_TOKENS
    assert cost(ticket.price, est.prompt_max, ticket.cap) <= ticket.amount <= 1000
    # One more token would not be paid for.
    prompt = cost(ticket.price, est.prompt_max, 0)
    assert prompt + cost(ticket.price, 0, ticket.cap + 1) > ticket.amount


async def test_too_little_room_for_the_minimum_completion_is_exhausted() -> None:
    call = chat()
    est = estimate(call)
    just_enough = est.prompt_max + MIN_COMPLETION_TOKENS * 10
    ok = accountant(config(budgets=[budget(limit_usd=just_enough / 1e6)]))
    assert (await ok.reserve(call, PAID, None, est)).cap == MIN_COMPLETION_TOKENS
    short = accountant(config(budgets=[budget(limit_usd=(just_enough - 1) / 1e6)]))
    with pytest.raises(BudgetExhausted):
        await short.reserve(call, PAID, None, est)


async def test_a_client_limit_that_does_not_fit_is_exhausted_not_shrunk() -> None:
    call = chat(max_tokens=100)
    est = estimate(call)
    acc = accountant(config(budgets=[budget(limit_usd=(est.prompt_max + 999) / 1e6)]))
    with pytest.raises(BudgetExhausted):
        await acc.reserve(call, PAID, None, est)
    assert (await totals(acc, BudgetKey("b", "*", DAY)))[BudgetKey("b", "*", DAY)] == Totals()


async def test_reservations_add_up_until_the_limit() -> None:
    call = chat(max_tokens=10)
    est = estimate(call)
    each = est.prompt_max + 100
    acc = accountant(config(budgets=[budget(limit_usd=(3 * each + each // 2) / 1e6)]))
    for _ in range(3):
        await acc.reserve(call, PAID, None, est)
    with pytest.raises(BudgetExhausted):
        await acc.reserve(call, PAID, None, est)


# --- which budgets apply ------------------------------------------------------------------


SCOPED = [
    budget("g"),
    budget("each-key", scope="key"),
    budget("alice-only", scope="key", key="alice"),
    budget("each-provider", scope="provider"),
    budget("p1-only", scope="provider", provider="p1"),
]
KEYS = [{"name": "alice", "key": "sk-a"}, {"name": "bob", "key": "sk-b"}]


async def test_budgets_apply_by_scope() -> None:
    acc = accountant(config(budgets=SCOPED, keys=KEYS))
    call = chat(max_tokens=1)
    est = estimate(call)
    a = await acc.reserve(call, PAID, "alice", est)
    b = await acc.reserve(call, Target("p2", "m2"), "bob", est)
    assert a.amount == b.amount > 0

    def k(name: str, subject: str) -> BudgetKey:
        return BudgetKey(name, subject, DAY)

    expected = {
        k("g", "*"): 2 * a.amount,
        k("each-key", "alice"): a.amount,
        k("each-key", "bob"): b.amount,
        k("alice-only", "alice"): a.amount,
        k("alice-only", "bob"): 0,
        k("each-provider", "p1"): a.amount,
        k("each-provider", "p2"): b.amount,
        k("p1-only", "p1"): a.amount,
        k("p1-only", "p2"): 0,
    }
    got = await totals(acc, *expected)
    assert {key: t.reserved for key, t in got.items()} == expected


async def test_the_tightest_budget_decides() -> None:
    cfg = config(keys=KEYS, budgets=[budget("g", 100.0),
                                     budget("alice-small", 0.0002, scope="key", key="alice")])
    acc = accountant(cfg)
    call = chat()
    est = estimate(call)
    ticket = await acc.reserve(call, PAID, "alice", est)
    assert ticket.amount == 200  # alice's budget, not the global one
    assert (await acc.reserve(call, PAID, "bob", est)).cap == DEFAULT_MAX_TOKENS
    with pytest.raises(BudgetExhausted) as e:
        await acc.reserve(call, PAID, "alice", est)
    assert "alice-small" in e.value.message and "key 'alice'" in e.value.message


async def test_without_identity_per_key_budgets_do_not_apply() -> None:
    acc = accountant(config(keys=KEYS, budgets=[budget("each-key", 0.0, scope="key")]))
    ticket = await acc.reserve(chat(), PAID, None, estimate(chat()))
    assert ticket.rid is None and ticket.price == Price.usd(1.0, 10.0)


# --- free targets and unknown prices --------------------------------------------------------


class ExplodingStore:
    """A ledger that must never be touched."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the ledger was used: {name}")


@pytest.mark.parametrize("target", [Target("local", "smollm2"), Target("ollama", "llama3")])
async def test_free_targets_never_reserve(target: Target) -> None:
    acc = accountant(config(budgets=[budget(limit_usd=0.0)]), store=ExplodingStore())
    call = chat()
    ticket = await acc.reserve(call, target, None, estimate(call))
    assert ticket == Ticket(target, FREE)
    assert await acc.settle(ticket, estimate(call), Usage(10, 10, 20), None) == 0
    await acc.release(ticket)


async def test_unknown_price_under_a_budget_is_skipped_like_an_exhausted_one() -> None:
    acc = accountant(config(budgets=[budget(on_exhausted="reject")]), store=ExplodingStore())
    call = chat()
    with pytest.raises(BudgetExhausted) as e:
        await acc.reserve(call, Target("p1", "mystery-model"), None, estimate(call))
    assert "p1/mystery-model" in e.value.message and "[prices]" in e.value.message
    assert e.value.status == 429 and isinstance(e.value, UpstreamError)


async def test_unknown_price_without_an_applicable_budget_goes_through() -> None:
    acc = accountant(config(budgets=[budget("p2-only", 0.0, scope="provider", provider="p2")]),
                     store=ExplodingStore())
    call = chat()
    ticket = await acc.reserve(call, Target("p1", "mystery-model"), None, estimate(call))
    assert ticket.rid is None
    no_budgets = accountant(config())
    assert (await no_budgets.reserve(call, Target("p1", "mystery"), None,
                                     estimate(call))).rid is None


async def test_list_prices_apply_without_config() -> None:
    acc = accountant(config(budgets=[budget()], prices={}))
    call = chat(max_tokens=100)
    est = estimate(call)
    ticket = await acc.reserve(call, Target("p1", "gpt-4o-mini"), None, est)
    assert ticket.price == Price.usd(0.15, 0.60, 0.075)
    assert ticket.amount == cost(ticket.price, est.prompt_max, 0) + cost(ticket.price, 0, 100)


# --- exhausted: reject vs local -------------------------------------------------------------


async def test_exhausted_local_budget_lets_free_targets_serve() -> None:
    acc = accountant(config(budgets=[budget("daily", 0.0, on_exhausted="local")]))
    with pytest.raises(BudgetExhausted) as e:
        await acc.reserve(chat(), PAID, None, estimate(chat()))
    err = e.value
    assert err.retryable and not err.counts_against_health
    assert err.target == "p1/m1" and err.status == 429
    assert err.retry_after_s == pytest.approx(MIDNIGHT - NOW)
    assert "Budget 'daily' is exhausted" in err.message
    assert "resets at 2026-03-11T00:00:00Z" in err.message
    assert "only free and local targets can serve" in err.message


async def test_exhausted_reject_budget_is_a_429_with_the_reset_time() -> None:
    acc = accountant(config(budgets=[budget("monthly", 0.0, window="month",
                                            on_exhausted="reject")]))
    with pytest.raises(BudgetRejected) as e:
        await acc.reserve(chat(), PAID, None, estimate(chat()))
    err = e.value
    assert isinstance(err, RateLimited) and err.status == 429
    assert err.type == "insufficient_quota" and err.code == "budget_exhausted"
    reset = datetime.datetime(2026, 4, 1, tzinfo=datetime.UTC).timestamp()
    assert err.retry_after_s == pytest.approx(reset - NOW)
    assert "resets at 2026-04-01T00:00:00Z" in err.message


async def test_a_total_budget_does_not_reset() -> None:
    acc = accountant(config(budgets=[budget("forever", 0.0, window="total",
                                            on_exhausted="reject")]))
    with pytest.raises(BudgetRejected) as e:
        await acc.reserve(chat(), PAID, None, estimate(chat()))
    assert e.value.retry_after_s is None and "does not reset" in e.value.message


async def test_the_window_rolls_over_at_utc_midnight() -> None:
    clock = Clock(MIDNIGHT - 1)
    acc = accountant(config(budgets=[budget("daily", 0.001)]), clock=clock)
    call = chat()
    est = estimate(call)
    ticket = await acc.reserve(call, PAID, None, est)
    await acc.settle(ticket, est, None, None)
    with pytest.raises(BudgetExhausted):
        await acc.reserve(call, PAID, None, est)
    clock.t = MIDNIGHT + 1
    assert (await acc.reserve(call, PAID, None, est)).amount == 1000


# --- settle / release -----------------------------------------------------------------------


async def test_settle_records_the_usage_cost_and_frees_the_rest() -> None:
    acc = accountant(config(budgets=[budget()]))
    call = chat(max_tokens=100)
    est = estimate(call)
    key = BudgetKey("b", "*", DAY)
    ticket = await acc.reserve(call, PAID, None, est)
    spent = await acc.settle(ticket, est, Usage(20, 30, 50), None)
    assert spent == 20 * 1 + 30 * 10
    assert (await totals(acc, key))[key] == Totals(320, 0)


async def test_settle_prices_cached_tokens() -> None:
    cfg = config(budgets=[budget()],
                 prices={"p1/m1": {"input": 1.0, "output": 10.0, "cached_input": 0.5}})
    acc = accountant(cfg)
    call = chat(max_tokens=10)
    est = estimate(call)
    ticket = await acc.reserve(call, PAID, None, est)
    usage = Usage(100, 5, 105, PromptTokensDetails(cached_tokens=60))
    assert await acc.settle(ticket, est, usage, None) == 40 * 1 + 30 + 50


async def test_settle_without_usage_uses_the_meter_or_the_reservation() -> None:
    acc = accountant(config(budgets=[budget()]))
    call = chat(max_tokens=100)
    est = estimate(call)
    # A stream whose provider reported no usage: prompt bound + what was relayed.
    meter = Meter()
    meter.content_chunks, meter.content_chars = 7, 40
    ticket = await acc.reserve(call, PAID, None, est)
    assert await acc.settle(ticket, est, None, meter) == est.prompt_max + 10 * 10
    # The meter's own usage, when the provider sent one.
    meter.usage = Usage(3, 4, 7)
    ticket = await acc.reserve(call, PAID, None, est)
    assert await acc.settle(ticket, est, None, meter) == 3 + 40
    # Nothing measured: the whole reservation is spent.
    ticket = await acc.reserve(call, PAID, None, est)
    assert await acc.settle(ticket, est, None, None) == ticket.amount


async def test_settle_above_the_reservation_is_still_spent() -> None:
    acc = accountant(config(budgets=[budget()]))
    call = chat(max_tokens=1)
    est = estimate(call)
    key = BudgetKey("b", "*", DAY)
    ticket = await acc.reserve(call, PAID, None, est)
    await acc.settle(ticket, est, Usage(10_000, 1_000, 11_000), None)
    assert (await totals(acc, key))[key].spent == 20_000


async def test_release_frees_the_whole_reservation() -> None:
    acc = accountant(config(budgets=[budget()]))
    call = chat(max_tokens=10)
    est = estimate(call)
    key = BudgetKey("b", "*", DAY)
    ticket = await acc.reserve(call, PAID, None, est)
    await acc.release(ticket)
    await acc.release(ticket)  # twice is harmless
    await acc.release(None)
    assert (await totals(acc, key))[key] == Totals(0, 0)


# --- views ----------------------------------------------------------------------------------


async def test_views_show_every_budget_window() -> None:
    acc = accountant(config(budgets=SCOPED, keys=KEYS))
    call = chat(max_tokens=10)
    est = estimate(call)
    ticket = await acc.reserve(call, PAID, "alice", est)
    await acc.settle(ticket, est, Usage(100, 10, 110), None)  # 200 µ$
    held = await acc.reserve(call, PAID, "alice", est)
    views = {(v.name, v.subject): v for v in await acc.views(None, auth=False)}
    assert set(views) == {
        ("g", "*"), ("each-key", "alice"), ("each-key", "bob"), ("alice-only", "alice"),
        ("each-provider", "p1"), ("each-provider", "p2"), ("p1-only", "p1"),
    }
    g = views[("g", "*")]
    assert (g.scope, g.window, g.limit_usd, g.spent_usd) == ("global", DAY, "100.000000",
                                                              "0.000200")
    assert g.reserved_usd == f"0.{held.amount:06d}"
    assert g.remaining_usd == f"{(100_000_000 - 200 - held.amount) / 1e6:.6f}"
    assert g.on_exhausted == "local" and g.resets_at == "2026-03-11T00:00:00Z"
    assert views[("each-key", "bob")].spent_usd == "0.000000"
    assert views[("each-provider", "p2")].spent_usd == "0.000000"


async def test_views_with_auth_show_only_the_callers_key_budgets() -> None:
    acc = accountant(config(budgets=SCOPED, keys=KEYS))
    bob = {(v.name, v.subject) for v in await acc.views("bob", auth=True)}
    assert ("each-key", "bob") in bob and ("g", "*") in bob
    assert not any(s == "alice" for _, s in bob)
    alice = {(v.name, v.subject) for v in await acc.views("alice", auth=True)}
    assert {("each-key", "alice"), ("alice-only", "alice")} <= alice


async def test_views_of_a_total_budget_and_of_none() -> None:
    acc = accountant(config(budgets=[budget("t", 1.5, window="total")]))
    (v,) = await acc.views(None, auth=False)
    assert (v.window, v.resets_at, v.remaining_usd) == ("total", None, "1.500000")
    assert await accountant(config()).views(None, auth=False) == []


# --- the ledger is unavailable --------------------------------------------------------------


class DownStore:
    async def reserve(self, rid: str, limits: Sequence[tuple[BudgetKey, int]], want_max: int,
                      want_min: int, ttl_s: float) -> Reserved | Shortfall:
        raise LedgerUnavailable("disk on fire")

    async def settle(self, rid: str, actual: int) -> None:
        raise LedgerUnavailable("disk on fire")

    async def release(self, rid: str) -> None:
        raise LedgerUnavailable("disk on fire")

    async def totals(self, keys: Sequence[BudgetKey]) -> dict[BudgetKey, Totals]:
        raise LedgerUnavailable("disk on fire")

    async def aclose(self) -> None:
        pass


async def test_ledger_down_fails_closed_by_default() -> None:
    acc = accountant(config(budgets=[budget()]), store=DownStore())
    with pytest.raises(LedgerDown) as e:
        await acc.reserve(chat(), PAID, None, estimate(chat()))
    # The paid target is skipped (free ones may still serve); 503 if none is left.
    err = e.value
    assert err.status == 503 and err.retryable and not err.counts_against_health
    assert err.target == "p1/m1" and "disk on fire" in err.message
    with pytest.raises(Unavailable):
        await acc.views(None, auth=False)
    # Free targets do not need the ledger.
    assert (await acc.reserve(chat(), Target("local", "x"), None, estimate(chat()))).rid is None


async def test_ledger_down_after_the_call_fails_closed_on_settle() -> None:
    store = MemoryBudgetStore(Clock(NOW))
    acc = accountant(config(budgets=[budget()]), store=store)
    ticket = await acc.reserve(chat(), PAID, None, estimate(chat()))
    acc._store = DownStore()
    with pytest.raises(Unavailable):
        await acc.settle(ticket, estimate(chat()), Usage(1, 1, 2), None)
    await acc.release(ticket)  # a failed release is only logged


async def test_ledger_down_open_lets_calls_through_unrecorded() -> None:
    cfg = config(budgets=[budget()], state={"budgets_on_unavailable": "open"})
    acc = accountant(cfg, store=DownStore())
    ticket = await acc.reserve(chat(), PAID, None, estimate(chat()))
    assert ticket.rid is None and ticket.price == Price.usd(1.0, 10.0)
    store = MemoryBudgetStore(Clock(NOW))
    acc2 = accountant(cfg, store=store)
    ticket = await acc2.reserve(chat(), PAID, None, estimate(chat()))
    acc2._store = DownStore()
    assert await acc2.settle(ticket, estimate(chat()), Usage(1, 1, 2), None) == 11


# --- inbound and outbound rate limits -------------------------------------------------------


async def test_key_rpm_admits_a_burst_of_a_tenth_then_waits() -> None:
    mono = Clock(1000.0)
    cfg = config(keys=[{"name": "alice", "key": "sk-a", "rpm": 60}])
    acc = accountant(cfg, limiter=MemoryRateLimiter(mono))
    est = estimate(chat())
    for _ in range(6):  # rpm / 10
        await acc.admit("alice", ROUTE, est)
    with pytest.raises(RateLimited) as e:
        await acc.admit("alice", ROUTE, est)
    assert e.value.retry_after_s == pytest.approx(1.0)
    assert "key 'alice'" in e.value.message and "requests per minute" in e.value.message
    mono.t += 1.0
    await acc.admit("alice", ROUTE, est)
    # Other identities (and none) are not limited by alice's key.
    for _ in range(20):
        await acc.admit("bob", ROUTE, est)
        await acc.admit(None, ROUTE, est)


async def test_route_rpm_is_shared_by_every_key() -> None:
    mono = Clock(1000.0)
    cfg = config(keys=KEYS, routes=[{"model": "chat", "rpm": 20,
                                     "targets": [{"provider": "p1", "model": "m1"}]}])
    acc = accountant(cfg, limiter=MemoryRateLimiter(mono))
    est = estimate(chat())
    await acc.admit("alice", ROUTE, est)
    await acc.admit("bob", ROUTE, est)  # burst 2
    with pytest.raises(RateLimited) as e:
        await acc.admit(None, ROUTE, est)
    assert "route 'chat'" in e.value.message
    assert e.value.retry_after_s == pytest.approx(3.0)
    other = Route("other", "priority", (PAID,), 0)
    await acc.admit("alice", other, est)


async def test_key_tpm_counts_the_prompt_then_the_usage() -> None:
    mono = Clock(1000.0)
    cfg = config(keys=[{"name": "alice", "key": "sk-a", "tpm": 600}])  # 10/s, burst 60
    acc = accountant(cfg, limiter=MemoryRateLimiter(mono))
    call = chat()
    est = estimate(call)
    await acc.admit("alice", ROUTE, est)
    await acc.used("alice", ROUTE, PAID, est, Usage(20, 80, 100))
    with pytest.raises(RateLimited) as e:
        await acc.admit("alice", ROUTE, est)
    assert "tokens per minute" in e.value.message
    # 100 tokens used + this prompt's guess, at 10 tokens/s, beyond a 6 s burst.
    assert e.value.retry_after_s == pytest.approx((100 + est.prompt_guess) / 10 - 6)


async def test_provider_rpm_makes_its_targets_skip() -> None:
    mono = Clock(1000.0)
    cfg = config(providers=[
        {"name": "p1", "type": "openai", "base_url": "http://127.0.0.1:1/v1", "rpm": 6},
    ], prices={"p1/m1": {"input": 1.0, "output": 1.0}})
    acc = accountant(cfg, limiter=MemoryRateLimiter(mono))
    est = estimate(chat())
    await acc.outbound(PAID, est)
    with pytest.raises(TargetLimited) as e:
        await acc.outbound(Target("p1", "other-model"), est)  # the limit is per provider
    assert e.value.retry_after_s == pytest.approx(10.0)
    assert e.value.retryable and not e.value.counts_against_health


async def test_what_the_provider_said_blocks_only_that_model() -> None:
    acc = accountant(config())
    est = estimate(chat())
    acc.provider_limited(PAID, 30.0)
    acc.provider_limited(PAID, 1.0)  # a shorter block never shortens a longer one
    with pytest.raises(TargetLimited) as e:
        await acc.outbound(PAID, est)
    assert 29.0 < (e.value.retry_after_s or 0) <= 30.0
    await acc.outbound(Target("p1", "other-model"), est)


async def test_a_retry_after_holds_only_that_model_until_then() -> None:
    mono = Clock(1000.0)
    acc = accountant(config(), limiter=MemoryRateLimiter(mono))
    await acc.check_retry_after(PAID)  # nothing said yet
    await acc.retry_after(PAID, 5.0)
    await acc.retry_after(PAID, 1.0)  # a shorter hold never shortens a longer one
    await acc.retry_after(PAID, None)  # no Retry-After: nothing changes
    mono.t += 1.0
    with pytest.raises(RetryAfterHeld) as e:
        await acc.check_retry_after(PAID)
    err = e.value
    assert err.message == "p1/m1 is rate limited by the provider for 4.0 more seconds"
    assert err.retry_after_s == 4.0 and err.target == "p1/m1"
    assert err.route_reason == "upstream_429" and not err.counts_against_health
    await acc.check_retry_after(Target("p1", "other-model"))
    # A Retry-After hold is not what x-ratelimit-* said: outbound still lets it go.
    await acc.outbound(PAID, estimate(chat()))
    mono.t += 4.0 - 0.001  # within the timer slack: a caller that slept for it goes
    await acc.check_retry_after(PAID)


async def test_what_the_provider_said_is_held_in_the_shared_limiter() -> None:
    # Two gateways sharing one limiter (as a fleet shares Redis): what one was told, the
    # other obeys.
    mono = Clock(1000.0)
    limiter = MemoryRateLimiter(mono)
    told, other = accountant(config(), limiter=limiter), accountant(config(), limiter=limiter)
    await told.retry_after(PAID, 30.0)
    told.provider_limited(Target("p1", "m2"), 10.0)
    await told.outbound(PAID, estimate(chat()))  # waits for its own hold to be recorded
    with pytest.raises(RetryAfterHeld):
        await other.check_retry_after(PAID)
    with pytest.raises(TargetLimited) as e:
        await other.outbound(Target("p1", "m2"), estimate(chat()))
    assert e.value.message == "p1/m2: the provider asked to wait 10.0 s"
    assert e.value.route_reason == "rate_limit" and e.value.retry_after_s == 10.0
    mono.t += 30.0
    await other.check_retry_after(PAID)
    await other.outbound(Target("p1", "m2"), estimate(chat()))


class DownLimiter:
    def may_have(self, key: str) -> bool:
        return True

    async def acquire(self, key: str, rate: Rate, cost: float = 1.0) -> float:
        raise LimiterUnavailable("redis gone")

    async def charge(self, key: str, rate: Rate, cost: float) -> None:
        raise LimiterUnavailable("redis gone")

    async def block(self, key: str, rate: Rate, until_s: float) -> None:
        raise LimiterUnavailable("redis gone")

    async def aclose(self) -> None:
        pass


async def test_limiter_down_admits_by_default_and_refuses_when_closed() -> None:
    keys = [{"name": "alice", "key": "sk-a", "rpm": 1, "tpm": 10}]
    est = estimate(chat())
    open_acc = accountant(config(keys=keys), limiter=DownLimiter())
    await open_acc.admit("alice", ROUTE, est)
    await open_acc.used("alice", ROUTE, PAID, est, Usage(1, 100, 101))
    closed = accountant(config(keys=keys, state={"limits_on_unavailable": "closed"}),
                        limiter=DownLimiter())
    with pytest.raises(Unavailable) as e:
        await closed.admit("alice", ROUTE, est)
    assert e.value.status == 503 and "redis gone" in e.value.message
    # Holds fail open whatever limits_on_unavailable says: the provider says it again.
    await closed.retry_after(PAID, 5.0)
    closed.provider_limited(PAID, 5.0)
    await closed.check_retry_after(PAID)
    await closed.outbound(PAID, est)
