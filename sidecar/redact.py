"""Redaction of configured secrets from every text that leaves the process.

An upstream (or a proxy in front of it) may echo the credentials it received in an error
message, a 200 body or a stream frame; the sidecar copies such text into what it tells
clients, logs and prints. :class:`Redactor` is built once from the :class:`Config` by the
composition root (:mod:`sidecar.runtime`) and applied where text leaves:

* the :class:`~sidecar.gateway.Gateway`'s public boundary: errors it raises (message,
  ``param``, ``code``: HTTP envelope and gRPC status + details alike), reply bodies and
  stream frames (relayed bytes and error frames);
* the status endpoints' bodies;
* the process's log records (a record factory) and its stdout/stderr (:func:`install`).

What is secret (:func:`secrets_of`): provider ``api_key`` values, the values of provider
``headers`` (and the token after a ``Bearer``/``Basic`` scheme in them), client keys
(``server.api_keys``, ``[[keys]].key``), and in ``state.redis_url`` and provider
``base_url`` values: the userinfo (the password, or a lone user name) and the values of query
parameters named like ``pass``/``key``/``token``/``secret``/``sig``.

Forms searched for each secret: the text itself, its URL-encoded forms (``%XX`` upper and
lower case, ``+`` for spaces), its JSON-escaped form (with ``\\/`` too), its base64 (standard
and URL-safe, padding stripped) and, for ``user:password`` userinfo, the base64 of that pair
(what ``Authorization: Basic`` carries). ``Bearer <key>`` is covered by the key itself.
Each found form is replaced by :data:`REDACTED`, longest first.

Secrets shorter than :data:`MIN_SECRET_LEN` characters are not searched (a 1-character test
key would mangle every message); ``sidecar check`` warns about them (:func:`short_secrets`).

Limits: a secret split across two stream frames (an upstream echoing it token by token)
is not found; nor are encodings other than those above.

Cost: texts under 256 characters (stream frames, log lines) are searched with one compiled
pattern, longer ones with one substring search per form; a text is copied only when a form
is found. With 9 secrets (18 forms): about 1.4 µs per SSE frame and 10 µs per 2 KB reply
body on the development machine (``python benchmarks/redact_cost.py``).
"""

from __future__ import annotations

import base64
import logging
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO, cast
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

import msgspec

from sidecar.config import Config
from sidecar.errors import SidecarError

REDACTED = "[redacted]"
MIN_SECRET_LEN = 8
"""Secrets shorter than this are not searched for (documented; ``sidecar check`` warns)."""

_SCHEMES = ("bearer ", "basic ", "token ")
_SECRET_PARAM = re.compile(r"pass|key|token|secret|sig", re.IGNORECASE)
"""Query parameters of a URL whose values are secrets (``?password=``, ``?api-key=``)."""
_SHORT = 256
"""Below this length a text is searched with one compiled pattern (see :class:`Redactor`)."""


def _userinfo(url: str) -> tuple[str | None, str | None]:
    """The (user, password) of ``url``'s userinfo, percent-decoded; (None, None) when none."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None, None
    if "@" not in parts.netloc:
        return None, None
    user = parts.username
    password = parts.password
    return (unquote(user) if user else None), (unquote(password) if password else None)


def redact_url(url: str) -> str:
    """``url`` with its userinfo (``user:password@``) and the values of its secret query
    parameters (see :func:`secrets_of`) replaced by ``[redacted]``."""
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return REDACTED
    if "@" in parts.netloc:
        parts = parts._replace(netloc=f"{REDACTED}@{parts.netloc.rpartition('@')[2]}")
    if any(_SECRET_PARAM.search(name) for name, _ in query):
        parts = parts._replace(query="&".join(
            f"{quote_plus(name)}={REDACTED if _SECRET_PARAM.search(name) else quote_plus(v)}"
            for name, v in query))
    return parts.geturl()


def secrets_of(config: Config) -> list[tuple[str, str]]:
    """Every configured secret as ``(where, value)``; ``where`` is its config path.
    ``user:password`` pairs of URLs are included (their base64 is what Basic auth sends)."""
    out: list[tuple[str, str]] = []

    def url_secrets(where: str, url: str | None) -> None:
        if not url:
            return
        user, password = _userinfo(url)
        if password:
            out.append((f"{where} (password)", password))
            if user:
                out.append((f"{where} (user:password)", f"{user}:{password}"))
        elif user:
            out.append((f"{where} (user)", user))
        try:
            query = parse_qsl(urlsplit(url).query, keep_blank_values=False)
        except ValueError:
            query = []
        for name, value in query:
            if _SECRET_PARAM.search(name):
                out.append((f"{where} (query {name})", value))

    for i, p in enumerate(config.providers):
        if p.api_key:
            out.append((f"providers[{i}].api_key", p.api_key))
        for name, value in p.headers.items():
            out.append((f"providers[{i}].headers.{name}", value))
            low = value.lower()
            for scheme in _SCHEMES:
                if low.startswith(scheme) and value[len(scheme):].strip():
                    out.append((f"providers[{i}].headers.{name}", value[len(scheme):].strip()))
        url_secrets(f"providers[{i}].base_url", p.base_url)
    for i, key in enumerate(config.server.api_keys):
        out.append((f"server.api_keys[{i}]", key))
    for i, k in enumerate(config.keys):
        out.append((f"keys[{i}].key", k.key))
    url_secrets("state.redis_url", config.state.redis_url)
    return out


def short_secrets(config: Config) -> list[str]:
    """The config paths of secrets too short to be redacted (for ``sidecar check``)."""
    seen: list[str] = []
    for where, value in secrets_of(config):
        if len(value) < MIN_SECRET_LEN and where not in seen:
            seen.append(where)
    return seen


def _b64(data: bytes) -> list[str]:
    return [base64.b64encode(data).decode().rstrip("="),
            base64.urlsafe_b64encode(data).decode().rstrip("=")]


def forms(secret: str) -> set[str]:
    """The texts that show ``secret``: itself and the encodings an echo would show (for
    a ``user:password`` pair, its base64 is what ``Authorization: Basic`` carries)."""
    out = {secret, quote(secret, safe=""), quote_plus(secret, safe="")}
    out |= {_lower_escapes(f) for f in out}
    json_form = msgspec.json.encode(secret).decode()[1:-1]
    out |= {json_form, json_form.replace("/", "\\/")}
    out.update(_b64(secret.encode()))
    return {f for f in out if len(f) >= MIN_SECRET_LEN}


def _lower_escapes(text: str) -> str:
    """``text`` with the hex digits of its ``%XX`` escapes in lower case."""
    parts = text.split("%")
    return parts[0] + "".join("%" + p[:2].lower() + p[2:] for p in parts[1:])


class Redactor:
    """Replaces every form of every secret (see the module docstring) with
    :data:`REDACTED`. Immutable once built; safe to share between threads and tasks."""

    def __init__(self, secrets: Iterable[str]) -> None:
        found: set[str] = set()
        for s in secrets:
            if len(s) >= MIN_SECRET_LEN:
                found |= forms(s)
        # Longest first, so a form that contains another is replaced whole.
        self._texts = tuple(sorted(found, key=lambda f: (-len(f), f)))
        self._bytes = tuple(f.encode() for f in self._texts)
        # Short texts (stream frames, log lines) are searched with one compiled pattern,
        # longer ones with one substring search per form (faster there).
        self._text_rx = re.compile("|".join(map(re.escape, self._texts)) or "(?!)")
        self._bytes_rx = re.compile(b"|".join(map(re.escape, self._bytes)) or b"(?!)")

    @classmethod
    def from_config(cls, config: Config) -> Redactor:
        return cls(value for _, value in secrets_of(config))

    @property
    def forms(self) -> tuple[str, ...]:
        """Every text searched for, longest first."""
        return self._texts

    def __bool__(self) -> bool:
        """Whether there is anything to search for."""
        return bool(self._texts)

    def text(self, text: str) -> str:
        """``text`` with every secret form replaced."""
        if len(text) < _SHORT and not self._text_rx.search(text):
            return text
        for f in self._texts:
            if f in text:
                text = text.replace(f, REDACTED)
        return text

    def data(self, data: bytes) -> bytes:
        """``data`` (UTF-8 bytes: a body or SSE frames) with every secret form replaced.
        Returns ``data`` itself when nothing is found."""
        if len(data) < _SHORT and not self._bytes_rx.search(data):
            return data
        for f in self._bytes:
            if f in data:
                data = data.replace(f, _REDACTED_BYTES)
        return data

    def error(self, err: SidecarError) -> SidecarError:
        """Redact ``err``'s client-visible texts (message, param, code) in place; returns it."""
        if not self._texts:
            return err
        err.message = self.text(err.message)
        err.args = (err.message,)
        if err.param is not None:
            err.param = self.text(err.param)
        if err.code is not None:
            code = self.text(err.code)
            if code != err.code:
                err.code = code
        return err


_REDACTED_BYTES = REDACTED.encode()


class _RedactingStream:
    """A text stream that redacts what is written and passes it to ``inner``; everything
    else (``fileno``, ``encoding``, ``isatty``...) is ``inner``'s."""

    def __init__(self, inner: TextIO, redactor: Redactor) -> None:
        self._inner = inner
        self._redactor = redactor

    def write(self, s: str) -> int:
        self._inner.write(self._redactor.text(s))
        return len(s)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _redact_arg(arg: object, redactor: Redactor) -> object:
    return redactor.text(arg) if isinstance(arg, str) else arg


def install(redactor: Redactor) -> None:
    """Redact the process's log records (their text message and arguments, traceback and
    stack, whatever handler emits them) and everything written to ``sys.stdout`` /
    ``sys.stderr`` (prints, and handlers that write there). Called by the composition root
    before any logging is configured, and again after a config reload with a redactor of
    the old and the new secrets: the hooks are installed once, then only their redactor is
    replaced. A no-op when there is nothing to redact and nothing installed yet."""
    installed = getattr(logging.getLogRecordFactory(), "sidecar_redaction", None)
    if isinstance(installed, _Hooks):
        installed.redactor = redactor
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _RedactingStream):
                stream._redactor = redactor
        return
    if not redactor:
        return
    hooks = _Hooks(redactor)
    factory = logging.getLogRecordFactory()

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        redactor = hooks.redactor
        # Arguments keep their shape (formatters such as uvicorn's read them); text ones
        # are redacted, and the streams below catch what other objects render to.
        if isinstance(record.msg, str):
            record.msg = redactor.text(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(a, redactor) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_arg(a, redactor) for k, a in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = redactor.text(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redactor.text(record.stack_info)
        return record

    make_record.sidecar_redaction = hooks  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_record)
    if not isinstance(sys.stdout, _RedactingStream):
        sys.stdout = cast(TextIO, _RedactingStream(sys.stdout, redactor))
    if not isinstance(sys.stderr, _RedactingStream):
        sys.stderr = cast(TextIO, _RedactingStream(sys.stderr, redactor))


class _Hooks:
    """The redactor the installed hooks use (replaced by a reload's :func:`install`)."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
