"""The tests' server throttle (``tests/plugins/throttle.py``) holds a busy process to its share
and leaves nothing behind: the cancel tests rely on it to keep a server generating."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.plugins.throttle import V1_CPU, V2_ROOT, cgroup_possible, throttle_process


@pytest.fixture
def busy() -> Iterator[psutil.Process]:
    """A process spinning on one CPU."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield psutil.Process(child.pid)
    finally:
        child.kill()
        child.wait(10)


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _groups() -> list[Path]:
    """This process's throttle groups (the other xdist process may be throttling a server)."""
    return [p for root in (V1_CPU, V2_ROOT) if root.is_dir()
            for p in root.glob(f"fabric-throttle-{os.getpid()}-*")]


def _cpu_cgroup(pid: int) -> str:
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return next((line for line in lines if ":cpu:" in line or line.startswith("0::")), "")


def test_a_busy_process_gets_its_share_only_while_throttled(busy: psutil.Process) -> None:
    before_group = _cpu_cgroup(busy.pid)
    start = _cpu_s(busy)
    t0 = time.monotonic()
    with throttle_process(busy.pid, share=0.05) as how:
        time.sleep(1.0)
    # Where a cgroup can be made, the kernel's quota throttles: the signal fallback is weaker
    # when the test process is starved, and must not take over unnoticed.
    assert how == ("cgroup" if cgroup_possible() else "signals")
    held = (_cpu_s(busy) - start) / (time.monotonic() - t0)
    # 5% asked; the signal fallback lets through about 9%: a free spin takes up to 100%.
    assert held < 0.2, f"throttled process used {held:.0%} of a CPU"
    assert _cpu_cgroup(busy.pid) == before_group
    assert _groups() == []


def test_a_process_that_exits_while_throttled(busy: psutil.Process) -> None:
    with throttle_process(busy.pid):
        busy.kill()
        busy.wait(10)
    assert _groups() == []
