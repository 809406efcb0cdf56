"""The local site's process: find it (``endpoint.json``), start it, ask it, stop it.

``fabric endpoint start|status|stop`` and the SDK's auto-start use these; ``LocalTransport``
(``fabric.client.local``) talks to the site they find.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

from fabric.errors import EndpointError
from fabric.procs import process_running
from fabric.sites import resolve_site
from fabric.wire import framing
from fabric.wire.framing import CONTROL

INFO_FILE = "endpoint.json"
LOCK_FILE = "endpoint.lock"
"""Held (flock) by the site process that owns the state dir, from start until it has exited."""
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
"""Site processes this process started (so their exit is seen, not left as zombies)."""


def read_info(state_dir: Path) -> dict[str, Any] | None:
    """The running site's ``endpoint.json``, or None if no live site owns ``state_dir``."""
    try:
        info = json.loads((Path(state_dir) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not site_running(int(info.get("pid", 0))):
        return None
    if not _is_site_of(int(info["pid"]), Path(state_dir)):
        return None  # the site died and its pid now belongs to another process
    return info


def _is_site_of(pid: int, state_dir: Path) -> bool:
    """Whether ``pid`` is a site process serving ``state_dir``. A site killed with -9 leaves
    its ``endpoint.json``, and once pids wrap around another process (another site, even) may
    hold its pid: stopping "the site" must not signal that one."""
    from fabric.procs import proc_args

    args = proc_args(pid)
    if not args:
        return True  # /proc unreadable (another user's process): trust the pid check
    if "fabric.siteproc" not in args:
        return False
    if "--state-dir" not in args[:-1]:
        return True  # started by hand with the site's own state dir
    given = Path(args[args.index("--state-dir") + 1])
    if not given.is_absolute():  # relative to where the site was started
        with contextlib.suppress(OSError):
            given = Path(os.readlink(f"/proc/{pid}/cwd")) / given
    return os.path.realpath(given) == os.path.realpath(state_dir)


def start_site(site: str = "local", state_dir: str | Path | None = None,
               timeout_s: float = 180.0) -> dict[str, Any]:
    """Start the site in the background unless it runs; returns its ``endpoint.json``.

    Raises ``EndpointError`` saying why (with the site log's tail) if it cannot start.
    """
    cfg, ref, folder = resolve_site(site, state_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Two clients auto-starting at once: the second waits here and then finds the first's site.
    with (folder / "start.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = _owner_or_none(folder, cfg.name, time.monotonic() + timeout_s)
        if info is not None:
            return info
        log_path = folder / "logs" / "site.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "fabric.siteproc", "--site", ref,
                     "--state-dir", str(folder)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives this client, ignores its Ctrl-C
                )
            except OSError as exc:
                raise EndpointError(f"cannot start the {cfg.name} site: {exc}") from None
        _CHILDREN[proc.pid] = proc
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rc = proc.poll()
            if rc is not None:
                raise EndpointError(
                    f"the {cfg.name} site exited (code {rc}) before it was ready: "
                    f"{_tail(log_path, offset)}", log=str(log_path), exit_code=rc)
            info = read_info(folder)
            if info is not None and info.get("pid") == proc.pid:
                return info
            time.sleep(0.1)
        proc.kill()
        raise EndpointError(f"the {cfg.name} site did not start within {timeout_s:.0f} s: "
                            f"{_tail(log_path, offset)}", log=str(log_path))


def _owner_or_none(folder: Path, name: str, deadline: float) -> dict[str, Any] | None:
    """The live site's ``endpoint.json``, or None once no site process holds ``folder``.

    A stopping site (SIGTERM, ``stop``) removes ``endpoint.json`` first, so clients see it
    gone, and lets go of the state dir only when its engine has shut down, seconds later. A
    site started in between exits at once ("a site is already running"): wait instead.
    """
    while True:
        info = read_info(folder)
        if info is not None or not _lock_held(folder / LOCK_FILE):
            return info
        if time.monotonic() > deadline:
            raise EndpointError(
                f"cannot start the {name} site: the site process that last used {folder} "
                "still holds it (stopping) and did not let go in time; try again, or see "
                "`fabric endpoint status`", state_dir=str(folder))
        time.sleep(0.1)


def _lock_held(path: Path) -> bool:
    """Whether a process holds the flock on ``path`` (tested without waiting; the site that
    takes it meanwhile retries for a moment)."""
    try:
        fh = path.open("a")
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def site_status(site: str = "local", state_dir: str | Path | None = None,
                timeout_s: float = 30.0, health: bool = True) -> dict[str, Any] | None:
    """The running site's status (pid, address, state dir, deployments), or None if down."""
    _, _, folder = resolve_site(site, state_dir)
    info = read_info(folder)
    if info is None:
        return None
    return _control(info, {"op": "status", "health": health}, timeout_s)


def stop_site(site: str = "local", state_dir: str | Path | None = None, all: bool = False,
              timeout_s: float = 60.0) -> dict[str, Any] | None:
    """Stop the running site (``all``: undeploy its model servers first); None if it was down."""
    _, _, folder = resolve_site(site, state_dir)
    info = read_info(folder)
    if info is None:
        return None
    pid = int(info["pid"])
    try:
        reply = _control(info, {"op": "stop", "all": all}, timeout_s)
    except EndpointError:
        reply = {"op": "stop", "note": "site did not answer; sent SIGTERM"}
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while site_running(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            reply["killed"] = True
            break
        time.sleep(0.1)
    return reply


def connect_site(info: dict[str, Any]) -> socket.socket:
    """A connection to the site ``info`` (its ``endpoint.json``) describes."""
    if not info.get("socket"):
        raise EndpointError(
            f"the site (pid {info.get('pid')}) runs an older fabric without a Unix socket: "
            "restart it (`fabric endpoint stop`, then start)")
    try:
        return framing.connect(str(info["socket"]))
    except OSError as exc:
        raise EndpointError(f"cannot connect to the site (pid {info.get('pid')}) at "
                            f"{info['socket']}: {exc}") from None


def _control(info: dict[str, Any], msg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One control round trip on a fresh connection (for the CLI; no I/O thread)."""
    sock = connect_site(info)
    reader = framing.Reader()
    deadline = time.monotonic() + timeout_s
    replies: list[list[bytes]] | None = []
    try:
        framing.send_all(sock, framing.encode([CONTROL, pack({**msg, "id": "cli"})]),
                         timeout_s)
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        while replies == [] and time.monotonic() < deadline:
            if poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                replies = framing.recv_ready(sock, reader)
    except (OSError, framing.FramingError) as exc:
        raise EndpointError(f"the site (pid {info.get('pid')}) failed {msg['op']!r}: "
                            f"{exc}") from None
    finally:
        sock.close()
    if not replies:
        raise EndpointError(f"the site (pid {info.get('pid')}) did not answer "
                            f"{msg['op']!r} within {timeout_s:.0f} s")
    reply = dict(msgpack.unpackb(replies[0][-1], raw=False))
    if reply.get("error"):
        raise EndpointError(f"site control {msg['op']} failed: {reply['error']}")
    return reply


def site_running(pid: int) -> bool:
    """True while the site process ``pid`` runs. A site this process started is its child:
    once it exits it is reaped here (``poll``) rather than left a zombie."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    return process_running(pid)


def _tail(path: Path, offset: int = 0, lines: int = 15) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return "\n".join(kept) if kept else f"(log {path} is empty)"


def pack(msg: dict[str, Any]) -> bytes:
    """``msg`` as msgpack (what the site's control messages are)."""
    return bytes(msgpack.packb(msg, use_bin_type=True, default=str))
