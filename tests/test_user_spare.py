"""A request worker's spare user function process (``fabric.endpoint.userchild``).

Each ``fab.submit`` runs in a fresh process of its own; the worker starts the next one ahead of
time so that a call does not wait ~0.3-0.5 s for it. Checked here with real processes, the
worker's side (``run_user_call``) run from this process or from a worker process of the test's
own, without a model (``model=None``):

* a call is served by the spare that was started and ready before it, and a spare serves one
  call only (the next call gets another process; the used one is gone);
* the spare that serves a call is as isolated as a process started for it: clean environment,
  umask 077, a session of its own, one socket and no other file descriptor;
* no spare where the site runs no user functions;
* kill -9 of the worker: its waiting spare, and a busy user function with a process of its own,
  are gone within seconds, their home folders too (no orphans).
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

from fabric.endpoint import userchild
from fabric.endpoint.userchild import SparePool
from tests.plugins.ci import cannot_run

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 60.0


# -- functions run in the user function's process (by reference: PYTHONPATH has the repo) -----

def probe(handle: Any) -> dict[str, Any]:
    """What the process it runs in looks like from inside."""
    fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
    mask = os.umask(0o077)
    os.umask(mask)
    return {"pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0),
            "pgid": os.getpgrp(), "umask": mask, "fds": fds, "env": dict(os.environ),
            "cwd": os.getcwd(), "uid": os.getuid(),
            "started": Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1]
            .split()[19]}


def busy_with_a_child(handle: Any, note: str) -> None:
    """Start a process of its own, say both pids, then keep busy (never reading its socket)."""
    sleeper = subprocess.Popen(["sleep", "300"])
    Path(note).write_text(f"{os.getpid()} {sleeper.pid} {os.getcwd()}")
    time.sleep(300)


# -- helpers ---------------------------------------------------------------------------------

@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[SparePool]:
    """A pool of this test's own as the worker's (``run_user_call`` and ``prestart`` use it)."""
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    fresh = SparePool()
    monkeypatch.setattr(userchild, "SPARES", fresh)
    monkeypatch.setattr("fabric.endpoint.sandbox.SPARES", fresh)
    yield fresh
    fresh.close()


def _ctx(tmp_path: Path, **site: Any) -> Any:
    from fabric.endpoint.context import SiteContext
    from fabric.sites import SiteConfig

    return SiteContext(SiteConfig(name="spare-test", allow_user_functions=True, **site),
                       tmp_path / "state")


def _call(ctx: Any, fn: Any, *args: Any) -> Any:
    from fabric.endpoint.sandbox import run_user_call
    from fabric.wire.usercode import pack_call, unpack_value

    return unpack_value(run_user_call(ctx, pack_call(fn, args, {}), model=None, version=None,
                                      identity="tester", auth=None))


def _alive(pid: int) -> bool:
    """Running. A zombie, dead but not yet reaped by its parent, counts as gone once its other
    threads have exited too (its leader shows Z before they have, and only then can its parent
    reap it and its socket is closed)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z" or threads > 1


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    end = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _isolated(out: dict[str, Any]) -> None:
    assert out["sid"] == out["pid"] == out["pgid"]  # a session (and group) of its own
    assert out["umask"] == 0o077
    assert set(out["env"]) == {"PATH", "PYTHONPATH", "HOME", "TMPDIR", "LANG",
                               "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
    assert out["env"]["HOME"] == out["cwd"] and Path(out["cwd"]).name.startswith("fabric-userfn-")
    # stdin/out/err (/dev/null), its one socket, and the listing's own descriptor.
    assert len(out["fds"]) == 5, out["fds"]


# -- tests -----------------------------------------------------------------------------------

def test_call_is_served_by_the_ready_spare_and_a_spare_serves_one_call(
        pool: SparePool, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    first = _call(ctx, probe)  # no spare yet: a process started for this call
    _isolated(first)
    assert first["ppid"] == os.getpid()
    spare = pool.wait_spare(STARTUP_S)  # the next call's, started when the first ended
    assert spare is not None and spare != first["pid"]
    assert not _alive(first["pid"]) and not Path(first["cwd"]).exists()
    second = _call(ctx, probe)
    assert second["pid"] == spare  # served by the process started before it
    _isolated(second)
    third_spare = pool.wait_spare(STARTUP_S)
    assert third_spare not in (None, first["pid"], second["pid"])
    assert not _alive(second["pid"]) and not Path(second["cwd"]).exists()
    third = _call(ctx, probe)
    assert third["pid"] == third_spare and len({first["pid"], second["pid"], third["pid"]}) == 3


def test_no_spare_where_user_functions_are_off(pool: SparePool) -> None:
    from fabric.sites import SiteConfig

    userchild.prestart(SiteConfig(name="closed"))  # allow_user_functions defaults to off
    assert pool.wait_spare(1.0) is None and pool.spare_pid() is None
    userchild.prestart(SiteConfig(name="open", allow_user_functions=True))
    pid = pool.wait_spare(STARTUP_S)
    assert pid is not None and _alive(pid)
    pool.close()
    assert _wait_gone([pid], 10) == []


def test_worker_context_starts_the_spare_only_for_user_function_sites(
        pool: SparePool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fabric.endpoint import context
    from tests.plugins.site import write_site

    monkeypatch.setattr(context, "_CURRENT", None)
    closed = write_site(tmp_path / "closed", name="closed", allow_user_functions=False)
    monkeypatch.setenv("FABRIC_SITE", str(closed))
    monkeypatch.setenv("FABRIC_STATE_DIR", str(closed / "state"))
    assert not context.current().site.allow_user_functions
    assert pool.wait_spare(1.0) is None
    opened = write_site(tmp_path / "open", name="open", allow_user_functions=True)
    monkeypatch.setenv("FABRIC_SITE", str(opened))
    monkeypatch.setenv("FABRIC_STATE_DIR", str(opened / "state"))
    assert context.current().site.allow_user_functions
    assert pool.wait_spare(STARTUP_S) is not None
    monkeypatch.setattr(context, "_CURRENT", None)


def test_spare_of_another_kind_is_not_handed_out(pool: SparePool, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A spare started with another module path (or run_as) is replaced, not used."""
    pool.refill(None)
    old = pool.wait_spare(STARTUP_S)
    assert old is not None
    monkeypatch.setenv("PYTHONPATH", f"{REPO_ROOT}{os.pathsep}{tmp_path}")
    out = _call(_ctx(tmp_path), probe)
    assert out["pid"] != old and out["env"]["PYTHONPATH"].endswith(str(tmp_path))
    assert _wait_gone([old], 10) == []


def test_dead_spare_is_replaced(pool: SparePool, tmp_path: Path) -> None:
    pool.refill(None)
    old = pool.wait_spare(STARTUP_S)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    assert _wait_gone([old], 10) == []
    out = _call(_ctx(tmp_path), probe)
    assert out["pid"] != old
    _isolated(out)


WORKER = """
import os, sys, threading, time
sys.path.insert(0, {repo!r})
from fabric.endpoint import userchild
from fabric.endpoint.context import SiteContext
from fabric.endpoint.sandbox import run_user_call
from fabric.sites import SiteConfig
from fabric.wire.usercode import pack_call
from tests.test_user_spare import busy_with_a_child

ctx = SiteContext(SiteConfig(name="w", allow_user_functions=True), {state!r})
if {busy!r}:
    call = pack_call(busy_with_a_child, ({note!r},), {{}})
    threading.Thread(target=run_user_call, args=(ctx, call), daemon=True,
                     kwargs=dict(model=None, version=None, identity="t", auth=None)).start()
else:
    userchild.prestart(ctx.site)
    print(userchild.SPARES.wait_spare(60), flush=True)
time.sleep(600)
"""


def _worker(tmp_path: Path, busy: bool) -> subprocess.Popen[str]:
    note = tmp_path / "note"
    script = WORKER.format(repo=str(REPO_ROOT), state=str(tmp_path / "state"), busy=busy,
                           note=str(note))
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                            start_new_session=True)


def test_spare_dies_with_its_worker(tmp_path: Path) -> None:
    worker = _worker(tmp_path, busy=False)
    spare: int | None = None
    try:
        assert worker.stdout is not None
        spare = int(worker.stdout.readline())  # started and ready: waiting for its call
        home = Path(os.readlink(f"/proc/{spare}/cwd"))
        assert _alive(spare) and home.name.startswith("fabric-userfn-")
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        assert _wait_gone([spare], 10) == []
        assert not home.exists()
    finally:
        with_kill(worker)
        if spare is not None:  # left behind only if the test failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(spare, signal.SIGKILL)


def test_busy_user_function_and_its_process_die_with_the_worker(tmp_path: Path) -> None:
    worker = _worker(tmp_path, busy=True)
    note = tmp_path / "note"
    pids: list[int] = []
    try:
        end = time.monotonic() + STARTUP_S
        while not note.exists() and time.monotonic() < end:
            time.sleep(0.05)
        fn_pid, sleeper, home = note.read_text().split()
        pids = [int(fn_pid), int(sleeper)]
        assert all(_alive(p) for p in pids)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        # It never reads its socket: its parent-pid watch ends it and its process group.
        assert _wait_gone(pids, 10) == []
        assert not Path(home).exists()
    finally:
        with_kill(worker)
        for pid in pids:  # left behind only if the test failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def with_kill(proc: subprocess.Popen[str]) -> None:
    """End a test's worker process group if the test failed before it did."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_run_as_applies_to_the_spare(pool: SparePool, tmp_path: Path) -> None:
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        cannot_run("no user 'nobody'")
    ctx = _ctx(tmp_path, user_functions={"run_as": "nobody"})
    try:
        usable = subprocess.run(
            [sys.executable, "-c", "import fabric.endpoint.userproc"], user=nobody.pw_uid,
            group=nobody.pw_gid, env={"PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
            check=False).returncode == 0
    except OSError:
        usable = False
    if not usable:
        cannot_run("user 'nobody' cannot run this interpreter or read this checkout")
    first = _call(ctx, probe)
    spare = pool.wait_spare(STARTUP_S)
    second = _call(ctx, probe)
    assert first["uid"] == second["uid"] == nobody.pw_uid
    assert second["pid"] == spare
    _isolated(second)
