"""A user function's process, and the one spare a request worker keeps started.

Every ``fab.submit`` runs in a fresh process of its own (``fabric.endpoint.userproc``) that
serves that one call and exits. Starting one costs ~0.3-0.5 s here (the interpreter, then the
Globus Compute serializer, the request models and dill), which every call used to wait for.
Each request worker now keeps ONE such process started ahead of time, its imports done, blocked
reading its socket for the call it will get (``SparePool``); a call takes it (or, if there is
none, starts one as before) and, once the call is over, a new spare is started in the
background. A spare serves one call only, like any user function process.

What the process gets is what it got when it was started for its call: a clean environment
(``clean_env``), a private temporary home as its working directory, umask 077, a session of
its own, one end of one socket pair and no other file descriptor, the site's
``user_functions.run_as`` user where set. It is started before any caller is known, so it holds
even less: no caller's code, no capability, until its call arrives. The worker's side starts
no spare where the site runs no user functions, and a spare dies with its worker: the end of
its socket, or its parent pid changing, ends it (``userproc``), and its home with it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import queue
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from fabric import env
from fabric.endpoint import userproc
from fabric.errors import FabricError, UserFunctionError

log = logging.getLogger(__name__)

STARTUP_S = 60.0
"""Most seconds a user function's process may take to start and say it is ready."""


def clean_env(home: str) -> dict[str, str]:
    """The user function's whole environment: where Python finds its modules, and a home of
    its own. Nothing else of the worker's (``FABRIC_*``, the policy's client secret...)."""
    return {"PATH": env.PATH.get() or "/usr/bin:/bin", "PYTHONPATH": env.PYTHONPATH.get() or "",
            "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1"}


def _kind(run_as: str | None) -> tuple[str | None, str, str]:
    """What a process started now would differ in from one started earlier: a spare started
    for another ``run_as`` or another module path is not handed out."""
    return (run_as, env.PATH.get() or "", env.PYTHONPATH.get() or "")


class UserChild:
    """One user function process and the worker's end of its socket."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, home: str,
                 kind: tuple[str | None, str, str]) -> None:
        self.proc = proc
        self.sock = sock
        """The worker's end of the socket pair."""
        self.home = home
        self.kind = kind
        self._ready = False
        self._ready_lock = threading.Lock()

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    @classmethod
    def start(cls, run_as: str | None) -> UserChild:
        """Start a process (it imports what a call needs, then waits for its call)."""
        home = tempfile.mkdtemp(prefix=userproc.HOME_PREFIX)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = _spawn(theirs, home, run_as)
        except BaseException:
            ours.close()
            shutil.rmtree(home, ignore_errors=True)
            raise
        finally:
            theirs.close()  # the child's end lives only in the child
        return cls(proc, ours, home, _kind(run_as))

    def wait_ready(self, timeout_s: float) -> None:
        """Return once the process said it is ready for its call; ``UserFunctionError`` if it
        died first or took longer than ``timeout_s``."""
        with self._ready_lock:
            if not self._ready:
                self._read_ready(timeout_s)
                self._ready = True

    def _read_ready(self, timeout_s: float) -> None:
        readable, _, _ = select.select([self.sock], [], [], timeout_s)
        if not readable:
            raise UserFunctionError(f"the user function's process did not start within "
                                    f"{timeout_s:.0f} s", reason="startup")
        self.sock.settimeout(timeout_s)
        try:
            msg = userproc.receive(self.sock)
        except (userproc.ChannelClosed, OSError, FabricError):
            code = self.proc.poll()
            raise UserFunctionError(f"the user function's process exited (code {code}) "
                                    "before its call", exit_code=code, reason="startup") from None
        if msg.get("op") != "ready":
            raise UserFunctionError(f"the user function's process sent {msg.get('op')!r} "
                                    "before its call", reason="startup")

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def kill(self) -> None:
        """End its whole process group (a function may have started others), wait for it,
        close the socket, remove its home."""
        self.signal()
        self.reap()

    def signal(self) -> None:
        """SIGKILL its whole process group (returns at once; ``reap`` waits)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def reap(self) -> None:
        """Wait for the killed process, close the socket, remove its home."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.sock.close()
        shutil.rmtree(self.home, ignore_errors=True)


def _spawn(sock: socket.socket, home: str, run_as: str | None) -> subprocess.Popen[bytes]:
    fd = sock.fileno()
    kwargs: dict[str, Any] = {}
    if run_as:
        import pwd

        try:
            who = pwd.getpwnam(run_as)
        except KeyError:
            raise FabricError(f"site misconfigured: user_functions.run_as user {run_as!r} "
                              "does not exist") from None
        os.chown(home, who.pw_uid, who.pw_gid)
        kwargs.update(user=who.pw_uid, group=who.pw_gid, extra_groups=[])
    os.chmod(home, 0o700)
    return subprocess.Popen(
        [sys.executable, "-m", "fabric.endpoint.userproc", str(fd), str(os.getpid())],
        env=clean_env(home), cwd=home, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, close_fds=True, pass_fds=(fd,), umask=0o077,
        start_new_session=True, **kwargs)


class SparePool:
    """A request worker's one spare user function process (thread-safe).

    ``take`` hands out a ready process for one call: the spare when there is one started for
    the same ``run_as`` (and module path), else a new one started there and then. ``refill``
    starts the next spare in a background thread, unless one exists or is starting. No spare
    ever serves two calls: ``take`` removes it from the pool.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spare: UserChild | None = None
        self._starting = False
        self._closed = False
        self._jobs: queue.SimpleQueue[Callable[[], None]] | None = None

    def take(self, run_as: str | None, timeout_s: float = STARTUP_S) -> UserChild:
        """A process ready for one call (the caller kills it when the call is over)."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            if spare.kind == _kind(run_as) and spare.alive():
                try:
                    spare.wait_ready(timeout_s)
                    return spare
                except UserFunctionError:
                    log.warning("the spare user function process %d died; starting another",
                                spare.pid)
            spare.kill()
        child = UserChild.start(run_as)
        try:
            child.wait_ready(timeout_s)
        except BaseException:
            child.kill()
            raise
        return child

    def refill(self, run_as: str | None) -> None:
        """Start a spare for ``run_as`` in the background unless one exists or is starting."""
        if self._claim(run_as):
            self._background(functools.partial(self._start_spare, run_as))

    def finish(self, child: UserChild, run_as: str | None) -> None:
        """A call is over: its process group is killed now (nothing of it runs once the
        worker hands its value on); waiting for it, removing its home and starting the next
        spare happen in the background, off the call's path."""
        child.signal()
        self._background(child.reap)
        if self._claim(run_as):
            self._background(functools.partial(self._start_spare, run_as))

    def _claim(self, run_as: str | None) -> bool:
        """Whether the caller is to start a spare for ``run_as`` (none exists or is starting)."""
        with self._lock:
            if self._closed or self._starting or (
                    self._spare is not None and self._spare.kind == _kind(run_as)):
                return False
            self._starting = True
            return True

    def _background(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the pool's one background thread (started on first use; a queue,
        so that a call never waits for a thread to start)."""
        with self._lock:
            if self._jobs is None:
                self._jobs = queue.SimpleQueue()
                threading.Thread(target=self._run_jobs, args=(self._jobs,), daemon=True,
                                 name="userfn-spares").start()
                atexit.register(self.close)
            self._jobs.put(job)

    @staticmethod
    def _run_jobs(jobs: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            job = jobs.get()
            try:
                job()
            except Exception:  # one failed reap or start must not stop the next ones
                log.exception("user function process housekeeping failed")

    def _start_spare(self, run_as: str | None) -> None:
        child: UserChild | None = None
        try:
            child = UserChild.start(run_as)
        except Exception as exc:  # a call then starts its own and reports the typed error
            log.warning("could not start a spare user function process: %s", exc)
        finally:
            with self._lock:
                self._starting = False
                old = None
                if child is not None and not self._closed:
                    old, self._spare, child = self._spare, child, None
            for stale in (old, child):
                if stale is not None:
                    stale.kill()

    def spare_pid(self) -> int | None:
        """The spare's pid, if one is started."""
        with self._lock:
            return self._spare.pid if self._spare is not None else None

    def wait_spare(self, timeout_s: float) -> int | None:
        """The pid of the spare once it is started and ready (its imports done, waiting for
        its call); None if there is none within ``timeout_s``. For tests and benchmarks."""
        end = time.monotonic() + timeout_s
        while True:
            with self._lock:
                spare, starting = self._spare, self._starting
            if spare is not None:
                with contextlib.suppress(UserFunctionError):
                    spare.wait_ready(max(0.0, end - time.monotonic()))
                    return spare.pid
                return None
            if not starting or time.monotonic() >= end:
                return None
            time.sleep(0.01)

    def close(self) -> None:
        """Kill the spare, and start no more (at the worker's exit)."""
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.kill()


SPARES = SparePool()
"""This worker's spare (one per process)."""


def prestart(site: Any) -> None:
    """Start this worker's spare where ``site`` (a ``SiteConfig``) runs user functions; nothing
    where it does not."""
    if site.allow_user_functions:
        SPARES.refill(site.user_functions.run_as)
