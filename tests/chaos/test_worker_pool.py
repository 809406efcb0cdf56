"""kill -9 of the worker pool's helper process: the campaign goes on, the logs stay small.

Parsl's worker pool (``process_worker_pool``) keeps its in-flight task table and monitoring
queue in a ``multiprocessing`` Manager: a helper process it spawns before its workers. With the
helper gone the pool still heartbeats to the interchange, so nothing noticed: each worker died
on its next task, the task was never answered (the shard waited for ``shard_timeout_s``, an
hour), and the pool's monitoring thread logged the same traceback in a loop (``manager.log``
grew to 1 GB in 10 minutes). A campaign stalled at 60/120 for more than 9 minutes.

The site now checks its pools every second (``fabric.endpoint.poolwatch``): a pool whose helper
is gone is killed whole, its in-flight tasks fail with a retryable ``EndpointError`` (code
``WorkerPoolLost``) once the interchange misses its heartbeats, Parsl starts a new block, and the
campaign runner resubmits the lost shards. Parsl's logs under the site's run dir are capped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from fabric.campaign import store
from fabric.campaign.api import Campaign
from fabric.client.local import site_status
from fabric.endpoint.poolwatch import LOG_CAP_BYTES, POOL_LOST, PoolWatch, retype_lost
from fabric.errors import DeadlineExceeded, EndpointError, UserFunctionError
from fabric.procs import proc_stat
from tests.chaos.common import cmdline, processes, report
from tests.plugins.site import REPO_ROOT, TINY_MODEL, LocalSite, wait_until

INPUTS = 120
RECOVERY_S = 60.0
"""The whole campaign must finish within this long after the kill (it stalled for hours)."""


def pools(state_dir: Path) -> list[int]:
    """The site's worker pools: detached by Parsl, found by the run dir in their command line."""
    return processes(lambda pid, st: "process_worker_pool" in cmdline(pid)
                     and str(state_dir) in cmdline(pid))


def _start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def helper_of(pool: int) -> int | None:
    """The pool's ``multiprocessing`` Manager: the first child it spawned (before its workers;
    the resource tracker is not spawned with ``spawn_main``)."""
    kids = children(pool)
    return min(kids, key=_start_time) if kids else None


def manager_logs(state_dir: Path) -> int:
    """The largest ``manager.log`` (any block) under the site's engine run dir, in bytes."""
    sizes = [p.stat().st_size for p in (state_dir / "engine").rglob("manager.log")]
    return max(sizes, default=0)


def write_manifest(tmp: Path, site: LocalSite) -> Path:
    lines = [json.dumps({"custom_id": f"id-{i:04d}", "prompt": f"Prompt {i}: the cell"})
             for i in range(INPUTS)]
    (tmp / "in.jsonl").write_text("\n".join(lines) + "\n")
    (tmp / "m.yaml").write_text(yaml.safe_dump({
        "name": "pool", "model": TINY_MODEL, "kind": "generate",
        "sampling": {"max_tokens": 3, "temperature": 0.0}, "input": {"path": "in.jsonl"},
        "output": "out", "shard_size": 5, "max_attempts": 3, "shard_timeout_s": 3600,
        "sites": [{"name": str(site.site_dir), "max_in_flight": 2}]}))
    return tmp / "m.yaml"


@pytest.mark.parametrize("target", ["helper", "pool"])
def test_killed_pool_is_replaced(tmp_path: Path, local_site: LocalSite, target: str) -> None:
    """``helper``: the pool's multiprocessing Manager (the stall of issue 14); ``pool``: the
    pool process itself (its workers exit; its helper must not be left behind)."""
    state = local_site.state_dir
    folder = store.create(write_manifest(tmp_path, local_site), tmp_path / "home")
    c = Campaign(folder).start()
    biggest = [0]
    stop = threading.Event()

    def sample() -> None:  # the log's size while the pool is broken and after
        while not stop.wait(0.25):
            biggest[0] = max(biggest[0], manager_logs(state))

    counts: dict[str, int] = {}
    try:
        wait_until(lambda: int(store.status(folder)["done"]) >= INPUTS // 4, 300,
                   "a quarter of the campaign")
        old_pools = pools(state)
        assert len(old_pools) == 1, old_pools
        helper = helper_of(old_pools[0])
        assert helper is not None, "the pool's multiprocessing helper"
        threading.Thread(target=sample, daemon=True).start()
        killed_at = time.monotonic()
        os.kill(helper if target == "helper" else old_pools[0], signal.SIGKILL)
        try:
            status = c.wait(timeout=RECOVERY_S)
        except DeadlineExceeded as exc:
            status = exc.details["status"]
        took = time.monotonic() - killed_at
        out = list(store.read_records(folder))
        err = list(store.read_records(folder, errors=True))
        ids = Counter(r["custom_id"] for r in out + err)
        new_pools = pools(state)
        site = site_status(str(local_site.site_dir), state, health=False) or {}
        shards = next(iter(status["sites"].values()), {}).get("shards", {})
        counts = {"inputs": INPUTS, "typed_errors": int(shards.get("failed", 0)),
                  "lost": INPUTS - len(ids), "duplicated": sum(n - 1 for n in ids.values()),
                  "leaked": len([p for p in (*old_pools, helper) if p in processes(
                      lambda pid, st: st[0] not in ("Z", "X"))]),
                  "errors": len(err), "recovery_s": round(took),
                  "manager_log_max": biggest[0],
                  "pools_replaced": int(site.get("pools_replaced", 0))}
        assert status["status"] == "done", (
            f"{status['done']}/{INPUTS} done {took:.0f} s after the pool's helper was killed")
        assert counts["lost"] == counts["duplicated"] == counts["errors"] == 0, counts
        assert counts["leaked"] == 0, "the old pool or its helper is still running"
        assert new_pools and not set(new_pools) & set(old_pools), "the pool was not replaced"
        if target == "helper":
            assert counts["pools_replaced"] >= 1, "the site did not notice the broken pool"
        # The lost shards failed with the typed, retryable error (not "your function raised").
        assert counts["typed_errors"] >= 1 and POOL_LOST in str(status.get("last_error")), status
    finally:
        stop.set()
        if c.status()["status"] not in ("done", "cancelled", "failed"):
            c.cancel()
        c.stop()
        report(f"worker-pool-{target}-kill", **counts)
    assert biggest[0] <= LOG_CAP_BYTES, f"manager.log reached {biggest[0]} bytes"


def workers_of(pool: int) -> list[int]:
    """The pool's worker processes: its ``spawn_main`` children but its helper."""
    helper = helper_of(pool)
    return [pid for pid in children(pool) if pid != helper]


def children(pool: int) -> list[int]:
    """The pool's children started by ``spawn_main`` (its helper and its workers)."""
    return processes(lambda pid, st: "spawn_main" in cmdline(pid)
                     and (proc_stat(pid) or ("", 0))[1] == pool)


def test_idle_workers_killed_the_pool_is_replaced(tmp_path: Path, local_site: LocalSite) -> None:
    """kill -9 of every worker of an idle pool, then a campaign. An idle worker holds the lock
    of the pool's task queue while it waits for a task; Parsl restarted the killed workers, but
    they waited for that lock forever and the campaign never started (a campaign test hung
    until its 600 s limit when it killed an idle worker). The site replaces the pool."""
    import psutil

    from fabric.endpoint.poolwatch import CHECK_PERIOD_S, RESCAN_EVERY

    state = local_site.state_dir
    wait_until(lambda: len(pools(state)) == 1, 120, "one worker pool")
    pool = pools(state)[0]
    # The site learns a pool's workers at its periodic scan of all processes.
    age = time.time() - psutil.Process(pool).create_time()
    time.sleep(max(0.0, 3 * RESCAN_EVERY * CHECK_PERIOD_S - age))
    workers = workers_of(pool)
    assert len(workers) >= 1, "the pool's workers"
    before = int((site_status(str(local_site.site_dir), state, health=False) or {})
                 .get("pools_replaced", 0))
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    c = Campaign(store.create(write_manifest(tmp_path, local_site), tmp_path / "home")).start()
    try:
        status = c.wait(timeout=300)
    finally:
        if c.status()["status"] not in ("done", "cancelled", "failed"):
            c.cancel()
        c.stop()
    site = site_status(str(local_site.site_dir), state, health=False) or {}
    assert status["status"] == "done" and status["done"] == INPUTS, status
    assert int(site.get("pools_replaced", 0)) >= before + 1, site
    assert pool not in pools(state), "the pool that lost its workers still runs"


def _failed_result(exc: Exception) -> bytes:
    """A task's failure packed as the engine packs it (``GlobusComputeEngine``)."""
    import uuid

    from globus_compute_common import messagepack
    from globus_compute_common.messagepack.message_types import Result, ResultErrorDetails
    from globus_compute_endpoint.exception_handling import (
        get_error_string,
        get_result_error_details,
    )

    try:
        raise exc
    except Exception as raised:
        code, message = get_result_error_details(raised)
        text = get_error_string(exc=raised)
    return bytes(messagepack.pack(Result(
        task_id=uuid.uuid4(), data=text,
        error_details=ResultErrorDetails(code=code, user_message=message))))


def test_a_lost_pool_is_a_retryable_endpoint_error() -> None:
    """Parsl's ``ManagerLost`` reached the caller as the function's own error."""
    from parsl.executors.high_throughput.errors import ManagerLost

    from fabric.wire.gcwire import unpack_result

    with pytest.raises(UserFunctionError):  # what it was
        unpack_result(_failed_result(ManagerLost(b"abc", "node1")))
    with pytest.raises(EndpointError) as lost:
        unpack_result(retype_lost(_failed_result(ManagerLost(b"abc", "node1"))))
    assert lost.value.retryable and lost.value.details["code"] == POOL_LOST
    assert "worker pool was lost" in lost.value.message
    assert "ManagerLost" in lost.value.details["traceback"]
    # A function that merely says "ManagerLost" is still its own error.
    own = _failed_result(RuntimeError("parsl.executors.high_throughput.errors.ManagerLost"))
    assert retype_lost(own) == own


def test_parsl_logs_are_capped(tmp_path: Path) -> None:
    log = tmp_path / "fabric-local-HighThroughputExecutor" / "block-0" / "ab12" / "manager.log"
    log.parent.mkdir(parents=True)
    log.write_bytes(b"x" * 5000 + b"the end\n")
    small = tmp_path / "interchange.log"
    small.write_bytes(b"ok\n")
    watch = PoolWatch(tmp_path, log_cap_bytes=1000)
    assert watch.cap_logs() == [log]
    assert log.stat().st_size == 0 and small.read_bytes() == b"ok\n"
    assert (log.parent / "manager.log.1").read_bytes().endswith(b"the end\n")
    with log.open("ab") as fh:  # the writer appends at the new end: no hole
        fh.write(b"next\n")
    assert log.read_bytes() == b"next\n" and watch.cap_logs() == []


def test_site_log_rotates_and_stderr_follows(tmp_path: Path) -> None:
    """``site.log`` is bounded, stray stderr writes included (``start_site`` points the site's
    stderr at it)."""
    code = f"""
import logging, os, sys
from pathlib import Path
import fabric.siteproc as sp
sp.SITE_LOG_BYTES = 20_000
state = Path({str(tmp_path / "state")!r})
(state / "logs").mkdir(parents=True)
fd = os.open(state / "logs" / "site.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
os.dup2(fd, 2)
sp.setup_logging(state)
for i in range(3000):
    logging.getLogger("fabric.site").info("line %d %s", i, "y" * 40)
    if i % 100 == 0:
        print("stray", i, file=sys.stderr, flush=True)
print("last stray", file=sys.stderr, flush=True)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    logs = sorted((tmp_path / "state" / "logs").iterdir())
    assert [p.name for p in logs] == ["site.log", "site.log.1", "site.log.2", "site.log.3"]
    assert all(p.stat().st_size <= 20_000 + 200 for p in logs), [p.stat().st_size for p in logs]
    current = (tmp_path / "state" / "logs" / "site.log").read_text()
    assert "last stray" in current and "line 2999" in current


def test_a_hung_engine_shutdown_is_not_waited_for_ever() -> None:
    """After its interchange died, Parsl's block-status thread can block for ever in a ZMQ
    send, and the engine's shutdown joins it (the site hung in its stop once in CI). The site
    waits a bounded time, then exits without it; a shutdown that returns or raises is fine."""
    import threading
    import time as clock

    from fabric.endpoint.poolwatch import stop_engine

    release = threading.Event()

    class Hung:
        def shutdown(self) -> None:
            release.wait(30)

    class Quick:
        def shutdown(self) -> None:
            pass

    class Broken:
        def shutdown(self) -> None:
            raise RuntimeError("half torn down")

    t0 = clock.monotonic()
    assert stop_engine(Hung(), timeout_s=0.3) is False
    assert clock.monotonic() - t0 < 5
    release.set()
    assert stop_engine(Quick(), timeout_s=5) is True
    assert stop_engine(Broken(), timeout_s=5) is True
