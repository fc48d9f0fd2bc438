"""The keep-alive pool transport against a real server on loopback."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.config import OpenAIProvider
from sidecar.errors import UpstreamRejected, UpstreamUnreachable
from sidecar.providers.base import Upstream
from tests.support.fake_provider import FakeProvider, disconnect, ok, status
from tests.support.process import closed_port

BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
STREAM = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'


def upstream(base_url: str, max_connections: int = 4, timeout_s: float = 5) -> Upstream:
    config = OpenAIProvider(name="t", base_url=base_url, timeout_s=timeout_s,
                            connect_timeout_s=1, max_connections=max_connections)
    return Upstream(config, {})


async def test_sequential_requests_reuse_one_connection(fake: FakeProvider) -> None:
    up = upstream(fake.openai_base_url)
    for _ in range(20):
        assert b"choices" in await up.post("/chat/completions", BODY, 5, "t")
    assert fake.stats()["connections_total"] == 1
    await up.aclose()


async def test_concurrency_is_capped_at_max_connections(fake: FakeProvider) -> None:
    fake.set_default("m", ok(delay_s=0.02))
    up = upstream(fake.openai_base_url, max_connections=3)
    await asyncio.gather(*(up.post("/chat/completions", BODY, 5, "t") for _ in range(12)))
    assert fake.stats()["connections_total"] == 3
    await up.aclose()


async def test_stream_closed_early_discards_its_connection(fake: FakeProvider) -> None:
    up = upstream(fake.openai_base_url)
    async with up.open_stream("/chat/completions", STREAM, 5, "t") as pieces:
        async for _ in pieces:
            break  # leave the rest unread
    # the half-read connection is not reused; the next request still works
    assert b"choices" in await up.post("/chat/completions", BODY, 5, "t")
    assert fake.stats()["connections_total"] == 2
    await up.aclose()


async def test_server_closed_connection_is_not_reused(fake: FakeProvider) -> None:
    up = upstream(fake.openai_base_url)
    fake.script("m", ok(), disconnect())
    await up.post("/chat/completions", BODY, 5, "t")
    with pytest.raises(UpstreamUnreachable):
        await up.post("/chat/completions", BODY, 5, "t")
    assert b"choices" in await up.post("/chat/completions", BODY, 5, "t")
    await up.aclose()


async def test_status_errors_keep_the_connection(fake: FakeProvider) -> None:
    up = upstream(fake.openai_base_url)
    fake.script("m", status(400))
    with pytest.raises(UpstreamRejected) as e:
        await up.post("/chat/completions", BODY, 5, "t")
    assert e.value.status == 400
    assert b"choices" in await up.post("/chat/completions", BODY, 5, "t")
    assert fake.stats()["connections_total"] == 1
    await up.aclose()


async def test_connect_refused_is_unreachable() -> None:
    up = upstream(f"http://127.0.0.1:{closed_port()}", max_connections=2, timeout_s=1)
    for _ in range(3):  # failed connects give their slot back
        with pytest.raises(UpstreamUnreachable):
            await up.post("/x", BODY, 1, "t")
    await up.aclose()
