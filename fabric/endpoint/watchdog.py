"""The site's watchdog: ends the site's Parsl processes when the site dies, however it dies.

The site process leads its own session (``start_site`` starts it with ``start_new_session``),
and everything it starts stays in that session: the Parsl interchange (its child) and the
request-worker pool, which Parsl's ``LocalProvider`` detaches into a process group of its own
(its parent becomes init) but not into another session. A ``kill -9`` of the site therefore
leaves them running, holding ports, memory and a worker pool nobody uses. The watchdog is a
small separate process (in a session of its own, so it survives the site) that polls the
site's pid and, once it is gone, kills what is left of the site's session.

Model servers stay: they run in the same session (the ``jobs`` provider launches them the same
way) but are meant to outlive the site (a restarted site adopts them; they exit on their idle
timeout), so every process group holding a ``fabric.engine.server`` process is spared.

The same ``reap`` runs when a site starts on a state dir whose previous site died with its
watchdog (a ``kill -9`` of both): it reads the dead pid from ``endpoint.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fabric.procs import proc_cmdline, proc_stat, process_running

SERVER_MARK = "fabric.engine.server"
"""A command line with this runs a model server (spared: servers outlive their site)."""
POLL_S = 0.2


def leftovers(session: int) -> list[int]:
    """Live processes of ``session`` except model servers' process groups and this one."""
    members: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = proc_stat(int(entry.name))
        if st is not None and st[3] == session and st[0] not in ("Z", "X"):
            members[int(entry.name)] = st[2]
    spared = {pgrp for pid, pgrp in members.items() if SERVER_MARK in proc_cmdline(pid)}
    return [pid for pid, pgrp in members.items()
            if pgrp not in spared and pid not in (os.getpid(), session)]


def reap(session: int) -> list[int]:
    """SIGKILL what is left of a dead site's ``session`` (see ``leftovers``); the pids hit.

    Does nothing while the session's leader still runs: it is not a dead site's.
    """
    if session <= 1 or process_running(session):
        return []
    hit = []
    for pid in leftovers(session):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            hit.append(pid)
    return hit


def launch(site_pid: int, state_dir: Path) -> subprocess.Popen[bytes] | None:
    """Start the watchdog of ``site_pid`` (None where the site leads no session of its own:
    its session is then its caller's, which is not the watchdog's to end)."""
    if os.getsid(site_pid) != site_pid:
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "fabric.endpoint.watchdog", "--pid", str(site_pid),
         "--state-dir", str(state_dir)],
        stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def main(argv: list[str] | None = None) -> int:
    """Wait for the site to die, then reap its session."""
    parser = argparse.ArgumentParser(prog="python -m fabric.endpoint.watchdog")
    parser.add_argument("--pid", type=int, required=True, help="the site process")
    parser.add_argument("--state-dir", default="", help="the site's state dir (for ps)")
    args = parser.parse_args(argv)
    while process_running(args.pid):
        time.sleep(POLL_S)
    # Twice: a process that was forking during the first pass leaves a child behind.
    hit = reap(args.pid)
    time.sleep(POLL_S)
    hit += reap(args.pid)
    if hit:
        print(f"fabric watchdog: site pid {args.pid} is gone; killed {len(hit)} of its "
              f"processes: {sorted(set(hit))}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
