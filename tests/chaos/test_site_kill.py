"""kill -9 of the site: nothing of it survives, and any process can start a new one.

Before the watchdog, every kill left the site's Parsl interchange and worker pool running (3
orphan sets were seen alive after 30 minutes). Before the zombie check, a site auto-started by
an SDK process that was still running stayed a zombie after the kill (its parent had not
reaped it), which ``kill(pid, 0)`` calls alive: other processes found "the site", could not
connect to it and did not start another.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from fabric.client.local import LocalTransport, read_info
from tests.chaos.common import kill_all, of_site, report, throwaway_site, worker_pid
from tests.plugins.site import wait_until

pytestmark = pytest.mark.slow

KILLS = 2


def test_kill_9_leaves_no_process_behind(tmp_path: Path) -> None:
    leaked = crashes = 0
    folder = tmp_path / "killed"
    with throwaway_site(folder, workers=2) as (state, info):
        for _ in range(KILLS):
            with LocalTransport(site=str(folder), state_dir=state) as client:
                worker = client.submit(worker_pid).result(timeout=180)
                info = read_info(state) or {}
            site_pid = int(info["pid"])
            before = of_site(site_pid, state)
            assert worker in before, "the worker pool is in the site's session"
            os.kill(site_pid, signal.SIGKILL)
            try:
                wait_until(lambda p=site_pid: not of_site(p, state), 15,
                           f"every process of the killed site (pid {site_pid}) to end")
            except BaseException:
                leaked += len(of_site(site_pid, state))
                kill_all(of_site(site_pid, state))
                raise
            finally:
                report("site-kill-9", inputs=KILLS, leaked=leaked, crashes=crashes)
