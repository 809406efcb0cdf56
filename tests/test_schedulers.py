"""The scheduler parsers (``fabric.endpoint.schedulers``) on recorded outputs (``tests/data/``),
and the local provider's view by pid through a launcher that did not submit the job."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest

from fabric.endpoint.jobs import JobLauncher
from fabric.endpoint.schedulers import JobState as S
from fabric.endpoint.schedulers import (
    LocalJobs,
    PBSPro,
    Slurm,
    clock_seconds,
    parse_qstat_json,
    parse_queue_order,
    parse_sacct,
    parse_squeue,
    scheduler_for,
    state_of,
)
from fabric.errors import DeploymentError
from fabric.sites import JobsConfig, TypedSpec

DATA = Path(__file__).parent / "data"
PBS = ".polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov"


def read(name: str) -> str:
    return (DATA / name).read_text()


def test_squeue_states_reasons_and_estimates() -> None:
    views = parse_squeue(read("squeue_jobs.txt"))
    states = {j: v.state for j, v in views.items()}
    assert states == {"4101": S.QUEUED, "4102": S.QUEUED, "4103": S.QUEUED, "4104": S.QUEUED,
                      "4110": S.QUEUED, "4098": S.RUNNING, "4099": S.RUNNING,
                      "4095": S.COMPLETED, "4096": S.CANCELLED, "4097": S.TIMEOUT,
                      "4100": S.FAILED}
    first = views["4101"]
    assert (first.reason, first.queue, first.limit) == ("Resources", "debug", "1:00:00")
    assert first.estimated_start == datetime(2026, 12, 2, 9, 12, 40)
    assert views["4102"].estimated_start is None  # N/A: backfill has no estimate yet
    assert views["4103"].reason == "BeginTime"
    assert views["4104"].reason == "JobHeldUser" and views["4104"].state is S.QUEUED
    running = views["4098"]
    assert running.time_left == "52:17" and running.estimated_start is None  # started already
    assert views["4097"].reason == "TimeLimit"


def test_time_left_in_seconds_tells_a_job_at_its_walltime() -> None:
    views = parse_squeue(read("squeue_jobs.txt"))
    assert clock_seconds(views["4098"].time_left) == 52 * 60 + 17
    assert clock_seconds(views["4101"].time_left) == 3600
    assert clock_seconds(views["4097"].time_left) == 0  # TIMEOUT: none left
    assert clock_seconds(views["4099"].time_left) == 4 * 60 + 59  # cancelled, not timed out
    running = parse_qstat_json(read("qstat_running.json"))
    assert {clock_seconds(v.time_left) for v in running.values()} >= {47 * 60 + 26}
    assert clock_seconds("1-02:00:00") == 93600
    for text in ("UNLIMITED", "INVALID", "N/A", "", None, "1:2:3:4", "x-1:00"):
        assert clock_seconds(text) is None, text


def test_queue_positions_count_within_the_partition() -> None:
    order = parse_queue_order(read("squeue_pending_order.txt"))
    assert order[:2] == [("4101", "debug"), ("4110", "gpu")]
    debug = [j for j, part in order if part == "debug"]
    assert debug.index("4102") + 1 == 2 and debug.index("4103") + 1 == 4


def test_sacct_for_jobs_squeue_forgot() -> None:
    views = parse_sacct(read("sacct_finished.txt"))
    assert {j: v.state for j, v in views.items()} == {
        "3990": S.COMPLETED, "3991": S.CANCELLED, "3992": S.TIMEOUT, "3993": S.FAILED,
        "3994": S.FAILED, "3995": S.FAILED}
    assert views["3991"].raw_state == "CANCELLED by 1000" and views["3991"].message == "signal 15"
    assert views["3993"].exit_code == 1 and views["3990"].exit_code == 0
    assert views["3994"].limit == "1-00:00:00"
    assert parse_sacct("sacct: error: Slurm accounting storage is disabled\n") == {}


def test_qstat_queued_held_with_estimate() -> None:
    views = parse_qstat_json(read("qstat_queued.json"))
    q, waiting, held = (views[f"{n}{PBS}"] for n in (2046118, 2046119, 2046120))
    assert q.state is S.QUEUED and q.raw_state == "Q" and q.queue == "small"
    assert q.estimated_start == datetime(2026, 12, 2, 9, 12)
    assert q.reason is not None and "Insufficient amount of resource: ngpus" in q.reason
    assert q.limit == "01:00:00" and q.position is None  # PBS reports no position
    assert waiting.state is S.QUEUED and waiting.estimated_start is None
    assert held.state is S.QUEUED and held.raw_state == "H"


def test_qstat_running_and_exiting_hold_their_nodes() -> None:
    views = parse_qstat_json(read("qstat_running.json"))
    running, exiting = views[f"2046117{PBS}"], views[f"2046121{PBS}"]
    assert running.state is S.RUNNING and running.time_left == "00:47:26"
    assert running.estimated_start is None
    assert exiting.state is S.RUNNING and exiting.raw_state == "E"  # not terminal yet


def test_qstat_finished_jobs_by_exit_status() -> None:
    views = parse_qstat_json(read("qstat_finished.json"))
    got = {j.split(".")[0]: (v.state, v.exit_code) for j, v in views.items()}
    assert got == {"2046100": (S.COMPLETED, 0),
                   "2046101": (S.CANCELLED, 271),  # qdel: 256 + SIGTERM
                   "2046102": (S.TIMEOUT, -29),  # JOB_EXEC_KILL_WALLTIME
                   "2046103": (S.FAILED, 1),
                   "2046104": (S.CANCELLED, None)}  # deleted while queued: never ran
    assert parse_qstat_json("qstat: Unknown Job Id 1.x\n") == {}
    assert parse_qstat_json('{"timestamp": 1, "Jobs": {}}') == {}


def test_state_names_and_scheduler_choice() -> None:
    assert state_of("CANCELLED by 0") is S.CANCELLED and state_of("") is S.UNKNOWN
    assert state_of("RUNNING") is S.RUNNING and state_of("WHATEVER") is S.UNKNOWN
    assert isinstance(scheduler_for("SlurmProvider"), Slurm)
    assert isinstance(scheduler_for("PBSProProvider"), PBSPro)
    assert isinstance(scheduler_for("LocalProvider"), LocalJobs)
    assert scheduler_for("KubernetesProvider") is None


def test_pbs_without_qstat_knows_nothing_and_qdel_errors_are_typed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert PBSPro().query(["1.server"]) == {}
    with pytest.raises(DeploymentError, match="qdel"):
        PBSPro().cancel("1.server")


def test_a_second_local_launcher_sees_and_cancels_the_first_ones_job(tmp_path: Path) -> None:
    jobs = JobsConfig(provider=TypedSpec(type="LocalProvider"),
                      launcher=TypedSpec(type="SingleNodeLauncher", debug=False))
    first = JobLauncher.from_config(jobs, tmp_path / "scripts")
    job = first.submit("sleep 600", ranks=1, nodes=1, job_name="mine")
    second = JobLauncher.from_config(jobs, tmp_path / "scripts")  # another request worker
    assert job not in second.provider.resources
    assert second.status([job])[job].state is S.RUNNING
    second.cancel(job)
    deadline = time.monotonic() + 10
    while first.status([job])[job].state is not S.CANCELLED and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.status([job])[job].state is S.CANCELLED
