"""The real ``globus-compute-endpoint start`` daemon, run by a test from a rendered site.

The endpoint directory is what ``fabric site check NAME --write DIR`` wrote, plus two lines a test
environment needs: ``local_compute_services: true`` (talk to ``fabric.testing.compute_fake`` on
localhost:5000) and, because a root endpoint clears its user endpoints' environment, a
``user_environment.yaml`` that gives them this venv, this source tree and a marker. The marker
(``FABRIC_GC_RUN``) is how ``stop`` finds every process the endpoint started, including user
endpoints and their workers, which run in sessions of their own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fabric import env as fenv
from fabric.errors import FabricError

MARKER = "FABRIC_GC_RUN"


class EndpointFailed(FabricError):
    """The endpoint daemon exited or did not register in time (see its log)."""


def client_env(gc_dir: Path) -> dict[str, str]:
    """Environment of an endpoint that logs in to the fake (a client-credentials app whose
    Auth calls go to localhost:5000) and keeps its state in ``gc_dir``."""
    return {"GLOBUS_COMPUTE_USER_DIR": str(gc_dir),
            "GLOBUS_COMPUTE_CLIENT_ID": "4d0b7f0c-8f1a-4a53-9d1c-0000000000c1",
            "GLOBUS_COMPUTE_CLIENT_SECRET": "fake-secret",
            "GLOBUS_SDK_SERVICE_URL_AUTH": "http://localhost:5000/"}


def prepare_endpoint_dir(ep_dir: Path, extra_env: dict[str, str] | None = None) -> str:
    """Point a rendered endpoint directory at the fake; returns the run marker."""
    marker = uuid.uuid4().hex
    config = yaml.safe_load((ep_dir / "config.yaml").read_text()) or {}
    config["local_compute_services"] = True
    (ep_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": bin_dir + os.pathsep + (fenv.PATH.get() or "/usr/bin:/bin"),
           "PYTHONPATH": fenv.PYTHONPATH.get() or "", "HOME": str(ep_dir),
           MARKER: marker, **client_env(ep_dir.parent), **(extra_env or {})}
    (ep_dir / "user_environment.yaml").write_text(yaml.safe_dump(env))
    return marker


@dataclass
class EndpointDaemon:
    """``globus-compute-endpoint start NAME`` with ``GLOBUS_COMPUTE_USER_DIR`` = ``gc_dir``."""

    gc_dir: Path
    name: str
    marker: str
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        """The endpoint manager's log."""
        return self.gc_dir / self.name / "endpoint.log"

    def start(self, registered: Any, timeout_s: float = 120.0) -> str:
        """Start the daemon; ``registered()`` returns its endpoint id once the service has it."""
        bin_dir = Path(sys.executable).parent
        self.env = {**os.environ, **client_env(self.gc_dir), MARKER: self.marker,
                    "PATH": f"{bin_dir}{os.pathsep}{fenv.PATH.get() or ''}"}
        with open(self.gc_dir / f"{self.name}.out", "wb") as out:
            # Its own session: on stop the endpoint signals its whole process group.
            self.process = subprocess.Popen(
                [str(bin_dir / "globus-compute-endpoint"), "start", self.name],
                env=self.env, stdout=out, stderr=out, start_new_session=True)
        t0 = time.monotonic()
        while (endpoint_id := registered()) is None:
            if self.process.poll() is not None or time.monotonic() - t0 > timeout_s:
                tail = self.tail()
                self.stop()
                raise EndpointFailed(f"endpoint {self.name} did not register:\n{tail}")
            time.sleep(0.1)
        return str(endpoint_id)

    def tail(self, chars: int = 4000) -> str:
        """The end of the daemon's output and log (for failure messages)."""
        parts = []
        for path in (self.gc_dir / f"{self.name}.out", self.log):
            if path.exists():
                parts.append(f"--- {path}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def stop(self, timeout_s: float = 30.0) -> None:
        """TERM the daemon's session (it stops its user endpoints), then TERM and KILL
        whatever still carries this run's marker."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = marked(self.marker)
            for pid in pids:
                _signal(pid, sig)
            deadline = time.monotonic() + 10
            while pids and time.monotonic() < deadline:
                pids = marked(self.marker)
                time.sleep(0.2)


    def kill(self, timeout_s: float = 10.0) -> list[int]:
        """KILL the daemon and every process of this run at once, as a crashed login node
        would lose them (no clean stop: nothing tells the service); returns their pids."""
        pids = marked(self.marker)
        if self.process is not None:
            pids.append(self.process.pid)
            _signal_group(self.process.pid, signal.SIGKILL)  # its session (environ rewritten)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while marked(self.marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        return pids


def marked(marker: str) -> list[int]:
    """Processes whose environment carries ``FABRIC_GC_RUN=marker`` (not this one)."""
    needle = f"{MARKER}={marker}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                out.append(int(entry.name))
        except OSError:
            continue
    return out


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
