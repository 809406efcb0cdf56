"""What the chaos tests share: a throwaway site, process census and the counts they print.

Every scenario prints one line, ``chaos <name>: inputs=.. typed_errors=.. crashes=..
leaked=.. lost=.. duplicated=..``, so a CI log shows what was tried and what broke.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fabric.client.local import start_site, stop_site
from tests.plugins.site import REPO_ROOT, write_site


def worker_pid() -> int:
    """Shipped by reference to the site's workers (the repo root is on their path)."""
    return os.getpid()


def report(name: str, **counts: int) -> dict[str, int]:
    """Print the scenario's counts (``-s`` or the captured output shows them)."""
    line = {"inputs": 0, "typed_errors": 0, "crashes": 0, "leaked": 0, "lost": 0,
            "duplicated": 0, **counts}
    print(f"chaos {name}: " + " ".join(f"{k}={v}" for k, v in line.items()), flush=True)
    return line


def stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, process group, session)`` of a live ``pid``, read from ``/proc``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[2]), int(fields[3])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def processes(where: Any) -> list[int]:
    """Live (not zombie) pids for which ``where(pid, stat)`` holds."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = stat(int(entry.name))
            if st is not None and st[0] not in ("Z", "X") and where(int(entry.name), st):
                out.append(int(entry.name))
    return out


def of_site(site_pid: int, state_dir: Path) -> list[int]:
    """Processes of a site: its session (interchange, worker pool, workers) and its watchdog."""
    return processes(lambda pid, st: st[2] == site_pid or str(state_dir) in cmdline(pid))


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def throwaway_site(folder: Path, **site: Any) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A site with no models in ``folder`` (started; stopped with every process it left)."""
    write_site(folder, **site)
    state = folder / "state"
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(REPO_ROOT)
    pids: set[int] = set()
    try:
        info = start_site(str(folder), state, timeout_s=180)
        pids.add(int(info["pid"]))
        yield state, info
    finally:
        with contextlib.suppress(Exception):
            stop_site(str(folder), state, all=True, timeout_s=30)
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
        # Sites started since (restarts) lead sessions of their own with the state dir named.
        pids.update(processes(lambda pid, st: st[2] == pid and str(state) in cmdline(pid)))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(of_site(p, state) for p in pids):
            time.sleep(0.2)
        for pid in pids:  # whatever the site under test failed to end
            kill_all(of_site(pid, state))
