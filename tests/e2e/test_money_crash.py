"""SIGKILL under load loses no billed call: a real ``sidecar serve`` with a SQLite ledger
and a budget, 24 concurrent clients against a fake provider that answers in 0.3 s, killed
three times mid-load and restarted on the same ledger each time.

A call counts as billed once the provider has received it (a provider bills the work it
started even when its client hung up). Every billed call must be in the ledger: settled at
its exact cost (the fake's usage is fixed, so that is :data:`COST`), or, when the sidecar
died first, charged at its reservation by the next start (which says so on stderr).
"""

from __future__ import annotations

import re
import signal
import threading
from decimal import Decimal
from pathlib import Path

import httpx

from tests.support.fake_provider import FakeProvider, ok
from tests.support.process import SidecarProcess

CLIENTS = 24
CRASHES = 3
COST = 4 * 100 + 2 * 1000  # 4 prompt + 2 completion tokens at the prices below, in µ$
RECOVERED = re.compile(r"charged (\d+) reservations? of a previous run at their reserved "
                       r"amount \((\d+\.\d{6}) USD\)")


def config(fake: FakeProvider, ledger: Path) -> str:
    return f"""
        [server]
        request_timeout_s = 30

        [routing]
        retries = 0
        circuit_failures = 100000

        [[providers]]
        name = "pd"
        type = "openai"
        base_url = "{fake.openai_base_url}"

        [prices]
        "pd/paid" = {{ input = 100.0, output = 1000.0 }}

        [[budgets]]
        name = "forever"
        limit_usd = 100000.0
        window = "total"

        [state]
        path = "{ledger}"
    """


def micro(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def forever(url: str) -> dict[str, str]:
    r = httpx.get(f"{url}/v1/sidecar/budgets", timeout=10)
    assert r.status_code == 200, r.text
    (view,) = [v for v in r.json()["data"] if v["name"] == "forever"]
    return dict(view)


def recovered(sidecar: SidecarProcess) -> tuple[int, int]:
    """Reservations (and µ$) the start charged for a killed predecessor's calls."""
    found = [RECOVERED.search(line) for line in sidecar.output]
    hits = [m for m in found if m is not None]
    assert len(hits) <= 1, hits
    return (int(hits[0][1]), micro(hits[0][2])) if hits else (0, 0)


def hammer(sidecar: SidecarProcess, answered: list[int]) -> None:
    """Chat until the sidecar is gone; counts the answers it got."""
    body = {"model": "pd/paid", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2}
    with httpx.Client(base_url=sidecar.base_url, timeout=20) as client:
        while True:
            try:
                r = client.post("/chat/completions", json=body)
            except httpx.HTTPError:
                return
            assert r.status_code == 200, r.text
            assert r.headers["x-sidecar-cost-usd"] == "0.002400"
            answered.append(1)


def test_three_sigkills_under_load_leave_no_billed_call_unrecorded(
    fp: FakeProvider, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    text = config(fp, ledger)
    fp.set_default("paid", ok(delay_s=0.3, prompt_tokens=4, completion_tokens=2))
    charged_calls = charged_usd = 0
    answered: list[int] = []
    for _ in range(CRASHES):
        sidecar = SidecarProcess(text, tmp_path)
        try:
            calls, usd = recovered(sidecar)
            charged_calls, charged_usd = charged_calls + calls, charged_usd + usd
            assert forever(sidecar.url)["reserved_usd"] == "0.000000"
            before = fp.stats()["requests"]
            threads = [threading.Thread(target=hammer, args=(sidecar, answered))
                       for _ in range(CLIENTS)]
            for t in threads:
                t.start()
            fp.wait_until(lambda s, n=before: s["requests"] >= n + 5 * CLIENTS
                          and s["in_flight"] >= CLIENTS // 2, timeout=30)
        finally:
            sidecar.stop(signal.SIGKILL)
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)

    last = SidecarProcess(text, tmp_path)
    try:
        calls, usd = recovered(last)
        charged_calls, charged_usd = charged_calls + calls, charged_usd + usd
        view = forever(last.url)
    finally:
        last.stop()
    stats = fp.stats()
    billed, completed = stats["requests"], stats["completed"]
    spent = micro(view["spent_usd"])
    settled, rest = divmod(spent - charged_usd, COST)
    assert rest == 0, (spent, charged_usd)
    recorded = settled + charged_calls
    unrecorded = max(0, billed - recorded)
    print(f"\nmoney crash: {billed} billed calls ({completed} answered, {len(answered)} "
          f"reached a client) over {CRASHES} SIGKILLs: {settled} settled at their cost, "
          f"{charged_calls} charged at their reservation, {unrecorded} unrecorded")
    assert view["reserved_usd"] == "0.000000"
    assert len(answered) <= settled <= completed
    assert unrecorded == 0
    # Charged are the calls in flight at a kill: at most every client's one call, per kill.
    assert charged_calls <= CRASHES * CLIENTS
