"""Paid traffic with known costs for money tests: prices, a budget config, concurrent clients."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai

from tests.support.fake_provider import FakeProvider, Ok, ok

# 100 µ$ per prompt token and 1000 µ$ per completion token: small usages, visible costs.
EXPENSIVE = "{ input = 100.0, output = 1000.0 }"
# The fake answers every paid call with 4 prompt + 2 completion tokens: 2400 µ$.
PAID_COST = 4 * 100 + 2 * 1000


def paid_ok(delay_s: float = 0.0) -> Ok:
    return ok(delay_s=delay_s, prompt_tokens=4, completion_tokens=2)



# Worth 10.5 paid calls of PAID_COST: ten fit, the eleventh cannot.
TINY_LIMIT_USD = 10.5 * PAID_COST / 1e6


def budget_config(fake: FakeProvider, tmp: Path, on_exhausted: str, targets: str,
                  extra: str = "") -> str:
    return f"""
        [server]
        request_timeout_s = 90

        [routing]
        retries = 0
        circuit_failures = 1000

        [[providers]]
        name = "pp"
        type = "openai"
        base_url = "{fake.openai_base_url}"

        [[providers]]
        name = "pc"
        type = "anthropic"
        base_url = "{fake.anthropic_base_url}"

        [[routes]]
        model = "money"
        targets = [{targets}]

        [prices]
        "pp/paid" = {EXPENSIVE}
        "pc/claude-paid" = {EXPENSIVE}

        [[budgets]]
        name = "tiny"
        limit_usd = {TINY_LIMIT_USD}
        window = "day"
        on_exhausted = "{on_exhausted}"

        [state]
        path = "{tmp / 'ledger.sqlite3'}"
        {extra}
    """


async def burst(base_url: str, n: int, **fields: Any) -> list[Any]:
    """``n`` concurrent clients, one completion each (a short prompt: cheap for the local
    model). Returns raw responses, or the APIStatusError of the failures."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0,
                                  timeout=90) as client:
        async def one() -> Any:
            try:
                return await client.completions.with_raw_response.create(
                    model="money", prompt="hi", max_tokens=2, **fields)
            except openai.APIStatusError as e:
                return e

        return await asyncio.gather(*(one() for _ in range(n)))
