"""A real Slurm cluster of namespace hosts for tests marked ``@pytest.mark.slurm``.

``slurm_cluster`` (session scope) builds the hosts and starts munged + slurmctld (on ``login``)
and a slurmd on each compute node (``fabric.testing.netns_cluster``), puts ``SLURM_CONF`` in
``os.environ`` for the session and removes the namespaces with everything in them at the end
(and at exit, should the session die first). ``tests/slurm/start.sh`` still starts a plain
single-node Slurm by hand. ``slurm`` (function scope) is the same cluster, with every job
cancelled after the test so each test starts on an empty node.

Without the Slurm binaries (or when the daemons cannot start) the tests are skipped, except
under ``CI=true``, where they fail: CI must prove the real scheduler runs
(``tests/slurm/install.sh`` installs it).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabric import env
from fabric.testing.netns_cluster import NetnsCluster


@dataclass(frozen=True)
class SlurmCluster:
    """A running test cluster."""

    dir: Path
    """State, spool, logs and PID files."""
    conf: Path
    """Its ``slurm.conf`` (also in ``os.environ['SLURM_CONF']``)."""
    node: str
    """The first compute node's name (jobs of one node land there while it is idle)."""
    cpus: int
    """CPUs each compute node advertises."""
    partition: str = "debug"
    hosts: NetnsCluster | None = None
    """The namespace hosts (login, compute1, compute2, laptop) the cluster runs on."""

    def squeue(self, *args: str) -> str:
        """``squeue`` output against this cluster."""
        return subprocess.run(["squeue", *args], capture_output=True, text=True, check=False,
                              env={**os.environ, "SLURM_CONF": str(self.conf)}).stdout

    def cancel_all(self, wait_s: float = 20.0) -> None:
        """Cancel every job and wait until none is pending or running."""
        ids = self.squeue("-h", "-t", "PD,R,CG,CF,S", "-o", "%i").split()
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, check=False)
        deadline = time.monotonic() + wait_s
        while self.squeue("-h", "-t", "PD,R,CG,CF,S", "-o", "%i").strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"jobs still active after {wait_s}s:\n{self.squeue()}")
            time.sleep(0.2)


def _ci() -> bool:
    return (env.CI.get() or "").lower() == "true"


def _unavailable(reason: str) -> None:
    if _ci():
        pytest.fail(f"CI=true and Slurm is not usable: {reason}", pytrace=False)
    pytest.skip(f"Slurm not usable here ({reason}); run tests/slurm/install.sh as root")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A real Slurm across namespace hosts for the session (``fabric.testing.netns_cluster``:
    slurmctld on ``login``, one slurmd on each of ``compute1``/``compute2``, a ``laptop`` that
    reaches only ``login``). Skips without root/Slurm unless CI=true; torn down (every process
    in the namespaces killed, the namespaces deleted) however the session ends."""
    from fabric.testing import netns_cluster

    missing = netns_cluster.missing_tools()
    if missing:
        _unavailable(f"missing {', '.join(missing)}")
    atexit.register(netns_cluster.clean)  # a session killed mid-way still tears down
    try:
        hosts = netns_cluster.start(tmp_path_factory.mktemp("slurm"))
    except netns_cluster.ClusterUnavailable as exc:
        _unavailable(str(exc)[-3000:])
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(hosts.conf)
    try:
        yield SlurmCluster(dir=hosts.dir, conf=hosts.conf, node="compute1", cpus=hosts.cpus,
                           partition=hosts.partition, hosts=hosts)
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        left = netns_cluster.stop(hosts)
        atexit.unregister(netns_cluster.clean)
        if netns_cluster.missing_tools() == [] and netns_cluster.namespaces():
            raise RuntimeError(f"namespaces left after stop: {left}")


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster, emptied of jobs after the test."""
    yield slurm_cluster
    slurm_cluster.cancel_all()
