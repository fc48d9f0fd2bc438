"""End to end, rate limits: per key and per route (inbound, 429 with an accurate
Retry-After), tokens per minute, and per provider (outbound: the target at its limit is
skipped and the next one serves). The official ``openai`` SDK against a real ``sidecar
serve`` process and the scripted fake provider."""

from __future__ import annotations

import math
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.fake_provider import FakeProvider, ok, status
from tests.support.process import SidecarProcess, run_cli

CONFIG = """
[server]
request_timeout_s = 30

[routing]
retries = 0
circuit_failures = 1000

[[keys]]
name = "steady"
key = "k-steady"
rpm = 120

[[keys]]
name = "precise"
key = "k-precise"
rpm = 30

[[keys]]
name = "tokens"
key = "k-tokens"
tpm = 600

[[keys]]
name = "free1"
key = "k-free1"

[[keys]]
name = "free2"
key = "k-free2"

[[providers]]
name = "p1"
type = "openai"
base_url = "{url}"

[[providers]]
name = "lim"
type = "openai"
base_url = "{url}"
rpm = 6

[[providers]]
name = "told"
type = "openai"
base_url = "{url}"

[[routes]]
model = "chat"
targets = [{{ provider = "p1", model = "a" }}]

[[routes]]
model = "busy-route"
rpm = 120
targets = [{{ provider = "p1", model = "rl" }}]

[[routes]]
model = "tokens-route"
targets = [{{ provider = "p1", model = "tk" }}]

[[routes]]
model = "outbound"
targets = [{{ provider = "lim", model = "o1" }}, {{ provider = "p1", model = "o2" }}]

[[routes]]
model = "provider-said"
targets = [{{ provider = "told", model = "t1" }}, {{ provider = "p1", model = "t2" }}]
"""


@pytest.fixture(scope="module")
def sidecar(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(CONFIG.format(url=fake_mod.openai_base_url),
                          tmp_path_factory.mktemp("limits"))
    yield proc
    proc.stop()


def ask(c: openai.OpenAI, model: str) -> openai.APIStatusError | None:
    """One chat call: None when it was answered, else the error."""
    try:
        c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    except openai.APIStatusError as e:
        return e
    return None


@dataclass
class Load:
    admitted: int = 0
    limited: list[openai.APIStatusError] = field(default_factory=list)
    first_start: float = math.inf
    first_end: float = math.inf
    last_start: float = 0.0
    last_end: float = 0.0


def hammer(sidecar: SidecarProcess, keys: list[str], model: str, duration_s: float) -> Load:
    """One thread per key, each sending requests back to back for ``duration_s`` (bounded
    by a count too)."""
    load = Load()
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def run(key: str) -> None:
        c = sidecar.sdk(key, timeout=20)
        for _ in range(5000):
            start = time.monotonic()
            if start >= stop_at:
                return
            err = ask(c, model)
            end = time.monotonic()
            with lock:
                load.first_start = min(load.first_start, start)
                load.first_end = min(load.first_end, end)
                load.last_start = max(load.last_start, start)
                load.last_end = max(load.last_end, end)
                if err is None:
                    load.admitted += 1
                else:
                    assert err.status_code == 429, err.message
                    load.limited.append(err)

    threads = [threading.Thread(target=run, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + 30)
    return load


def check_rate(load: Load, rpm: float, fp: FakeProvider, model: str, what: str) -> None:
    rate, burst = rpm / 60.0, max(1.0, rpm / 10.0)  # accounting._requests
    longest = load.last_end - load.first_start
    shortest = max(0.0, load.last_start - load.first_end)
    assert load.limited, "the load never reached the limit"
    assert load.admitted <= rate * longest + burst + 1, (load.admitted, longest)
    assert load.admitted >= rate * shortest - 1, (load.admitted, shortest)
    # Back-to-back requests get the whole burst, then the rate (GCRA carries no loss).
    assert load.admitted >= burst + rate * shortest - 1, (load.admitted, shortest)
    # Refused requests never reached the provider.
    assert sum(1 for r in fp.requests() if r["model"] == model) == load.admitted
    for err in load.limited:
        body = err.body
        assert isinstance(body, dict)
        assert body["type"] == "rate_limit_error" and body["code"] == "rate_limit_exceeded"
        assert f"Rate limit of {what} reached (requests per minute)." == body["message"]
        # Never asked to wait longer than one request's interval.
        assert 1 <= int(err.response.headers["retry-after"]) <= math.ceil(1 / rate)


def test_key_rpm_under_load(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    load = hammer(sidecar, ["k-steady", "k-steady"], "chat", 2.5)
    check_rate(load, 120, fp, "a", "key 'steady'")
    # Another key on the same route is not limited by it.
    assert ask(sidecar.sdk("k-free1", timeout=20), "chat") is None


def test_route_rpm_is_shared_by_every_key(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    load = hammer(sidecar, ["k-free1", "k-free2"], "busy-route", 2.5)
    check_rate(load, 120, fp, "rl", "route 'busy-route'")
    # Other routes are not limited by it.
    assert ask(sidecar.sdk("k-free1", timeout=20), "chat") is None


def test_retry_after_is_accurate(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    c = sidecar.sdk("k-precise", timeout=20)  # 30 rpm: a burst of 3, then one per 2 s
    results = [ask(c, "chat") for _ in range(3)]
    assert results == [None, None, None]
    err = ask(c, "chat")
    assert err is not None and err.status_code == 429
    retry_after = int(err.response.headers["retry-after"])
    assert 1 <= retry_after <= 2
    again = ask(c, "chat")  # a refused request is not charged, but does not pass either
    assert again is not None and again.status_code == 429
    time.sleep(retry_after)
    assert ask(c, "chat") is None
    assert fp.stats()["requests"] == 4


def test_key_tpm_counts_what_the_calls_used(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    fp.set_default("tk", ok(prompt_tokens=20, completion_tokens=80))
    c = sidecar.sdk("k-tokens", timeout=20)  # 600 tpm: 10 tokens/s, a burst of 60
    assert ask(c, "tokens-route") is None  # admitted on its prompt; it used 100 tokens
    err = ask(c, "tokens-route")
    assert err is not None and err.status_code == 429
    assert "Rate limit of key 'tokens' reached (tokens per minute)." in err.message
    # 100 tokens + this prompt's guess at 10/s, less the 6 s burst: about 5 s.
    assert 4 <= int(err.response.headers["retry-after"]) <= 6
    assert fp.stats()["requests"] == 1
    # Other keys still go.
    assert ask(sidecar.sdk("k-free2", timeout=20), "tokens-route") is None


def test_provider_rpm_skips_to_the_next_target(sidecar: SidecarProcess,
                                               fp: FakeProvider) -> None:
    c = sidecar.sdk("k-free1", timeout=20)
    body: dict[str, Any] = {"model": "outbound",
                            "messages": [{"role": "user", "content": "hi"}]}
    first = c.chat.completions.with_raw_response.create(**body)
    assert first.headers["x-sidecar-target"] == "lim/o1"
    second = c.chat.completions.with_raw_response.create(**body)  # lim: 6 rpm, burst 1
    assert second.headers["x-sidecar-target"] == "p1/o2"
    assert [r["model"] for r in fp.requests()] == ["o1", "o2"]
    # Naming the limited target itself: 429 with the time its limit frees up.
    err = ask(c, "lim/o1")
    assert err is not None and err.status_code == 429
    assert 1 <= int(err.response.headers["retry-after"]) <= 10
    assert len(fp.requests()) == 2


def test_what_the_provider_says_about_its_limit_is_obeyed(sidecar: SidecarProcess,
                                                           fp: FakeProvider) -> None:
    answer = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "t1",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "last one for now"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
    }
    fp.script("t1", status(200, body=answer, headers={
        "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "30s"}))
    c = sidecar.sdk("k-free2", timeout=20)
    body: dict[str, Any] = {"model": "provider-said",
                            "messages": [{"role": "user", "content": "hi"}]}
    first = c.chat.completions.with_raw_response.create(**body)
    assert first.headers["x-sidecar-target"] == "told/t1"
    assert first.parse().choices[0].message.content == "last one for now"
    second = c.chat.completions.with_raw_response.create(**body)
    assert second.headers["x-sidecar-target"] == "p1/t2"
    assert [r["model"] for r in fp.requests()] == ["t1", "t2"]


def test_an_anonymous_key_never_shares_a_named_keys_identity(
    fp: FakeProvider, start_sidecar: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    text = f"""
        [server]
        api_keys = ["sk-anonymous-1"]

        [[keys]]
        name = "key-1"
        key = "sk-named-1"
        rpm = 6

        [[providers]]
        name = "p1"
        type = "openai"
        base_url = "{fp.openai_base_url}"
    """
    path = tmp_path / "clash.toml"
    path.write_text(textwrap.dedent(text))
    check = run_cli("check", "--config", str(path))
    if check.returncode != 0:  # refusing the clashing name is a fix too
        assert "keys[0].name" in check.stderr, check.stderr
        return
    sidecar = start_sidecar(text)
    assert ask(sidecar.sdk("sk-named-1", timeout=20), "p1/a") is None  # its burst of one
    # The anonymous key has no limit of its own; it must not be limited as 'key-1'.
    assert ask(sidecar.sdk("sk-anonymous-1", timeout=20), "p1/a") is None
