"""JobLauncher over Parsl's LocalProvider + SingleNodeLauncher: real processes, no scheduler."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from fabric.endpoint.jobs import JobLauncher, JobState, JobStatus
from fabric.errors import DeploymentError, InvalidSiteConfig
from fabric.procs import process_running
from fabric.sites import JobsConfig, TypedSpec


def local_launcher(tmp_path: Path, walltime: str = "00:59:17") -> JobLauncher:
    jobs = JobsConfig(provider=TypedSpec(type="LocalProvider"),
                      launcher=TypedSpec(type="SingleNodeLauncher", debug=False),
                      walltime=walltime)
    return JobLauncher.from_config(jobs, tmp_path / "scripts")


def wait_for(launcher: JobLauncher, job_id: str, states: set[JobState],
             timeout: float = 20.0) -> JobStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = launcher.status([job_id])[job_id]
        if status.state in states or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def gone(*pids: int, timeout: float = 5.0) -> bool:
    """True once none of ``pids`` is alive (signals take a moment)."""
    deadline = time.monotonic() + timeout
    while any(process_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(process_running(p) for p in pids)


def test_two_copies_run_then_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # A walltime no other test uses, so the watchdog check below sees only this job's `sleep`;
    # the job runs 3 s so that it is still running at the first status on a loaded machine.
    launcher = local_launcher(tmp_path, walltime="00:59:11")
    job = launcher.submit(f'echo "$1 $FABRIC_RANK $FABRIC_WORLD_SIZE" > {out}/copy.$1; sleep 3',
                          ranks=2, nodes=1, job_name="two copies")
    first = launcher.status([job])[job]
    assert first.state is JobState.RUNNING
    assert first.walltime == "00:59:11"
    done = wait_for(launcher, job, {JobState.COMPLETED, JobState.FAILED})
    assert done.state is JobState.COMPLETED and done.exit_code == 0
    assert sorted(p.read_text() for p in out.iterdir()) == ["1 0 2\n", "2 1 2\n"]
    # the walltime watchdog went away with the job
    left = subprocess.run(["pgrep", "-f", "^sleep 3551$"], capture_output=True, check=False)
    assert left.returncode == 1, left.stdout


def test_cancel_kills_the_whole_job(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    launcher = local_launcher(tmp_path)
    job = launcher.submit(f"echo $$ > {pid_file}.$1; sleep 600", ranks=2, nodes=1, job_name="s")
    deadline = time.monotonic() + 10
    while len(list(tmp_path.glob("pid.*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int(p.read_text()) for p in tmp_path.glob("pid.*")]
    assert len(pids) == 2 and all(process_running(p) for p in pids)
    launcher.cancel(job)
    status = wait_for(launcher, job, {JobState.CANCELLED})
    assert status.state is JobState.CANCELLED
    assert gone(*pids)
    launcher.cancel(job)  # cancelling again is harmless


def test_a_fresh_launcher_sees_and_cancels_an_old_job(tmp_path: Path) -> None:
    """An endpoint restarted with job ids from its state dir can still watch and stop them."""
    old = local_launcher(tmp_path)
    job = old.submit(f"echo $$ > {tmp_path}/pid; sleep 600", ranks=1, nodes=1, job_name="old")
    deadline = time.monotonic() + 10
    while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    fresh = local_launcher(tmp_path)
    assert fresh.status([job])[job].state is JobState.RUNNING
    fresh.cancel(job)
    assert wait_for(fresh, job, {JobState.UNKNOWN}).state is JobState.UNKNOWN
    assert wait_for(old, job, {JobState.CANCELLED}).state is JobState.CANCELLED
    assert gone(int((tmp_path / "pid").read_text()))
    assert fresh.status(["999999999"])["999999999"].state is JobState.UNKNOWN


def test_walltime_watchdog_ends_local_job_as_timeout(tmp_path: Path) -> None:
    launcher = local_launcher(tmp_path, walltime="00:00:02")
    job = launcher.submit(f"echo $$ > {tmp_path}/pid; sleep 60", ranks=1, nodes=1, job_name="w")
    status = wait_for(launcher, job, {JobState.TIMEOUT, JobState.COMPLETED}, timeout=15)
    assert status.state is JobState.TIMEOUT, status
    assert "walltime" in (status.message or "")
    assert gone(int((tmp_path / "pid").read_text()))


def _watchdog_sleeps(seconds: int) -> list[str]:
    found = subprocess.run(["pgrep", "-f", f"^sleep {seconds}$"], capture_output=True,
                           text=True, check=False)
    return found.stdout.split()


def test_walltime_watchdog_counts_hours_and_minutes(tmp_path: Path) -> None:
    """The other walltime tests give seconds only (00:00:02) or only check that the watchdog
    left: 02:01:07 must be 7267 s, not 7 s, nor 2 h alone. (A walltime no other test uses.)"""
    launcher = local_launcher(tmp_path, walltime="02:01:07")
    job = launcher.submit(f"echo $$ > {tmp_path}/pid; sleep 600", ranks=1, nodes=1,
                          job_name="hms")
    try:
        deadline = time.monotonic() + 10
        while not _watchdog_sleeps(7267) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _watchdog_sleeps(7267)
        assert launcher.status([job])[job].state is JobState.RUNNING
    finally:
        launcher.cancel(job)
    assert wait_for(launcher, job, {JobState.CANCELLED}).state is JobState.CANCELLED
    deadline = time.monotonic() + 5
    while _watchdog_sleeps(7267) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _watchdog_sleeps(7267)  # it went away with the job


def test_unknown_type_names_list_accepted(tmp_path: Path) -> None:
    jobs = JobsConfig(provider=TypedSpec(type="SlurmProviderr"))
    with pytest.raises(InvalidSiteConfig) as err:
        JobLauncher.from_config(jobs, tmp_path)
    assert "SlurmProviderr" in str(err.value)
    accepted = set(err.value.details["accepted"])
    assert {"LocalProvider", "SlurmProvider", "PBSProProvider"} <= accepted
    jobs = JobsConfig(launcher=TypedSpec(type="Srun"))
    with pytest.raises(InvalidSiteConfig, match="SrunLauncher"):
        JobLauncher.from_config(jobs, tmp_path)
    with pytest.raises(InvalidSiteConfig, match="HH:MM:SS"):
        JobLauncher.from_config(JobsConfig(), tmp_path, walltime="90")
    with pytest.raises(InvalidSiteConfig, match="leave debug on"):
        JobLauncher.from_config(JobsConfig(launcher=TypedSpec(type="SrunLauncher", debug=False)),
                                tmp_path)
    with pytest.raises(InvalidSiteConfig, match="partitio"):
        JobLauncher.from_config(JobsConfig(provider=TypedSpec(type="LocalProvider",
                                                              partitio="x")), tmp_path)


def test_uneven_ranks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="3 ranks on 2 nodes"):
        local_launcher(tmp_path).submit("true", ranks=3, nodes=2, job_name="x")


def slurm_jobs() -> JobsConfig:
    return JobsConfig(provider=TypedSpec(type="SlurmProvider", partition="debug"),
                      launcher=TypedSpec(type="SrunLauncher"), walltime="00:10:00")


def test_slurm_without_sbatch_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    launcher = JobLauncher.from_config(slurm_jobs(), tmp_path / "scripts", nodes=2)
    assert launcher.provider.nodes_per_block == 2
    with pytest.raises(DeploymentError, match="sbatch not found"):
        launcher.submit("true", ranks=2, nodes=1, job_name="x")


def test_slurm_submit_failure_carries_stderr(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    launcher = JobLauncher.from_config(slurm_jobs(), tmp_path / "scripts")
    with pytest.raises(DeploymentError, match="invalid partition") as err:
        launcher.submit("true", ranks=1, nodes=1, job_name="x")
    assert "invalid partition" in err.value.details["stderr"]
    script = next((tmp_path / "scripts").glob("x.*[0-9]"))  # Parsl's sbatch script
    text = script.read_text()
    assert "#SBATCH --time=10" in text and "#SBATCH --partition=debug" in text
    assert "srun --ntasks 1" in text


def test_untyped_provider_arguments_are_type_checked(tmp_path: Path) -> None:
    """Parsl's PBS provider takes any value: ``cpus_per_node: sixtyfour`` became
    ``#PBS -l select=1:ncpus=sixtyfour``."""
    jobs = JobsConfig(provider=TypedSpec(type="PBSProProvider", cpus_per_node="sixtyfour"),
                      launcher=TypedSpec(type="MpiExecLauncher"))
    with pytest.raises(InvalidSiteConfig, match=r"jobs\.provider\.cpus_per_node: 'sixtyfour' "
                                                r"is not int") as err:
        JobLauncher.from_config(jobs, tmp_path)
    assert err.value.details["key"] == "jobs.provider.cpus_per_node"
    jobs = JobsConfig(provider=TypedSpec(type="PBSProProvider", cpus_per_node=64),
                      launcher=TypedSpec(type="MpiExecLauncher", debug="yes"))
    with pytest.raises(InvalidSiteConfig, match=r"jobs\.launcher\.debug"):
        JobLauncher.from_config(jobs, tmp_path)


def test_render_is_submit_without_the_scheduler(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``render`` (``fabric site check``) writes the script ``submit`` hands the scheduler and
    returns it with the command, never running it; it refuses what ``submit`` refuses."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: nothing could be submitted
    launcher = JobLauncher.from_config(slurm_jobs(), tmp_path / "scripts")
    script, command = launcher.render("echo hi", ranks=4, nodes=2, job_name="m")
    assert command.startswith("sbatch ") and "#SBATCH --nodes=2" in script
    assert "srun --ntasks 4" in script
    with pytest.raises(DeploymentError, match="3 ranks on 2 nodes"):
        launcher.render("echo hi", ranks=3, nodes=2, job_name="m")
