"""What the sidecar adds on top of an upstream that is never the bottleneck.

nginx serves canned OpenAI answers (a chat completion, and a stream of 20
``chat.completion.chunk`` frames plus ``[DONE]``) from memory. The same ``wrk`` load is run
straight at nginx ("direct") and through ``sidecar serve`` ("sidecar"); the difference is
the gateway's cost. The sidecar is pinned to core 0; nginx (one worker) and wrk share
core 1, so the sidecar has a core to itself and the upstream is never what it waits for.

    python benchmarks/overhead.py [--duration 10] [--concurrency 1,8,64]
                                  [--modes nonstream,stream] [--warmup 2]
                                  [--baseline DIR] [--rounds 1]

``--baseline DIR`` also runs a sidecar from another source tree (a checkout of an earlier
commit, e.g. made with ``git worktree add DIR REV``) under the same load in the same run,
alternating which of the two goes first, and adds its figures and the ratios. With
``--rounds N`` each cell is measured N times and the medians are reported.

Needs ``nginx``, ``wrk`` and ``taskset`` (``scripts/bench-deps.sh`` installs them) and two
cores. Traffic goes only to 127.0.0.1. Prints a Markdown table on stdout, progress on
stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from harness import SIDECAR_READY, choices, exit_on_sigterm, free_port, int_list, log, stop

SIDECAR_CORE = "0"
LOAD_CORE = "1"  # nginx and wrk
STREAM_CHUNKS = 20
CHAT_PATH = "/v1/chat/completions"
STREAM_PREFIX = "/stream"
MODES = ("nonstream", "stream")


@dataclass(frozen=True)
class Mode:
    name: str
    route: str  # the sidecar route, which selects the nginx location behind it
    stream: bool

    @property
    def body(self) -> str:
        body: dict[str, Any] = {
            "model": self.route,
            "messages": [{"role": "user", "content": "hi"}],
        }
        if self.stream:
            body["stream"] = True
        return json.dumps(body, separators=(",", ":"))

    @property
    def upstream_path(self) -> str:
        return (STREAM_PREFIX if self.stream else "") + CHAT_PATH


MODE_BY_NAME = {
    "nonstream": Mode("nonstream", "bench", stream=False),
    "stream": Mode("stream", "bench-stream", stream=True),
}


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: str | None  # wrk's "Socket errors: ..." text when any count is non-zero

    @property
    def errors(self) -> str | None:
        parts = []
        if self.non_2xx:
            parts.append(f"{self.non_2xx} non-2xx")
        if self.socket_errors:
            parts.append(f"socket errors: {self.socket_errors}")
        return ", ".join(parts) or None


@dataclass(frozen=True)
class Row:
    mode: str
    concurrency: int
    direct: WrkResult
    sidecar: WrkResult
    baseline: WrkResult | None = None


def median_result(results: Sequence[WrkResult]) -> WrkResult:
    """Per-figure medians of several runs of one cell (errors summed)."""
    def mid(values: list[float]) -> float:
        return statistics.median(values)
    errors = [r.socket_errors for r in results if r.socket_errors]
    return WrkResult(
        requests_per_s=mid([r.requests_per_s for r in results]),
        p50_ms=mid([r.p50_ms for r in results]),
        p99_ms=mid([r.p99_ms for r in results]),
        non_2xx=sum(r.non_2xx for r in results),
        socket_errors="; ".join(errors) or None,
    )


# --- canned upstream answers -------------------------------------------------------------

def _compact(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def canned_completion() -> str:
    return _compact({
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Hello from the canned upstream."},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 1, "completion_tokens": 8, "total_tokens": 9},
    })


def canned_stream() -> str:
    """20 chunk frames, the last with ``finish_reason: "stop"``, then ``[DONE]``."""
    frames = []
    for i in range(STREAM_CHUNKS):
        last = i == STREAM_CHUNKS - 1
        delta: dict[str, str] = {} if last else {"content": f"tok{i} "}
        if i == 0:
            delta["role"] = "assistant"
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "bench",
            "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if last else None}],
        }
        frames.append(f"data: {_compact(chunk)}\n\n")
    frames.append("data: [DONE]\n\n")
    return "".join(frames)


def nginx_string(text: str) -> str:
    """``text`` as a single-quoted nginx string (nginx turns ``\\n`` back into a newline)."""
    if any(c in text for c in "'\\$"):
        raise ValueError("canned bodies must not contain quotes, backslashes or '$'")
    return "'" + text.replace("\n", "\\n") + "'"


def nginx_config(workdir: Path, port: int) -> str:
    temp_paths = "\n".join(
        f"    {kind}_temp_path {workdir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
daemon off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "nginx-error.log"} warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
{temp_paths}
    keepalive_requests 10000000;
    keepalive_timeout 300s;

    server {{
        listen 127.0.0.1:{port} backlog=4096;

        location = {CHAT_PATH} {{
            default_type application/json;
            return 200 {nginx_string(canned_completion())};
        }}

        location = {STREAM_PREFIX}{CHAT_PATH} {{
            default_type text/event-stream;
            return 200 {nginx_string(canned_stream())};
        }}

        location / {{
            return 404;
        }}
    }}
}}
"""


def sidecar_config(sidecar_port: int, nginx_port: int) -> str:
    upstream = f"http://127.0.0.1:{nginx_port}"
    return f"""\
[server]
host = "127.0.0.1"
port = {sidecar_port}
grpc_port = 0
shutdown_grace_s = 1

[[providers]]
name = "upstream"
type = "openai"
base_url = "{upstream}/v1"

[[providers]]
name = "upstream-stream"
type = "openai"
base_url = "{upstream}{STREAM_PREFIX}/v1"

[[routes]]
model = "bench"
targets = [{{ provider = "upstream", model = "bench" }}]

[[routes]]
model = "bench-stream"
targets = [{{ provider = "upstream-stream", model = "bench" }}]
"""


def wrk_script(mode: Mode) -> str:
    return f"""\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{mode.body}]]
"""


# --- processes ---------------------------------------------------------------------------

def wait_for_port(port: int, proc: subprocess.Popen[Any], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:g}s")


def wait_for_line(
    proc: subprocess.Popen[bytes], pattern: re.Pattern[str], timeout_s: float
) -> re.Match[str]:
    """Read ``proc``'s stdout until a line matches ``pattern``; the rest is drained in a
    thread so a full pipe can never block the process."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    pending = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            data = os.read(fd, 65536)
            if not data:
                raise RuntimeError(f"the sidecar exited with status {proc.wait()} while starting")
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                if match := pattern.search(line.decode(errors="replace")):
                    threading.Thread(target=_drain, args=(fd,), daemon=True).start()
                    return match
    raise RuntimeError(f"the sidecar printed no ready line within {timeout_s:g}s")


def _drain(fd: int) -> None:
    with contextlib.suppress(OSError):
        while os.read(fd, 65536):
            pass


@contextlib.contextmanager
def running_nginx(workdir: Path) -> Iterator[int]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(workdir, port))
    error_log = workdir / "nginx-error.log"
    proc = subprocess.Popen(
        ["taskset", "-c", LOAD_CORE, nginx, "-p", str(workdir), "-c", str(conf),
         "-e", str(error_log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        try:
            wait_for_port(port, proc, "nginx", timeout_s=10)
        except RuntimeError:
            log(error_log.read_text() if error_log.exists() else "(no nginx error log)")
            raise
        yield port
    finally:
        stop(proc)


@contextlib.contextmanager
def running_sidecar(
    workdir: Path, nginx_port: int, source: Path | None = None
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A sidecar on core 0 in front of nginx; ``source``: run the ``sidecar`` package of
    that source tree instead of the installed one."""
    port = free_port()
    name = "baseline" if source is not None else "sidecar"
    config = workdir / f"{name}.toml"
    config.write_text(sidecar_config(port, nginx_port))
    script = Path(sys.executable).with_name("sidecar")
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
        command = [sys.executable, "-m", "sidecar"]
    else:
        command = [str(script)] if script.exists() else [sys.executable, "-m", "sidecar"]
    stderr_path = workdir / f"{name}-stderr.log"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            ["taskset", "-c", SIDECAR_CORE, *command, "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            start_new_session=True, env=env, cwd=source,
        )
    try:
        try:
            match = wait_for_line(proc, SIDECAR_READY, timeout_s=30)
        except RuntimeError:
            log(stderr_path.read_text())
            raise
        yield int(match.group(2)), proc
    finally:
        stop(proc)


# --- correctness -------------------------------------------------------------------------

def check_sidecar(sidecar_port: int, modes: Sequence[Mode]) -> None:
    """One request per mode through the sidecar: 200, and 20 chunks plus [DONE] for streams."""
    url = f"http://127.0.0.1:{sidecar_port}{CHAT_PATH}"
    headers = {"content-type": "application/json"}
    with httpx.Client(timeout=10) as client:
        for mode in modes:
            if not mode.stream:
                resp = client.post(url, content=mode.body, headers=headers)
                if resp.status_code != 200 or not resp.json().get("choices"):
                    raise RuntimeError(f"{mode.name}: HTTP {resp.status_code}: {resp.text}")
                continue
            with client.stream("POST", url, content=mode.body, headers=headers) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise RuntimeError(f"{mode.name}: HTTP {resp.status_code}: {resp.text}")
                data = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
            chunks = [json.loads(d) for d in data[:-1]]
            if (
                len(chunks) != STREAM_CHUNKS
                or data[-1:] != ["[DONE]"]
                or any(c.get("object") != "chat.completion.chunk" for c in chunks)
                or chunks[-1]["choices"][0].get("finish_reason") != "stop"
            ):
                raise RuntimeError(
                    f"{mode.name}: expected {STREAM_CHUNKS} chunks and [DONE], got {data!r}"
                )
        log(f"check: {', '.join(m.name for m in modes)} through the sidecar OK")


# --- wrk ---------------------------------------------------------------------------------

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_LATENCY = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors:\s+(.*)")


def parse_wrk(output: str) -> WrkResult:
    latencies = {pct: float(value) * _UNIT_MS[unit]
                 for pct, value, unit in _LATENCY.findall(output)}
    rps = _RPS.search(output)
    if rps is None or set(latencies) != {"50", "99"}:
        raise RuntimeError(f"cannot parse wrk's output:\n{output}")
    non_2xx = _NON_2XX.search(output)
    socket_errors = _SOCKET_ERRORS.search(output)
    return WrkResult(
        requests_per_s=float(rps.group(1)),
        p50_ms=latencies["50"],
        p99_ms=latencies["99"],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors.group(1).strip() if socket_errors else None,
    )


def run_wrk(url: str, script: Path, connections: int, duration_s: int) -> WrkResult:
    command = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}",
               f"-d{duration_s}s", "--latency", "-s", str(script), url]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          timeout=duration_s + 60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return parse_wrk(done.stdout)


# --- report ------------------------------------------------------------------------------

def markdown_table(rows: Sequence[Row]) -> str:
    header = ["mode", "concurrency", "direct req/s", "direct p50 ms", "direct p99 ms",
              "sidecar req/s", "sidecar p50 ms", "sidecar p99 ms", "added p50 ms"]
    compared = any(r.baseline is not None for r in rows)
    if compared:
        header += ["baseline req/s", "baseline p50 ms", "baseline p99 ms",
                   "req/s ratio", "p50 ratio"]
    with_errors = any(r.direct.errors or r.sidecar.errors
                      or (r.baseline is not None and r.baseline.errors) for r in rows)
    if with_errors:
        header.append("errors")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r.mode, str(r.concurrency),
            f"{r.direct.requests_per_s:,.0f}", f"{r.direct.p50_ms:.3f}", f"{r.direct.p99_ms:.3f}",
            f"{r.sidecar.requests_per_s:,.0f}", f"{r.sidecar.p50_ms:.3f}",
            f"{r.sidecar.p99_ms:.3f}", f"{r.sidecar.p50_ms - r.direct.p50_ms:.3f}",
        ]
        if compared:
            b = r.baseline
            cells += ["-"] * 5 if b is None else [
                f"{b.requests_per_s:,.0f}", f"{b.p50_ms:.3f}", f"{b.p99_ms:.3f}",
                f"{r.sidecar.requests_per_s / b.requests_per_s:.3f}",
                f"{r.sidecar.p50_ms / b.p50_ms:.3f}",
            ]
        if with_errors:
            sides = [("direct", r.direct), ("sidecar", r.sidecar)]
            if r.baseline is not None:
                sides.append(("baseline", r.baseline))
            errors = [f"{side}: {res.errors}" for side, res in sides if res.errors]
            cells.append("; ".join(errors) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------

def _mode_list(text: str) -> list[Mode]:
    return [MODE_BY_NAME[n] for n in choices(text, MODES, fixed_order=False)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=int, default=10, help="seconds per cell (default 10)")
    p.add_argument("--concurrency", type=int_list, default=[1, 8, 64],
                   help="wrk connections, comma separated (default 1,8,64)")
    p.add_argument("--modes", type=_mode_list, default=list(MODE_BY_NAME.values()),
                   help="nonstream, stream or both, comma separated (default both)")
    p.add_argument("--warmup", type=int, default=2,
                   help="seconds of load through the sidecar before each mode (default 2, 0: none)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="also run the sidecar of this source tree, side by side (ratios)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measurements per cell; medians are reported (default 1)")
    args = p.parse_args(argv)
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--duration and --rounds must be >= 1 and --warmup >= 0")
    if args.baseline is not None and not (args.baseline / "sidecar" / "__init__.py").exists():
        p.error(f"--baseline {args.baseline}: no sidecar package there")
    return args


def check_tools() -> None:
    missing = [t for t in ("wrk", "taskset") if shutil.which(t) is None]
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        missing.append("nginx")
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run scripts/bench-deps.sh (as root)")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two cores (the sidecar on core 0, nginx and wrk on core 1)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    modes: list[Mode] = args.modes
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp, \
            contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        nginx_port = stack.enter_context(running_nginx(workdir))
        sidecar_port, sidecar = stack.enter_context(running_sidecar(workdir, nginx_port))
        sides = {"sidecar": (sidecar_port, sidecar)}
        if args.baseline is not None:
            sides["baseline"] = stack.enter_context(
                running_sidecar(workdir, nginx_port, args.baseline.resolve()))
        log(f"nginx on 127.0.0.1:{nginx_port} (core {LOAD_CORE}), "
            + ", ".join(f"{n} on 127.0.0.1:{port}" for n, (port, _) in sides.items())
            + f" (core {SIDECAR_CORE})")
        for port, _ in sides.values():
            check_sidecar(port, modes)
        urls = {n: f"http://127.0.0.1:{port}{CHAT_PATH}" for n, (port, _) in sides.items()}
        for mode in modes:
            script = workdir / f"{mode.name}.lua"
            script.write_text(wrk_script(mode))
            direct_url = f"http://127.0.0.1:{nginx_port}{mode.upstream_path}"
            if args.warmup:
                log(f"{mode.name}: warming up for {args.warmup}s")
                for url in urls.values():
                    run_wrk(url, script, max(args.concurrency), args.warmup)
            for connections in args.concurrency:
                got: dict[str, list[WrkResult]] = {"direct": [], **{n: [] for n in sides}}
                for i in range(args.rounds):
                    # Alternate who goes first, so a drifting machine favours neither.
                    order = list(sides) if i % 2 == 0 else list(reversed(sides))
                    log(f"{mode.name} c={connections} round {i + 1}/{args.rounds}: direct, "
                        f"then {', '.join(order)}, {args.duration}s each")
                    got["direct"].append(run_wrk(direct_url, script, connections,
                                                 args.duration))
                    for name in order:
                        got[name].append(run_wrk(urls[name], script, connections,
                                                 args.duration))
                for name, (_, proc) in sides.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"the {name} exited with status {proc.returncode}")
                rows.append(Row(mode.name, connections, median_result(got["direct"]),
                                median_result(got["sidecar"]),
                                median_result(got["baseline"]) if "baseline" in got else None))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
