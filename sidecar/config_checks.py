"""The config's cross-field rules: what msgspec's types cannot say (names that must exist,
be unique or agree), checked once after decoding (:func:`check_references`)."""

from __future__ import annotations

import os
import re

from sidecar.config import LOCAL_PROVIDER, Config, ConfigError, RouteConfig


def check_references(config: Config) -> None:
    """Raise :class:`ConfigError` for the first reference that does not hold (a route's
    unknown provider or local model, a duplicate name, a price or budget of nothing, a
    cascade or semantic cache set up wrong), its message starting with the value's path."""
    seen: set[str] = set()
    for i, p in enumerate(config.providers):
        if p.name == LOCAL_PROVIDER:
            raise ConfigError(
                f"providers[{i}].name: '{LOCAL_PROVIDER}' is reserved for local models"
            )
        if p.name in seen:
            raise ConfigError(f"providers[{i}].name: duplicate provider name '{p.name}'")
        seen.add(p.name)
        if not re.match(r"^https?://[^/\s]+", p.base_url):
            raise ConfigError(f"providers[{i}].base_url: must be an http:// or https:// URL")
    _check_money(config, seen)
    res = config.resources
    if res.cpu_contended_percent > res.cpu_high_percent:
        raise ConfigError("resources.cpu_contended_percent: must not be above "
                          f"cpu_high_percent ({res.cpu_high_percent:g})")
    if res.cpu_low_percent >= res.cpu_contended_percent:
        raise ConfigError("resources.cpu_low_percent: must be below cpu_contended_percent "
                          f"({res.cpu_contended_percent:g}) and cpu_high_percent")
    cpus = os.cpu_count() or 1
    bad = [c for c in res.cpus if c >= cpus]
    if bad:
        raise ConfigError(f"resources.cpus: this host has CPUs 0-{cpus - 1}, not {bad[0]}")
    local: set[str] = set()
    for i, m in enumerate(config.local_models):
        if (m.path is None) == (m.package is None):
            raise ConfigError(f"local_models[{i}]: set exactly one of 'path' or 'package'")
        if m.name in local:
            raise ConfigError(f"local_models[{i}].name: duplicate local model '{m.name}'")
        local.add(m.name)
    def unknown_local(name: str) -> bool:
        # Scanned directories are only read at startup; their names are checked then.
        return name not in local and not config.local.model_dirs

    routes: set[str] = set()
    for i, r in enumerate(config.routes):
        if r.model in routes:
            raise ConfigError(f"routes[{i}].model: duplicate route '{r.model}'")
        routes.add(r.model)
        _check_cascade(r, i)
        if r.cache_semantic is not None:
            if not r.cache:
                raise ConfigError(f"routes[{i}].cache_semantic: needs cache = true")
            if unknown_local(r.cache_semantic.model):
                raise ConfigError(f"routes[{i}].cache_semantic.model: unknown local model "
                                  f"'{r.cache_semantic.model}'")
        for j, t in enumerate(r.targets):
            if t.provider == LOCAL_PROVIDER:
                if unknown_local(t.model):
                    raise ConfigError(
                        f"routes[{i}].targets[{j}].model: unknown local model '{t.model}'"
                    )
            elif t.provider not in seen:
                raise ConfigError(
                    f"routes[{i}].targets[{j}].provider: unknown provider '{t.provider}'"
                )


def _check_cascade(r: RouteConfig, i: int) -> None:
    if r.strategy != "cascade":
        if r.cascade is not None:
            raise ConfigError(f'routes[{i}].cascade: only for strategy = "cascade"')
        return
    if len(r.targets) < 2:
        raise ConfigError(f"routes[{i}].targets: a cascade needs at least two targets")
    if r.prefer is not None:
        raise ConfigError(f"routes[{i}].prefer: a cascade orders its targets by price, "
                          "cheapest first; leave prefer unset")
    c = r.cascade
    if c is not None and c.min_mean_logprob is None and c.min_token_logprob is None \
            and not c.check_schema and c.no_logprobs == "accept":
        raise ConfigError(f"routes[{i}].cascade: every check is off, so no answer would "
                          "ever escalate (set a threshold, or use strategy = \"cost\")")


def _check_money(config: Config, providers: set[str]) -> None:
    keys: set[str] = set()
    secrets = set(config.server.api_keys)
    for i, k in enumerate(config.keys):
        if k.name in keys:
            raise ConfigError(f"keys[{i}].name: duplicate key name '{k.name}'")
        if k.key in secrets:
            raise ConfigError(f"keys[{i}].key: the same key is configured twice")
        keys.add(k.name)
        secrets.add(k.key)
    names: set[str] = set()
    for i, b in enumerate(config.budgets):
        if b.name in names:
            raise ConfigError(f"budgets[{i}].name: duplicate budget '{b.name}'")
        names.add(b.name)
        if b.key is not None and (b.scope != "key" or b.key not in keys):
            raise ConfigError(f"budgets[{i}].key: needs scope = \"key\" and a name from [[keys]]")
        if b.provider is not None and (b.scope != "provider" or b.provider not in providers):
            raise ConfigError(
                f"budgets[{i}].provider: needs scope = \"provider\" and a configured provider"
            )
        if b.scope == "key" and not (keys or config.server.api_keys):
            raise ConfigError(f"budgets[{i}].scope: per-key budgets need client keys")
    state = config.state
    if state.backend == "redis" and not state.redis_url:
        raise ConfigError('state.redis_url: required when backend = "redis"')
    if state.redis_url is not None and not re.match(r"^(rediss?|unix)://", state.redis_url):
        raise ConfigError("state.redis_url: must be a redis://, rediss:// or unix:// URL")
    cache = config.cache
    if cache.redis_url is not None and not re.match(r"^(rediss?|unix)://", cache.redis_url):
        raise ConfigError("cache.redis_url: must be a redis://, rediss:// or unix:// URL")
    if cache.backend == "redis" and not (cache.redis_url or state.redis_url):
        raise ConfigError('cache.redis_url: required when backend = "redis" (or set '
                          "state.redis_url)")
