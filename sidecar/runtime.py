"""The composition root: builds every part from a :class:`Config` and runs the front ends.

Nothing else constructs providers, the gateway or the apps. :func:`serve` blocks until
SIGINT/SIGTERM, then drains: ``/readyz`` turns 503 and the gRPC health status NOT_SERVING,
new requests get 503 + Retry-After (UNAVAILABLE) while the listeners stay open for
``drain_delay_s``; then they close. Requests in flight get ``shutdown_grace_s`` from the
signal to finish (HTTP and gRPC alike); at its end streams still running get an SSE error
event (503 "shut down", the OpenAI envelope, no ``[DONE]``, as every mid-stream error) and
other calls a 503 (:meth:`Gateway.cut`). A second signal ends the delay and the grace at
once. Then provider connections are closed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import psutil
import uvicorn

from local_models import Catalog, ModelPool, ModelSpec, PoolSettings
from local_models import build_catalog as _build_catalog
from sidecar.cache import build_store
from sidecar.config import (
    LOCAL_PROVIDER,
    AnthropicProvider,
    Config,
    ConfigError,
    OpenAIProvider,
    ProviderConfig,
)
from sidecar.gateway import Current, Gateway, Observer
from sidecar.gateway.cached import ResponseCache
from sidecar.host import HostWatch, memory_floor_bytes
from sidecar.http.app import create_app
from sidecar.http.protocol import CappedHttpToolsProtocol
from sidecar.limits import MemoryRateLimiter, RateLimiter
from sidecar.logs import LogFormat, RequestLog, fields
from sidecar.logs import configure as configure_logs
from sidecar.metrics import Metrics
from sidecar.money import (
    Accountant,
    BudgetStore,
    MemoryBudgetStore,
    SQLiteBudgetStore,
    format_usd,
)
from sidecar.providers.anthropic import AnthropicMessages
from sidecar.providers.base import Provider
from sidecar.providers.local import LocalProvider
from sidecar.providers.openai import OpenAICompatible
from sidecar.redact import Redactor, secrets_of
from sidecar.redact import install as install_redaction

log = logging.getLogger("sidecar")

_CUT_S = 1.0
"""How long calls have to end cleanly after the grace, before the servers cancel them."""


def build_provider(config: ProviderConfig) -> Provider:
    match config:
        case OpenAIProvider():
            return OpenAICompatible(config)
        case AnthropicProvider():
            return AnthropicMessages(config)


def build_catalog(config: Config) -> Catalog:
    """Read the GGUF headers of every configured and scanned local model (no weights)."""
    specs = [
        ModelSpec(name=m.name, path=m.path, package=m.package, n_ctx=m.n_ctx,
                  n_parallel=m.n_parallel, n_gpu_layers=m.n_gpu_layers,
                  prefix_cache=m.prefix_cache)
        for m in config.local_models
    ]
    local = config.local
    return _build_catalog(specs, local.model_dirs, n_ctx=local.n_ctx,
                          n_parallel=local.n_parallel)


def memory_budget(config: Config) -> int:
    """The local models' memory budget in bytes (75% of physical memory unless set)."""
    mb = config.local.memory_budget_mb
    return mb * 2**20 if mb else int(psutil.virtual_memory().total * 0.75)


def build_pool(config: Config, catalog: Catalog) -> ModelPool:
    local = config.local
    return ModelPool(catalog.entries, PoolSettings(
        memory_budget_bytes=memory_budget(config),
        memory_floor_bytes=memory_floor_bytes(config.resources, psutil.virtual_memory().total),
        idle_unload_s=local.idle_unload_s,
        max_queue=local.max_queue,
        n_threads=local.threads,
        load_timeout_s=local.load_timeout_s,
    ))


def build_state(config: Config) -> tuple[BudgetStore | None, RateLimiter]:
    """The ledger (only when budgets are configured) and the rate limiter of
    ``[state]``. Raises :class:`LedgerUnavailable` when the SQLite ledger cannot be opened."""
    state = config.state
    if state.backend == "redis":
        from sidecar.limits.redis import RedisRateLimiter
        from sidecar.money.ledger_redis import RedisBudgetStore

        assert state.redis_url is not None
        limiter: RateLimiter = RedisRateLimiter(state.redis_url, prefix=state.redis_prefix,
                                                timeout_s=state.redis_timeout_s)
        store: BudgetStore | None = None
        if config.budgets:
            store = RedisBudgetStore(state.redis_url, prefix=state.redis_prefix,
                                     timeout_s=state.redis_timeout_s)
        return store, limiter
    if not config.budgets:
        return None, MemoryRateLimiter()
    if state.backend == "memory":
        return MemoryBudgetStore(), MemoryRateLimiter()
    ledger = SQLiteBudgetStore(Path(state.path).expanduser())
    if ledger.recovered.reservations:
        log.warning("charged %d reservations of a previous run at their reserved amount "
                    "(%s USD): their calls were in flight when it stopped",
                    ledger.recovered.reservations, format_usd(ledger.recovered.micro_usd),
                    extra=fields(event="ledger_recovered"))
    return ledger, MemoryRateLimiter()


class Built:
    """One config's gateway and the parts a reload may keep for the next one."""

    def __init__(self, config: Config, gateway: Gateway, providers: dict[str, Provider],
                 local: LocalProvider | None, store: BudgetStore | None, limiter: RateLimiter,
                 host: HostWatch, cache: ResponseCache | None = None) -> None:
        self.config = config
        self.gateway = gateway
        self.providers = providers
        """Remote providers by name (not ``local``)."""
        self.local = local
        self.store = store
        self.limiter = limiter
        self.host = host
        self.cache = cache
        """The response cache (None: no route has one)."""


def _local_provider(config: Config, previous: Built | None) -> tuple[LocalProvider | None,
                                                                      list[str]]:
    """The local provider (the previous one when the local settings are unchanged, so its
    loaded workers serve on) and the local models' names."""
    if not (config.local_models or config.local.model_dirs):
        return None, []
    if (previous is not None and previous.local is not None
            and (previous.config.local_models, previous.config.local)
            == (config.local_models, config.local)):
        return previous.local, previous.local.pool.names()
    catalog = build_catalog(config)
    for warning in catalog.warnings:
        log.warning("%s", warning, extra=fields(event="catalog"))
    for entry in catalog.entries:
        if entry.error is not None:
            log.warning("local model '%s' is unavailable: %s", entry.name, entry.error,
                        extra=fields(event="local_model_unavailable"))
    names = [e.name for e in catalog.entries]
    for route in config.routes:
        for t in route.targets:
            if t.provider == LOCAL_PROVIDER and t.model not in names:
                log.warning("route '%s' names local model '%s', which was not found",
                            route.model, t.model, extra=fields(event="config"))
    pool = build_pool(config, catalog)
    pool.start()
    pool.preload(m.name for m in config.local_models if m.preload)
    return LocalProvider(pool), names


def build_gateway(config: Config, redactor: Redactor | None = None,
                  metrics: Metrics | None = None, previous: Built | None = None) -> Built:
    """Must run inside the event loop that will serve requests. Reports local models that
    cannot be used on stderr; the rest of the sidecar serves regardless. ``redactor``
    (default: one built from ``config``) takes secrets out of what the gateway returns;
    ``metrics`` (none: no metrics) observes its requests and reads its state at scrape
    time. ``previous`` (a reload): what did not change is kept from it (providers whose
    settings are the same, the local models when theirs are, the ledger and rate limiter
    when ``[state]`` is, the host watch when that and the local models are), and the
    gateway takes over its circuits and figures. Raises what :func:`build_state` raises."""
    old = previous.providers if previous is not None else {}
    old_configs = {p.name: p for p in previous.config.providers} if previous else {}
    providers = {p.name: old[p.name] if old_configs.get(p.name) == p else build_provider(p)
                 for p in config.providers}
    local, names = _local_provider(config, previous)
    if (previous is not None and previous.config.state == config.state
            and bool(previous.config.budgets) == bool(config.budgets)):
        store, limiter = previous.store, previous.limiter
    else:
        store, limiter = build_state(config)
    if (previous is not None and previous.local is local
            and previous.config.resources == config.resources):
        host = previous.host
    else:
        host = HostWatch(config.resources) if local is None else HostWatch(
            config.resources, workers=local.pool.worker_pids,
            set_priority=local.pool.set_priority, unload_idle=local.pool.unload_idle)
    cache = _response_cache(config, previous)
    observers: list[Observer] = [RequestLog()]
    if metrics is not None:
        observers.append(metrics.observe)
    everything: dict[str, Provider] = dict(providers)
    if local is not None:
        everything[LOCAL_PROVIDER] = local
    gateway = Gateway(config, everything, local_models=names,
                      accountant=Accountant(config, store, limiter),
                      local_load=None if local is None else local.load, host=host,
                      redactor=redactor, observers=observers, cache=cache,
                      previous=previous.gateway if previous is not None else None)
    if metrics is not None:
        metrics.watch(gateway)
    return Built(config, gateway, providers, local, store, limiter, host, cache)


def build_cache(config: Config) -> ResponseCache | None:
    """The response cache of ``[cache]`` when a route uses it. Raises
    :class:`~sidecar.cache.CacheUnavailable` when its store cannot be opened."""
    if not any(r.cache for r in config.routes):
        return None
    return ResponseCache(build_store(config.cache, config.state))


def _response_cache(config: Config, previous: Built | None) -> ResponseCache | None:
    """The previous response cache when ``[cache]`` (and the Redis URL it may borrow from
    ``[state]``) is unchanged and still used, else a new one."""
    if (previous is not None and previous.cache is not None
            and previous.config.cache == config.cache
            and previous.config.state.redis_url == config.state.redis_url
            and any(r.cache for r in config.routes)):
        return previous.cache
    return build_cache(config)


async def retire(old: Built, new: Built) -> None:
    """Close what ``old`` has that ``new`` does not keep, once ``old``'s gateway has
    finished every call and stream it had (they ran on its config to their end)."""
    await old.gateway.until_idle()
    kept = {id(p) for p in new.providers.values()}
    closing: list[Awaitable[None]] = [
        p.aclose() for p in old.providers.values() if id(p) not in kept]
    if old.local is not None and old.local is not new.local:
        closing.append(old.local.aclose())
    if old.host is not new.host:
        closing.append(old.host.aclose())
    if old.store is not None and old.store is not new.store:
        closing.append(old.store.aclose())
    if old.limiter is not new.limiter:
        closing.append(old.limiter.aclose())
    if old.cache is not None and old.cache is not new.cache:
        closing.append(old.cache.aclose())
    await asyncio.gather(*closing)


class Reloader:
    """Re-reads the config on SIGHUP or ``POST /v1/sidecar/reload`` and swaps the gateway
    new requests go to; one reload at a time. An invalid config (or one whose parts cannot
    be built, such as an unopenable ledger) is refused with its error, and the old one
    serves on. Settings of the listeners (``[server]`` host, ports, socket, body limit)
    need a restart: a reload keeps them and says so."""

    def __init__(self, load: Callable[[], Config] | None, built: Built, current: Current,
                 metrics: Metrics) -> None:
        self._load = load
        self.built = built
        self._current = current
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    async def reload(self) -> Built:
        """Swap in the config as it is now. Raises :class:`ConfigError` (or the error that
        kept its parts from being built), and changes nothing then."""
        if self._load is None:
            raise ConfigError("there is no config file to reload: the sidecar serves the "
                              "embedded default (start it with --config or $SIDECAR_CONFIG)")
        async with self._lock:
            config = self._load()
            before = self.built.config.server
            listen = ("host", "port", "grpc_port", "uds", "grpc_max_calls", "max_body_bytes")
            changed = [k for k in listen if getattr(config.server, k) != getattr(before, k)]
            if changed:
                log.warning("reload: server.%s changed; the listeners keep the old values "
                            "until a restart", ", server.".join(changed),
                            extra=fields(event="reload_needs_restart", fields=changed))
                kept = {k: getattr(before, k) for k in listen}
                config = msgspec.structs.replace(
                    config, server=msgspec.structs.replace(config.server, **kept))
            redactor = Redactor(v for c in (self.built.config, config)
                                for _, v in secrets_of(c))
            install_redaction(redactor)  # old and new secrets: both may still be printed
            new = build_gateway(config, Redactor.from_config(config), self._metrics,
                                previous=self.built)
            if new.host is not self.built.host:
                await new.gateway.start()
            old, self.built = self.built, new
            self._current.gateway = new.gateway
            task = asyncio.create_task(retire(old, new), name="retire-gateway")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            log.info("reloaded", extra=fields(
                event="reloaded", routes=len(config.routes), providers=len(config.providers),
                in_flight_on_old=old.gateway.in_flight))
            return new

    def on_signal(self) -> None:
        """SIGHUP: reload in the background; a refusal is logged."""
        async def run() -> None:
            try:
                await self.reload()
            except Exception as e:
                log.error("reload refused: %s", e, extra=fields(event="reload_refused"))

        task = asyncio.create_task(run(), name="reload")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def aclose(self) -> None:
        """Wait for the gateways being retired (after the shutdown cut they end at once)."""
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def run(config: Config, *, log_format: LogFormat = "text", log_level: str = "info",
              reload: Callable[[], Config] | None = None) -> None:
    """Serve until a stop signal. Prints ``sidecar: http listening on HOST:PORT`` once
    both front ends accept connections (tests and scripts wait for that line), then
    ``sidecar: grpc listening on ADDRESS`` for each gRPC listener (``HOST:PORT``,
    ``unix:PATH``; none when ``grpc_port`` is 0 and no ``uds`` is set).

    Configured secrets are redacted from everything that leaves the process (see
    :mod:`sidecar.redact`): log records and stdout/stderr from here on, and what the
    gateway returns. SIGHUP (or ``POST /v1/sidecar/reload``) reloads the config with
    ``reload`` (see :class:`Reloader`)."""
    redactor = Redactor.from_config(config)
    install_redaction(redactor)
    configure_logs(log_format, log_level)  # after: its lines go to the redacted stderr
    metrics = Metrics()
    built = build_gateway(config, redactor, metrics)
    gateway = built.gateway
    await gateway.start()
    current = Current(gateway)
    reloader = Reloader(reload, built, current, metrics)
    server_cfg = config.server
    app = create_app(current, max_body_bytes=server_cfg.max_body_bytes, metrics=metrics,
                     reload=reloader.reload)
    sock = _bind(server_cfg.host, server_cfg.port)
    host, port = sock.getsockname()[:2]
    grpc_server = None
    grpc_addresses: list[str] = []
    if server_cfg.grpc_port or server_cfg.uds:
        # Local workers are exec'd, never forked children that use gRPC: grpc's fork
        # handlers would only pause its threads at each worker start (and log about it).
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        from sidecar.grpc.server import GrpcServer  # grpc is imported only when enabled

        grpc_server = GrpcServer(current, server_cfg)
        grpc_addresses = await grpc_server.start()
    uv = uvicorn.Server(
        uvicorn.Config(
            app,
            loop="none",
            http=CappedHttpToolsProtocol,
            lifespan="off",
            access_log=server_cfg.access_log,
            log_level="warning",
            # Set again when the listener closes (see _drain): uvicorn cancels what is
            # still running after it, which only non-stream calls cut at the grace can be.
            timeout_graceful_shutdown=round(server_cfg.shutdown_grace_s) + 1,
            server_header=False,
            date_header=False,
            timeout_keep_alive=30,
        )
    )
    if server_cfg.access_log:  # its lines are INFO records, below the level set above
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reloader.on_signal)
    # Signals are ours (the gRPC server and the gateway drain with HTTP), so uvicorn's
    # serve() that captures and re-raises them is bypassed.
    task = asyncio.create_task(uv._serve(sockets=[sock]))
    print(f"sidecar: http listening on {host}:{port}", flush=True)
    for address in grpc_addresses:
        print(f"sidecar: grpc listening on {address}", flush=True)
    log.debug("serving", extra=fields(event="serving", http=f"{host}:{port}",
                                      grpc=grpc_addresses))
    try:
        await asyncio.wait(
            [task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        log.info("draining", extra=fields(event="draining"))
        loop.remove_signal_handler(signal.SIGHUP)
        gateway = current.gateway
        gateway.drain()
        forced = asyncio.Event()

        def force() -> None:  # a second signal: no more waiting
            forced.set()
            gateway.cut()  # every gateway's: a reloaded one shares its cut

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, force)
        if grpc_server is not None:
            await grpc_server.drain()
        grace_end = loop.time() + server_cfg.shutdown_grace_s
        cutter = loop.call_at(grace_end, gateway.cut)
        if not task.done():  # the listeners stay open, answering 503
            await asyncio.wait([task, asyncio.create_task(forced.wait())],
                               timeout=server_cfg.drain_delay_s,
                               return_when=asyncio.FIRST_COMPLETED)
        # After the cut, streams end at once; what is left gets _CUT_S more.
        left = _CUT_S if forced.is_set() else max(0.0, grace_end - loop.time()) + _CUT_S
        uv.config.timeout_graceful_shutdown = math.ceil(left)
        uv.should_exit = True
        if grpc_server is not None:
            await asyncio.gather(task, grpc_server.stop(left))
        else:
            await task
        cutter.cancel()
        gateway.cut()  # what older gateways still run ends now
        await reloader.aclose()
        await gateway.aclose()
        log.info("stopped", extra=fields(event="stopped"))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            # The drain is done and only the exit is left (the loop closing, threads
            # joined, the interpreter finalized, which puts back the default action of
            # any Python handler): a repeated stop signal must not turn it into death by
            # signal. SIGKILL still ends a process whose exit would hang.
            signal.signal(sig, signal.SIG_IGN)


def serve(config: Config, *, log_format: LogFormat = "text", log_level: str = "info",
          reload: Callable[[], Config] | None = None) -> None:
    """Blocking entry point for ``sidecar serve``; ``reload`` reads the config again (None:
    the embedded default, which cannot be reloaded)."""
    main = run(config, log_format=log_format, log_level=log_level, reload=reload)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(main)
    else:
        uvloop.run(main)
