"""The sidecar's logs: one line per record on stderr, as text or JSON.

``sidecar serve --log-format text|json --log-level debug|info|warning|error``
(:func:`configure`, called once by the CLI). Every record is one line:

* text: ``sidecar: message`` (``sidecar: warning: message`` for warnings and worse), then
  the record's fields as ``key=value`` (but ``event``, which names the message); the lines
  the sidecar has always printed stay as they were.
* json: ``{"ts": "2026-12-03T05:31:14.123Z", "level": "info", "logger": "sidecar.request",
  "msg": "request", ...fields}``, a traceback under ``"exc"``.

Fields travel in a record's ``extra={"fields": {...}}`` (see :func:`fields`). Every request
is one INFO record of logger ``sidecar.request`` (:class:`RequestLog`, a gateway observer)
with its id, operation, route, target, attempts, retries, route reasons, status, error
code, token counts, cost (µ$, an integer) and durations, and never a prompt, an answer
or a key. Lifecycle events (serving, draining, stopped, reloads, host pressure, local
models) are records of ``sidecar`` loggers too. Lines go to ``sys.stderr``, which
:func:`sidecar.redact.install` redacts, so configured secrets never appear in any line.
"""

from __future__ import annotations

import datetime
import logging
import sys
from typing import TYPE_CHECKING, Any, Literal

import msgspec

if TYPE_CHECKING:
    from sidecar.gateway import Outcome

LogFormat = Literal["text", "json"]
LEVELS = ("debug", "info", "warning", "error")
_encoder = msgspec.json.Encoder()


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a record that carries fields: ``log.info("msg", extra=fields(a=1))``."""
    return {"fields": values}


def _fields_of(record: logging.LogRecord) -> dict[str, Any]:
    found = getattr(record, "fields", None)
    return found if isinstance(found, dict) else {}


class TextFormatter(logging.Formatter):
    """``sidecar: [warning: ]message key=value ...`` (values with spaces are quoted)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        parts = [f"sidecar: {prefix}{record.getMessage()}"]
        for key, value in _fields_of(record).items():
            if value is None or key == "event":
                continue
            text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            parts.append(f"{key}={_encoder.encode(text).decode() if ' ' in text else text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        doc: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields_of(record).items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(doc).decode()


def configure(log_format: LogFormat = "text", level: str = "info") -> None:
    """Send every record of ``level`` and above to stderr, one line each, in ``log_format``.
    Replaces the root logger's handlers; call once, before serving."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The HTTP client's own line per upstream request only at debug: requests have theirs.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(
            logging.DEBUG if level == "debug" else logging.WARNING)


class RequestLog:
    """A gateway observer: one INFO record of ``sidecar.request`` per request."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("sidecar.request")

    def __call__(self, o: Outcome) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        self._log.info("request", extra=fields(
            request_id=o.request_id, op=o.op, model=o.model, route=o.route, target=o.target,
            status=o.status, error=o.error, stream=o.stream, attempts=o.attempts,
            retries=o.retries, reasons=list(o.reasons), prompt_tokens=o.prompt_tokens,
            completion_tokens=o.completion_tokens,
            cost_micro_usd=o.cost, cache=o.cache,
            duration_ms=round(o.duration_s * 1000, 1),
            ttft_ms=None if o.ttft_s is None else round(o.ttft_s * 1000, 1)))
