"""SIGTERM drains a real ``sidecar serve``: for ``drain_delay_s`` the listener stays open and
says it is going (``/readyz`` 503, new requests 503 + Retry-After), streams in flight that
can finish within ``shutdown_grace_s`` do, the ones that cannot end with a clean SSE error
event at the grace, and nothing is logged as a traceback."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.fake_provider import FakeProvider, hang, slow_drip
from tests.support.process import SidecarProcess, poll

DRAIN_DELAY_S = 1.5
GRACE_S = 3.0

CONFIG = f"""
[server]
drain_delay_s = {DRAIN_DELAY_S}
shutdown_grace_s = {GRACE_S}

[routing]
retries = 0

[[providers]]
name = "p"
type = "openai"
base_url = "{{url}}/v1"
timeout_s = 60
"""


def _chat(model: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "x"}]}


class _Stream(threading.Thread):
    """Reads one SSE answer to its end, line by line, in the background."""

    def __init__(self, sc: SidecarProcess, model: str) -> None:
        super().__init__(daemon=True)
        self.sc, self.model = sc, model
        self.lines: list[str] = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.sc.base_url + "/chat/completions",
                              json=_chat(self.model, True), timeout=30) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    self.lines.append(line)
                    if line.startswith("data: {") and '"content":"' in line:
                        self.started.set()
        except BaseException as e:
            self.error = e
        finally:
            self.started.set()

    def events(self) -> list[str]:
        return [ln.removeprefix("data: ") for ln in self.lines if ln.startswith("data: ")]


class _Plain(threading.Thread):
    def __init__(self, sc: SidecarProcess, model: str) -> None:
        super().__init__(daemon=True)
        self.sc, self.model = sc, model
        self.response: httpx.Response | None = None
        self.start()

    def run(self) -> None:
        self.response = httpx.post(self.sc.base_url + "/chat/completions",
                                   json=_chat(self.model, False), timeout=30)


def test_sigterm_drains_then_cuts_streams_cleanly(fake: FakeProvider, tmp_path: Path) -> None:
    sc = SidecarProcess(CONFIG.format(url=fake.url), tmp_path)
    try:
        fake.script("long", slow_drip(interval_s=0.2, chunks=200))  # 40 s: cut at the grace
        fake.script("short", slow_drip(interval_s=0.1, chunks=15))  # 1.5 s: finishes
        fake.script("stuck", hang())  # a non-stream call still running at the grace
        long, short = _Stream(sc, "p/long"), _Stream(sc, "p/short")
        stuck = _Plain(sc, "p/stuck")
        assert long.started.wait(10) and short.started.wait(10)
        poll(lambda: len(fake.requests()) == 3)
        sc.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # Not ready, and new requests are told to go elsewhere, while the listener is open.
        def not_ready() -> bool:
            r = httpx.get(sc.url + "/readyz", timeout=5)  # a refused connection fails here
            return r.status_code == 503
        poll(not_ready, within=5, interval=0.01)
        assert httpx.get(sc.url + "/readyz", timeout=5).json()["status"] == "draining"
        for stream in (False, True):
            r = httpx.post(sc.base_url + "/chat/completions", json=_chat("p/new", stream),
                           timeout=5)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert set(r.json()["error"]) == {"message", "type", "code", "param"}
        assert time.monotonic() - signalled < DRAIN_DELAY_S
        assert sorted(q["model"] for q in fake.requests()) == ["long", "short", "stuck"]

        # After the drain delay the listener closes.
        def refused() -> bool:
            try:
                httpx.get(sc.url + "/healthz", timeout=5)
            except (httpx.ConnectError, httpx.ReadError):  # reset: closed under a connect
                return True
            return False
        poll(refused, within=5)
        assert time.monotonic() - signalled >= DRAIN_DELAY_S - 0.1

        for t in (long, short, stuck):
            t.join(GRACE_S + 10)
            assert not t.is_alive()
        took = time.monotonic() - signalled
        assert GRACE_S - 0.2 <= took <= GRACE_S + 2, took

        # The short stream finished normally.
        assert short.error is None and short.status == 200
        assert short.events()[-1] == "[DONE]"
        # The long one was cut at the grace between frames, with one error event.
        assert long.error is None and long.status == 200, long.error
        events = long.events()
        assert len(events) > 5
        for e in events[:-1]:
            assert json.loads(e)["choices"] is not None  # every frame relayed is whole
        last = json.loads(events[-1])
        assert set(last["error"]) == {"message", "type", "code", "param"}
        assert "shut down" in last["error"]["message"]
        # The non-stream call was answered 503, not dropped.
        assert stuck.response is not None and stuck.response.status_code == 503
        assert "shut down" in stuck.response.json()["error"]["message"]

        assert sc.proc.wait(10) == 0
    finally:
        sc.stop()
    output = "".join(sc.output)
    assert "Traceback" not in output and "Cancel" not in output, output


def test_a_second_signal_cuts_at_once(fake: FakeProvider, tmp_path: Path) -> None:
    sc = SidecarProcess(CONFIG.format(url=fake.url).replace(
        f"shutdown_grace_s = {GRACE_S}", "shutdown_grace_s = 60").replace(
        f"drain_delay_s = {DRAIN_DELAY_S}", "drain_delay_s = 30"), tmp_path)
    try:
        fake.script("long", slow_drip(interval_s=0.2, chunks=200))
        long = _Stream(sc, "p/long")
        assert long.started.wait(10)
        sc.proc.send_signal(signal.SIGTERM)
        poll(lambda: httpx.get(sc.url + "/readyz", timeout=5).status_code == 503)
        sc.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert sc.proc.wait(10) == 0
        assert time.monotonic() - signalled < 5
        long.join(10)
        assert long.error is None
        assert "shut down" in json.loads(long.events()[-1])["error"]["message"]
    finally:
        sc.stop()
    assert "Traceback" not in "".join(sc.output)
