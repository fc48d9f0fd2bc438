"""Facts from a child process: tests of the real llama.cpp run a script in a fresh Python
(llama.cpp's compute never runs in the pytest process, and one thread of the child makes
every llama.cpp call), which prints one ``FACTS <json>`` line for the tests to assert on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def child_facts(script: str, *args: str, timeout: float = 300) -> dict[str, Any]:
    """Run ``script`` (``python -c``, with ``args``) from the repository root and return
    the JSON of its ``FACTS`` line; fails with the end of its stderr when there is none."""
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                         text=True, timeout=timeout, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("FACTS ")), None)
    assert line is not None, run.stderr[-3000:]
    facts: dict[str, Any] = json.loads(line[len("FACTS "):])
    return facts
