"""An httpx transport with an O(1) HTTP/1.1 keep-alive pool on asyncio streams.

httpcore's own pool checks every pooled connection for expiry on every request (one
``poll()`` each), so with 64 busy upstream connections half of the gateway's CPU went to
pool bookkeeping (measured with py-spy; see docs/benchmarks.md). This pool keeps idle
connections per origin on a LIFO stack and checks only the one it hands out. The HTTP/1.1
protocol itself is still httpcore's, but its sockets are plain asyncio streams: httpcore's
default anyio backend opens a cancel scope per read and write, which was a fifth of the
CPU of a request at concurrency 1.

Contract: at most ``max_connections`` requests are in flight; more wait (FIFO) for a slot,
bounded by the caller's own timeout. A connection returns to the stack when its response
has been read to the end and closed; a response closed early, a failure or a cancellation
discards the connection. Safe for concurrent use from one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpcore
import httpx

# httpcore exception -> httpx exception, most specific first.
_EXCEPTIONS: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError:
        raise
    except Exception as e:
        for core, mapped in _EXCEPTIONS:
            if isinstance(e, core):
                raise mapped(str(e) or type(e).__name__) from e
        raise


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One TCP (or TLS) connection as httpcore needs it; timeouts with ``asyncio.timeout``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            if timeout is None:
                return await self._reader.read(max_bytes)
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout("read timed out") from None
        except OSError as e:
            raise httpcore.ReadError(str(e) or type(e).__name__) from e

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            raise httpcore.WriteTimeout("write timed out") from None
        except OSError as e:
            raise httpcore.WriteError(str(e) or type(e).__name__) from e

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            raise httpcore.ConnectTimeout("TLS handshake timed out") from None
        except (OSError, ssl.SSLError) as e:
            raise httpcore.ConnectError(str(e) or type(e).__name__) from e
        return self

    def get_extra_info(self, info: str) -> Any:
        sock: socket.socket | None = self._writer.get_extra_info("socket")
        match info:
            case "is_readable":
                # An idle keep-alive connection that is readable was closed by the server.
                if sock is None:
                    return True
                poller = select.poll()
                poller.register(sock.fileno(), select.POLLIN)
                return bool(poller.poll(0))
            case "socket":
                return sock
            case "ssl_object":
                return self._writer.get_extra_info("ssl_object")
            case "client_addr":
                return self._writer.get_extra_info("sockname")
            case "server_addr":
                return self._writer.get_extra_info("peername")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Opens :class:`AsyncioStream` connections."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=(local_address, 0) if local_address else None
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connect to {host}:{port} timed out") from None
        except OSError as e:
            raise httpcore.ConnectError(str(e) or type(e).__name__) from e
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Idle:
    __slots__ = ("conn", "since")

    def __init__(self, conn: httpcore.AsyncHTTPConnection) -> None:
        self.conn = conn
        self.since = time.monotonic()


class PooledTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 transport with a LIFO keep-alive pool per origin."""

    def __init__(self, *, max_connections: int, keepalive_expiry_s: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._expiry = keepalive_expiry_s
        self._ssl = ssl_context
        self._idle: dict[tuple[bytes, bytes, int], list[_Idle]] = {}
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()
        self._backend = AsyncioBackend()

    def _close_soon(self, conn: httpcore.AsyncHTTPConnection) -> None:
        """Close a connection without making the caller wait for it."""
        if not conn.is_closed():
            task = asyncio.get_running_loop().create_task(conn.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _checkout(self, origin: httpcore.Origin) -> httpcore.AsyncHTTPConnection:
        stack = self._idle.get((origin.scheme, origin.host, origin.port))
        now = time.monotonic()
        while stack:
            idle = stack.pop()
            # has_expired() polls the socket: only the connection handed out pays for it.
            if now - idle.since < self._expiry and not idle.conn.has_expired():
                return idle.conn
            self._close_soon(idle.conn)
        ssl_context = self._ssl
        if origin.scheme == b"https" and ssl_context is None:
            ssl_context = self._ssl = httpx.create_ssl_context()
        return httpcore.AsyncHTTPConnection(
            origin, ssl_context=ssl_context, keepalive_expiry=self._expiry,
            network_backend=self._backend,
        )

    def _checkin(self, origin: httpcore.Origin, conn: httpcore.AsyncHTTPConnection) -> None:
        self._slots.release()
        if not self._closed and conn.is_idle():
            key = (origin.scheme, origin.host, origin.port)
            self._idle.setdefault(key, []).append(_Idle(conn))
        else:
            self._close_soon(conn)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("transport is closed")
        url = request.url
        origin = httpcore.Origin(url.raw_scheme, url.raw_host,
                                 url.port or (443 if url.raw_scheme == b"https" else 80))
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port,
                             target=url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        await self._slots.acquire()
        try:
            conn = self._checkout(origin)
        except BaseException:
            self._slots.release()
            raise
        try:
            with _httpx_errors():
                response = await conn.handle_async_request(core_request)
        except BaseException:
            self._slots.release()
            self._close_soon(conn)
            raise
        if not isinstance(response.stream, AsyncIterable):  # pragma: no cover - httpcore contract
            raise TypeError("httpcore returned a synchronous stream")
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream, lambda: self._checkin(origin, conn)),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        self._closed = True
        stacks, self._idle = self._idle, {}
        for stack in stacks.values():
            for idle in stack:
                await idle.conn.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes], on_close: Callable[[], None]) -> None:
        self._stream = stream
        self._on_close = on_close
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        try:
            aclose: Callable[[], Awaitable[None]] | None = getattr(self._stream, "aclose", None)
            if aclose is not None:
                with _httpx_errors():
                    await aclose()
        finally:
            if not self._done:
                self._done = True
                self._on_close()

