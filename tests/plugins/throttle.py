"""Slow a model server down so that a test's cancel reaches it before it finishes.

The tiny model makes hundreds of tokens a second. A test that cancels a stream after its first
token must know the server is still generating when the cancel arrives, however loaded the
machine is. Stopping and continuing the server from a thread of the test (SIGSTOP/SIGCONT) was
not enough: when the test process itself was starved of CPU, the thread that should stop the
server again did not run either, so the server ran freely exactly while the test could not
cancel (CI, twice in one run: a cancelled stream came back whole, "done"). A CPU cgroup's
quota is enforced by the kernel whatever the test process is doing, so it is used where the
machine allows it (cgroup v1 ``cpu`` or v2 ``cpu.max``, as root); the signal loop is the
fallback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

V1_CPU = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 20_000


@contextlib.contextmanager
def throttle_process(pid: int, share: float = 0.05) -> Iterator[str]:
    """Let process ``pid`` use at most ``share`` of one CPU while the block runs; it goes on
    freely after (and nothing is left behind, even when the block raises). The block gets
    how: ``"cgroup"`` (a kernel quota) or ``"signals"`` (the fallback)."""
    group = _cpu_group(pid, share)
    if group is None:
        with _signal_duty(pid, run_s=0.002, stop_s=0.02):
            yield "signals"
        return
    try:
        yield "cgroup"
    finally:
        _leave(group, pid)


def cgroup_possible() -> bool:
    """Whether this process may make a CPU cgroup (root, a cpu controller, a writable tree):
    where it may, the throttle must not fall back to signals unnoticed."""
    if os.geteuid() != 0:
        return False
    if (V1_CPU / "cpu.cfs_quota_us").exists():
        return os.access(V1_CPU, os.W_OK)
    return ("cpu" in _read(V2_ROOT / "cgroup.subtree_control").split()
            and os.access(V2_ROOT, os.W_OK))


def _cpu_group(pid: int, share: float) -> Path | None:
    """A new cgroup holding ``pid`` with a CPU quota of ``share``, or None where there is none
    the test may make."""
    quota_us = max(1000, int(PERIOD_US * share))  # the kernel's smallest quota is 1 ms
    name = f"fabric-throttle-{os.getpid()}-{pid}"
    if (V1_CPU / "cpu.cfs_quota_us").exists():
        group, limits = V1_CPU / name, {"cpu.cfs_period_us": str(PERIOD_US),
                                        "cpu.cfs_quota_us": str(quota_us)}
    elif "cpu" in _read(V2_ROOT / "cgroup.subtree_control").split():
        group, limits = V2_ROOT / name, {"cpu.max": f"{quota_us} {PERIOD_US}"}
    else:
        return None
    try:
        group.mkdir()
    except OSError:  # not root, or a read-only cgroup tree
        return None
    try:
        for knob, value in limits.items():
            (group / knob).write_text(value)
        (group / "cgroup.procs").write_text(str(pid))  # every thread of the process
    except OSError:
        _leave(group, pid)
        return None
    return group


def _leave(group: Path, pid: int) -> None:
    """Put ``pid`` back in the parent group (unthrottled) and remove ``group``."""
    with contextlib.suppress(ProcessLookupError, OSError):  # a process gone has left already
        (group.parent / "cgroup.procs").write_text(str(pid))
    with contextlib.suppress(OSError):
        group.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@contextlib.contextmanager
def _signal_duty(pid: int, run_s: float, stop_s: float) -> Iterator[None]:
    """Let ``pid`` run only ``run_s`` in every ``run_s + stop_s`` (SIGSTOP/SIGCONT from a
    thread of this process: weaker than a quota when this process is starved)."""
    done = threading.Event()

    def duty() -> None:
        with contextlib.suppress(ProcessLookupError):  # the process is gone: nothing to hold
            while not done.is_set():
                os.kill(pid, signal.SIGSTOP)
                try:
                    done.wait(stop_s)
                finally:
                    os.kill(pid, signal.SIGCONT)
                time.sleep(run_s)

    thread = threading.Thread(target=duty, daemon=True, name="throttle")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
