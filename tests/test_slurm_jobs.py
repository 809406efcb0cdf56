"""JobLauncher over Parsl's SlurmProvider + SrunLauncher against a real Slurm of two compute
nodes (namespace hosts, ``tests/plugins/slurm.py``)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fabric.endpoint.deployments import DeploymentManager
from fabric.endpoint.jobs import JobLauncher, JobState, JobStatus
from fabric.sites import JobsConfig, TypedSpec, load_site
from tests.plugins.site import write_site
from tests.plugins.slurm import SlurmCluster

pytestmark = pytest.mark.slurm


def slurm_launcher(tmp_path: Path, walltime: str = "00:05:00", **overrides: Any) -> JobLauncher:
    jobs = JobsConfig(provider=TypedSpec(type="SlurmProvider", partition="debug", exclusive=False),
                      launcher=TypedSpec(type="SrunLauncher"), walltime=walltime)
    return JobLauncher.from_config(jobs, tmp_path / "scripts", **overrides)


def wait_for(launcher: JobLauncher, job_id: str, states: set[JobState],
             timeout: float = 30.0, poll: float = 0.2) -> JobStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = launcher.status([job_id])[job_id]
        if status.state in states or time.monotonic() > deadline:
            return status
        time.sleep(poll)


def test_two_ranks_see_their_slurm_procid(slurm: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    launcher = slurm_launcher(tmp_path)
    job = launcher.submit(
        f'echo "$SLURM_PROCID $FABRIC_RANK $SLURM_NTASKS $FABRIC_WORLD_SIZE" > {out}/$SLURM_PROCID',
        ranks=2, nodes=1, job_name="ranks")
    status = wait_for(launcher, job, {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
    assert status.state is JobState.COMPLETED, (status, slurm.squeue("-t", "all"))
    assert status.walltime == "00:05:00"
    assert {p.name: p.read_text() for p in out.iterdir()} == {"0": "0 0 2 2\n", "1": "1 1 2 2\n"}
    # Slurm itself says COMPLETED (MinJobAge keeps it in squeue), as does a launcher that did
    # not submit the job (a restarted endpoint reading job ids from its state dir).
    fresh = slurm_launcher(tmp_path).status([job])[job]
    assert fresh.state is JobState.COMPLETED


def test_cancel_is_cancelled_in_slurm(slurm: SlurmCluster, tmp_path: Path) -> None:
    launcher = slurm_launcher(tmp_path)
    job = launcher.submit("sleep 600", ranks=2, nodes=1, job_name="cancel-me")
    running = wait_for(launcher, job, {JobState.RUNNING})
    assert running.state is JobState.RUNNING
    assert running.reason == "None" and running.time_left is not None
    launcher.cancel(job)
    assert launcher.status([job])[job].state is JobState.CANCELLED
    fresh = slurm_launcher(tmp_path)  # Slurm's own view, not Parsl's bookkeeping
    assert wait_for(fresh, job, {JobState.CANCELLED}, timeout=15).state is JobState.CANCELLED


def test_queued_job_reports_position(slurm: SlurmCluster, tmp_path: Path) -> None:
    blocker = slurm_launcher(tmp_path, exclusive=True)  # takes both compute nodes
    big = blocker.submit("sleep 600", ranks=2, nodes=2, job_name="blocker")
    assert wait_for(blocker, big, {JobState.RUNNING}).state is JobState.RUNNING
    launcher = slurm_launcher(tmp_path)
    first = launcher.submit("true", ranks=2, nodes=1, job_name="waiting-1")
    second = launcher.submit("true", ranks=1, nodes=1, job_name="waiting-2")
    deadline = time.monotonic() + 15
    while True:  # reasons come from the main scheduler, estimates from backfill (bf_interval=1)
        statuses = launcher.status([first, second])
        if all(s.reason in ("Resources", "Priority") and s.estimated_start
               for s in statuses.values()):
            break
        assert time.monotonic() < deadline, statuses
        time.sleep(0.2)
    assert statuses[first].state is statuses[second].state is JobState.QUEUED
    assert (statuses[first].queue_position, statuses[second].queue_position) == (1, 2)
    assert statuses[first].reason == "Resources"
    start = statuses[first].estimated_start
    assert start is not None
    # the blocker's 5-minute limit bounds the wait (Slurm reports local time, whole seconds)
    assert datetime.now() - timedelta(seconds=5) <= start <= datetime.now() + timedelta(minutes=6)
    blocker.cancel(big)
    done = wait_for(launcher, first, {JobState.COMPLETED, JobState.FAILED}, timeout=30)
    assert done.state is JobState.COMPLETED, slurm.squeue("-t", "all")


def test_another_worker_sees_a_queued_job_and_cancels_it(slurm: SlurmCluster,
                                                         tmp_path: Path) -> None:
    """A request worker that did not submit the job (a new launcher, a fresh Parsl provider)
    sees it queued, with Slurm's reason, position and start estimate, and cancels it."""
    first = slurm_launcher(tmp_path, scheduler_options="#SBATCH --begin=now+1hour")
    job = first.submit("sleep 600", ranks=1, nodes=1, job_name="later")
    second = slurm_launcher(tmp_path)
    assert job not in second.provider.resources  # Parsl alone would not know it
    status = wait_for(second, job, {JobState.QUEUED})
    assert status.state is JobState.QUEUED, (status, slurm.squeue("-t", "all"))
    assert status.reason == "BeginTime" and status.queue_position == 1
    start = status.estimated_start
    assert start is not None, slurm.squeue("-t", "all", "-o", "%i|%T|%r|%S")
    assert timedelta(minutes=55) < start - datetime.now() < timedelta(minutes=65)
    time.sleep(1)  # still queued a moment later: nothing treats it as lost
    assert second.status([job])[job].state is JobState.QUEUED
    second.cancel(job)
    assert wait_for(second, job, {JobState.CANCELLED}, timeout=15).state is JobState.CANCELLED
    assert slurm.squeue("-h", "-t", "all", "-j", job, "-o", "%T").strip() == "CANCELLED"
    assert first.status([job])[job].state is JobState.CANCELLED
    second.cancel(job)  # cancelling a finished job again is harmless


def test_a_queued_deployment_is_neither_relaunched_nor_orphaned_by_another_worker(
        slurm: SlurmCluster, tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Two request workers (two DeploymentManagers on one state dir): the second refreshes the
    first one's queued deployment as queued, reuses it instead of launching a duplicate, and
    undeploys it, which cancels the Slurm job."""
    folder = write_site(tmp_path / "site", name="slurm-queue", model_dir=tiny_llama_dir,
                        jobs={"provider": {"type": "SlurmProvider", "partition": "debug",
                                           "exclusive": False,
                                           "scheduler_options": "#SBATCH --begin=now+1hour"},
                              "launcher": {"type": "SrunLauncher"}, "walltime": "00:10:00"})
    site = load_site(folder)
    entry = site.extra_models[0]
    first, second = (DeploymentManager(site, site.resolved_state_dir()) for _ in range(2))
    dep = first.deploy(entry)
    assert dep.job_id and dep.state == "queued", dep
    for _ in range(3):
        seen = second.refresh(second.db.get(dep.id) or dep)
        assert seen.state == "queued", seen.reason
        time.sleep(0.3)
    assert second.describe(seen)["job_reason"] == "BeginTime"
    assert second.deploy(entry).id == dep.id  # no duplicate job
    assert slurm.squeue("-h", "-t", "PD,R,CF,CG", "-o", "%i").split() == [dep.job_id]
    assert second.undeploy(dep.id).state == "dead"
    deadline = time.monotonic() + 15
    while slurm.squeue("-h", "-t", "all", "-j", dep.job_id, "-o", "%T").strip() != "CANCELLED":
        assert time.monotonic() < deadline, slurm.squeue("-t", "all")
        time.sleep(0.2)
