"""Model servers reachable where they run: a server in its own network namespace (a "compute
node" at 198.18.0.2) advertises the address the site's ``server.network`` CIDR picks there,
and a client in the host namespace (the "login node", 198.18.0.1) gets correct answers over
CURVE through it.

Needs root and ``ip`` (network namespaces); skipped otherwise, failed under ``CI=true``. Only
198.18.0.0/15 (the benchmarking range) is used; the namespace and its veth pair are deleted and
the server's processes killed by pid even when the test fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from fabric import tickets
from fabric.endpoint.jobs import JobLauncher
from fabric.engine.launch import prepare_server_launch
from fabric.errors import ModelServerUnavailable
from fabric.protocol import InferenceRequest
from fabric.serverclient import ServerClient
from fabric.sites import JobsConfig, NetworkConfig, Plan, ServerConfig, TypedSpec
from fabric.weights import prepare
from tests.plugins.ci import cannot_run
from tests.plugins.models import tiny_entry
from tests.plugins.servers import hf_greedy

pytestmark = pytest.mark.slow

HOST_ADDR, NODE_ADDR, PREFIX = "198.18.0.1", "198.18.0.2", 24
READY_TIMEOUT_S = 120.0


@dataclasses.dataclass(frozen=True)
class Namespace:
    """A network namespace joined to the host by a veth pair."""

    name: str
    address: str
    """Its address on the veth (the host side has ``HOST_ADDR``)."""

    def exec_prefix(self) -> str:
        """Shell prefix that runs a command inside the namespace."""
        return f"ip netns exec {shlex.quote(self.name)}"


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@pytest.fixture
def netns() -> Iterator[Namespace]:
    """One namespace at 198.18.0.2/24, the host at 198.18.0.1/24; deleted afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        cannot_run("network namespaces need root and ip(8)")
    tag = f"{os.getpid() % 100000}"
    ns, host_if, node_if = f"fabric-node-{tag}", f"fab{tag}h", f"fab{tag}n"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", node_if)
        _ip("link", "set", node_if, "netns", ns)
        _ip("addr", "add", f"{HOST_ADDR}/{PREFIX}", "dev", host_if)
        _ip("link", "set", host_if, "up")
        for args in (("addr", "add", f"{NODE_ADDR}/{PREFIX}", "dev", node_if),
                     ("link", "set", node_if, "up"), ("link", "set", "lo", "up")):
            _ip("netns", "exec", ns, "ip", *args)
        yield Namespace(ns, NODE_ADDR)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _wait_info(path: Path, timeout: float) -> dict[str, Any]:
    deadline, info = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(path.read_text())
        if info.get("state") in ("ready", "dead"):
            break
        time.sleep(0.2)
    return info


@contextlib.contextmanager
def server_in(tmp_path: Path, weights: Path, network: NetworkConfig,
              prefix: str = "") -> Iterator[tuple[dict[str, Any], str]]:
    """A tiny-model server launched as the deployment manager does (``prepare_server_launch``
    then a ``JobLauncher`` job), its command run behind ``prefix``; yields (info, ticket) once
    the head says ready or dead, and kills the job and the head by pid afterwards."""
    entry = tiny_entry("tiny_llama", weights)
    folder = tmp_path / "server"
    folder.mkdir()
    (tmp_path / "state").mkdir()
    server = ServerConfig(idle_timeout_s=600, threads_per_rank=1, network=network)
    launch = prepare_server_launch("netns", entry, prepare(entry), Plan(), server,
                                   tmp_path / "state", folder)
    if prefix:
        launch = dataclasses.replace(launch, command=f"{prefix} bash -c "
                                                     f"{shlex.quote(launch.command)}")
    jobs = JobsConfig(provider=TypedSpec(type="LocalProvider"),
                      launcher=TypedSpec(type="SingleNodeLauncher"), walltime="00:30:00")
    launcher = JobLauncher.from_config(jobs, folder / "scripts")
    job = launch.submit(launcher, "netns")
    info: dict[str, Any] = {}
    try:
        info = _wait_info(folder / "info.json", READY_TIMEOUT_S)
        key = tickets.load_or_create_key(Path(launch.config.ticket_key_path))
        yield info, tickets.issue(key, model=entry.name, ttl_s=600)
    finally:
        with contextlib.suppress(Exception):
            launcher.cancel(job)
        if info.get("pid"):
            _kill(int(info["pid"]))
        _kill(int(job))


def test_server_in_a_namespace_is_reached_through_its_cidr_address(
        netns: Namespace, tmp_path: Path, tiny_llama_dir: Path) -> None:
    network = NetworkConfig(advertise="198.18.0.0/15")
    with server_in(tmp_path, tiny_llama_dir, network, netns.exec_prefix()) as (info, ticket):
        assert info.get("state") == "ready", info
        host, _, port = info["address"].removeprefix("tcp://").rpartition(":")
        assert host == netns.address and port.isdigit()
        prompt = "The quick brown fox"
        req = InferenceRequest(model="tiny_llama", prompt=prompt, sampling={"max_tokens": 8})
        with ServerClient(info["address"], info["public_key"], timeout_s=60) as client:
            client.submit(req, ticket)
            result = client.result(req.request_id, 120)
        assert result["token_ids"] == hf_greedy(tiny_llama_dir, prompt, 8)
        # CURVE is on: a client that expects another server key gets no answer
        wrong = zmq.curve_keypair()[0].decode()
        with ServerClient(info["address"], wrong, timeout_s=3) as stranger, \
                pytest.raises(ModelServerUnavailable):
            stranger.health()


def test_a_node_without_the_network_refuses_to_serve(tmp_path: Path,
                                                     tiny_llama_dir: Path) -> None:
    network = NetworkConfig(advertise="198.19.254.0/24")  # nothing here is in it
    with server_in(tmp_path, tiny_llama_dir, network) as (info, _):
        assert info.get("state") == "dead", info
        assert "AddressNotFound" in info["reason"] and "198.19.254.0/24" in info["reason"]
        assert "lo 127.0.0.1/8" in info["reason"]
