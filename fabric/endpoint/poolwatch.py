"""The site's worker-pool health check and Parsl log cap: one cheap loop, once a second.

Parsl's worker pool (``process_worker_pool``, one per block) keeps its in-flight task table and
monitoring queue in a ``multiprocessing`` Manager, a helper process it spawns before its
workers. When the helper dies the pool keeps heartbeating to the interchange, so Parsl notices
nothing: each worker dies on its next task, that task is never answered (a campaign shard waited
for its hour-long timeout), and the pool's monitoring thread logs the same traceback in a loop
(``manager.log`` grew to 1 GB in 10 minutes). So the site checks each of its pools every second
and, when the helper is gone, kills the pool's whole process group:

- Parsl's provider then sees the block gone (``CANCELLED``: its wrapper shell dies too, before
  it can write an exit code) and its strategy starts a new block within ``strategy_period``.
- The interchange fails the tasks it had sent to that pool with ``ManagerLost`` once the pool
  misses heartbeats for ``HEARTBEAT_THRESHOLD_S``; ``retype_lost`` turns that result into an
  error with code ``WorkerPoolLost``, which the client raises as a retryable ``EndpointError``
  (a campaign runner resubmits the shard; exactly one output line per input still holds).

A pool that lost one of its workers to a signal (OOM killer, ``kill -9``) is killed the same
way. Parsl's pool restarts the worker, but its workers share one ``multiprocessing`` task queue
whose read lock an idle worker holds while it waits for a task: a worker killed then leaves the
lock taken, every worker (the restarted one too) waits for it forever, and the pool, still
heartbeating, takes tasks that never run (a campaign's shards waited out ``shard_timeout_s``).
Which worker held the lock cannot be seen from outside, so any lost worker condemns its pool,
as a lost worker breaks Python's own ``ProcessPoolExecutor``.

The interchange (Parsl's broker between the site and its pools, a process of its own) is
checked in the same loop. Parsl does not notice it die: the site's next submission blocks for
ever in a ZMQ send no peer will take, and with it the site's one serving thread (control
messages too). So once it has exited, ``check_interchange`` puts the executor in its bad state
(every task out fails, a new submission fails at once, each answered with a typed, retryable
error) and calls ``on_lost``: the site stops, and the client's next call starts a new one.

The same loop caps every ``*.log`` under the engine's run dir (Parsl's ``interchange.log``,
``manager.log``, ``worker_N.log``) at ``LOG_CAP_BYTES``: a bigger one has its last
``LOG_KEEP_BYTES`` copied to ``NAME.1`` and is truncated in place (Parsl opens its logs in append
mode, so its next write lands at the new end; renaming would not help, the writer keeps the
old file open).

A site run under the ``globus-compute-endpoint`` daemon has no site process beside its engine:
there each block's ``worker_init`` starts ``fabric.endpoint.poolguard``, this watch narrowed to
the pool that block's shell starts (``owns``) and killing the block with itself (``kill``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from fabric.endpoint.watchdog import SERVER_MARK
from fabric.procs import proc_cmdline, proc_stat, process_running
from fabric.wire.lost import LOST, POOL_LOST, lost_failure

log = logging.getLogger("fabric.site.pool")

CHECK_PERIOD_S = 1.0
"""How often the pools' health and the logs' sizes are checked (a /proc scan and a few stats)."""
LOG_CAP_BYTES = 16 * 2**20
"""The most any Parsl log under the run dir holds for longer than ``CHECK_PERIOD_S``."""
LOG_KEEP_BYTES = 2**20
"""How much of a capped log's tail is kept (in ``NAME.1``) when it is truncated."""
HEARTBEAT_PERIOD_S = 2
"""Parsl's ``heartbeat_period``: how often a pool and the interchange exchange heartbeats. Parsl
also uses it as the pool's check of its workers (a killed worker's task fails with
``WorkerLost`` within this long; Parsl's default of 30 s left it hanging that long) and the
workers' queue poll. A heartbeat is one small ZMQ message each way: 2 s costs nothing."""
HEARTBEAT_THRESHOLD_S = 20
"""Parsl's ``heartbeat_threshold``: the interchange drops a pool silent for this long and fails
its tasks (``ManagerLost``); a pool that hears nothing from the interchange that long exits.
This bounds how long a task on a lost pool waits (Parsl's default is 120 s). It is 10 missed
heartbeats, not fewer: a pool wrongly dropped on a loaded node fails tasks that were running."""
RESCAN_EVERY = 5
"""Every this many checks all of ``/proc`` is scanned for new pools (a replaced block's)."""


def engine_options() -> dict[str, Any]:
    """The Parsl executor settings this module relies on (see the constants' docs)."""
    from parsl.jobs.error_handlers import windowed_error_handler

    # A killed pool's block ends FAILED when its wrapper shell outlives it; Parsl's default
    # handler gives up on the whole engine when every block has failed, which with one block is
    # the first loss. The windowed one gives up only after three failed blocks in a row (a pool
    # that cannot start at all): its tasks then fail instead of waiting forever.
    return {"heartbeat_period": HEARTBEAT_PERIOD_S,
            "heartbeat_threshold": HEARTBEAT_THRESHOLD_S,
            "block_error_handler": windowed_error_handler}


def retype_lost(packed: bytes) -> bytes:
    """``packed`` (a Globus Compute ``Result``), with a failure of the site's own machinery
    (``ManagerLost``: its pool was lost; ``BadStateException``: its interchange exited)
    re-coded (``WorkerPoolLost``, ``EngineLost``) so the client raises a retryable
    ``EndpointError`` rather than taking it for the function's own error; any other result
    is returned as it is."""
    if not any(entry[0] in packed for entry in LOST):  # the common case: a search or two
        return packed
    from globus_compute_common import messagepack
    from globus_compute_common.messagepack.message_types import Result, ResultErrorDetails

    try:
        res = messagepack.unpack(packed)
    except Exception:
        return packed
    if not isinstance(res, Result) or not res.is_error:
        return packed
    found = lost_failure(res.data)
    if found is None:
        return packed
    code, message = found
    details = ResultErrorDetails(code=code, user_message=message)
    # The client quotes the last line: make it this, not the traceback's closing rule.
    data = f"{res.data}\n{code}: {message}"
    return bytes(messagepack.pack(Result(task_id=res.task_id, data=data, error_details=details,
                                         task_statuses=res.task_statuses)))


class PoolWatch:
    """Health of the worker pools whose logs are under ``run_dir``, and their logs' size."""

    def __init__(self, run_dir: Path, log_cap_bytes: int = LOG_CAP_BYTES) -> None:
        self.executor: Any = None
        """The engine's Parsl executor, once started (its interchange is checked)."""
        self.on_lost: Any = None
        """Called once the interchange has exited (the site stops)."""
        self._lost_lock = threading.Lock()  # this loop and a submission may both see it go
        self.run_dir = Path(run_dir)
        self.log_cap_bytes = log_cap_bytes
        self.helpers: dict[int, int] = {}
        """Each live pool's pid -> its multiprocessing helper's pid (once seen)."""
        self.workers: dict[int, set[int]] = {}
        """Each live pool's pid -> its workers' pids (at the last scan of all processes)."""
        self.killed = 0
        """Pools killed because their helper or one of their workers was gone."""
        self.truncated = 0
        """Times a log was cut down to its cap."""
        self._live: list[int] = []
        self._checks = 0

    def run(self, stopping: threading.Event) -> None:
        """Check every ``CHECK_PERIOD_S`` until ``stopping`` is set (the site's background loop)."""
        while not stopping.wait(CHECK_PERIOD_S):
            self.check()

    def check(self) -> None:
        """One round: the interchange, the pools, the logs (never raises)."""
        try:
            self.check_interchange()
            self.check_pools()
            self.cap_logs()
        except Exception:  # a /proc race or a full disk must not end the loop
            log.exception("worker pool check failed")

    def check_interchange(self) -> bool:
        """False (and the executor failed, ``on_lost`` called, once) if the interchange has
        exited; True while it runs or before the engine has one."""
        proc = getattr(self.executor, "interchange_proc", None)
        if proc is None or proc.poll() is None:
            return True
        with self._lost_lock:
            self._interchange_lost(proc)
        return False

    def _interchange_lost(self, proc: Any) -> None:
        """Fail the executor, end its pools and tell the site, once."""
        if self.executor.bad_state_is_set:
            return
        from globus_compute_endpoint.exceptions import CouldNotExecuteUserTaskError

        log.error("the Parsl interchange (pid %d) exited with code %s: the site stops "
                  "(its next call starts a new one)", proc.pid, proc.returncode)
        self.executor.set_bad_state_and_fail_all(CouldNotExecuteUserTaskError(
            f"the site's Parsl interchange exited (code {proc.returncode}); the site "
            "restarts on the next call: retry"))
        # Its pools would wait out their heartbeat threshold for an interchange that is
        # gone, and the site's stop has no interchange to ask them to leave: end them.
        for pool in self.scan():
            self.kill(pool)
        if self.on_lost is not None:
            self.on_lost()

    def scan(self) -> dict[int, set[int]]:
        """One pass over ``/proc``: each live worker pool this watch owns (``owns``) -> its
        children started by ``spawn_main`` (its workers and its helper). Only this session's
        processes are looked at."""
        session = os.getsid(0)
        stats = {pid: st for pid in _pids() if (st := proc_stat(pid)) is not None
                 and st[3] == session and st[0] not in ("Z", "X")}
        found = {pid: set[int]() for pid in stats
                 if "process_worker_pool" in (cmd := proc_cmdline(pid))
                 and self.owns(pid, cmd, stats)}
        for pid, st in stats.items():
            if st[1] in found and "spawn_main" in proc_cmdline(pid):
                found[st[1]].add(pid)
        return found

    def owns(self, pool: int, cmd: str, stats: dict[int, tuple[str, int, int, int]]) -> bool:
        """Whether worker pool ``pool`` (command line ``cmd``) is this watch's: the site's
        pools name its run dir (Parsl detaches pools; their parent is init)."""
        return str(self.run_dir) + os.sep in cmd

    def kill(self, pool: int) -> None:
        """End ``pool`` (``kill_pool``: its block's process group)."""
        kill_pool(pool)

    def check_pools(self) -> list[int]:
        """Kill each pool whose helper or one of whose workers is gone; the pools killed.

        The known pools' helpers and workers are checked each time (a ``/proc`` read or two
        each); the scan of every process, for new pools and restarted workers, runs every
        ``RESCAN_EVERY`` checks, or while a pool's helper is not known.
        """
        self._checks += 1
        scan = None
        if self._checks % RESCAN_EVERY == 0 or len(self.helpers) < len(self._live) \
                or not self._live:
            scan = self.scan()
            self._live = list(scan)
        else:
            self._live = [pool for pool in self._live if process_running(pool)]
        for gone in set(self.helpers) - set(self._live):
            self._end_orphan(gone, self.helpers.pop(gone))
        for gone in set(self.workers) - set(self._live):
            del self.workers[gone]
        killed = [pool for pool in self._live if self._check(pool, scan)]
        self._live = [pool for pool in self._live if pool not in killed]
        return killed

    def _check(self, pool: int, scan: dict[int, set[int]] | None) -> bool:
        """Kill ``pool`` if its helper or a worker it had is gone; True if it was killed."""
        helper = self.helpers.get(pool)
        if helper is None:
            found = helper_of(pool)
            if found is not None:  # not yet listening right after the pool started
                self.helpers[pool] = found
            return False
        if not process_running(helper):
            why = f"lost its multiprocessing helper (pid {helper})"
        elif lost := sorted(w for w in self.workers.get(pool, ()) if not process_running(w)):
            why = (f"lost worker {lost[0]}, which may hold the lock of the queue its workers "
                   "take tasks from")
        else:
            if scan is not None:
                self.workers[pool] = scan.get(pool, set()) - {helper}
            return False
        # Said first: a block's guard (fabric.endpoint.poolguard) dies with the pool's group.
        log.warning("worker pool %d %s: killing it; Parsl starts a new one, its tasks fail as "
                    "%s", pool, why, POOL_LOST)
        self.kill(pool)
        self.helpers.pop(pool, None)
        self.workers.pop(pool, None)
        self.killed += 1
        return True

    def _end_orphan(self, pool: int, helper: int) -> None:
        # A pool killed by someone else leaves its helper behind (a Manager does not watch its
        # parent; the workers do, and exit): end it, if that pid is still that helper.
        st = proc_stat(helper)
        if st is None or st[3] != os.getsid(0) or "multiprocessing" not in proc_cmdline(helper):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(helper, signal.SIGKILL)
            log.warning("worker pool %d is gone: ended its orphaned helper (pid %d)", pool,
                        helper)

    def cap_logs(self) -> list[Path]:
        """Cut every ``*.log`` under the run dir over the cap down (tail kept); those cut."""
        cut = []
        for path in self.run_dir.rglob("*.log"):
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                if size <= self.log_cap_bytes:
                    continue
                with path.open("rb") as fh:
                    fh.seek(max(0, size - LOG_KEEP_BYTES))
                    tail = fh.read(LOG_KEEP_BYTES)
                path.with_name(path.name + ".1").write_bytes(tail)
                os.truncate(path, 0)
                self.truncated += 1
                cut.append(path)
                log.warning("%s reached %d bytes (cap %d): truncated, its last %d bytes are in "
                            "%s.1", path, size, self.log_cap_bytes, len(tail), path.name)
        return cut


def helper_of(pool: int) -> int | None:
    """The pool's ``multiprocessing`` Manager: its child listening on a Unix socket named
    ``.../pymp-*/listener-*`` (workers and the resource tracker listen on none)."""
    listening = _listener_inodes()
    if not listening:
        return None
    for pid in _pids():
        st = proc_stat(pid)
        if st is None or st[1] != pool:
            continue
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                if os.readlink(fd) in listening:
                    return pid
    return None


def _listener_inodes() -> set[str]:
    """``socket:[inode]`` of every listening Unix socket that multiprocessing named."""
    out = set()
    with contextlib.suppress(OSError), open("/proc/net/unix") as fh:
        next(fh, None)
        for line in fh:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 = accepting
            if len(fields) >= 8 and "/pymp-" in fields[7] and "listener-" in fields[7] \
                    and int(fields[3], 16) & 0x10000:
                out.add(f"socket:[{fields[6]}]")
    return out


ENGINE_STOP_S = 30.0
"""How long the site waits for its engine's shutdown before it exits without it."""


def stop_engine(engine: Any, timeout_s: float = ENGINE_STOP_S) -> bool:
    """``engine.shutdown()``, waited for at most ``timeout_s``; False if it did not return.
    After its interchange died, Parsl's block-status thread can be stuck for ever in a ZMQ
    send to it, and the shutdown joins that thread: the site would hang in its stop (CI saw
    it, its ``endpoint.json`` already gone). The caller then exits without waiting for it."""
    done = threading.Event()

    def run() -> None:
        try:
            engine.shutdown()
        except Exception:
            log.exception("engine shutdown failed")
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="site-engine-stop").start()
    if done.wait(timeout_s):
        return True
    log.error("the engine did not shut down within %.0f s (a thread waits on the dead "
              "interchange): exiting without it", timeout_s)
    return False


def kill_pool(pool: int, spared: tuple[int, ...] | None = None) -> None:
    """SIGKILL the pool's process group (the block: wrapper shells, pool, workers) at once, so
    no wrapper lives to record an exit code; where that group is not the block's own (one of
    ``spared``: by default the caller's group and session) or holds a model server (servers
    outlive pools), just the pool and its children, servers spared."""
    st = proc_stat(pool)
    if st is None:
        return
    group = st[2]
    stats = {pid: s for pid in _pids() if (s := proc_stat(pid)) is not None}
    own = group > 1 and group not in (
        (os.getpgrp(), os.getsid(0)) if spared is None else spared)
    if own and not any(SERVER_MARK in proc_cmdline(pid) for pid, s in stats.items()
                       if s[2] == group):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
        return
    for pid in [pool, *(pid for pid, s in stats.items() if s[1] == pool)]:
        if SERVER_MARK not in proc_cmdline(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
