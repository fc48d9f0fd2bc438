"""A real, throw-away ``prometheus`` server for tests.

:class:`PrometheusServer` writes a config that scrapes the given targets every second,
starts ``prometheus`` on a free loopback port with its TSDB in a temporary directory, waits
until it is ready, answers instant queries (:meth:`~PrometheusServer.query`) and stops it.
:func:`prometheus_binary` skips the calling test when the binary is not installed (Debian:
``apt-get install prometheus``; ``scripts/install.sh --dev`` does it)::

    with PrometheusServer([f"127.0.0.1:{port}"], bearer="sk-key") as prom:
        poll(lambda: prom.value('up{job="sidecar"}') == 1)
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest

from tests.support.process import closed_port

START_TIMEOUT_S = 30.0


def prometheus_binary() -> str:
    """The ``prometheus`` executable, or skip the calling test with the reason."""
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("the prometheus binary is not on PATH (apt-get install prometheus, or "
                    "scripts/install.sh --dev, to run the Prometheus scrape test)")
    return path


class PrometheusServer:
    """One ``prometheus`` child process on ``127.0.0.1:port`` scraping ``targets`` (job
    ``sidecar``, path ``/metrics``, every second) with ``Authorization: Bearer <bearer>``
    when given."""

    def __init__(self, targets: Sequence[str], *, bearer: str | None = None,
                 job: str = "sidecar") -> None:
        self.binary = prometheus_binary()
        self._dir = Path(tempfile.mkdtemp(prefix="sidecar-prometheus-"))
        scrape: dict[str, Any] = {
            "job_name": job,
            "metrics_path": "/metrics",
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "static_configs": [{"targets": list(targets)}],
        }
        if bearer is not None:
            scrape["authorization"] = {"type": "Bearer", "credentials": bearer}
        # JSON is YAML: no YAML writer needed.
        self.config = self._dir / "prometheus.yml"
        self.config.write_text(json.dumps({"global": {"scrape_interval": "1s"},
                                           "scrape_configs": [scrape]}))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = self._dir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = closed_port()
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}",
                 f"--storage.tsdb.path={self._dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        log_text = self.log()
        self.stop()
        raise RuntimeError(f"prometheus did not start on port {self.port}:\n{log_text}")

    def log(self) -> str:
        return self._log.read_text(errors="replace")[-4000:] if self._log.exists() else ""

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector of ``promql`` now: ``[{"metric": {...}, "value": [t, "v"]}]``."""
        r = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=5)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The value of a query that yields one series (None: no series yet)."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, with their health and last error."""
        r = httpx.get(self.url + "/api/v1/targets", timeout=5)
        r.raise_for_status()
        active: list[dict[str, Any]] = r.json()["data"]["activeTargets"]
        return active

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
