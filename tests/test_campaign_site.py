"""Campaigns against a real local site and model server (the tiny random Llama).

Fault tests: kill -9 a request worker (the site replaces its pool) and the model server
mid-campaign; kill -9 the runner process and resume; 1% poison inputs; the site's scheduler runs
a submitted campaign. Each checks the invariant: results + errors = inputs, no duplicates,
nothing missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabric.campaign import store
from fabric.campaign.api import Campaign
from tests.plugins.site import REPO_ROOT, TINY_MODEL, LocalSite

pytestmark = pytest.mark.slow


def make_campaign(tmp: Path, site: LocalSite, n: int, *, name: str = "c", poison: int = 0,
                  **fields: Any) -> Path:
    """A manifest over ``n`` short prompts (the first ``poison`` of every 100 are too long for
    the tiny model's 512-token context: they fail on every attempt)."""
    lines = []
    for i in range(n):
        prompt = ("word " * 900) if i % 100 < poison else f"Prompt {i}: the cell"
        lines.append(json.dumps({"custom_id": f"id-{i:04d}", "prompt": prompt}))
    (tmp / "in.jsonl").write_text("\n".join(lines) + "\n")
    data = {"name": name, "model": TINY_MODEL, "kind": "generate",
            "sampling": {"max_tokens": 3, "temperature": 0.0},
            "input": {"path": "in.jsonl"}, "output": "out", "shard_size": 25,
            "max_attempts": 3, "audit": True,
            "sites": [{"name": str(site.site_dir), "max_in_flight": 2}], **fields}
    (tmp / "m.yaml").write_text(yaml.safe_dump(data))
    return tmp / "m.yaml"


def invariant(folder: Path, n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out = list(store.read_records(folder))
    err = list(store.read_records(folder, errors=True))
    ids = Counter(r["custom_id"] for r in out + err)
    assert len(ids) == n and max(ids.values()) == 1, ids.most_common(3)
    files = Path(store.load(folder).output)
    assert len((files / store.RESULTS).read_text().splitlines()) == len(out)
    assert len((files / store.ERRORS).read_text().splitlines()) == len(err)
    return out, err


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def done(folder: Path) -> int:
    return int(store.status(folder)["done"])


def busy_workers(state_dir: Path, server_port: int) -> list[int]:
    """Pids of the site's request workers now talking to the model server (running a shard).

    Parsl starts the worker pool detached (its parent is init), so it is found by the state
    dir in its command line; its spawned children include a manager process, so only the
    ones holding a connection to the server's port count.
    """
    import psutil

    out = []
    for pool in psutil.process_iter(["cmdline"]):
        cmd = " ".join(pool.info["cmdline"] or [])
        if "process_worker_pool" not in cmd or str(state_dir) not in cmd:
            continue
        for proc in pool.children():
            try:
                if any(c.raddr and c.raddr.port == server_port
                       for c in proc.net_connections("tcp")):
                    out.append(proc.pid)
            except psutil.Error:
                continue
    return out


def engine_processes(site_pid: int, state_dir: Path) -> list[Any]:
    """The site's Parsl processes (interchange, detached worker pool and its workers): a
    kill -9 of the site leaves them behind, so the test ends them itself."""
    import psutil

    procs = list(psutil.Process(site_pid).children(recursive=True))
    for pool in psutil.process_iter(["cmdline"]):
        if "process_worker_pool" in " ".join(pool.info["cmdline"] or []) \
                and str(state_dir) in " ".join(pool.info["cmdline"] or []):
            procs.extend([pool, *pool.children(recursive=True)])
    return [p for p in procs if "fabric.engine.server" not in " ".join(p.cmdline())]


def server(state_dir: Path) -> tuple[int, int]:
    """``(pid, port)`` of the ready tiny-llama server."""
    from fabric.endpoint.state import StateDB

    deps = list(StateDB(state_dir).query(model=TINY_MODEL, states=("ready",)))
    assert deps, "no ready server"
    pid = int(json.loads(Path(deps[0].info_path).read_text())["pid"])
    return pid, int(str(deps[0].address).rsplit(":", 1)[1])


def audit_counts(state_dir: Path, campaign: str) -> Counter[str]:
    """Executions per custom_id, from the site's own audit file for ``campaign``."""
    from fabric.endpoint.campaign_shard import audit_path

    path = audit_path(state_dir, {"campaign": campaign})
    return Counter(json.loads(line)["custom_id"] for line in path.read_text().splitlines()) \
        if path.exists() else Counter()


def test_kill_worker_and_server_mid_campaign(tmp_path: Path, local_site: LocalSite) -> None:
    folder = store.create(make_campaign(tmp_path, local_site, 500), tmp_path / "home")
    c = Campaign(folder).start()
    wait_for(lambda: done(folder) >= 100, 600, "100 inputs")
    _, port = server(local_site.state_dir)
    workers: list[int] = []

    def found() -> bool:
        workers[:] = busy_workers(local_site.state_dir, port)
        return bool(workers)

    wait_for(found, 60, "a request worker running a shard")
    os.kill(workers[0], signal.SIGKILL)
    wait_for(lambda: done(folder) >= 300, 600, "300 inputs")
    os.kill(server(local_site.state_dir)[0], signal.SIGKILL)
    status = c.wait(timeout=900)
    assert status["status"] == "done", status
    out, err = invariant(folder, 500)
    assert len(out) == 500 and not err
    shards = next(iter(status["sites"].values()))["shards"]
    assert shards.get("failed", 0) >= 1  # the killed worker's shard, retried
    assert all(r["model"]["name"] == TINY_MODEL and len(r["model"]["sha256"]) == 64
               for r in out)


def test_poison_inputs_end_in_the_error_file(tmp_path: Path, local_site: LocalSite) -> None:
    folder = store.create(make_campaign(tmp_path, local_site, 200, poison=1, max_attempts=2),
                          tmp_path / "home")
    status = Campaign(folder).start().wait(timeout=300)  # seconds normally
    out, err = invariant(folder, 200)
    assert status["status"] == "done"
    assert sorted(e["custom_id"] for e in err) == ["id-0000", "id-0100"]
    assert all(e["attempts"] == 2 and e["error"]["kind"] == "ContextLengthExceeded"
               for e in err)
    assert len(out) == 198 and all(r["usage"]["completion_tokens"] >= 1 for r in out)
    assert status["errors_by_kind"] == {"ContextLengthExceeded": 2}


def test_kill_runner_and_resume(tmp_path: Path, local_site: LocalSite) -> None:
    manifest = make_campaign(tmp_path, local_site, 300, shard_size=10, name="k")
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "fabric.cli.main", "campaign", "run",
                             str(manifest), "--home", str(home), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    folder = home / "k"
    wait_for(lambda: (folder / store.LEDGER).exists() and done(folder) >= 60, 600, "60 inputs")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {r["custom_id"]: r["nonce"] for r in store.read_records(folder)}
    assert store.status(folder)["status"] == "interrupted"
    from fabric.cli.main import main

    assert main(["campaign", "resume", "k", "--home", str(home), "--quiet"]) == 0
    out, _ = invariant(folder, 300)
    after = {r["custom_id"]: r["nonce"] for r in out}
    assert all(after[c] == n for c, n in before.items())
    executions = audit_counts(local_site.state_dir, "k")
    # Inputs committed before the kill ran exactly once; only in-flight ones may run twice.
    assert all(executions[c] == 1 for c in before), [c for c in before if executions[c] != 1]
    assert sum(executions.values()) - 300 <= 2 * 10 * 2  # at most the in-flight shards


def test_site_scheduler_runs_submitted_campaign(tmp_path: Path, local_site: LocalSite) -> None:
    from fabric.cli.main import main

    home = store.default_home(str(local_site.site_dir), local_site.state_dir)
    # The one due in 2099 goes in first: the scheduler ticks many times while it runs the
    # other one to the end, and must leave it alone each time.
    (tmp_path / "later").mkdir()
    later = make_campaign(tmp_path / "later", local_site, 5, name=f"later-{os.getpid()}",
                          output="out-later")
    assert main(["campaign", "submit", str(later), "--site", str(local_site.site_dir),
                 "--state-dir", str(local_site.state_dir), "--at", "2099-01-01T00:00:00Z",
                 "--json"]) == 0
    manifest = make_campaign(tmp_path, local_site, 30, name=f"sched-{os.getpid()}")
    assert main(["campaign", "submit", str(manifest), "--site", str(local_site.site_dir),
                 "--state-dir", str(local_site.state_dir), "--wait", "--json"]) == 0
    folder = home / f"sched-{os.getpid()}"
    invariant(folder, 30)
    assert store.status(home / f"later-{os.getpid()}")["status"] == "scheduled"


def test_kill_site_process_and_restart(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """kill -9 the endpoint process running a submitted campaign; a restarted site's
    scheduler resumes it by itself (no done input re-executed)."""
    from fabric.client.local import start_site, stop_site
    from tests.plugins.site import write_site

    site_dir = write_site(tmp_path / "site2", name="test-local-2", model_dir=tiny_llama_dir)
    orphans: list[Any] = []
    state = site_dir / "state"
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(REPO_ROOT)
    try:
        info = start_site(str(site_dir), state, timeout_s=300)
        site = LocalSite(site_dir, state, info)
        folder = store.create(make_campaign(tmp_path, site, 300, shard_size=10, name="s"),
                              state / "campaigns", runner="site")
        wait_for(lambda: done(folder) >= 60, 600, "60 inputs")
        orphans = engine_processes(int(info["pid"]), state)
        os.kill(int(info["pid"]), signal.SIGKILL)
        wait_for(lambda: store.runner_pid(folder) is None, 30, "the runner lock to free")
        before = {r["custom_id"]: r["nonce"] for r in store.read_records(folder)}
        assert store.status(folder)["status"] == "interrupted"
        start_site(str(site_dir), state, timeout_s=300)
        wait_for(lambda: store.status(folder)["status"] == "done", 600, "the resumed campaign")
    finally:
        stop_site(str(site_dir), state, all=True, timeout_s=60)
        for proc in orphans:  # the killed site's interchange and worker pool
            with contextlib.suppress(Exception):
                proc.kill()
        if env_before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_before
    out, _ = invariant(folder, 300)
    after = {r["custom_id"]: r["nonce"] for r in out}
    assert all(after[c] == n for c, n in before.items())
    executions = audit_counts(state, "s")
    assert all(executions[c] == 1 for c in before)
