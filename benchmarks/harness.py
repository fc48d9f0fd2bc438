"""What the benchmark scripts share around the thing they measure: progress on stderr,
loopback ports, comma-separated command-line lists, and the processes they start.

A process is started in a process group of its own (``running``, or ``Popen`` with
``start_new_session``) so that ``stop`` can end it with everything it started; the scripts
install ``exit_on_sigterm`` so that a SIGTERM unwinds their context managers, and with
them every ``stop``, as Ctrl-C does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
SIDECAR_READY = re.compile(r"sidecar: http listening on (\S+):(\d+)")  # sidecar serve
FAKE_READY = re.compile(r"listening on http://(\S+):(\d+)")  # python -m tests.support.fake_provider


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- command-line lists ------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    """``"1,8,64"`` as ``[1, 8, 64]``; every value must be >= 1 (an argparse ``type``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"values must be >= 1; got {text!r}")
    return values


def choices(text: str, allowed: Iterable[str], *, fixed_order: bool = True) -> list[str]:
    """A comma-separated, non-empty subset of ``allowed``: in the order of ``allowed`` with
    ``fixed_order``, else as given."""
    allowed = tuple(allowed)
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(n not in allowed for n in names):
        raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}; got {text!r}")
    return [a for a in allowed if a in names] if fixed_order else names


# --- processes ---------------------------------------------------------------------------

def exit_on_sigterm(signum: int, frame: object) -> None:
    """A SIGTERM handler: exit as Ctrl-C would, unwinding the context managers, so the
    processes the benchmark started are stopped."""
    raise SystemExit(128 + signum)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def stop(proc: subprocess.Popen[Any], term_timeout_s: float = 10) -> None:
    """Stop ``proc`` and everything it started. ``proc`` leads a process group of its own:
    SIGTERM to the group, SIGKILL after ``term_timeout_s``. Then its descendants that live
    in sessions of their own (the sidecar's model workers), out of the group's reach, get
    10 s to exit before SIGKILL, and whatever is left of the group gets SIGKILL. Blocks
    until then."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(term_timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
    _gone, alive = psutil.wait_procs(descendants, timeout=10)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=5)
    _kill_group(proc.pid)


def _drain(stream: IO[str], sink: list[str] | None = None) -> None:
    with contextlib.suppress(OSError, ValueError):
        for line in stream:
            if sink is not None:
                sink.append(line)


@contextlib.contextmanager
def running(command: list[str], ready: re.Pattern[str], what: str, *, own_session: bool = True,
            timeout_s: float = 60, output: list[str] | None = None,
            ) -> Iterator[tuple[re.Match[str], subprocess.Popen[str]]]:
    """Start ``command`` (in ROOT) in a process group of its own (and, with
    ``own_session``, a session of its own), wait at most ``timeout_s`` for a line of its
    output (stdout and stderr) matching ``ready``, yield the match and the process, and
    ``stop`` it afterwards. Once the line is seen, the rest of the output is drained in a
    thread so that a full pipe never blocks the process: appended to ``output`` when given
    (the lines up to the ready one included), else dropped."""
    # Either way a Ctrl-C in the terminal reaches only this script, which stops the process.
    group: dict[str, Any] = {"start_new_session": True} if own_session else {"process_group": 0}
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, **group)
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        timer = threading.Timer(timeout_s, _kill_group, args=(proc.pid,))
        timer.start()  # a process that never prints the line cannot block us
        try:
            match = None
            for line in proc.stdout:
                seen.append(line)
                if match := ready.search(line):
                    break
        finally:
            timer.cancel()
        if match is None:
            raise RuntimeError(f"{what} exited or printed no ready line within "
                               f"{timeout_s:g} s:\n{''.join(seen[-30:])}")
        if output is not None:
            output.extend(seen)
        threading.Thread(target=_drain, args=(proc.stdout, output), daemon=True).start()
        yield match, proc
    finally:
        stop(proc)
