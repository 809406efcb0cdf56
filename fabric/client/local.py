"""``LocalTransport``: the SDK's way into the embedded local site (started on demand).

The site runs in its own background process (``fabric.siteproc``); this module finds it
through ``<state_dir>/endpoint.json``, starting it first if it is not running (as Ollama does;
``fabric.client.sitelife`` finds, starts and stops it),
and sends it Globus Compute task messages over the site's Unix socket (``fabric.wire.framing``
says why not ZMQ). One connection per transport: ``submit`` writes the task from the calling
thread (under a lock) and returns a ``Future`` at once. A thread waiting in ``result()`` reads
the replies itself (under another lock), so a synchronous call never waits for another thread
to wake; an I/O thread reads them whenever nobody waits that way (callbacks,
``concurrent.futures.wait``), and watches that the site is alive.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgpack

from fabric.client.sitelife import (
    INFO_FILE,
    connect_site,
    pack,
    read_info,
    site_running,
    site_status,
    start_site,
    stop_site,
)
from fabric.client.transport import settle
from fabric.errors import EndpointError, FabricError, InvalidRequest, RequestTooLarge
from fabric.sites import resolve_site
from fabric.wire import framing, gcwire
from fabric.wire.framing import CONTROL, RESULT, TASK

__all__ = ["INFO_FILE", "LocalTransport", "read_info", "site_status", "start_site", "stop_site"]
"""The site's lifecycle lives in ``fabric.client.sitelife``; its functions stay importable
from here, where the SDK, the CLI and the tests have always found them."""

SEND_TIMEOUT_S = 30.0
"""How long ``submit`` may block when the site takes no messages (ZMQ's queue is full)."""


class LocalTransport:
    """Runs endpoint functions in the local site's request workers (a ``Transport``)."""

    can_reach_servers = True
    """Model servers bind on this machine: streams go to them directly."""


    def __init__(self, site: str = "local", state_dir: str | Path | None = None,
                 autostart: bool = True, start_timeout_s: float = 180.0) -> None:
        cfg, self._ref, self.state_dir = resolve_site(site, state_dir)
        self.site: str = cfg.name
        self.admission_slots = cfg.max_request_workers
        """Admission tasks a client keeps in flight (``fabric.client.admission``): one per
        request worker; more would only wait at the site."""
        self.autostart = autostart
        self.start_timeout_s = start_timeout_s
        self.info: dict[str, Any] | None = None
        self._info_stamp: tuple[int, int] | None = None  # endpoint.json's (inode, mtime) seen
        self._lock = threading.Lock()
        self._futures: dict[str, Future[Any]] = {}
        self._conn: _Connection | None = None
        """The connection to the site: written under ``_send_lock``, read under
        ``_recv_lock`` (a stream socket may do both at once from two threads)."""
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._ids = itertools.count(1)
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
        key = fut.task_id = str(task_id)  # type: ignore[attr-defined]
        self._send(key, fut, [TASK, packed, task_id.bytes])
        return fut

    def control(self, op: str, timeout_s: float = 30.0, **fields: Any) -> dict[str, Any]:
        """A control request to the site (``status``, ``ping``, ``stop``)."""
        key = f"c{next(self._ids)}"
        fut: Future[Any] = _LocalFuture(self)
        self._send(key, fut, [CONTROL, pack({"op": op, "id": key, **fields})])
        return dict(fut.result(timeout_s))

    def close(self) -> None:
        """Stop the I/O thread; pending futures fail with ``EndpointError``."""
        self._closing.set()
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        self._fail_all(EndpointError("transport closed"))
        with self._send_lock, self._recv_lock:
            if self._conn is not None:
                self._conn.sock.close()
                self._conn = None
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
        data = framing.encode(frames)
        size, limit = len(data) - framing.HEADER_BYTES, framing.MAX_MESSAGE_BYTES
        if size > limit:  # the site would hang up on it, failing the connection's other calls
            raise RequestTooLarge(f"the request is {size} bytes; the {self.site} site reads "
                                  f"at most {limit} bytes per message: split it", limit=limit)
        for attempt in (1, 2):
            conn = self._connect()
            with self._lock:
                self._futures[key] = fut
                conn.keys.add(key)
            err: FabricError
            with self._send_lock:
                try:
                    framing.send_all(conn.sock, data, SEND_TIMEOUT_S)
                    return
                except TimeoutError:
                    err = EndpointError(f"the {self.site} site accepted no message for "
                                        f"{SEND_TIMEOUT_S:.0f} s")
                except OSError as exc:  # the site closed the connection (it exited)
                    conn.lost = True
                    err = EndpointError(f"the {self.site} site's connection broke: {exc}; "
                                        "the next request reconnects (restarting it if needed)")
            with self._lock:
                self._futures.pop(key, None)
                conn.keys.discard(key)
            # A broken connection took less than the whole message, so the site never read
            # it: send it once more on a new one (a site that exited a moment ago, before the
            # I/O thread saw it go, is the usual case).
            if not conn.lost or attempt == 2:
                raise err
        raise AssertionError("unreachable")

    def _connect(self) -> _Connection:
        with self._lock:
            if self._closing.is_set():
                raise EndpointError("transport is closed")
            if self._conn is not None and not self._conn.lost and self._thread is not None \
                    and self._thread.is_alive() and self.info is not None \
                    and site_running(int(self.info["pid"])) and self._info_names_site():
                return self._conn
            info = read_info(self.state_dir)
            if info is None:
                if not self.autostart:
                    raise EndpointError(f"the {self.site} site is not running; start it with "
                                        "`fabric endpoint start`", state_dir=str(self.state_dir))
                info = start_site(self._ref, self.state_dir, self.start_timeout_s)
            conn = _Connection(connect_site(info))
            self.info, self._info_stamp = info, None
            # Not the receive lock: a reader holds it while it waits for this (_deliver) lock.
            # A reader still on the old connection keeps its own socket and reader.
            with self._send_lock:
                old, self._conn = self._conn, conn
            if old is not None:  # of a site that exited: its I/O thread fails what it had
                old.lost = True
                if self._thread is None or not self._thread.is_alive():
                    old.sock.close()
            self._thread = threading.Thread(target=self._io_loop, args=(info, conn),
                                            daemon=True, name="fabric-local-transport")
            self._thread.start()
            return conn

    def _info_names_site(self) -> bool:
        """Whether ``endpoint.json`` still names the site of this connection. Gone: the site
        is stopping (its process lives on a few seconds while Parsl shuts down), so new work
        goes to its successor. Another file (sites write it by atomic rename) may be the
        successor's, so its pid is compared; an unchanged file costs one ``stat``."""
        try:
            st = (Path(self.state_dir) / INFO_FILE).stat()
        except OSError:
            return False
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp != self._info_stamp:
            now = read_info(self.state_dir)
            if now is None or self.info is None or now.get("pid") != self.info.get("pid"):
                return False
            self._info_stamp = stamp
        return True

    def _io_loop(self, info: dict[str, Any], conn: _Connection) -> None:
        try:
            self._io_until_lost(info, conn)
        finally:
            if conn is not self._conn:  # replaced: nobody else reads this socket now
                conn.sock.close()

    def _io_until_lost(self, info: dict[str, Any], conn: _Connection) -> None:
        next_check = time.monotonic() + 1.0
        while not self._closing.is_set():
            if conn.lost:  # a send found it broken, or a new connection replaced it
                return self._lost(info, conn, "hung up")
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            if self._recv_lock.locked():
                # A waiter reads the socket: look again soon, or when it lets go.
                timeout_ms = 20
            else:
                poller.register(conn.sock.fileno(), select.POLLIN)
                timeout_ms = 500
            if any(f == self._wake_r for f, _ in poller.poll(timeout_ms)):
                os.read(self._wake_r, 65536)
            if self._recv_lock.acquire(blocking=False):
                try:
                    open_ = self._drain(conn)
                finally:
                    self._recv_lock.release()
                if not open_:
                    return self._lost(info, conn, "closed the connection")
            if time.monotonic() > next_check:
                next_check = time.monotonic() + 1.0
                if not site_running(int(info["pid"])):
                    return self._lost(info, conn, "exited")
        return None

    def _lost(self, info: dict[str, Any], conn: _Connection, what: str) -> None:
        # Fail what was sent on this connection only: calls made since on a new connection
        # (the next submit reconnects, restarting the site if needed) are not this one's.
        conn.lost = True
        if self._closing.is_set():
            return
        err = EndpointError(f"the {self.site} site (pid {info['pid']}) {what}; see "
                            f"{info.get('log')}", log=info.get("log"))
        with self._lock:
            pending = [self._futures.pop(k) for k in conn.keys if k in self._futures]
            conn.keys.clear()
        for fut in pending:
            settle(fut, exc=err)

    def _pump(self, fut: Future[Any], deadline: float | None) -> None:
        """Read replies in this thread until ``fut`` is done (or ``deadline``), unless another
        thread is reading them already."""
        if not self._recv_lock.acquire(blocking=False):
            return
        conn = self._conn
        try:
            poller = select.poll()
            if conn is not None:
                poller.register(conn.sock.fileno(), select.POLLIN)
            while conn is not None and not fut.done() and not self._closing.is_set():
                wait_s = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if wait_s <= 0:
                    break
                if poller.poll(int(wait_s * 1000) or 1) and not self._drain(conn):
                    break  # the site closed the connection: the I/O thread says so
        finally:
            self._recv_lock.release()
        with self._lock:
            others = bool(self._futures)
        if others or not fut.done():  # replies nobody waits on this way: the I/O thread's
            self._wake()

    def _drain(self, conn: _Connection) -> bool:
        """Deliver the replies that can be read now; False once the site has hung up."""
        try:
            messages = framing.recv_ready(conn.sock, conn.reader)
        except framing.FramingError as exc:
            self._fail_all(EndpointError(f"the {self.site} site sent garbage: {exc}"))
            return False
        except OSError:  # closed under us (the site went and a new connection replaced it)
            return False
        for frames in messages or ():
            self._deliver(conn, frames)
        return messages is not None

    def _deliver(self, conn: _Connection, frames: list[bytes]) -> None:
        if frames[0] == RESULT and len(frames) == 3:
            with self._lock:
                conn.keys.discard(frames[1].decode())
                fut = self._futures.pop(frames[1].decode(), None)
            if fut is None:
                return
            try:
                value = gcwire.unpack_result(frames[2])
            except FabricError as exc:
                settle(fut, exc=exc)
            except Exception as exc:  # deserialising the value failed on this side
                settle(fut, exc=EndpointError(f"cannot read the result: {exc}"))
            else:
                settle(fut, value)
        elif frames[0] == CONTROL and len(frames) == 2:
            reply = msgpack.unpackb(frames[1], raw=False)
            with self._lock:
                conn.keys.discard(str(reply.get("id")))
                fut = self._futures.pop(str(reply.get("id")), None)
            if fut is None:
                return
            if reply.get("error"):
                settle(fut, exc=EndpointError(f"site control {reply.get('op')} failed: "
                                                 f"{reply['error']}"))
            else:
                settle(fut, reply)

    def _fail_all(self, err: FabricError) -> None:
        with self._lock:
            pending, self._futures = self._futures, {}
        for fut in pending.values():
            settle(fut, exc=err)

    def _wake(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")


class _Connection:
    """A socket to the site and the reader of what arrives on it."""

    __slots__ = ("keys", "lost", "reader", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = framing.Reader()
        self.keys: set[str] = set()
        """Calls sent on this connection and not answered yet (failed if it is lost)."""
        self.lost = False
        """The site behind it exited or hung up: the next call opens a new connection."""


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
