"""A real RabbitMQ broker for tests: Debian's ``rabbitmq-server``, started and stopped by the test.

Debian's ``/usr/sbin/rabbitmq-server`` wrapper switches user and writes under ``/var/log``, so the
broker runs from ``/usr/lib/rabbitmq/bin`` directly, with its own ``HOME`` (Erlang cookie), node
name, database and log folders inside a temp dir, listening on loopback only (AMQP, Erlang
distribution and ``epmd``). ``stop`` asks the node to halt, then ends ``epmd``, which the broker
started. Install it with ``tests/globus_offline/install.sh`` (``apt-get install rabbitmq-server``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fabric.errors import FabricError

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
"""Where Debian installs the broker's own scripts (not the user-switching wrapper)."""


class BrokerUnavailable(FabricError):
    """RabbitMQ is not installed or did not start (install ``rabbitmq-server``; retry won't
    help until it is)."""


def installed() -> bool:
    """Whether the broker's scripts and ``epmd`` are on this machine."""
    return (RABBIT_BIN / "rabbitmq-server").exists() and shutil.which("epmd") is not None


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RabbitBroker:
    """One broker node in ``folder``; ``url`` is its AMQP address (guest, loopback only)."""

    folder: Path
    port: int = field(default_factory=free_port)
    node: str = field(default_factory=lambda: f"fabric{os.getpid()}@localhost")
    process: subprocess.Popen[bytes] | None = None
    started_s: float = 0.0
    """Seconds from launch until AMQP connections were accepted."""

    @property
    def url(self) -> str:
        """``amqp://`` URL of the broker (RabbitMQ's guest user works from loopback only)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        """The broker's (and ``rabbitmqctl``'s) environment: everything under ``folder``."""
        loopback = "-kernel inet_dist_use_interface {127,0,0,1}"
        return {**os.environ, "HOME": str(self.folder / "home"),
                "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(free_port()),
                "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.folder / "log"),
                "RABBITMQ_PID_FILE": str(self.folder / "broker.pid"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": loopback,
                "RABBITMQ_CTL_ERL_ARGS": loopback,
                "ERL_EPMD_ADDRESS": "127.0.0.1"}

    def start(self, timeout_s: float = 90.0) -> RabbitBroker:
        """Launch the node and wait until it accepts AMQP connections."""
        if not installed():
            raise BrokerUnavailable(f"RabbitMQ is not installed ({RABBIT_BIN}/rabbitmq-server "
                                    "missing): apt-get install rabbitmq-server")
        (self.folder / "home").mkdir(parents=True, exist_ok=True)
        (self.folder / "enabled_plugins").write_text("[].\n")  # no management plugin
        t0 = time.monotonic()
        with open(self.folder / "broker.out", "wb") as out:
            # Its own session: nothing a test does to its process group reaches the broker.
            self.process = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")],
                                            env=self.env(), stdout=out, stderr=out,
                                            start_new_session=True)
        while not self._accepts():
            if self.process.poll() is not None or time.monotonic() - t0 > timeout_s:
                self.stop()
                log = (self.folder / "broker.out").read_text(errors="replace")[-2000:]
                raise BrokerUnavailable(f"RabbitMQ did not start in {timeout_s:.0f} s:\n{log}")
            time.sleep(0.2)
        self.started_s = time.monotonic() - t0
        return self

    def _accepts(self) -> bool:
        import pika

        try:
            pika.BlockingConnection(pika.URLParameters(self.url)).close()
            return True
        except Exception:
            return False

    def stop(self) -> None:
        """Halt the node (``rabbitmqctl stop``; TERM then KILL its session if that fails),
        then end ``epmd``."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, "stop"],
                           env=self.env(), capture_output=True, timeout=60, check=False)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(proc.pid, sig)
                        proc.wait(timeout=10)
                        break
                    except (ProcessLookupError, subprocess.TimeoutExpired):
                        continue
        subprocess.run(["epmd", "-kill"], env=self.env(), capture_output=True, timeout=30,
                       check=False)
