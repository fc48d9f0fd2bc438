"""The local_models package's public face: what sidecar uses is there, and importing it
loads neither llama.cpp nor anything of sidecar's (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import local_models

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_face_loads_no_native_library_and_nothing_of_sidecar() -> None:
    code = ("import json, sys, local_models; print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('llama_cpp', 'sidecar'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out) == []


def test_the_face_re_exports_what_it_lists() -> None:
    for name in local_models.__all__:
        assert getattr(local_models, name).__module__.startswith("local_models."), name
    assert {"ModelPool", "PoolSettings", "ModelState", "LocalError", "WorkerLost", "NoRoom",
            "build_catalog", "ModelSpec"} <= set(local_models.__all__)
