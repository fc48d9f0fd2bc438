"""The model pool's counters (``ModelStatus.loads``, ``load_failures``, ``unloads``,
``crashes``: what ``/metrics`` exports per local model), over the real default model, real
worker processes and a real SIGKILL."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from local_models import ModelPool, ModelSpec, ModelStatus, ModelUnavailable, Sampling
from tests.integration.test_local_pool import collect
from tests.support.gguf_files import write_model
from tests.support.process import wait_until


def counters(pool: ModelPool, name: str = "m") -> tuple[int, int, int, int]:
    s: ModelStatus = next(s for s in pool.status() if s.name == name)
    return s.loads, s.load_failures, s.unloads, s.crashes


async def test_loads_crashes_and_unloads_are_counted(make_pool: Callable[..., ModelPool]
                                                     ) -> None:
    pool = make_pool()
    assert counters(pool) == (0, 0, 0, 0)
    greedy = {"prompt": "1, 2, 3,", "max_tokens": 2, "sampling": Sampling(temperature=0.0)}
    await collect(pool, **greedy)
    await collect(pool, **greedy)  # the same worker: one load
    assert counters(pool) == (1, 0, 0, 0)
    pid = next(s.pid for s in pool.status())
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: counters(pool)[3] == 1)
    await collect(pool, **greedy)  # a new worker: a restart
    assert counters(pool) == (2, 0, 0, 1)  # reaping the dead one is no unload
    assert await pool.unload_idle() == ["m"]
    assert counters(pool) == (2, 0, 1, 1)


async def test_a_failed_load_is_counted_once_per_attempt(
        make_pool: Callable[..., ModelPool], tmp_path: Path) -> None:
    unloadable = write_model(tmp_path / "tiny.gguf")  # header fine, tensors llama.cpp needs absent
    pool = make_pool(ModelSpec(name="tiny", path=str(unloadable)), retry_failed_load_s=60)
    for _ in range(2):  # the second is refused from memory: no new attempt
        with pytest.raises(ModelUnavailable):
            await collect(pool, "tiny", prompt="hi", max_tokens=1)
    assert counters(pool, "tiny") == (0, 1, 0, 0)
