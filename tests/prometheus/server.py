"""A real Prometheus server for tests: ``running_prometheus(targets, folder)``.

It runs the Debian ``prometheus`` binary (``tests/prometheus/install.sh``) on 127.0.0.1 at a free
port, with a generated config (scrape interval 1 s) and its storage in ``folder``, and stops it
on exit (terminate, then kill), whatever the test did. ``Prom.query`` asks its HTTP API.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml


def require_prometheus() -> str:
    """The ``prometheus`` binary; skips the test without it (fails under ``CI=true``)."""
    binary = shutil.which("prometheus")
    if binary:
        return binary
    message = ("Prometheus is not installed (tests/prometheus/install.sh, as root: "
               "apt-get install prometheus)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; under CI=true the metrics tests must run")
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Prom:
    """A running Prometheus."""

    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (``[{"metric": ..., "value": ...}]``)."""
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        reply.raise_for_status()
        body = reply.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def scalar(self, expr: str) -> float | None:
        """The single value ``expr`` evaluates to now (``None`` when it has no series)."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr} has {len(result)} series: {result}"
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, ok: Callable[[float | None], bool], timeout_s: float
                 ) -> float | None:
        """Poll ``expr`` until ``ok(value)``; fails after ``timeout_s`` with the last value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.scalar(expr)
            if ok(value):
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"after {timeout_s:g} s Prometheus still says {expr} = {value}",
                            pytrace=False)
            time.sleep(0.5)


@contextmanager
def running_prometheus(targets: dict[str, str], folder: Path,
                       timeout_s: float = 60.0) -> Iterator[Prom]:
    """Prometheus scraping each ``job -> host:port`` (path ``/metrics``) every second."""
    binary = require_prometheus()
    folder.mkdir(parents=True, exist_ok=True)
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                         "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                                 for job, target in targets.items()]}
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (folder / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={folder / 'prometheus.yml'}",
         f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}: "
                            f"{(folder / 'prometheus.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready within {timeout_s:g} s")
            time.sleep(0.2)
        yield Prom(url)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
