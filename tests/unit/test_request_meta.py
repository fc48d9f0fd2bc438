"""What a request's headers say about its client key (:func:`sidecar.request_meta.api_key`),
and the status page's headers (:mod:`sidecar.http.status_page`)."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from sidecar.http.status_page import content_security_policy, load_status_page
from sidecar.request_meta import api_key


def _basic(credentials: bytes) -> str:
    return "Basic " + base64.b64encode(credentials).decode()


@pytest.mark.parametrize(("headers", "key"), [
    ({}, None),
    ({"authorization": "Bearer sk-1"}, "sk-1"),
    ({"authorization": "bearer  sk-1 "}, "sk-1"),
    ({"x-api-key": "sk-2"}, "sk-2"),
    ({"authorization": "Bearer sk-1", "x-api-key": "sk-2"}, "sk-1"),
    # Basic: the password is the key, whatever the user name (empty included).
    ({"authorization": _basic(b"admin:sk-3")}, "sk-3"),
    ({"authorization": _basic(b":sk-3")}, "sk-3"),
    ({"authorization": "basic " + base64.b64encode(b"u:a:b").decode()}, "a:b"),
    ({"authorization": _basic("ü:sk-ü".encode())}, "sk-ü"),
    # Malformed or another scheme: "" (an incorrect key, not a missing one).
    ({"authorization": _basic(b"sk-3")}, ""),  # no ':'
    ({"authorization": "Basic not base64!"}, ""),
    ({"authorization": "Basic " + base64.b64encode(b"\xff:\xfe").decode()}, ""),
    ({"authorization": "Digest sk-1"}, ""),
    ({"authorization": "Basic " + base64.b64encode(b"u:sk-4").decode(), "x-api-key": "x"},
     "sk-4"),
])
def test_api_key(headers: dict[str, str], key: str | None) -> None:
    assert api_key(headers) == key


def test_status_page_policy_allows_only_its_own_inline_code() -> None:
    page = load_status_page()
    csp = page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"
    assert "default-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "'unsafe-eval'" not in csp
    for kind in ("script", "style"):
        blocks = re.findall(rf"<{kind}>(.*?)</{kind}>".encode(), page.body, re.DOTALL)
        assert len(blocks) == 1
        digest = base64.b64encode(hashlib.sha256(blocks[0]).digest()).decode()
        assert f"{kind}-src 'sha256-{digest}'" in csp
    assert "script-src 'none'" in content_security_policy(b"<p>no code</p>")
