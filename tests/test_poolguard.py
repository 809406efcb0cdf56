"""``fabric.endpoint.poolguard``, the pool watch a daemon-run site's ``worker_init`` starts, against
a stand-in block: a shell in a process group of its own (as Parsl's ``LocalProvider`` starts one)
that starts the guard, as the templates do, then a "pool" (``process_worker_pool.py``: a
``multiprocessing`` Manager helper and two spawned workers, what poolwatch looks for). The real
daemon's case: ``test_a_daemon_run_pool_that_lost_its_helper_is_replaced`` in
``tests/test_globus_real.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric.endpoint import poolguard
from fabric.endpoint.poolwatch import CHECK_PERIOD_S, LOG_CAP_BYTES, RESCAN_EVERY, helper_of
from fabric.procs import proc_cmdline, proc_stat, process_running
from tests.plugins.site import wait_until

POOL = """\
import multiprocessing as mp
import sys
import time


def work():
    time.sleep(float(sys.argv[1]))


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    tasks = manager.dict()
    workers = [ctx.Process(target=work) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
"""


def _group(pgid: int) -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()
            and (st := proc_stat(int(e.name))) is not None and st[2] == pgid
            and st[0] not in ("Z", "X")]


@pytest.fixture
def block(tmp_path: Path) -> Iterator[Any]:
    """Start a block whose pool lives ``life_s``; returns its shell (a Popen). Killed at exit."""
    started: list[subprocess.Popen[bytes]] = []

    def start(life_s: float) -> subprocess.Popen[bytes]:
        (tmp_path / "process_worker_pool.py").write_text(POOL)
        (tmp_path / "logs").mkdir(exist_ok=True)
        script = (f"{sys.executable} -m fabric.endpoint.poolguard --shell $$ </dev/null & "
                  f"CMD() {{ {sys.executable} {tmp_path}/process_worker_pool.py {life_s} "
                  f"--logdir={tmp_path}/logs; }}; CMD 1 & wait $!")
        shell = subprocess.Popen(["bash", "-c", script], process_group=0,
                                 stderr=(tmp_path / "block.err").open("wb"),
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        started.append(shell)
        return shell

    yield start
    for shell in started:
        for pid in _group(shell.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shell.wait(timeout=10)


def _pool_of(shell: int) -> tuple[int, int, list[int]] | None:
    """The block's pool, its helper and its workers, once the helper listens."""
    for pid in _group(shell):
        if "process_worker_pool" in proc_cmdline(pid) and (helper := helper_of(pid)):
            kids = [k for k in _group(shell) if (st := proc_stat(k)) is not None
                    and st[1] == pid and k != helper and "spawn_main" in proc_cmdline(k)]
            if len(kids) == 2:
                return pid, helper, kids
    return None


@pytest.mark.parametrize("target", ["helper", "worker"])
def test_a_block_whose_pool_lost_a_process_is_killed_whole(block: Any, target: str,
                                                           tmp_path: Path) -> None:
    """The pool's helper (or a worker) is SIGKILLed: the guard kills the block's whole group,
    its shells and itself too, so no shell lives to write an exit code (Parsl then reports
    the block CANCELLED, not FAILED, and starts a new one)."""
    shell = block(600)
    pool, helper, workers = wait_until(lambda: _pool_of(shell.pid), 30, "the pool's helper")
    # The guard learns a helper at its next check, a pool's workers at its next scan of all
    # processes (a helper or worker lost before that goes unseen, as on the embedded site).
    time.sleep(RESCAN_EVERY * CHECK_PERIOD_S + 2 if target == "worker" else 3 * CHECK_PERIOD_S)
    os.kill(helper if target == "helper" else workers[0], signal.SIGKILL)
    t0 = time.monotonic()
    assert shell.wait(timeout=20) == -signal.SIGKILL
    waited = time.monotonic() - t0
    wait_until(lambda: not _group(shell.pid), 10, "the block's processes to end")
    assert not process_running(pool)
    assert waited < 5, waited
    said = (tmp_path / "block.err").read_text()
    assert f"worker pool {pool} lost " in said and "killing it" in said, said


def test_the_guard_ends_with_its_block_and_caps_the_pools_logs(block: Any,
                                                               tmp_path: Path) -> None:
    """A block that ends by itself takes its guard with it (nothing killed); while it runs, a
    log under the pool's ``--logdir`` over the cap is cut (its tail kept in ``NAME.1``)."""
    shell = block(6)
    wait_until(lambda: _pool_of(shell.pid), 30, "the pool's helper")
    guard = next(p for p in _group(shell.pid) if "fabric.endpoint.poolguard" in proc_cmdline(p))
    log = tmp_path / "logs" / "block-0" / "manager.log"
    log.parent.mkdir(parents=True)
    log.write_bytes(b"x" * (LOG_CAP_BYTES + 10))
    wait_until(lambda: log.stat().st_size == 0, 10, "the log to be capped")
    assert (log.parent / "manager.log.1").stat().st_size > 0
    assert shell.wait(timeout=30) == 0
    wait_until(lambda: not process_running(guard), 10, "the guard to end with its shell")


def test_the_guard_finds_only_pools_under_its_shell(tmp_path: Path) -> None:
    """A pool of another block (not a descendant of the shell) is not the guard's."""
    me = os.getpid()
    parent = os.getppid()
    guard = poolguard.PoolGuard(parent)
    stats = {me: ("S", parent, 0, 0), parent: ("S", 1, 0, 0)}
    assert guard.owns(me, "process_worker_pool --logdir=/x", stats)
    assert not poolguard.PoolGuard(me + 10**6).owns(me, "", stats)
    assert poolguard.log_dir_of(os.getpid()) is None


def test_a_lost_pool_under_the_daemon_is_a_retryable_endpoint_error() -> None:
    """Under the daemon no site process re-codes a lost pool's ``ManagerLost``: the Globus
    client raised it as the function's own ``UserFunctionError`` (not retryable)."""
    from globus_compute_endpoint.exception_handling import get_error_string
    from globus_compute_sdk.errors import TaskExecutionFailed
    from parsl.executors.high_throughput.errors import ManagerLost

    from fabric.endpoint.poolwatch import POOL_LOST
    from fabric.errors import EndpointError, UserFunctionError
    from fabric.globus.transport import _translate

    def failed(exc: Exception) -> TaskExecutionFailed:
        try:
            raise exc
        except Exception as raised:
            return TaskExecutionFailed(get_error_string(exc=raised))

    lost = _translate(failed(ManagerLost(b"abc", "node1")))
    assert isinstance(lost, EndpointError) and lost.retryable
    assert lost.details["code"] == POOL_LOST and "worker pool was lost" in lost.message
    own = _translate(failed(RuntimeError("parsl.executors.high_throughput.errors.ManagerLost")))
    assert isinstance(own, UserFunctionError)
