"""Processes on this host, as ``/proc`` and ``kill(pid, 0)`` see them.

One answer to "is process ``pid`` still running?" for the site, its watchdog and pool watch,
the local transport and the local provider's jobs: a zombie (exited, not yet reaped by its
parent) is not running, and another user's process is (``kill`` says ``EPERM``). A leaf module:
every package may use it.
"""

from __future__ import annotations

import os
from pathlib import Path


def proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """``(state, ppid, pgrp, session)`` of ``pid`` from ``/proc``, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # the command name may hold spaces and ")"
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3])


def proc_args(pid: int) -> list[str]:
    """The arguments ``pid`` was started with, or [] if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def proc_cmdline(pid: int) -> str:
    """The command line of ``pid`` (arguments joined by spaces), or "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def process_running(pid: int) -> bool:
    """True while ``pid`` runs: it exists (any user's) and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    st = proc_stat(pid)
    return st is None or st[0] not in ("Z", "X")  # no /proc: trust kill(pid, 0)
