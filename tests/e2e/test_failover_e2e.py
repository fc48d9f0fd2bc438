"""End to end, routing under faults: a hung target inside a short deadline, the provider
refusing the sidecar's own key, Retry-After holds, ``x-should-retry`` against the SDKs' own
retries, and what the answer says when the last target cannot express the request. A real
``sidecar serve`` talks to the scripted fake provider on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.support.fake_provider import FakeProvider, hang, status
from tests.support.process import SidecarProcess

CONFIG = """
[server]
request_timeout_s = 20

[routing]
retries = 1
backoff_base_s = 0.01
circuit_failures = 3
circuit_cooldown_s = 60

[[providers]]
name = "slow"
type = "openai"
base_url = "{url}/v1"
timeout_s = 30

[[providers]]
name = "p1"
type = "openai"
base_url = "{url}/v1"
timeout_s = 5

[[providers]]
name = "p2"
type = "openai"
base_url = "{url}/v1"
timeout_s = 5

[[providers]]
name = "claude"
type = "anthropic"
base_url = "{url}"
timeout_s = 5

[[routes]]
model = "hung-first"
targets = [{{ provider = "slow", model = "hung" }}, {{ provider = "p2", model = "healthy" }}]

[[routes]]
model = "hung-stream"
targets = [{{ provider = "slow", model = "hung-s" }}, {{ provider = "p2", model = "healthy-s" }}]

[[routes]]
model = "keyed"
targets = [{{ provider = "p1", model = "revoked" }}, {{ provider = "p2", model = "backup" }}]

[[routes]]
model = "keyed-only"
targets = [{{ provider = "p1", model = "revoked-only" }}]

[[routes]]
model = "held"
retries = 0
targets = [{{ provider = "p1", model = "held-a" }}, {{ provider = "p2", model = "held-b" }}]

[[routes]]
model = "held-only"
retries = 0
targets = [{{ provider = "p1", model = "held-only" }}]

[[routes]]
model = "terminal"
retries = 0
targets = [{{ provider = "p1", model = "terminal" }}]

[[routes]]
model = "then-claude"
retries = 0
targets = [{{ provider = "p1", model = "broken" }}, {{ provider = "claude", model = "c" }}]
"""

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def sidecar(fake_mod: FakeProvider,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(CONFIG.format(url=fake_mod.url), tmp_path_factory.mktemp("failover"))
    yield proc
    proc.stop()


def _chat(sidecar: SidecarProcess, model: str, timeout: str = "10", **body: Any
          ) -> httpx.Response:
    return httpx.post(f"{sidecar.base_url}/chat/completions",
                      headers={"x-sidecar-timeout": timeout},
                      json={"model": model, "messages": MSG, **body}, timeout=30)


def _target(sidecar: SidecarProcess, key: str) -> dict[str, Any]:
    status = httpx.get(f"{sidecar.url}/v1/sidecar/status", timeout=10).json()
    target: dict[str, Any] = status["targets"][key]
    return target


def _models(fp: FakeProvider) -> list[str]:
    return [r["model"] for r in fp.requests()]


# --- a hung target inside a deadline shorter than its timeout_s ---------------------------


def test_hung_target_fails_over_within_a_short_deadline(sidecar: SidecarProcess,
                                                        fp: FakeProvider) -> None:
    fp.set_default("hung", hang())
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _chat(sidecar, "hung-first", timeout="2"),
                                range(30)))
    assert [r.status_code for r in answers] == [200] * 30, answers[0].text
    assert {r.headers["x-sidecar-target"] for r in answers} == {"p2/healthy"}
    assert time.monotonic() - started < 30
    # Each cut attempt counted against the hung target: its circuit opened, and from then
    # on requests went straight to the healthy one.
    circuit = _target(sidecar, "slow/hung")["circuit"]
    assert circuit["state"] == "open"
    assert 3 <= _models(fp).count("hung") < 30
    reasons = {r.headers["x-sidecar-route-reason"] for r in answers}
    assert reasons == {"fallback:timeout", "fallback:circuit_open"}


def test_hung_stream_fails_over_before_its_first_frame(sidecar: SidecarProcess,
                                                       fp: FakeProvider) -> None:
    fp.set_default("hung-s", hang())
    client = sidecar.sdk("x", timeout=30, default_headers={"x-sidecar-timeout": "2"})
    for _ in range(2):
        started = time.monotonic()
        with client.chat.completions.with_streaming_response.create(
            model="hung-stream", messages=MSG, stream=True  # type: ignore[arg-type]
        ) as resp:
            assert resp.headers["x-sidecar-target"] == "p2/healthy-s"
            assert "fallback:timeout" in resp.headers["x-sidecar-route-reason"]
            text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
        assert text and time.monotonic() - started < 2
    assert _target(sidecar, "slow/hung-s")["circuit"]["consecutive_failures"] == 2


# --- the provider refuses the sidecar's own credentials -----------------------------------


@pytest.mark.parametrize("code", [401, 403])
def test_rejected_provider_key_fails_over_and_is_the_gateways_fault(
    sidecar: SidecarProcess, fp: FakeProvider, code: int
) -> None:
    fp.script("revoked", status(code))
    r = _chat(sidecar, "keyed")
    assert r.status_code == 200 and r.headers["x-sidecar-target"] == "p2/backup"
    assert r.headers["x-sidecar-route-reason"] == "fallback:upstream_auth"
    assert _models(fp) == ["revoked", "backup"]  # not retried on the refusing target

    fp.set_default("revoked-only", status(code, message="Incorrect API key provided"))
    client = sidecar.sdk("x", timeout=30)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="keyed-only", messages=MSG)  # type: ignore[arg-type]
    assert e.value.status_code == 502
    assert not isinstance(e.value, openai.AuthenticationError | openai.PermissionDeniedError)
    body: Any = e.value.body
    assert body["type"] == "upstream_error" and body["code"] != "invalid_api_key"
    assert "provider p1 rejected the sidecar's credentials" in body["message"]
    assert _target(sidecar, "p1/revoked-only")["circuit"]["consecutive_failures"] >= 1
    fp.set_default("revoked-only", None)


# --- a Retry-After hold is not an open circuit ---------------------------------------------


def test_retry_after_hold_says_rate_limited_not_circuit_open(sidecar: SidecarProcess,
                                                              fp: FakeProvider) -> None:
    fp.script("held-a", status(429, retry_after="30"))
    r = _chat(sidecar, "held")
    assert r.headers["x-sidecar-target"] == "p2/held-b"
    # Held by the Retry-After (the circuit is closed): the next request says so.
    r = _chat(sidecar, "held")
    assert r.status_code == 200 and r.headers["x-sidecar-target"] == "p2/held-b"
    assert r.headers["x-sidecar-route-reason"] == "fallback:upstream_429"
    assert _target(sidecar, "p1/held-a")["circuit"]["state"] == "closed"

    fp.script("held-only", status(429, retry_after="30"))
    assert _chat(sidecar, "held-only").status_code == 429
    r = _chat(sidecar, "held-only")
    assert r.status_code == 429, r.text
    assert 25 <= int(r.headers["retry-after"]) <= 30
    assert r.headers["x-should-retry"] == "true"
    message = r.json()["error"]["message"]
    assert "rate limited by the provider for" in message and "circuit" not in message
    assert _models(fp).count("held-only") == 1


# --- x-should-retry against the SDKs' own retries ------------------------------------------


def test_terminal_errors_are_not_retried_by_the_sdk(sidecar: SidecarProcess,
                                                    fp: FakeProvider) -> None:
    client = openai.OpenAI(base_url=sidecar.base_url, api_key="x", timeout=30)  # retries: 2
    fp.set_default("terminal", status(500))
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="terminal", messages=MSG)  # type: ignore[arg-type]
    assert _models(fp) == ["terminal"]  # once, not three times
    assert e.value.status_code == 502
    assert e.value.response.headers["x-should-retry"] == "false"

    fp.set_default("terminal", hang())
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="terminal", messages=MSG,  # type: ignore[arg-type]
                                       extra_headers={"x-sidecar-timeout": "1"})
    assert e.value.status_code == 504 and time.monotonic() - started < 2.5
    assert _models(fp).count("terminal") == 2
    fp.set_default("terminal", None)

    bad = _chat(sidecar, "terminal", temperature=9)
    assert bad.status_code == 400 and bad.headers["x-should-retry"] == "false"


def test_client_errors_say_retrying_cannot_help(sidecar: SidecarProcess) -> None:
    r = httpx.post(f"{sidecar.base_url}/chat/completions", json={"model": "nope"}, timeout=10)
    assert r.status_code == 400 and r.headers["x-should-retry"] == "false"
    r = httpx.get(f"{sidecar.url}/v2/nothing", timeout=10)
    assert r.status_code == 404 and r.headers["x-should-retry"] == "false"


# --- the last target cannot express the request --------------------------------------------


def test_a_refusal_at_the_end_keeps_the_earlier_failures(sidecar: SidecarProcess,
                                                         fp: FakeProvider) -> None:
    fp.script("broken", status(500, message="the primary broke"))
    audio = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]
    r = httpx.post(f"{sidecar.base_url}/chat/completions",
                   json={"model": "then-claude", "messages": audio}, timeout=30)
    assert r.status_code == 502, r.text
    message = r.json()["error"]["message"]
    assert "the primary broke" in message  # what the tried target did
    assert "claude/c" in message  # and why the last one was not tried
    assert _models(fp) == ["broken"]
