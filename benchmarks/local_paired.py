"""The sidecar against llama-server in alternated rounds, for ratios that rise above the noise.

``benchmarks/local.py`` runs one server after another: on a shared 2-core machine one run's
ratios move by a few percent from run to run, as much as the differences left between the
servers. This script starts every server at once (an idle one uses no CPU) and then, for
each workload and concurrency, measures each server in turn, ``--rounds`` times, the order
rotated each round, so that a slow spell of the machine lands on every server alike (the
sidecars do not yield the CPU to the other servers, as they would to the host's app: see
``local.unyielding_config``). Each
round gives a pair of measures taken minutes apart at most; the table gives each pair's
ratio and their median, min and max.

    python benchmarks/local_paired.py [--servers llama-server,sidecar,sidecar-on]
                                      [--workloads plain] [--levels 1,8] [--rounds 5]

Measures, servers and their settings are ``local.py``'s (``--servers``: llama-server, and the
sidecar as ``sidecar``, its default ``prefix_cache = "exact"``, or ``sidecar-on``,
``prefix_cache = true``). Only 127.0.0.1 is used. Prints Markdown tables on stdout, progress
on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from harness import choices, exit_on_sigterm, int_list, log
from local import (
    WORKLOADS,
    Level,
    Plan,
    Server,
    add_quiet_flags,
    cpu_count,
    find_llama_server,
    fmt_ms,
    kind_of,
    load_avg,
    measure_level,
    model_path,
    running_server,
    unyielding_config,
    warm_up,
)

SERVERS = ("llama-server", "sidecar", "sidecar-on")
BASELINE = "llama-server"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--servers", type=lambda text: choices(text, SERVERS),
                   default=["llama-server", "sidecar"],
                   help=f"comma separated subset of {','.join(SERVERS)}, llama-server "
                        "included (default llama-server,sidecar)")
    p.add_argument("--workloads", type=lambda text: choices(text, WORKLOADS), default=["plain"],
                   help=f"comma separated subset of {','.join(WORKLOADS)} (default plain)")
    p.add_argument("--levels", type=int_list, default=[1, 8],
                   help="concurrency levels, comma separated (default 1,8)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per level (default 5)")
    p.add_argument("--requests-scale", type=float, default=1.0,
                   help="multiplies the requests per level: 8 at c=1, 4*c above (default 1)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    p.add_argument("--threads", type=int, default=cpu_count(),
                   help="llama.cpp threads for every server (default: the cores we may use)")
    add_quiet_flags(p, before="each measure", wait_s=600)
    args = p.parse_args(argv)
    if BASELINE not in args.servers or len(args.servers) < 2:
        p.error(f"--servers needs {BASELINE} and at least one sidecar")
    if args.rounds < 1 or args.requests_scale <= 0 or args.max_tokens < 1:
        p.error("--rounds must be >= 1, --requests-scale > 0 and --max-tokens >= 1")
    return args


def spread(values: Sequence[float]) -> str:
    """``median (min-max)`` of ratios."""
    if not values:
        return "-"
    return f"**{statistics.median(values):.2f}** ({min(values):.2f}-{max(values):.2f})"


def markdown(runs: dict[tuple[str, str, int], list[Level]], servers: Sequence[str]) -> str:
    """Per server and level the medians over rounds; per sidecar and level each round's
    ratio to llama-server and their median."""
    out = ["| server | workload | concurrency | rounds | median agg tok/s | "
           "median p50 TTFT ms | median decode tok/s per stream | median tokens per answer |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for (server, workload, c), levels in runs.items():
        ttfts = [t for lv in levels if (t := lv.ttft_ms(50)) is not None]
        decodes = [d for lv in levels if (d := lv.decode_tok_s) is not None]
        out.append(
            f"| {server} | {workload} | {c} | {len(levels)} | "
            f"{statistics.median(lv.tokens_per_s for lv in levels):.1f} | "
            f"{fmt_ms(statistics.median(ttfts)) if ttfts else '-'} | "
            f"{statistics.median(decodes) if decodes else 0:.1f} | "
            f"{statistics.median(_per_answer(lv) for lv in levels):.1f} |")
    out += ["", f"| sidecar | workload | concurrency | tok/s / {BASELINE}, each round | "
                "median (min-max) | answers/s, median (min-max) | p50 TTFT / " + BASELINE
                + ", each round | median (min-max) |",
            "|---|---|---|---|---|---|---|---|"]
    for (server, workload, c), levels in runs.items():
        if server == BASELINE:
            continue
        base = runs[(BASELINE, workload, c)]
        tok = round_ratios(levels, base, lambda lv: lv.tokens_per_s)
        answers = round_ratios(levels, base, _answers_per_s)
        ttft = round_ratios(levels, base, lambda lv: lv.ttft_ms(50))
        out.append(f"| {server} | {workload} | {c} | {' '.join(f'{r:.2f}' for r in tok)} | "
                   f"{spread(tok)} | {spread(answers)} | {' '.join(f'{r:.2f}' for r in ttft)} | "
                   f"{spread(ttft)} |")
    errors = sum(len(lv.errors) for levels in runs.values() for lv in levels)
    out += ["", f"Servers in each round's order: {', '.join(servers)}, rotated by one each "
                f"round. Errors: {errors}. *answers/s*: completed requests per second of the "
                "level; where the servers' answers differ in length (under a grammar) it, "
                "not tok/s, says which answers sooner."]
    return "\n".join(out)


def round_ratios(levels: Sequence[Level], base: Sequence[Level],
                 measure: Callable[[Level], float | None]) -> list[float]:
    """Round by round, ``measure`` of ``levels`` over that of ``base`` (the same round of
    llama-server); rounds where either is missing or the base is 0 are left out."""
    return [a / b for lv, bl in zip(levels, base, strict=True)
            if (a := measure(lv)) is not None and (b := measure(bl))]


def _answers_per_s(level: Level) -> float:
    return len(level.ok) / level.wall_s if level.wall_s > 0 else 0.0


def _per_answer(level: Level) -> float:
    return level.tokens / len(level.ok) if level.ok else 0.0


def alive(server: Server) -> Server:
    """``server``, or RuntimeError when it has exited."""
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.name} exited ({server.proc.returncode})")
    return server


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    servers: list[str] = args.servers
    model = model_path()
    llama_server = find_llama_server(None)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    plan = Plan(args.workloads, args.levels, args.requests_scale, args.max_tokens,
                args.quiet_cores, args.quiet_wait, retries=2)
    log(f"{', '.join(servers)}: {args.rounds} rounds; load {load_avg()}")
    runs: dict[tuple[str, str, int], list[Level]] = {
        (s, w, c): [] for s in servers for w in args.workloads for c in args.levels}
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-paired-") as tmp, \
            contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        running = {}
        for name in servers:
            kind = kind_of(name)
            config = unyielding_config(workdir, name) if kind == "sidecar" else None
            running[name] = stack.enter_context(running_server(
                kind, model, workdir, args.threads, llama_server, config, label=name))
        pids = [s.proc.pid for s in running.values()]
        for workload in args.workloads:
            for name in servers:
                warm_up(running[name], workload, plan)
            for c in args.levels:
                for r in range(args.rounds):
                    for name in servers[r % len(servers):] + servers[:r % len(servers)]:
                        runs[(name, workload, c)].append(
                            measure_level(alive(running[name]), workload, c, plan, pids))
                for name in servers:
                    if name != BASELINE:
                        log(f"{name} / {BASELINE} {workload} c={c}: tok/s " + " ".join(
                            f"{r:.2f}" for r in round_ratios(
                                runs[(name, workload, c)], runs[(BASELINE, workload, c)],
                                lambda lv: lv.tokens_per_s)))
    log(f"done; load {load_avg()}")
    print(markdown(runs, servers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
