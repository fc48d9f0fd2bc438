"""The sidecar's main process's CPU per streamed token of a local model, against its worker's.

    .venv/bin/python benchmarks/local_stream_cpu.py [--seconds 8] [--rounds 2]

One sidecar (``local.py``'s config of the default model, with ``[resources] threads = 0,
nice = 0`` as ``local_paired.py`` runs it), one client streaming ``local.py``'s requests one
after another (c=1, 64 tokens), the plain and grammar workloads alternated. For each: the
main process's user + system CPU over the load divided by the tokens and the answers
streamed, and the worker's. The main process's CPU with no load comes first, so what the
stream costs can be told from what idling does. Traffic goes only to 127.0.0.1. A table on
stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from cpu_meter import tree_cpu_s  # noqa: E402
from harness import log  # noqa: E402
from local import model_path, request_body, running_server, unyielding_config  # noqa: E402


def cpu_s(main: int) -> tuple[float, float]:
    """CPU seconds of the sidecar's main process ``main`` and of its model worker."""
    names: dict[int, str] = {}
    by_pid = tree_cpu_s([main], names)
    worker = sum(t for pid, t in by_pid.items() if names.get(pid) == "local_models.worker")
    return by_pid[main], worker


def load(base_url: str, workload: str, seconds: float) -> tuple[int, int]:
    """Stream requests one after another for ``seconds``; (answers, completion tokens)."""
    answers = tokens = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(timeout=60, limits=limits) as client:
        while time.monotonic() < deadline:
            url = base_url + "/v1/chat/completions"
            with client.stream("POST", url, json=request_body(workload, 64)) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if line.startswith("data:") and '"usage"' in line:
                        usage = json.loads(line[5:]).get("usage")
                        tokens += usage["completion_tokens"] if usage else 0
            answers += 1
    return answers, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds of load per row")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = unyielding_config(work, "sidecar")
        with running_server("sidecar", model_path(), work, 2, None, config) as server:
            main = server.proc.pid
            load(server.base_url, "plain", 2.0)  # warm-up
            (before, _), t0 = cpu_s(main), time.monotonic()
            time.sleep(args.seconds)
            idle = (cpu_s(main)[0] - before) / (time.monotonic() - t0)
            log(f"idle: main process {idle * 100:.2f}% of a core")
            for r in range(args.rounds):
                for workload in ("plain", "grammar"):
                    (m0, w0), t0 = cpu_s(main), time.monotonic()
                    answers, tokens = load(server.base_url, workload, args.seconds)
                    m1, w1 = cpu_s(main)
                    main_s, worker_s = m1 - m0, w1 - w0
                    elapsed = time.monotonic() - t0
                    rows.append((r + 1, workload, answers, tokens, tokens / elapsed,
                                 main_s / tokens * 1e6, main_s / answers * 1e3,
                                 main_s / elapsed * 100, worker_s / tokens * 1e3))
                    log(f"round {r + 1} {workload}: {tokens} tokens, main process "
                        f"{rows[-1][5]:.0f} µs/token")
    print(f"c=1, 64-token answers, {args.seconds:g} s per row; main process idle: "
          f"{idle * 100:.2f}% of a core\n")
    print("| round | workload | answers | tokens | tok/s | main CPU µs/token "
          "| main CPU ms/answer | main CPU % of a core | worker CPU ms/token |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r, workload, answers, tokens, tps, per_token, per_answer, share, worker_ms in rows:
        print(f"| {r} | {workload} | {answers} | {tokens} | {tps:.1f} | {per_token:.0f} "
              f"| {per_answer:.1f} | {share:.1f}% | {worker_ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
