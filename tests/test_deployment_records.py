"""The deployment manager's decisions from what a job, an info file and a health ping say, with
those three played by stand-ins: no model server is launched here (``test_deployments.py``
runs the real ones). Which record a request reuses, when a record is dead and what it keeps,
what ``fabric deployments`` shows, and whose usage is collected."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fabric.endpoint import deployments, policy, site_events
from fabric.endpoint.deployments import DeploymentManager
from fabric.endpoint.jobs import JobStatus
from fabric.endpoint.schedulers import JobState
from fabric.endpoint.state import Deployment
from fabric.errors import DeploymentError
from fabric.sites import load_site

ENTRY: Any = SimpleNamespace(name="m", version="1", dtype="float32")


class Launcher:
    """A batch scheduler that says what the test sets and records cancellations."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobStatus] = {}
        self.cancelled: list[str] = []

    def set(self, job_id: str, state: JobState, **detail: Any) -> None:
        self.jobs[job_id] = JobStatus(job_id, state, **detail)

    def status(self, ids: list[str]) -> dict[str, JobStatus]:
        return {i: self.jobs[i] for i in ids if i in self.jobs}

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)


@pytest.fixture
def mgr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DeploymentManager]:
    manager = DeploymentManager(load_site("local"), tmp_path)
    manager._launcher = Launcher()
    health: dict[str, dict[str, Any] | None] = {}
    manager.health_replies = health  # type: ignore[attr-defined]
    monkeypatch.setattr(manager, "health", lambda dep: health.get(dep.id))
    monkeypatch.setattr(deployments.pings, "forget", lambda address: None)
    yield manager


def _add(mgr: DeploymentManager, dep_id: str, state: str, **fields: Any) -> Deployment:
    now = time.time()
    port = 5000 + sum(map(ord, dep_id))
    dep = Deployment(**{"id": dep_id, "model": "m", "version": "1", "state": state,
                        "job_id": f"job-{dep_id}", "address": f"tcp://10.255.0.1:{port}",
                        "public_key": "k", "created": now, "last_used": now, **fields})
    mgr.db.insert(dep)
    return dep


def _tokens(state_dir: Path, who: str) -> int:
    return sum(int(r["tokens"]) for r in policy.usage(state_dir) if r["identity"] == who)


def test_the_newest_warm_server_is_reused(mgr: DeploymentManager) -> None:
    _add(mgr, "old", "ready", created=time.time() - 600)
    _add(mgr, "new", "ready", created=time.time() - 60)
    _add(mgr, "newest", "loading", created=time.time() - 5)
    mgr.health_replies.update(old={"state": "ready"}, new={"state": "ready"})  # type: ignore
    assert mgr.ensure(ENTRY).id == "new"
    assert mgr.find("m").id == "new"  # type: ignore[union-attr]


def test_a_queued_job_waits_as_long_as_the_queue_but_a_running_one_must_be_ready(
        mgr: DeploymentManager) -> None:
    """``server.ready_timeout_s`` bounds loading, not the batch queue: a job still queued
    is never reaped for being slow, a running job that is not ready in time is."""
    late = time.time() - mgr.site.server.ready_timeout_s - 60
    queued = _add(mgr, "q", "queued", created=late, address=None)
    mgr.launcher().set("job-q", JobState.QUEUED)
    assert mgr.refresh(queued).state == "queued"
    assert mgr.launcher().cancelled == []
    mgr.launcher().set("job-q", JobState.RUNNING)
    gone = mgr.refresh(mgr.db.get("q"))  # type: ignore[arg-type]
    assert gone.state == "dead" and "server.ready_timeout_s" in gone.reason
    assert mgr.launcher().cancelled == ["job-q"]


def test_waiting_for_a_server_that_is_draining_fails_at_once(mgr: DeploymentManager) -> None:
    _add(mgr, "d", "loading")
    mgr.launcher().set("job-d", JobState.RUNNING)
    mgr.health_replies["d"] = {"state": "draining"}  # type: ignore[attr-defined]
    t0 = time.monotonic()
    with pytest.raises(DeploymentError, match="draining"):
        mgr.wait_ready("d", wait_s=30)
    assert time.monotonic() - t0 < 10


def test_undeploying_a_dead_deployment_keeps_why_it_died(mgr: DeploymentManager) -> None:
    _add(mgr, "x", "dead", reason="job failed (exit 1)")
    assert mgr.undeploy("x").reason == "job failed (exit 1)"
    assert mgr.db.get("x").reason == "job failed (exit 1)"  # type: ignore[union-attr]
    assert mgr.launcher().cancelled == []


def test_an_epitaphs_usage_is_recorded_once(mgr: DeploymentManager, tmp_path: Path) -> None:
    """Two readers that both held the record as ready find the server's epitaph: its
    uncollected tokens are recorded by the first only."""
    info = tmp_path / "info.json"
    info.write_text(json.dumps({"state": "dead", "reason": "idle", "usage": [
        {"subject": "carol", "tokens": 12, "prompt_tokens": 5, "completion_tokens": 7,
         "request_id": "r1", "ts": time.time()}]}))
    dep = _add(mgr, "e", "ready", info_path=str(info))
    assert mgr.refresh(dep).state == "dead"
    assert mgr.refresh(dep).state == "dead"  # a second worker's stale copy, still "ready"
    policy.flush_usage()
    assert _tokens(tmp_path, "carol") == 12


def test_a_listing_shows_idle_time_since_last_use_and_dead_ones_when_asked(
        mgr: DeploymentManager) -> None:
    now = time.time()
    _add(mgr, "r", "ready", created=now - 100, last_used=now - 10)
    _add(mgr, "gone", "dead", reason="undeployed")
    mgr.health_replies["r"] = {"state": "ready"}  # type: ignore[attr-defined]
    mgr.launcher().set("job-r", JobState.RUNNING)
    (shown,) = mgr.list_all()
    assert shown["id"] == "r" and 9 <= shown["idle_s"] <= 12 and 99 <= shown["age_s"] <= 102
    assert {d["id"] for d in mgr.list_all(include_dead=True)} == {"r", "gone"}


def test_a_cold_start_counts_when_the_server_is_ready(mgr: DeploymentManager) -> None:
    dep = _add(mgr, "c", "queued", created=time.time() - 30)
    mgr.launcher().set("job-c", JobState.RUNNING)
    mgr.health_replies["c"] = {"state": "loading"}  # type: ignore[attr-defined]
    dep = mgr.refresh(dep)
    assert dep.state == "loading" and site_events.cold_starts(mgr.state_dir) == {}
    mgr.health_replies["c"] = {"state": "ready"}  # type: ignore[attr-defined]
    assert mgr.refresh(dep).state == "ready"
    (seconds,) = site_events.cold_starts(mgr.state_dir)["m"]
    assert 29 <= seconds <= 40


def test_a_new_weights_hash_replaces_the_sites_record(mgr: DeploymentManager,
                                                      tmp_path: Path) -> None:
    """The weights changed on disk since the last server hashed them: the next launch must
    not hand the old hash to its server."""
    mgr.db.record_weights("m", "1", {"sha256": "a" * 64, "stamp": 1})
    info = tmp_path / "info.json"
    info.write_text(json.dumps({"address": "tcp://10.255.0.1:6000", "public_key": "k",
                                "weights": {"sha256": "b" * 64, "stamp": 2}}))
    dep = _add(mgr, "w", "loading", address=None, info_path=str(info))
    mgr.launcher().set("job-w", JobState.RUNNING)
    dep = mgr.refresh(dep)
    assert dep.address == "tcp://10.255.0.1:6000" and dep.sha256 == "b" * 64
    assert mgr.db.weights_of("m", "1")["sha256"] == "b" * 64  # type: ignore[index]


def test_usage_is_collected_from_draining_servers_too(mgr: DeploymentManager,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """A draining server still finishes requests: its tokens must not wait for its end."""
    import fabric.serverclient

    asked: list[str] = []

    class Client:
        def __init__(self, address: str, public_key: str, timeout_s: float) -> None:
            self.address = address

        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def usage(self, ticket: str, timeout_s: float) -> list[dict[str, Any]]:
            asked.append(self.address)
            return [{"subject": "dave", "tokens": 3, "ts": time.time()}]

    monkeypatch.setattr(fabric.serverclient, "ServerClient", Client)
    _add(mgr, "r", "ready")
    _add(mgr, "dr", "draining")
    _add(mgr, "q", "queued", address=None)
    assert mgr.collect_usage() == 2
    assert len(asked) == 2
    policy.flush_usage()
    assert _tokens(tmp_path, "dave") == 6


@pytest.mark.parametrize(("detail", "reached"), [
    ({"reason": "TimeLimit", "time_left": "5:00"}, True),
    ({"reason": None, "time_left": "0:00"}, True),  # Slurm ending it: COMPLETING, no time left
    ({"reason": None, "time_left": "0:01"}, False),
    ({"reason": None, "time_left": None}, False),
])
def test_walltime_is_reached_when_slurm_says_so_or_no_time_is_left(
        mgr: DeploymentManager, detail: dict[str, Any], reached: bool) -> None:
    dep = _add(mgr, "t", "ready")
    mgr.launcher().set("job-t", JobState.RUNNING, **detail)
    assert mgr.walltime_reached(dep) is reached


def test_a_local_server_of_another_user_is_not_taken_for_dead(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def kill(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(deployments.os, "kill", kill)
    assert deployments._local_pid_dead("tcp://127.0.0.1:5555", 4242) is False


@pytest.fixture
def launches(mgr: DeploymentManager, monkeypatch: pytest.MonkeyPatch,
             tmp_path: Path) -> list[Any]:
    """Launches stand in: each records its plan and makes a queued record."""
    made: list[Any] = []

    def launch(entry: Any, plan: Any, weights: Any) -> Deployment:
        made.append(plan)
        return _add(mgr, f"new{len(made)}", "queued", plan=plan.model_dump(), address=None)

    monkeypatch.setattr(mgr, "locate", lambda entry: SimpleNamespace(path=str(tmp_path),
                                                                     sha256=""))
    monkeypatch.setattr(deployments, "check_plan_fits", lambda *a: None)
    monkeypatch.setattr(mgr, "_launch", launch)
    return made


def test_deploy_with_a_plan_launches_it_unless_that_plan_is_live(
        mgr: DeploymentManager, launches: list[Any]) -> None:
    from fabric.sites import Plan

    default, wide = Plan(), Plan.model_validate({"tp": 2})
    _add(mgr, "warm", "ready", plan=default.model_dump())
    mgr.health_replies["warm"] = {"state": "ready"}  # type: ignore[attr-defined]
    assert mgr.deploy(ENTRY).id == "warm"  # any plan will do
    assert mgr.deploy(ENTRY, default).id == "warm"
    assert launches == []
    assert mgr.deploy(ENTRY, wide).id == "new1" and launches == [wide]


def test_a_warm_record_whose_server_is_gone_is_not_handed_out(
        mgr: DeploymentManager, launches: list[Any]) -> None:
    """The fast path asks the server itself: a record still "ready" whose server no longer
    answers (its job failed) is found dead and a new server is launched."""
    _add(mgr, "stale", "ready")
    mgr.launcher().set("job-stale", JobState.FAILED)
    assert mgr.deploy(ENTRY).id == "new1"
    assert mgr.db.get("stale").state == "dead"  # type: ignore[union-attr]


def test_a_presharded_folder_is_used_for_its_own_plan_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fabric shard`` wrote per-rank files for the hosted plan: a deployment with another
    plan (``fabric deploy --tp``) must read the checkpoint, not files cut for other ranks."""
    import fabric.engine.launch
    from fabric.sites import Plan, SiteConfig

    hosted = Plan.model_validate({"pp": 2})
    site = SiteConfig.model_validate({"name": "s", "models": [
        {"name": "m", "plan": hosted.model_dump(), "shard_dir": str(tmp_path / "shards")}]})
    mgr = DeploymentManager(site, tmp_path / "state")
    mgr._launcher = Launcher()
    given: list[str | None] = []

    def prepare(*args: Any, shard_dir: str | None = None) -> Any:
        given.append(shard_dir)
        return SimpleNamespace(submit=lambda launcher, name: f"job-{len(given)}")

    monkeypatch.setattr(fabric.engine.launch, "prepare_server_launch", prepare)
    weights = SimpleNamespace(path=str(tmp_path), sha256="")
    mgr._launch(ENTRY, hosted, weights)
    mgr._launch(ENTRY, Plan.model_validate({"tp": 2}), weights)
    assert given == [str(tmp_path / "shards"), None]
