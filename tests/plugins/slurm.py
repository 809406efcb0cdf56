"""A real single-node Slurm cluster for tests marked ``@pytest.mark.slurm``.

``slurm_cluster`` (session scope) starts munged + slurmctld + slurmd with ``tests/slurm/start.sh``
in a temp dir, puts ``SLURM_CONF`` in ``os.environ`` for the session and stops everything with
``tests/slurm/stop.sh`` at the end. ``slurm`` (function scope) is the same cluster, with every job
cancelled after the test so each test starts on an empty node.

Without the Slurm binaries (or when the daemons cannot start) the tests are skipped, except
under ``CI=true``, where they fail: CI must prove the real scheduler runs
(``tests/slurm/install.sh`` installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabric import env

SCRIPTS = Path(__file__).resolve().parent.parent / "slurm"
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "srun")


@dataclass(frozen=True)
class SlurmCluster:
    """A running test cluster."""

    dir: Path
    """State, spool, logs and PID files."""
    conf: Path
    """Its ``slurm.conf`` (also in ``os.environ['SLURM_CONF']``)."""
    node: str
    """The one node's name."""
    cpus: int
    """CPUs the node advertises."""
    partition: str = "debug"

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
    """Start a real single-node Slurm for the session (skips without Slurm unless CI=true)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [b for b in DAEMONS if shutil.which(b, path=path) is None]
    if missing:
        _unavailable(f"missing {', '.join(missing)}")
    cluster_dir = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "PATH": path}
    try:
        proc = subprocess.run([str(SCRIPTS / "start.sh"), str(cluster_dir)], capture_output=True,
                              text=True, env=env, timeout=90, check=False)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess([], 1, "", "start.sh timed out after 90 s")
    if proc.returncode != 0:
        subprocess.run([str(SCRIPTS / "stop.sh"), str(cluster_dir)], capture_output=True,
                       env=env, timeout=60, check=False)
        _unavailable(f"start.sh failed (rc={proc.returncode}): {proc.stderr.strip()[-2000:]}")
    conf = cluster_dir / "slurm.conf"
    settings = dict(line.split("=", 1) for line in conf.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    node_line = next(line for line in conf.read_text().splitlines() if line.startswith("NodeName="))
    node = node_line.split()[0].split("=", 1)[1]
    cpus = int(node_line.split("CPUs=", 1)[1].split()[0])
    assert settings.get("MinJobAge") == "600"
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield SlurmCluster(dir=cluster_dir, conf=conf, node=node, cpus=cpus)
    finally:
        stop = subprocess.run([str(SCRIPTS / "stop.sh"), str(cluster_dir)], capture_output=True,
                              text=True, env=env, timeout=120, check=False)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        if stop.returncode != 0:
            raise RuntimeError(f"stop.sh failed: {stop.stderr}")


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster, emptied of jobs after the test."""
    yield slurm_cluster
    slurm_cluster.cancel_all()
