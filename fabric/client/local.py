"""``LocalTransport``: the SDK's way into the embedded local site (started on demand).

The site runs in its own background process (``fabric.endpoint.site``); this module finds it
through ``<state_dir>/endpoint.json``, starting it first if it is not running (as Ollama does),
and sends it Globus Compute task messages over CURVE-encrypted ZMQ. ZMQ sockets are not
thread-safe, so each socket has one job: ``submit`` sends on a send-only DEALER from the calling
thread itself (under a lock, which is how a ZMQ socket may pass between threads) and returns a
``Future`` at once; the site answers on its reply socket to a receive-only DEALER. A thread
waiting in ``result()`` reads that socket itself (taking it under a lock), so a synchronous call
never waits for another thread to wake; an I/O thread reads it whenever nobody waits that way
(callbacks, ``concurrent.futures.wait``), and watches that the site is alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgpack
import zmq

from fabric.client import gcwire
from fabric.errors import EndpointError, FabricError, InvalidRequest

INFO_FILE = "endpoint.json"
TASK, RESULT, CONTROL = b"T", b"R", b"C"
SEND_TIMEOUT_S = 30.0
"""How long ``submit`` may block when the site takes no messages (ZMQ's queue is full)."""
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
"""Site processes this process started (so their exit is seen, not left as zombies)."""


def resolve_site(site: str = "local", state_dir: str | Path | None = None
                 ) -> tuple[Any, str, Path]:
    """``(SiteConfig, reference for the site process, state dir)`` for a site name or path."""
    from fabric.sites import load_site

    ref = str(Path(site).resolve()) if Path(site).exists() else site
    cfg = load_site(ref)
    folder = Path(state_dir).expanduser() if state_dir else cfg.resolved_state_dir()
    return cfg, ref, folder.resolve()


def read_info(state_dir: Path) -> dict[str, Any] | None:
    """The running site's ``endpoint.json``, or None if no live site owns ``state_dir``."""
    try:
        info = json.loads((Path(state_dir) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not _pid_alive(int(info.get("pid", 0))):
        return None
    return info


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
        info = read_info(folder)
        if info is not None:
            return info
        log_path = folder / "logs" / "site.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "fabric.endpoint.site", "--site", ref,
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
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            reply["killed"] = True
            break
        time.sleep(0.1)
    return reply


class LocalTransport:
    """Runs endpoint functions in the local site's request workers (a ``Transport``)."""

    can_reach_servers = True
    """Model servers bind on this machine: streams go to them directly."""

    def __init__(self, site: str = "local", state_dir: str | Path | None = None,
                 autostart: bool = True, start_timeout_s: float = 180.0) -> None:
        cfg, self._ref, self.state_dir = resolve_site(site, state_dir)
        self.site: str = cfg.name
        self.autostart = autostart
        self.start_timeout_s = start_timeout_s
        self.info: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._futures: dict[str, Future[Any]] = {}
        self._send_lock = threading.Lock()
        self._sender: Any = None
        """Send-only DEALER to the site's main socket (any thread, under ``_send_lock``)."""
        self._reply_id = b"r" + os.urandom(15)
        """Routing id of the I/O thread's reply socket (never starts with a zero byte)."""
        self._ids = itertools.count(1)
        self._recv_lock = threading.Lock()
        self._receiver: Any = None
        """Receive-only DEALER on the site's reply socket (whoever holds ``_recv_lock``)."""
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._wake_r, self._wake_w = os.pipe()

    # -- Transport ------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` in a request worker; the future holds its value."""
        try:
            task_id, packed = gcwire.pack_task(fn, args, kwargs)
        except Exception as exc:
            raise InvalidRequest(f"cannot serialise {getattr(fn, '__name__', fn)!r} or its "
                                 f"arguments: {exc}") from None
        fut: Future[Any] = _LocalFuture(self)
        fut.task_id = str(task_id)  # type: ignore[attr-defined]
        self._send(str(task_id), fut, [TASK, packed])
        return fut

    def control(self, op: str, timeout_s: float = 30.0, **fields: Any) -> dict[str, Any]:
        """A control request to the site (``status``, ``ping``, ``stop``)."""
        key = f"c{next(self._ids)}"
        fut: Future[Any] = _LocalFuture(self)
        self._send(key, fut, [CONTROL, _pack({"op": op, "id": key, **fields})])
        return dict(fut.result(timeout_s))

    def close(self) -> None:
        """Stop the I/O thread; pending futures fail with ``EndpointError``."""
        self._closing.set()
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        self._fail_all(EndpointError("transport closed"))
        with self._send_lock:
            if self._sender is not None:
                self._sender.close(0)
                self._sender = None
        if (thread is None or not thread.is_alive()) and self._wake_r >= 0:
            # Once only: a second close must not close descriptors reused by someone else.
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    def __enter__(self) -> LocalTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------

    def _send(self, key: str, fut: Future[Any], frames: list[bytes]) -> None:
        self._connect()
        with self._lock:
            self._futures[key] = fut
        err: FabricError
        with self._send_lock:
            try:
                if self._sender is None:
                    raise EndpointError("transport is closed")
                self._sender.send_multipart([*frames, self._reply_id])
                return
            except zmq.Again:
                err = EndpointError(f"the {self.site} site accepted no message for "
                                    f"{SEND_TIMEOUT_S:.0f} s")
            except FabricError as exc:
                err = exc
        with self._lock:
            self._futures.pop(key, None)
        raise err

    def _connect(self) -> None:
        with self._lock:
            if self._closing.is_set():
                raise EndpointError("transport is closed")
            if self._thread is not None and self._thread.is_alive():
                return
            info = read_info(self.state_dir)
            if info is None:
                if not self.autostart:
                    raise EndpointError(f"the {self.site} site is not running; start it with "
                                        "`fabric endpoint start`", state_dir=str(self.state_dir))
                info = start_site(self._ref, self.state_dir, self.start_timeout_s)
            if not info.get("reply_address"):
                raise EndpointError(
                    f"the {self.site} site (pid {info.get('pid')}) runs an older fabric without "
                    "a reply socket: restart it (`fabric endpoint stop`, then start)")
            self.info = info
            keys = zmq.curve_keypair()
            with self._send_lock:
                if self._sender is not None:
                    self._sender.close(0)  # of a site that exited
                self._sender = _dealer(info, keys=keys)
                self._sender.sndtimeo = int(SEND_TIMEOUT_S * 1000)
            ready = threading.Event()
            self._thread = threading.Thread(target=self._io_loop, args=(info, keys, ready),
                                            daemon=True, name="fabric-local-transport")
            self._thread.start()
            ready.wait(10.0)

    def _io_loop(self, info: dict[str, Any], keys: tuple[bytes, bytes],
                 ready: threading.Event) -> None:
        sock = _dealer(info, keys=keys, address=str(info["reply_address"]),
                       routing_id=self._reply_id)
        # The socket's own descriptor says "look at the socket"; polling it with the OS does
        # not touch the socket, so the I/O thread may watch it while a waiter reads it.
        fd = sock.getsockopt(zmq.FD)
        with self._recv_lock:
            self._receiver = sock
        ready.set()
        next_check = time.monotonic() + 1.0
        try:
            while not self._closing.is_set():
                poller = select.poll()
                poller.register(self._wake_r, select.POLLIN)
                if self._recv_lock.locked():
                    # A waiter reads the socket: look again soon, or when it lets go.
                    timeout_ms = 20
                else:
                    poller.register(fd, select.POLLIN)
                    timeout_ms = 500
                if any(f == self._wake_r for f, _ in poller.poll(timeout_ms)):
                    os.read(self._wake_r, 65536)
                if self._recv_lock.acquire(blocking=False):
                    try:
                        self._drain(sock)
                    finally:
                        self._recv_lock.release()
                if time.monotonic() > next_check:
                    next_check = time.monotonic() + 1.0
                    if not _pid_alive(int(info["pid"])):
                        # The site died: fail what is pending; the next submit restarts it.
                        self._fail_all(EndpointError(
                            f"the {self.site} site (pid {info['pid']}) exited; see "
                            f"{info.get('log')}", log=info.get("log")))
                        return
        finally:
            with self._recv_lock:
                self._receiver = None
                sock.close(0)

    def _pump(self, fut: Future[Any], deadline: float | None) -> None:
        """Read replies in this thread until ``fut`` is done (or ``deadline``), unless another
        thread is reading them already."""
        if not self._recv_lock.acquire(blocking=False):
            return
        sock = self._receiver
        try:
            while sock is not None and not fut.done() and not self._closing.is_set():
                wait_s = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if wait_s <= 0:
                    break
                if sock.poll(int(wait_s * 1000) or 1):
                    self._drain(sock)
        finally:
            if sock is not None:
                self._drain(sock)  # nothing left unread: new replies signal the I/O thread
            self._recv_lock.release()
        with self._lock:
            others = bool(self._futures)
        if others:  # replies for futures nobody waits on this way: the I/O thread's job
            self._wake()

    def _drain(self, sock: Any) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                sock.getsockopt(zmq.EVENTS)  # clears the descriptor's pending signal
                return
            self._deliver(frames)

    def _deliver(self, frames: list[bytes]) -> None:
        if frames[0] == RESULT and len(frames) == 3:
            with self._lock:
                fut = self._futures.pop(frames[1].decode(), None)
            if fut is None:
                return
            try:
                fut.set_result(gcwire.unpack_result(frames[2]))
            except FabricError as exc:
                fut.set_exception(exc)
            except Exception as exc:  # deserialising the value failed on this side
                fut.set_exception(EndpointError(f"cannot read the result: {exc}"))
        elif frames[0] == CONTROL and len(frames) == 2:
            reply = msgpack.unpackb(frames[1], raw=False)
            with self._lock:
                fut = self._futures.pop(str(reply.get("id")), None)
            if fut is None:
                return
            if reply.get("error"):
                fut.set_exception(EndpointError(f"site control {reply.get('op')} failed: "
                                                f"{reply['error']}"))
            else:
                fut.set_result(reply)

    def _fail_all(self, err: FabricError) -> None:
        with self._lock:
            pending, self._futures = self._futures, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)

    def _wake(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")


class _LocalFuture(Future[Any]):
    """A future of ``LocalTransport``: ``result()`` and ``exception()`` read the site's
    replies in the waiting thread (``LocalTransport._pump``) before waiting as usual."""

    def __init__(self, transport: LocalTransport) -> None:
        super().__init__()
        self._transport = transport

    def result(self, timeout: float | None = None) -> Any:
        """The value, read from the site in this thread where no other thread reads it."""
        return super().result(self._pump(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception, read from the site in this thread as ``result`` does."""
        return super().exception(self._pump(timeout))

    def _pump(self, timeout: float | None) -> float | None:
        if self.done():
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        self._transport._pump(self, deadline)
        return None if deadline is None else max(0.0, deadline - time.monotonic())


def _dealer(info: dict[str, Any], *, keys: tuple[bytes, bytes] | None = None,
            address: str | None = None, routing_id: bytes | None = None) -> Any:
    """A CURVE DEALER to the site's main socket (or ``address``), a fresh key pair unless
    ``keys`` are given."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    public, secret = keys or zmq.curve_keypair()
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = str(info["public_key"]).encode()
    sock.linger = 0
    if routing_id is not None:
        sock.routing_id = routing_id
    sock.connect(address or str(info["address"]))
    return sock


def _control(info: dict[str, Any], msg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One control round trip on a fresh socket (for the CLI; no I/O thread)."""
    sock = _dealer(info)
    try:
        sock.send_multipart([CONTROL, _pack({**msg, "id": "cli"})])
        if not sock.poll(int(timeout_s * 1000)):
            raise EndpointError(f"the site (pid {info.get('pid')}) did not answer "
                                f"{msg['op']!r} within {timeout_s:.0f} s")
        frames = sock.recv_multipart()
    finally:
        sock.close(0)
    reply = dict(msgpack.unpackb(frames[-1], raw=False))
    if reply.get("error"):
        raise EndpointError(f"site control {msg['op']} failed: {reply['error']}")
    return reply


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False  # our own child has exited (reaped here, not left a zombie)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, offset: int = 0, lines: int = 15) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return "\n".join(kept) if kept else f"(log {path} is empty)"


def _pack(msg: dict[str, Any]) -> bytes:
    return bytes(msgpack.packb(msg, use_bin_type=True, default=str))
