"""The Redactor: which configured values are secrets, which forms of them it finds, what it
leaves alone, and the process-wide install (log records, stdout/stderr)."""

from __future__ import annotations

import base64
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec

from sidecar.config import Config, parse_config
from sidecar.errors import UpstreamRejected
from sidecar.redact import (
    MIN_SECRET_LEN,
    REDACTED,
    Redactor,
    redact_url,
    secrets_of,
    short_secrets,
)
from tests.support.process import ROOT, run_cli

OPENAI_KEY = "sk-openai-secret-0001"
ANTHROPIC_KEY = "sk-ant-secret/0002+x"
HEADER = "hdr-secret-value-0003"
CLIENT = "client-key-0004"
NAMED = "named-client-key-0005"
REDIS_PW = "redis p@ss/0006"
URL_USER, URL_PW = "gateway", "url-pass-0007"


def config(**extra: Any) -> Config:
    data: dict[str, Any] = {
        "server": {"api_keys": [CLIENT]},
        "keys": [{"name": "app", "key": NAMED}],
        "providers": [
            {"name": "o", "type": "openai", "api_key": OPENAI_KEY,
             "base_url": f"https://{URL_USER}:{URL_PW}@proxy.example/v1",
             "headers": {"x-extra": HEADER, "proxy-authorization": f"Bearer {HEADER}-b"}},
            {"name": "a", "type": "anthropic", "api_key": ANTHROPIC_KEY},
        ],
        "routes": [{"model": "m", "targets": [{"provider": "o", "model": "x"}]}],
        "state": {"backend": "redis",
                  "redis_url": f"redis://:{quote(REDIS_PW, safe='')}@127.0.0.1:6379/0"},
    }
    data.update(extra)
    return parse_config(data, env={})


def test_every_configured_secret_is_found() -> None:
    values = {v for _, v in secrets_of(config())}
    assert {OPENAI_KEY, ANTHROPIC_KEY, HEADER, f"Bearer {HEADER}-b", f"{HEADER}-b", CLIENT,
            NAMED, REDIS_PW, URL_PW, f"{URL_USER}:{URL_PW}"} <= values
    assert URL_USER not in values  # a user name beside a password is not the secret


def test_secrets_in_url_queries() -> None:
    cfg = config(state={"backend": "redis",
                        "redis_url": "rediss://cache:6380/0?password=query-pass-0008&db=0"})
    cfg = msgspec.structs.replace(cfg, providers=(msgspec.structs.replace(
        cfg.providers[0], base_url="https://az.example/v1?api-key=query-key-0009&v=2024"),))
    r = Redactor.from_config(cfg)
    assert r.text("q=query-pass-0008 k=query-key-0009 v=2024") == \
        f"q={REDACTED} k={REDACTED} v=2024"


def test_plain_bearer_and_header_echoes_are_redacted() -> None:
    r = Redactor.from_config(config())
    for secret in (OPENAI_KEY, ANTHROPIC_KEY, HEADER, CLIENT, NAMED, REDIS_PW, URL_PW):
        text = f"upstream said: Authorization: Bearer {secret}; x-api-key={secret}!"
        out = r.text(text)
        assert secret not in out
        assert out == f"upstream said: Authorization: Bearer {REDACTED}; x-api-key={REDACTED}!"
        assert r.data(text.encode()) == out.encode()


def test_encoded_forms_are_redacted() -> None:
    r = Redactor.from_config(config())
    basic = base64.b64encode(f"{URL_USER}:{URL_PW}".encode()).decode()
    echoes = [
        f"Authorization: Basic {basic}",                              # base_url userinfo
        "key=sk-ant-secret%2F0002%2Bx",                               # URL-encoded
        "key=sk-ant-secret%2f0002%2bx",                               # lower-case escapes
        "pw=redis+p%40ss%2F0006",                                     # form-encoded
        msgspec.json.encode({"m": f"bad key {ANTHROPIC_KEY}"}).decode(),  # JSON
        '{"m": "sk-ant-secret\\/0002+x"}',                             # JSON with \\/
        base64.b64encode(OPENAI_KEY.encode()).decode(),               # base64
        base64.urlsafe_b64encode(ANTHROPIC_KEY.encode()).decode(),    # base64 (URL-safe)
    ]
    for text in echoes:
        out = r.text(text)
        assert REDACTED in out, text
    assert "sk-ant" not in r.text(echoes[1]) and "0006" not in r.text(echoes[3])
    assert basic not in r.text(echoes[0])


def test_json_bodies_stay_json() -> None:
    r = Redactor.from_config(config())
    body = msgspec.json.encode({"error": {"message": f"key {ANTHROPIC_KEY} \"{OPENAI_KEY}\""}})
    out = r.data(body)
    assert msgspec.json.decode(out) == {"error": {"message": f'key {REDACTED} "{REDACTED}"'}}


def test_text_without_secrets_is_untouched_and_not_copied() -> None:
    r = Redactor.from_config(config())
    body = b'{"choices": [{"message": {"content": "gateway sk- key"}}]}'
    assert r.data(body) is body
    assert r.text("All 2 attempts for 'm' failed.") == "All 2 attempts for 'm' failed."


def test_short_secrets_are_not_searched_and_are_reported() -> None:
    cfg = config(server={"api_keys": ["k"]}, keys=[{"name": "app", "key": "1234567"}])
    r = Redactor.from_config(cfg)
    assert r.text("k is a key; 1234567 too") == "k is a key; 1234567 too"
    assert short_secrets(cfg) == ["server.api_keys[0]", "keys[0].key"]
    assert len("1234567") == MIN_SECRET_LEN - 1
    assert not Redactor(["short"])  # nothing to search: falsy, a no-op


def test_errors_are_redacted_in_place() -> None:
    r = Redactor([OPENAI_KEY])
    err = UpstreamRejected(f"p/x: invalid key {OPENAI_KEY}", target="p/x", status=400,
                           code=f"bad_{OPENAI_KEY}", param=OPENAI_KEY)
    assert r.error(err) is err
    assert err.message == f"p/x: invalid key {REDACTED}" and str(err) == err.message
    assert err.param == REDACTED and err.code == f"bad_{REDACTED}"


def test_longest_form_wins() -> None:
    r = Redactor(["abcdefgh", "abcdefgh-longer"])
    assert r.text("x abcdefgh-longer y abcdefgh") == f"x {REDACTED} y {REDACTED}"


def test_redact_url() -> None:
    assert redact_url("https://u:p%40ss@host:8443/v1?x=1") == \
        f"https://{REDACTED}@host:8443/v1?x=1"
    assert redact_url("https://token@host/v1") == f"https://{REDACTED}@host/v1"
    assert redact_url("https://api.openai.com/v1") == "https://api.openai.com/v1"
    assert redact_url("https://az.example/v1?api-version=1&api-key=k%2B1") == \
        f"https://az.example/v1?api-version=1&api-key={REDACTED}"


def test_install_redacts_log_records_and_std_streams() -> None:
    """In a child process (install changes process-wide state): a log record with the
    secret in its message, its args and its traceback, and prints to stdout and stderr."""
    code = textwrap.dedent(f"""
        import logging, sys
        from sidecar.redact import Redactor, install
        install(Redactor([{OPENAI_KEY!r}]))
        logging.basicConfig(stream=sys.stderr, level=logging.INFO)
        log = logging.getLogger("t")
        log.info("msg %s", {OPENAI_KEY!r})
        log.info("inline {OPENAI_KEY}")
        try:
            raise ValueError({OPENAI_KEY!r})
        except ValueError:
            log.exception("failed")
        print("stdout {OPENAI_KEY}")
        print("stderr {OPENAI_KEY}", file=sys.stderr)
        sys.stderr.flush()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    both = out.stdout + out.stderr
    assert OPENAI_KEY not in both
    assert both.count(REDACTED) == 5, both
    assert "ValueError" in out.stderr  # the traceback is still there


def test_check_warns_about_short_secrets_and_hides_url_credentials(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent(f"""
        [server]
        api_keys = ["k1"]

        [[providers]]
        name = "p"
        type = "openai"
        base_url = "https://{URL_USER}:{URL_PW}@proxy.example/v1"
        api_key = "{OPENAI_KEY}"
    """))
    out = run_cli("check", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert f"https://{REDACTED}@proxy.example/v1" in out.stdout
    assert URL_PW not in out.stdout + out.stderr and OPENAI_KEY not in out.stdout
    assert "warning: server.api_keys[0] is shorter than 8 characters" in out.stderr
    assert "api_key " not in out.stderr  # long enough: no warning
