"""The local site process: a real Globus Compute engine behind the site's Unix socket.

``python -m fabric.siteproc --site local [--state-dir DIR]`` (or ``fabric endpoint start``)
runs what a Globus Compute endpoint runs at a supercomputer site, minus the cloud relay:

.. code:: text

    LocalTransport --[b"T", packed Task, task id]--> site.sock --> GlobusComputeEngine
                   <--[b"R", task id, packed Result]--            (Parsl HTEX, LocalProvider
                   --[b"C", control]--> status / stop              request workers)

Messages are length-prefixed frame lists (``fabric.wire.framing``) on a Unix stream socket
in the state dir (mode 0600; each peer's uid is checked). The main loop accepts clients, reads
their messages and submits tasks to the engine; a reply is written from the thread that has it
(the engine's result thread, a control thread) straight to the client's connection under that
connection's lock, so a result does not wait for the main loop to wake. What the kernel does not
take at once (a large result, a slow reader) the main loop flushes when the socket has room.

Tasks and results are Globus Compute's own messages (``fabric.wire.gcwire``), so the same
endpoint functions run here and behind a real endpoint. The process owns one state dir (a
file lock keeps a second copy out) and advertises itself in ``<state_dir>/endpoint.json``
(mode 0600). Model servers it launched keep running after it stops (they exit on their idle
timeout); ``stop`` with ``all`` undeploys them first.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import resource
import selectors
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from fabric import env
from fabric.endpoint import poolwatch, watchdog
from fabric.endpoint.context import SiteContext
from fabric.endpoint.siteconn import Conn, listen_unix
from fabric.sites import LOCAL_WORKERS_ADDRESS, SiteConfig
from fabric.wire import framing
from fabric.wire.framing import CONTROL, RESULT, TASK

log = logging.getLogger("fabric.site")

INFO_FILE = "endpoint.json"
"""Where the running site advertises its pid and socket (in the state dir)."""
LOCK_FILE = "endpoint.lock"
"""Held (flock) while a site owns the state dir; ``fabric.client.sitelife`` tests it."""
LOCK_PATIENCE_S = 2.0
"""How long a starting site waits for the state dir's lock before it gives up (a client
checking whether a stopping site still holds it holds it for an instant)."""
REAP_INTERVAL_S = 15.0
"""How often the site checks its deployments' servers for exits."""
BACKGROUND_STOP_S = 10.0
"""How long ``shutdown`` waits in all for the background tasks' own cleanup (``metrics.json``)."""
MAX_CLIENTS = 1024
"""Client connections the site holds at once; more are refused (closed at once), not fatal."""
FD_RESERVE = 128
"""Descriptors kept free of clients for the engine, logs, SQLite and model-server sockets."""


def cores_per_worker(workers: int) -> float:
    """Parsl's ``cores_per_worker`` that lets the pool spawn all ``workers`` here.

    The pool spawns ``min(max_workers_per_node, floor(cores / cores_per_worker))`` workers, so
    the default of one core each gave a 2-core machine 2 request workers while the site (and
    ``fabric endpoint status``) said 4. Request workers mostly wait on model servers, so they
    share cores: the value is rounded down so the floor cannot fall one short.
    """
    cores = os.cpu_count() or 1
    if cores >= workers:
        return 1.0
    return max(0.001, math.floor(cores / workers * 1000) / 1000)


def client_limit() -> int:
    """How many clients this process can hold: ``MAX_CLIENTS``, or fewer where the open-file
    limit is lower (an ``accept`` past it fails with EMFILE)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CLIENTS
    return max(8, min(MAX_CLIENTS, soft - FD_RESERVE))

BackgroundTask = Callable[["SiteProcess", threading.Event], None]
"""A long-running job of the site (e.g. the campaign runner): called in its own daemon thread
with the site and an event that is set when the site stops; ``shutdown`` waits for it to return."""


class SiteProcess:
    """One running local site: engine, socket, state dir, background tasks."""

    background_tasks: list[BackgroundTask] = []
    """Hooks started (each in a daemon thread) once the site serves; add to this list before
    ``start`` (class-wide) or on the instance. The composition root (``fabric.siteproc``) puts
    the campaign scheduler here: this module knows nothing of campaigns."""

    def __init__(self, site: SiteConfig, site_ref: str, state_dir: Path) -> None:
        self.site = site
        self.site_ref = site_ref
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.endpoint_id = uuid.uuid4()
        self.stopping = threading.Event()
        self.stop_all = False
        self.background_tasks = list(type(self).background_tasks)
        self._background: list[threading.Thread] = []
        self._wake_r, self._wake_w = os.pipe()
        self._selector = selectors.DefaultSelector()
        self._writers_lock = threading.Lock()
        self._writers: set[Conn] = set()
        """Connections with reply bytes the kernel did not take yet (the main loop flushes)."""
        self._control = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="site-control")
        self._lock_fh: Any = None
        self.engine: Any = None
        self.listener: socket.socket | None = None
        self.socket_path: Path | None = None
        self.started = 0.0
        self.replies_dropped = 0
        """Replies whose client had gone (counted for status; tests wait on it)."""
        self.max_clients = client_limit()
        self.clients = 0
        self.refused = 0
        """Connections closed at once because ``max_clients`` were open."""
        self._spare_fd = -1
        """Held open so an EMFILE accept can still take the connection (and close it)."""
        self.watchdog: Any = None
        self.engine_stopped = True
        """False when the engine's shutdown hung: the process must exit without its threads."""
        self.pools = poolwatch.PoolWatch(self.state_dir / "engine")
        """The worker pools' health check and Parsl's log cap (run in a background thread)."""
        self.context = SiteContext(site, self.state_dir)
        """The site as its workers see it; here only its catalog (``status`` lists the models)."""

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Take the state dir, start the engine, bind the socket, write ``endpoint.json``."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._take_lock()
        self._reap_predecessor()
        self.watchdog = watchdog.launch(os.getpid(), self.state_dir)
        self._spare_fd = os.open(os.devnull, os.O_RDONLY)
        self.socket_path = framing.socket_path(self.state_dir)
        self.listener = listen_unix(self.socket_path)
        self._start_engine()
        self.pools.executor = self.engine.executor  # Parsl's HTEX: its interchange is watched
        self.pools.on_lost = self.request_stop
        self.context.catalog  # noqa: B018 - built now: a status reply (5 s budget) lists it
        self.started = time.time()
        _write_private_json(self.state_dir / INFO_FILE, self.info())
        threading.Thread(target=self._reap_loop, daemon=True, name="site-reaper").start()
        threading.Thread(target=self.pools.run, args=(self.stopping,), daemon=True,
                         name="site-poolwatch").start()
        for task in self.background_tasks:
            thread = threading.Thread(target=self._run_background, args=(task,), daemon=True,
                                      name=f"site-bg-{getattr(task, '__name__', 'task')}")
            thread.start()
            self._background.append(thread)
        log.info("site %s serving at %s (state dir %s)", self.site.name, self.socket_path,
                 self.state_dir)

    def _start_engine(self) -> None:
        from globus_compute_endpoint.engines import GlobusComputeEngine
        from parsl.providers import LocalProvider

        # Workers are started by the engine from this process's environment: they need the
        # venv's bin on PATH (``globus-compute-endpoint python-exec``) and their site.
        bin_dir = str(Path(sys.executable).parent)
        env.PATH.set(bin_dir + os.pathsep + (env.PATH.get() or ""))
        env.FABRIC_SITE.set(self.site_ref)
        env.FABRIC_STATE_DIR.set(str(self.state_dir))
        run_dir = self.pools.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.engine = GlobusComputeEngine(
            label="fabric-local",
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
            max_workers_per_node=self.site.max_request_workers,
            cores_per_worker=cores_per_worker(self.site.max_request_workers),
            address=LOCAL_WORKERS_ADDRESS,  # LocalProvider: workers on this host
            # Long idle allowance: request workers stay warm; the short strategy period cuts
            # the first task's latency from ~6 s to ~2 s.
            job_status_kwargs={"strategy_period": 0.5, "max_idletime": 3600.0},
            # Heartbeats that notice a lost pool in seconds; a lost block is not fatal.
            **poolwatch.engine_options(),
        )
        self.engine.start(endpoint_id=self.endpoint_id, run_dir=str(run_dir))

    def info(self) -> dict[str, Any]:
        """What ``endpoint.json`` says about this site."""
        return {"pid": os.getpid(), "address": f"unix:{self.socket_path}",
                "socket": str(self.socket_path), "endpoint_id": str(self.endpoint_id),
                "state_dir": str(self.state_dir),
                "site": self.site.name, "site_ref": self.site_ref, "started": self.started,
                "workers": self.site.max_request_workers, "state": "ready",
                "log": str(self.state_dir / "logs" / "site.log")}

    def serve_forever(self) -> None:
        """Route tasks to the engine and results back until ``stop``/SIGTERM."""
        assert self.listener is not None, "start() first"
        sel = self._selector
        sel.register(self.listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        while not self.stopping.is_set():
            for key, events in sel.select(1.0):
                if key.fileobj is self.listener:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    os.read(self._wake_r, 65536)
                else:
                    if events & selectors.EVENT_WRITE:
                        self._flush(key.data)
                    if events & selectors.EVENT_READ:
                        self._read(key.data)
            with self._writers_lock:
                writers, self._writers = self._writers, set()
            for conn in writers:
                if not conn.closed:
                    sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def request_stop(self) -> None:
        """Ask the serving loop to end (signal-safe)."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def shutdown(self) -> None:
        """Stop background tasks (waiting ``BACKGROUND_STOP_S``) and the engine, close the
        socket, remove ``endpoint.json``."""
        self.stopping.set()
        if self._lock_fh is None:
            return  # never owned the state dir (another site runs there): touch nothing
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / INFO_FILE).unlink()
        deadline = time.monotonic() + BACKGROUND_STOP_S
        for thread in self._background:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.engine is not None:
            self.engine_stopped = poolwatch.stop_engine(self.engine)
        self._control.shutdown(wait=False, cancel_futures=True)
        for key in list(self._selector.get_map().values()):
            if isinstance(key.data, Conn):
                self._drop(key.data)
        if self.listener is not None:
            self.listener.close()
            with contextlib.suppress(OSError):
                if self.socket_path is not None:
                    self.socket_path.unlink()
        self._lock_fh.close()
        log.info("site %s stopped", self.site.name)

    # -- message handling -----------------------------------------------------------------

    def _reap_predecessor(self) -> None:
        # A site killed together with its watchdog left its Parsl processes: end them now.
        try:
            old = int(json.loads((self.state_dir / INFO_FILE).read_text()).get("pid", 0))
        except (OSError, ValueError, AttributeError):
            return
        if old != os.getpid():
            hit = watchdog.reap(old)
            if hit:
                log.warning("ended %d processes left by the dead site (pid %d): %s",
                            len(hit), old, hit)

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self._refuse_without_fds()
            return
        if self.clients >= self.max_clients:
            self._refuse(sock)
            return
        uid = framing.peer_uid(sock)
        if uid is not None and uid != os.getuid():
            log.warning("refused a connection from uid %d (the site serves uid %d only)",
                        uid, os.getuid())
            sock.close()
            return
        sock.setblocking(False)
        conn = Conn(sock)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        self.clients += 1

    def _refuse(self, sock: socket.socket) -> None:
        # Over the limit: hang up on the newcomer (it sees the connection close) and keep
        # serving the clients already here.
        sock.close()
        self.refused += 1
        if self.refused == 1 or self.refused % 100 == 0:
            log.warning("refused %d connections so far: %d clients are connected (the most "
                        "this site holds at once)", self.refused, self.clients)

    def _refuse_without_fds(self) -> None:
        # Out of descriptors (other files count too): free the spare one to take the
        # connection off the queue, else the listener stays readable and the loop spins.
        if self._spare_fd < 0:
            time.sleep(0.05)
            return
        os.close(self._spare_fd)
        self._spare_fd = -1
        try:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                self._refuse(self.listener.accept()[0])  # type: ignore[union-attr]
        finally:
            with contextlib.suppress(OSError):
                self._spare_fd = os.open(os.devnull, os.O_RDONLY)

    def _read(self, conn: Conn) -> None:
        try:
            messages = framing.recv_ready(conn.sock, conn.reader)
        except framing.FramingError as exc:
            log.warning("closing a client connection: %s", exc)
            messages = None
        for frames in messages or ():
            self._dispatch(conn, frames)
        if messages is None:
            self._drop(conn)

    def _flush(self, conn: Conn) -> None:
        if conn.flush():
            return
        if conn.closed:
            self._drop(conn)
        else:
            self._selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _drop(self, conn: Conn) -> None:
        # The client went away: replies still due to it are dropped by ``Conn.send``.
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
            self.clients -= 1
        conn.close()

    def _dispatch(self, conn: Conn, frames: list[bytes]) -> None:
        kind = frames[0] if frames else b""
        if kind == TASK and len(frames) == 3:
            self._submit_task(conn, frames[1], frames[2])
        elif kind == CONTROL and len(frames) == 2:
            self._control.submit(self._answer_control, conn, frames[1])
        else:
            log.warning("dropping a malformed message (%d frames)", len(frames))

    def _submit_task(self, conn: Conn, packed: bytes, raw_id: bytes) -> None:
        # The id travels beside the task so routing its reply needs no unpacking here; the
        # worker runs the packed Task under this id, as an endpoint runs the web service's.
        from globus_compute_endpoint.engines.base import GCFuture

        from fabric.wire.gcwire import admission_refusal, pack_error_result, pack_refusal

        try:
            task_id = uuid.UUID(bytes=raw_id)
        except ValueError:
            self._reply(conn, [CONTROL, _pack({"op": "error", "error": "bad task id"})])
            return
        fut = GCFuture(task_id)
        key = str(task_id).encode()

        def done(f: cf.Future[Any]) -> None:
            # A task whose pool was lost says so (retryable), not "your function raised".
            self._reply(conn, [RESULT, key, poolwatch.retype_lost(f.result())])

        fut.add_done_callback(done)
        # Before any worker unpickles the task's code or arguments.
        refusal = admission_refusal(packed, user_functions=self.site.allow_user_functions)
        if refusal is not None:
            fut.set_result(pack_refusal(task_id, refusal))
            return
        # A dead interchange would block the send below for ever: checked first, it fails
        # the executor, whose submit then raises and is answered with that error.
        self.pools.check_interchange()
        try:
            self.engine.submit(fut, packed, resource_specification={})
        except Exception as exc:  # the engine refused it: answer, and keep serving others
            log.exception("engine refused task %s", task_id)
            fut.set_result(pack_error_result(task_id, "EngineSubmitError",
                                             f"{type(exc).__name__}: {exc}"))

    def _answer_control(self, conn: Conn, raw: bytes) -> None:
        msg = msgpack.unpackb(raw, raw=False)
        op = msg.get("op")
        reply: dict[str, Any] = {"op": op, "id": msg.get("id")}
        try:
            if op == "status":
                reply.update(self.status(health=bool(msg.get("health", True))))
            elif op == "stop":
                self.stop_all = bool(msg.get("all"))
                if self.stop_all:
                    from fabric.endpoint.deployments import undeploy_all

                    reply["undeployed"] = undeploy_all(self.site, self.state_dir)
                reply["stopping"] = True
            elif op == "ping":
                reply["pid"] = os.getpid()
            else:
                reply["error"] = f"unknown control op {op!r}; known: status, stop, ping"
        except Exception as exc:
            reply["error"] = f"{type(exc).__name__}: {exc}"
            reply["traceback"] = traceback.format_exc()
        self._reply(conn, [CONTROL, _pack(reply)])
        if op == "stop":
            self.request_stop()

    def status(self, health: bool = True) -> dict[str, Any]:
        """pid, address, state dir, workers, the models served, and deployments (with their
        server health)."""
        from fabric.endpoint.deployments import DeploymentManager

        mgr = DeploymentManager(self.site, self.state_dir)  # one per call: calls run in threads
        deployments = mgr.list_all() if health else [d.to_dict() for d in mgr.db.query()]
        return {**self.info(), "workers_running": self.workers_running(),
                "models": self.context.catalog.names(),
                "uptime_s": round(time.time() - self.started, 1),
                "replies_dropped": self.replies_dropped, "clients": self.clients,
                "max_clients": self.max_clients, "refused": self.refused,
                "pools_replaced": self.pools.killed, "logs_truncated": self.pools.truncated,
                "deployments": deployments}

    def workers_running(self) -> int | None:
        """Request workers the engine's pools report connected now (None if it cannot say):
        ``workers`` is what the site asks for, this is what runs."""
        try:
            managers = self.engine.executor.connected_managers()
        except Exception:
            log.debug("cannot count the engine's workers", exc_info=True)
            return None
        return sum(int(m.get("worker_count", 0)) for m in managers if m.get("active", True))

    def _reply(self, conn: Conn, frames: list[bytes]) -> None:
        """Send ``frames`` to the client on ``conn``, from whichever thread has them."""
        if conn.send(frames):  # the rest waits for room: the main loop writes it
            with self._writers_lock:
                self._writers.add(conn)
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        elif conn.closed:
            self.replies_dropped += 1

    def _reap_loop(self) -> None:
        # Mark servers that exited (idle timeout, crash, walltime) dead even when no request
        # comes, so `fabric deployments` and status show the truth; and record the tokens
        # servers delivered on streams.
        from fabric.endpoint.deployments import DeploymentManager

        mgr = DeploymentManager(self.site, self.state_dir)
        while not self.stopping.wait(REAP_INTERVAL_S):
            try:
                mgr.reap()
            except Exception:
                log.exception("reaping deployments failed")
            try:  # streams' tokens, counted by the servers (a client cannot skip this)
                mgr.collect_usage()
            except Exception:
                log.exception("collecting stream usage failed")

    def _run_background(self, task: BackgroundTask) -> None:
        try:
            task(self, self.stopping)
        except Exception:
            log.exception("background task %r failed", task)

    def _take_lock(self) -> None:
        fh = (self.state_dir / LOCK_FILE).open("a")
        deadline = time.monotonic() + LOCK_PATIENCE_S
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    fh.close()
                    raise SystemExit("a site is already running with state dir "
                                     f"{self.state_dir}") from None
                time.sleep(0.05)
        self._lock_fh = fh


def _write_private_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)  # atomic: readers never see half a file


def _pack(msg: dict[str, Any]) -> bytes:
    return bytes(msgpack.packb(msg, use_bin_type=True, default=str))
