"""Deployments: model servers launched as jobs, locked, reused, found dead and relaunched.

Every test here runs the real model-server program on the tiny random Llama, launched through
Parsl's LocalProvider by the deployment manager (in-process or inside the site's workers).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fabric.catalog import Catalog
from fabric.client.local import LocalTransport, site_status
from fabric.endpoint import functions
from fabric.endpoint.deployments import TOUCH_EVERY_S, DeploymentManager
from fabric.sites import load_site
from tests.plugins.site import TINY_MODEL, LocalSite, site_manager, wait_until, write_site


def _pid_gone(pid: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _listeners(address: str | None) -> list[tuple[str, int | None]]:
    """(local address, pid) of every listening TCP socket on ``address``'s port."""
    port = int(str(address).rsplit(":", 1)[-1])
    return [(f"{c.laddr.ip}:{c.laddr.port}", c.pid) for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def _server_pid(record: dict[str, Any]) -> int:
    return int(json.loads(Path(record["info_path"]).read_text())["pid"])


def generate(transport: LocalTransport, prompt: str = "The cell", **sampling: Any) -> Any:
    request = {"model": TINY_MODEL, "prompt": prompt,
               "sampling": {"max_tokens": 6, "temperature": 0.0, **sampling}}
    return transport.submit(functions.run_request, request).result(timeout=300)


def live(transport: LocalTransport) -> list[dict[str, Any]]:
    return [d for d in transport.submit(functions.list_deployments).result(timeout=120)
            if d["model"] == TINY_MODEL]


# -- in-process manager -------------------------------------------------------------------------

@pytest.fixture
def manager(tmp_path: Path, tiny_llama_dir: Path) -> Iterator[DeploymentManager]:
    """A deployment manager on its own state dir; its servers are undeployed afterwards."""
    with site_manager(tmp_path / "site", tiny_llama_dir) as mgr:
        yield mgr


def _entry(mgr: DeploymentManager) -> Any:
    return Catalog().with_entries(mgr.site.extra_models).get(TINY_MODEL)


@pytest.mark.slow  # launches a model server (~10 s)
def test_concurrent_ensure_launches_once(manager: DeploymentManager,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Two requests for a cold model at once (separate managers, as in separate workers)."""
    entry = _entry(manager)
    other = DeploymentManager(manager.site, manager.state_dir)
    got: list[Any] = []
    errors: list[BaseException] = []

    def ensure(mgr: DeploymentManager) -> None:
        try:
            got.append(mgr.ensure(entry, wait_s=240))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=ensure, args=(m,)) for m in (manager, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({d.id for d in got}) == 1
    records = manager.db.query(model=TINY_MODEL)
    assert len(records) == 1 and records[0].state == "ready" and records[0].job_id
    # Only one job was ever submitted: every job file names the same deployment.
    names = {p.name.split(".")[0] for p in manager.script_dir().glob("fabric-*.sh")}
    assert names == {f"fabric-{records[0].id}"}
    health = manager.health(records[0])
    assert health is not None and health["state"] == "ready"
    status = manager.status(entry)
    assert status["state"] == "ready" and status["idle_s"] >= 0
    # The admissions' fast path asks a warm server itself, not the batch scheduler (an
    # squeue per admission); the full check (status, the reaper) still asks it.
    asked: list[Any] = []
    launcher = manager.launcher()
    monkeypatch.setattr(launcher, "status", lambda ids, real=launcher.status: (
        asked.append(ids), real(ids))[1])
    # A warm server's last use is written at most every TOUCH_EVERY_S: each write locks the
    # state db against every request worker's admissions.
    manager.ensure(entry)
    used = manager.db.get(records[0].id).last_used
    manager.ensure(entry)
    assert manager.db.get(records[0].id).last_used == used
    time.sleep(TOUCH_EVERY_S)
    manager.ensure(entry)
    assert manager.db.get(records[0].id).last_used > used
    assert asked == []
    assert manager.refresh(records[0]).state == "ready" and asked == [[records[0].job_id]]

    pid = _server_pid(records[0].to_dict())
    gone = manager.undeploy(records[0].id)
    assert gone.state == "dead" and gone.reason == "undeployed"
    assert _pid_gone(pid)
    assert manager.status(entry)["state"] == "absent"


@pytest.mark.slow  # launches a model server (~10 s)
def test_server_that_stops_answering_is_reaped(manager: DeploymentManager) -> None:
    """A ready server that stops answering health (stopped here with SIGSTOP, as a wedged one
    would be) is marked dead and its job is cancelled: it does not keep its nodes."""
    dep = manager.ensure(_entry(manager), wait_s=240)
    pid = _server_pid(dep.to_dict())
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 10,
                   f"server {pid} to stop")
        # Once (CI) refresh found this server ready here: whoever answered says who it is.
        answer = manager.health(dep)
        assert answer is None, (f"stopped server {pid} answered {answer}; listening on "
                                f"{dep.address}: {_listeners(dep.address)}")
        dead = manager.refresh(dep)
        assert dead.state == "dead" and "health" in (dead.reason or ""), dead
    finally:
        os.kill(pid, signal.SIGCONT)  # a stopped process acts on the cancel's TERM once resumed
    assert _pid_gone(pid), "the job of a deployment marked dead is still running"


@pytest.mark.slow  # a model server job that fails (~4 s)
def test_launch_failure_is_a_typed_error(manager: DeploymentManager, tmp_path: Path,
                                         tiny_llama_dir: Path) -> None:
    """A server that cannot load its weights: the record is dead and the error says why.
    (A served architecture, so the site's check before launch lets it through.)"""
    from fabric.catalog import CatalogEntry, WeightSource
    from fabric.errors import DeploymentError

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    entry = CatalogEntry(name="broken", version="test",
                         source=WeightSource(kind="path", path=str(broken)))
    with pytest.raises(DeploymentError) as info:
        manager.ensure(entry, wait_s=180)
    (record,) = manager.db.query(model="broken")
    assert record.state == "dead" and record.reason
    assert record.id in info.value.message


@pytest.mark.slow  # two model server launches (~26 s)
def test_idle_server_exits_and_is_relaunched(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """The server's idle timeout ends it; the record turns dead; the next ensure relaunches."""
    folder = write_site(tmp_path / "site", model_dir=tiny_llama_dir, idle_timeout_s=3.0)
    mgr = DeploymentManager(load_site(folder), folder / "state")
    entry = _entry(mgr)
    # deploy() returns at once; status() is non-blocking (what the SDK's spinner shows).
    launched = mgr.deploy(entry)
    early = mgr.status(entry)
    assert early["state"] in ("queued", "loading") and early["id"] == launched.id
    assert early["job_id"] == launched.job_id
    first = mgr.wait_ready(launched.id, 120)
    try:
        pid = _server_pid(first.to_dict())
        assert _pid_gone(pid, 60)
        dead = mgr.refresh(mgr.db.get(first.id) or first)
        assert dead.state == "dead" and "idle" in dead.reason
        assert mgr.reap() == []  # already dead: nothing new to reap
        second = mgr.ensure(entry, wait_s=120)
        assert second.id != first.id and second.state == "ready"
    finally:
        for d in mgr.db.query(states=("queued", "loading", "ready", "draining")):
            mgr.undeploy(d.id, drain_wait_s=2.0)


@pytest.mark.slow
def test_walltime_expiry_marks_dead_then_relaunches(tmp_path: Path,
                                                    tiny_llama_dir: Path) -> None:
    """LocalProvider jobs carry a walltime watchdog; its expiry is seen and survived."""
    jobs = {"provider": {"type": "LocalProvider", "init_blocks": 0, "min_blocks": 0,
                         "max_blocks": 1},
            "launcher": {"type": "SingleNodeLauncher"}, "walltime": "00:00:45"}
    folder = write_site(tmp_path / "site", model_dir=tiny_llama_dir, jobs=jobs)
    mgr = DeploymentManager(load_site(folder), folder / "state")
    entry = _entry(mgr)
    first = mgr.ensure(entry, wait_s=120)
    try:
        deadline = time.monotonic() + 120
        dep = first
        while dep.state != "dead" and time.monotonic() < deadline:
            time.sleep(1.0)
            dep = mgr.refresh(mgr.db.get(first.id) or first)
        assert dep.state == "dead" and "walltime" in dep.reason
        second = mgr.ensure(entry, wait_s=120)
        assert second.id != first.id and second.state == "ready"
    finally:
        for d in mgr.db.query(states=("queued", "loading", "ready", "draining")):
            mgr.undeploy(d.id, drain_wait_s=2.0)


# -- through the site's request workers ---------------------------------------------------------

def serving(transport: LocalTransport) -> dict[str, Any]:
    """The deployment the next request for the tiny model goes to (other test modules may
    have deployed more than one, e.g. with another plan)."""
    status = transport.submit(functions.deployment_status, TINY_MODEL).result(timeout=60)
    assert status["state"] == "ready", status
    return dict(status)


def test_warm_server_is_reused(site_transport: LocalTransport) -> None:
    first = generate(site_transport)
    assert first["model"]["name"] == TINY_MODEL and len(first["model"]["sha256"]) == 64
    dep1 = serving(site_transport)
    second = generate(site_transport, "Proteins fold")
    assert second["request_id"] != first["request_id"]
    dep2 = serving(site_transport)
    assert dep2["id"] == dep1["id"] and dep2["job_id"] == dep1["job_id"]
    assert dep2["last_used"] >= dep1["last_used"]
    records = {d["id"]: d for d in live(site_transport)}
    assert records[dep1["id"]]["state"] == "ready"


def test_killed_server_is_relaunched(site_transport: LocalTransport) -> None:
    # Kill every ready tiny-model server, so the next request must relaunch one.
    generate(site_transport)
    before = [d for d in live(site_transport) if d["state"] == "ready"]
    assert before
    for dep in before:
        os.kill(_server_pid(dep), signal.SIGKILL)
    after_result = generate(site_transport, "Tensor parallel")
    assert after_result["finish_reason"] in ("length", "eos", "stop")
    deps = {d["id"]: d for d in
            site_transport.submit(functions.list_deployments, None, True).result(120)}
    for dep in before:
        assert deps[dep["id"]]["state"] == "dead" and deps[dep["id"]]["reason"]
    now = serving(site_transport)
    assert now["id"] not in {d["id"] for d in before}


def test_streams_direct_and_polled(site_transport: LocalTransport) -> None:
    from fabric.protocol import validate_request
    from fabric.serverclient import ServerClient

    request = {"model": TINY_MODEL, "prompt": "The quick",
               "sampling": {"max_tokens": 5, "temperature": 0.0}}
    info = site_transport.submit(functions.open_stream, request, None, "direct").result(300)
    req = validate_request({**request, "request_id": info["request_id"]})
    with ServerClient(info["address"], info["public_key"]) as client:
        client.submit(req, info["ticket"], stream=True)
        events = list(client.events(req.request_id, 120))
    assert events[-1]["op"] == "done"
    direct_ids = events[-1]["result"]["token_ids"]

    info = site_transport.submit(functions.open_stream, request, None, "poll").result(300)
    cursor, done, reply = 0, False, {}
    deadline = time.monotonic() + 120
    while not done and time.monotonic() < deadline:
        poll = {"model": TINY_MODEL, "request_id": info["request_id"],
                "ticket": info["ticket"], "cursor": cursor, "events": True}
        reply = site_transport.submit(functions.poll_requests, [poll], 2.0).result(
            60)["replies"][info["request_id"]]
        assert reply.get("error") is None, reply
        cursor, done = int(reply["cursor"]), bool(reply.get("done"))
    assert done and reply["result"]["token_ids"] == direct_ids


def use_handle(handle: Any, prompt: str) -> dict[str, Any]:
    """A user function: two generations next to the warm model."""
    a = handle.generate(prompt, max_tokens=4)
    b = handle.generate(prompt, max_tokens=4)
    return {"a": a.token_ids, "b": b.token_ids, "model": a.model.name}


def use_representations(handle: Any, text: str) -> dict[str, Any]:
    """A user function: embeddings, hidden states and log-probabilities, as plain data."""
    vectors = handle.embed([text, text + " again"])
    hidden = handle.hidden_states(text, layers=[0, -1])
    scored = handle.logprobs(text, " of the cell")
    return {"embed_shape": list(vectors.shape), "hidden_keys": sorted(hidden),
            "logprob_keys": sorted(scored)}


def test_user_function_uses_the_warm_model(site_transport: LocalTransport) -> None:
    from fabric.wire.usercode import ValueFuture, pack_call

    def submit(fn: Any, text: str) -> Any:
        return ValueFuture(site_transport.submit(functions.run_user_function,
                                                 pack_call(fn, (text,), {}), TINY_MODEL))

    out = submit(use_handle, "The cell").result(300)
    assert out["model"] == TINY_MODEL and out["a"] == out["b"] and len(out["a"]) >= 1
    rep = submit(use_representations, "The cell").result(300)
    assert rep["embed_shape"] == [2, 64]  # the tiny Llama's hidden size
    assert rep["hidden_keys"] and rep["logprob_keys"]


def test_status_and_undeploy(site_transport: LocalTransport, local_site: LocalSite) -> None:
    generate(site_transport)
    status = site_status(str(local_site.site_dir), local_site.state_dir)
    assert status is not None
    target = serving(site_transport)["id"]
    (dep,) = [d for d in status["deployments"] if d["id"] == target]
    assert dep["state"] == "ready" and dep["health"]["kv_budget_tokens"] == 4096
    pid = _server_pid(dep)
    gone = site_transport.submit(functions.undeploy, dep["id"]).result(120)
    assert gone["state"] == "dead" and gone["reason"] == "undeployed"
    assert _pid_gone(pid)
    assert target not in {d["id"] for d in live(site_transport)}


def _accounted_run(mgr: DeploymentManager, dep: Any, subject: str) -> dict[str, Any]:
    """One request on ``dep``'s server with an accounting ticket, as ``open_stream`` issues
    them: the server tallies its tokens for the site to collect."""
    from fabric import tickets
    from fabric.protocol import InferenceRequest
    from fabric.serverclient import ServerClient

    req = InferenceRequest(model=TINY_MODEL, prompt="The cell is",
                           sampling={"max_tokens": 7, "temperature": 0.0})
    ticket = tickets.issue(mgr.ticket_key(), model=TINY_MODEL, subject=subject, account=True)
    with ServerClient(dep.address, dep.public_key) as client:
        client.submit(req, ticket)
        return client.result(req.request_id, 120)


def _tokens_of(mgr: DeploymentManager, subject: str) -> int:
    from fabric.endpoint import policy

    return sum(int(r["tokens"]) for r in policy.usage(mgr.state_dir)
               if r["identity"] == subject)


@pytest.mark.slow  # launches a model server (~10 s)
def test_undeploy_records_the_tokens_its_server_had_not_handed_over(
        manager: DeploymentManager) -> None:
    """A request finished, the site had not collected its tokens yet, and the operator
    undeploys: the tokens are recorded (the server is gone once its job has ended, so they
    must be taken before, or from its epitaph), not lost."""
    dep = manager.ensure(_entry(manager))
    result = _accounted_run(manager, dep, "alice")
    manager.undeploy(dep.id, drain_wait_s=5.0)
    usage = result["usage"]
    assert _tokens_of(manager, "alice") == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.slow  # launches a model server (~10 s)
def test_a_server_that_exits_leaves_its_uncollected_tokens_in_its_epitaph(
        manager: DeploymentManager) -> None:
    """A server stopped (SIGTERM, as a scheduler ends a job) before the site collected:
    its epitaph carries the tokens, recorded once when the site finds it dead."""
    dep = manager.ensure(_entry(manager))
    result = _accounted_run(manager, dep, "bob")
    pid = _server_pid(dep.to_dict())
    os.kill(pid, signal.SIGTERM)
    assert _pid_gone(pid)
    assert manager.refresh(dep).state == "dead"
    assert manager.refresh(manager.db.get(dep.id) or dep).state == "dead"  # seen again
    usage = result["usage"]
    assert _tokens_of(manager, "bob") == usage["prompt_tokens"] + usage["completion_tokens"]


def test_an_epitaph_found_by_two_workers_at_once_is_recorded_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every site worker refreshes the deployments it looks at: two that find a server's
    epitaph at once both saw the record not yet dead and both recorded its tokens (94 of 100
    tries with two processes). No server here: the epitaph is written by hand."""
    from fabric.endpoint.state import Deployment

    folder = write_site(tmp_path / "site")
    site = load_site(folder)
    first, second = (DeploymentManager(site, folder / "state") for _ in range(2))
    info = folder / "state" / "server.json"
    info.write_text(json.dumps({"state": "dead", "reason": "idle timeout", "usage": [
        {"subject": "carol", "request_id": "r1", "tokens": 12, "prompt_tokens": 5,
         "completion_tokens": 7, "ts": time.time()}]}))
    dep = Deployment(id=Deployment.new_id(), model="m", version="v", state="ready",
                     created=time.time(), info_path=str(info))
    first.db.insert(dep)
    record = first._record_usage

    def meanwhile(d: Deployment, entries: list[dict[str, Any]]) -> int:
        second.refresh(dep)  # the other worker, holding the same not-yet-dead record
        return record(d, entries)

    monkeypatch.setattr(first, "_record_usage", meanwhile)
    assert first.refresh(dep).state == "dead"
    assert second.refresh(dep).state == "dead"  # later still, from a stale record
    assert _tokens_of(first, "carol") == 12
    assert (first.db.get(dep.id) or dep).reason == "model server exited: idle timeout"


def test_a_plan_the_model_cannot_take_is_refused_before_any_rank_starts(
        local_site: LocalSite) -> None:
    """pp over the model's layers, tp over its key/value heads, ep > 1 on a dense model:
    refused by the site, typed, naming the bound, before a job is submitted (each rank would
    start, load and fail)."""
    from fabric import Fabric
    from fabric.errors import InvalidPlan

    with Fabric(transport=local_site.transport(), on_status=None) as fab:
        before = {d["id"] for d in fab.deployments()}
        with pytest.raises(InvalidPlan, match=r"pp=99 needs 1\.\.4 stages"):
            fab.deploy(TINY_MODEL, pp=99, wait=False)
        with pytest.raises(InvalidPlan, match=r"tp=3 exceeds .* 2 key/value heads"):
            fab.deploy(TINY_MODEL, tp=3, wait=False)
        with pytest.raises(InvalidPlan, match="pp=5"):
            fab.deploy(TINY_MODEL, pp=5, tp=2, wait=False)
        with pytest.raises(InvalidPlan, match="ep=2 needs a mixture-of-experts model"):
            fab.deploy(TINY_MODEL, tp=2, ep=2, wait=False)  # a dense model
        assert {d["id"] for d in fab.deployments()} == before
