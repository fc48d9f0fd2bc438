"""The two log line formats (sidecar.logs) on records built here."""

from __future__ import annotations

import json
import logging
import sys

from sidecar.logs import JSONFormatter, TextFormatter, fields


def record(msg: str, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("sidecar.x", level, __file__, 1, msg, (), None)
    r.fields = extra
    return r


def test_text_lines() -> None:
    fmt = TextFormatter()
    assert fmt.format(record("stopped", event="stopped")) == "sidecar: stopped"
    line = fmt.format(record("request", route="chat", reasons=["a", "b"], model="two words",
                             error=None, quote='x"y'))
    assert line == 'sidecar: request route=chat reasons=a,b model="two words" quote=x"y'
    assert fmt.format(record("careful", logging.WARNING)) == "sidecar: warning: careful"


def test_json_lines() -> None:
    fmt = JSONFormatter()
    doc = json.loads(fmt.format(record("request", status=200, logger="not replaced")))
    assert (doc["msg"], doc["status"], doc["level"], doc["logger"]) == (
        "request", 200, "info", "sidecar.x")
    try:
        raise ValueError("boom")
    except ValueError:
        r = logging.LogRecord("sidecar", logging.ERROR, __file__, 1, "failed", (),
                              sys.exc_info())
    doc = json.loads(fmt.format(r))
    assert "ValueError: boom" in doc["exc"] and "\n" not in fmt.format(r)


def test_fields_helper() -> None:
    assert fields(a=1) == {"fields": {"a": 1}}
