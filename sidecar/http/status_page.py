"""The status page at ``GET /``: one static HTML file, ``status_page.html`` (package data),
whose script fetches ``/v1/sidecar/status`` and ``/v1/sidecar/budgets`` every 2 s and renders
them with ``textContent`` only. The page carries no data and names no URL, so it needs no
escaping on the server and works on air-gapped hosts.

Contract: :func:`load_status_page` reads the file once (at app creation) and returns its
bytes with the headers every answer of the page carries: a ``content-security-policy`` that
allows only this origin, and the page's one inline ``<script>`` and one inline ``<style>``
by their SHA-256 hashes (computed here from the file, so editing it needs no other change);
``x-content-type-options: nosniff``; ``cache-control: no-store``. Credentials are the API's
(``sidecar.request_meta.api_key``): when keys are configured the route answers
:data:`CHALLENGE` (401) to a request without a valid one, so the browser asks for a user
name (ignored) and a password (the key) and sends them as HTTP Basic, to the page and to the
same-origin fetches it makes.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import re

import msgspec

_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)

CHALLENGE = {"www-authenticate": 'Basic realm="sidecar", charset="UTF-8"'}
"""Headers of the page's 401: the browser prompts for the key (as the Basic password)."""

CHALLENGE_BODY = (b"Authentication required: sign in with any user name and a client key of "
                  b"this sidecar as the password.\n")


class StatusPage(msgspec.Struct, frozen=True):
    body: bytes
    headers: dict[str, str]
    """What every answer of ``GET /`` carries (the 401 too): CSP, nosniff, no-store."""


def _hash_source(content: bytes) -> str:
    digest = base64.b64encode(hashlib.sha256(content).digest()).decode()
    return f"'sha256-{digest}'"


def content_security_policy(html: bytes) -> str:
    """The policy for ``html``: ``default-src 'self'``, its inline scripts and styles by hash
    only, images only as ``data:`` (the empty favicon, so the browser asks for no
    ``/favicon.ico``), no plugins, no framing, no ``<base>``, no form posts."""
    sources: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for match in _INLINE.finditer(html):
        sources[match.group(1)].append(_hash_source(match.group(2)))
    script = " ".join(sources[b"script"]) or "'none'"
    style = " ".join(sources[b"style"]) or "'none'"
    return (f"default-src 'self'; script-src {script}; style-src {style}; img-src data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


def load_status_page() -> StatusPage:
    """Read ``status_page.html`` from the package and build its headers (see the module)."""
    html = importlib.resources.files("sidecar.http").joinpath("status_page.html").read_bytes()
    return StatusPage(html, {
        "content-security-policy": content_security_policy(html),
        "x-content-type-options": "nosniff",
        "cache-control": "no-store",
        "referrer-policy": "no-referrer",
        "x-frame-options": "DENY",
    })
