"""The resource sampler and monitor against real processes on this host."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator

import msgspec
import psutil
import pytest

from sidecar.host.sampler import Monitor, ResourceSnapshot, Sampler

BURN = [sys.executable, "-c", "while True: pass"]
IDLE = [sys.executable, "-c", "import time; time.sleep(600)"]
SETTLE_S = 0.2  # between samples: a CPU share needs some time to be measured over
DEADLINE_S = 15.0


@pytest.fixture
def spawn() -> Iterator[Callable[[list[str]], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture
def sampler() -> Iterator[Sampler]:
    s = Sampler()
    yield s
    s.close()


def sample_until(
    sampler: Sampler,
    workers: list[tuple[str, int]],
    condition: Callable[[ResourceSnapshot], bool],
) -> ResourceSnapshot:
    """Sample every SETTLE_S until ``condition`` holds; fail with the last snapshot."""
    deadline = time.monotonic() + DEADLINE_S
    snap = sampler.sample(workers)
    while not condition(snap):
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {DEADLINE_S}s; last snapshot: {snap}")
        time.sleep(SETTLE_S)
        snap = sampler.sample(workers)
    return snap


def test_a_busy_worker_counts_as_the_sidecars_cpu(sampler: Sampler, spawn) -> None:
    burner = spawn(BURN)
    os.setpriority(os.PRIO_PROCESS, burner.pid, 2)
    workers = [("smollm2", burner.pid)]
    # One busy process is up to 100/cpu_count of the host; other tests may be running, so
    # ask only for a tenth of a core.
    busy = 10 / psutil.cpu_count()

    snap = sample_until(
        sampler, workers, lambda s: bool(s.workers) and s.workers[0].cpu_percent > busy
    )

    (usage,) = snap.workers
    assert (usage.name, usage.pid) == ("smollm2", burner.pid)
    assert usage.rss_bytes > 0
    assert usage.nice == 2
    assert usage.cpu_percent <= 100 / snap.cpu_count + 5
    assert snap.sidecar_cpu_percent >= usage.cpu_percent
    assert snap.cpu_count == psutil.cpu_count()


def test_a_busy_process_that_is_not_a_worker_is_the_hosts_demand(
    sampler: Sampler, spawn
) -> None:
    spawn(BURN)
    busy = 0.6 * 100 / psutil.cpu_count()

    snap = sample_until(sampler, [], lambda s: s.others_cpu_percent > busy)

    assert snap.workers == ()
    assert snap.cpu_percent >= snap.others_cpu_percent
    assert snap.sidecar_cpu_percent < busy


def test_a_worker_seen_for_the_first_time_reports_its_average_so_far(
    sampler: Sampler, spawn
) -> None:
    burner = spawn(BURN)
    # Let it run unlisted, then list it: its first reading must not be 0.
    deadline = time.monotonic() + DEADLINE_S
    while psutil.Process(burner.pid).cpu_times().user < 0.2:
        assert time.monotonic() < deadline, "the child got no CPU"
        time.sleep(0.05)

    snap = sampler.sample([("m", burner.pid)])

    assert snap.workers[0].cpu_percent > 5 / snap.cpu_count


def test_exited_and_unknown_pids_are_skipped(sampler: Sampler, spawn) -> None:
    short = spawn(IDLE)
    idle = spawn(IDLE)
    unknown = max(psutil.pids()) + 100_000  # above any pid in use, usually above pid_max
    workers = [("short", short.pid), ("idle", idle.pid), ("unknown", unknown)]

    first = sampler.sample(workers)
    assert [w.name for w in first.workers] == ["short", "idle"]

    short.kill()
    short.wait()  # reaped: the pid is gone, not a zombie
    second = sampler.sample(workers)
    assert [w.name for w in second.workers] == ["idle"]


def test_a_zombie_worker_is_skipped(sampler: Sampler, spawn) -> None:
    child = spawn([sys.executable, "-c", "pass"])
    # Not reaped: it stays a zombie until wait().
    deadline = time.monotonic() + DEADLINE_S
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "child did not exit"
        time.sleep(0.01)

    assert sampler.sample([("z", child.pid)]).workers == ()


def test_a_pid_listed_twice_counts_once(sampler: Sampler, spawn) -> None:
    idle = spawn(IDLE)
    snap = sampler.sample([("a", idle.pid), ("b", idle.pid)])
    assert [w.name for w in snap.workers] == ["a"]


def test_snapshot_fields_are_consistent_and_immutable(spawn) -> None:
    ticks = iter([100.0, 101.0])
    sampler = Sampler(nvml=False, clock=lambda: next(ticks))
    spawn(BURN)
    sampler.sample([])
    time.sleep(SETTLE_S)
    snap = sampler.sample([])

    assert snap.taken_at == 101.0
    assert snap.cpu_count >= 1
    assert 0 <= snap.memory_available_bytes <= snap.memory_total_bytes
    assert 0 <= snap.swap_used_bytes <= snap.swap_total_bytes
    assert len(snap.load_avg) == 3
    for value in (snap.cpu_percent, snap.sidecar_cpu_percent, snap.others_cpu_percent):
        assert 0 <= value <= 100
    assert snap.others_cpu_percent == max(0.0, snap.cpu_percent - snap.sidecar_cpu_percent)
    assert snap.gpus is None
    with pytest.raises(AttributeError):
        snap.cpu_percent = 1.0  # type: ignore[misc]
    # Encodes as a plain JSON object, as /readyz or /metrics would show it.
    assert msgspec.json.decode(msgspec.json.encode(snap))["cpu_count"] == snap.cpu_count


# --- GPUs ------------------------------------------------------------------------------------

class NVMLError(Exception):
    pass


def fake_pynvml(gpus: list[dict[str, object] | None], calls: list[str]) -> types.ModuleType:
    """A stand-in for the third-party ``pynvml`` module: ``None`` is a GPU whose queries fail."""
    mod = types.ModuleType("pynvml")

    def call(name: str, result: Callable[..., object]) -> Callable[..., object]:
        def f(*args: object) -> object:
            calls.append(name)
            return result(*args)
        return f

    def gpu(index: int) -> dict[str, object]:
        info = gpus[index]
        if info is None:
            raise NVMLError("GPU is lost")
        return info

    mod.NVMLError = NVMLError  # type: ignore[attr-defined]
    mod.nvmlInit = call("init", lambda: None)  # type: ignore[attr-defined]
    mod.nvmlShutdown = call("shutdown", lambda: None)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = call("count", lambda: len(gpus))  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = call("handle", lambda i: i)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = call(  # type: ignore[attr-defined]
        "name", lambda h: gpu(h)["name"])
    mod.nvmlDeviceGetMemoryInfo = call(  # type: ignore[attr-defined]
        "memory", lambda h: types.SimpleNamespace(total=gpu(h)["total"], used=gpu(h)["used"]))
    mod.nvmlDeviceGetUtilizationRates = call(  # type: ignore[attr-defined]
        "util", lambda h: types.SimpleNamespace(gpu=gpu(h)["util"], memory=0))
    return mod


def test_no_nvidia_driver_means_no_gpus_and_nvml_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    try:
        import pynvml  # type: ignore[import-untyped]
        pynvml.nvmlInit()
    except Exception:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this host has an NVIDIA driver")
    sampler = Sampler()
    assert sampler.sample([]).gpus is None

    # NVML would work now; a sampler that already found it unusable does not look again.
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], calls))
    assert sampler.sample([]).gpus is None
    assert calls == []
    sampler.close()
    assert calls == []


def test_gpus_are_read_through_nvml_and_a_failing_gpu_is_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    gpus: list[dict[str, object] | None] = [
        {"name": "NVIDIA H100", "total": 80 << 30, "used": 1 << 30, "util": 37},
        None,
        {"name": b"Tesla T4", "total": 16 << 30, "used": 0, "util": 0},
    ]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(gpus, calls))
    sampler = Sampler()

    snap = sampler.sample([])
    assert snap.gpus is not None
    assert [(g.index, g.name) for g in snap.gpus] == [(0, "NVIDIA H100"), (2, "Tesla T4")]
    h100 = snap.gpus[0]
    assert (h100.memory_total_bytes, h100.memory_used_bytes) == (80 << 30, 1 << 30)
    assert h100.utilization_percent == 37.0
    sampler.sample([])
    assert calls.count("init") == 1

    sampler.close()
    sampler.close()
    assert calls.count("shutdown") == 1
    assert sampler.sample([]).gpus is None


def test_nvml_off_never_imports_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], calls))
    sampler = Sampler(nvml=False)
    assert sampler.sample([]).gpus is None
    sampler.close()
    assert calls == []


def test_nvml_with_no_gpu_gives_an_empty_tuple(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], []))
    sampler = Sampler()
    assert sampler.sample([]).gpus == ()
    sampler.close()


# --- Monitor ---------------------------------------------------------------------------------

class Recorder:
    """on_sample that records snapshots and the thread it ran on; raises when told to."""

    def __init__(self, fail_first: int = 0) -> None:
        self.snapshots: list[ResourceSnapshot] = []
        self.threads: set[int] = set()
        self.fail_first = fail_first
        self.event = asyncio.Event()
        self.want = 0

    def __call__(self, snap: ResourceSnapshot) -> None:
        self.snapshots.append(snap)
        self.threads.add(threading.get_ident())
        if len(self.snapshots) >= self.want:
            self.event.set()
        if len(self.snapshots) <= self.fail_first:
            raise RuntimeError("on_sample failed")

    async def wait_for(self, n: int) -> None:
        self.want = n
        async with asyncio.timeout(DEADLINE_S):
            while len(self.snapshots) < n:
                self.event.clear()
                await self.event.wait()


async def test_monitor_samples_in_the_background_and_calls_back_on_the_loop(spawn) -> None:
    idle = spawn(IDLE)
    recorder = Recorder()
    worker_threads: set[int] = set()

    def workers() -> list[tuple[str, int]]:
        worker_threads.add(threading.get_ident())
        return [("m", idle.pid)]

    monitor = Monitor(Sampler(nvml=False), 0.05, workers, recorder)
    with pytest.raises(RuntimeError):
        _ = monitor.latest

    await monitor.start()
    first = monitor.latest
    assert first.workers[0].pid == idle.pid
    assert recorder.snapshots == [first]

    await recorder.wait_for(4)
    loop_thread = {threading.get_ident()}
    assert recorder.threads == loop_thread
    assert worker_threads == loop_thread
    assert monitor.latest is recorder.snapshots[-1]
    times = [s.taken_at for s in recorder.snapshots]
    assert times == sorted(times)

    await monitor.aclose()
    seen = len(recorder.snapshots)
    # Stopped: another two intervals pass without a sample.
    await asyncio.sleep(0.1)
    assert len(recorder.snapshots) == seen
    assert monitor.latest is recorder.snapshots[-1]
    await monitor.aclose()


async def test_an_on_sample_that_raises_does_not_stop_sampling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder(fail_first=3)
    monitor = Monitor(Sampler(nvml=False), 0.05, list, recorder)
    await monitor.start()
    await recorder.wait_for(5)
    await monitor.aclose()
    assert any(r.name == "sidecar.host.sampler" and r.exc_info for r in caplog.records)


async def test_a_failing_sample_keeps_the_previous_snapshot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    calls = 0

    def workers() -> list[tuple[str, int]]:
        nonlocal calls
        calls += 1
        if calls in (2, 3):
            raise RuntimeError("pool state unreadable")
        return []

    monitor = Monitor(Sampler(nvml=False), 0.05, workers, recorder)
    await monitor.start()
    first = monitor.latest
    await recorder.wait_for(2)
    await monitor.aclose()
    assert calls >= 4
    assert recorder.snapshots[0] is first
    failures = [r for r in caplog.records if r.name == "sidecar.host.sampler" and r.exc_info]
    assert len(failures) == 1  # a repeated fault is logged once, until it clears


class SlowSampler(Sampler):
    """A sampler whose every sample takes ``delay_s`` (a slow /proc, a slow NVML call)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(nvml=False)
        self.delay_s = delay_s

    def sample(self, workers):  # type: ignore[no-untyped-def]
        time.sleep(self.delay_s)
        return super().sample(workers)


async def test_samples_are_interval_apart_however_long_a_sample_takes() -> None:
    recorder = Recorder()
    monitor = Monitor(SlowSampler(0.03), 0.05, list, recorder)
    await monitor.start()
    await recorder.wait_for(11)
    await monitor.aclose()
    times = [s.taken_at for s in recorder.snapshots]
    # Ten intervals of 0.05 s; sleeping interval_s after each sample would give 0.8 s.
    assert 0.45 <= times[10] - times[0] < 0.78
