"""The local site process: a real Globus Compute engine behind a CURVE-encrypted ZMQ socket.

``python -m fabric.endpoint.site --site local [--state-dir DIR]`` (or ``fabric endpoint start``)
runs what a Globus Compute endpoint runs at a supercomputer site, minus the cloud relay:

.. code:: text

    LocalTransport send DEALER --[b"T", packed Task, reply id]--> ROUTER --> GlobusComputeEngine
                   recv DEALER <--[b"R", task id, packed Result]-- reply ROUTER   (Parsl HTEX,
                   (routing id = reply id)                         LocalProvider request workers)
                               --[b"C", control, reply id]----> status / stop (off the main loop)

The main loop only receives (and submits to the engine); replies leave from the thread that
has them (the engine's result thread, a control thread) on the send-only reply ROUTER, under a
lock, so a result does not wait for the main loop to wake. A message without a reply id (the
CLI's one-shot control socket) is answered on the socket it came from, by the main loop.

Tasks and results are Globus Compute's own messages (``fabric.client.gcwire``), so the same
endpoint functions run here and behind a real endpoint. The process owns one state dir (a
file lock keeps a second copy out) and advertises itself in ``<state_dir>/endpoint.json``
(mode 0600). Model servers it launched keep running after it stops (they exit on their idle
timeout); ``stop`` with ``all`` undeploys them first.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import fcntl
import importlib
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

from fabric.endpoint.functions import SITE_ENV, STATE_DIR_ENV
from fabric.sites import SiteConfig, load_site

log = logging.getLogger("fabric.site")

INFO_FILE = "endpoint.json"
"""Where the running site advertises its pid, address and public key (in the state dir)."""
TASK, RESULT, CONTROL = b"T", b"R", b"C"
"""First frame of each message kind on the site socket."""
REPLY_RETRY_S = 30.0
"""How long a reply waits for its client's reply socket to finish connecting."""
REAP_INTERVAL_S = 15.0
"""How often the site checks its deployments' servers for exits."""

BackgroundTask = Callable[["SiteProcess", threading.Event], None]
"""A long-running job of the site (e.g. the campaign runner): called in its own daemon thread
with the site and an event that is set when the site stops."""


class SiteProcess:
    """One running local site: engine, socket, state dir, background tasks."""

    background_tasks: list[BackgroundTask] = []
    """Hooks started (each in a daemon thread) once the site serves; add to this list before
    ``start`` (class-wide) or on the instance. The campaign runner registers itself here."""

    def __init__(self, site: SiteConfig, site_ref: str, state_dir: Path) -> None:
        self.site = site
        self.site_ref = site_ref
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.endpoint_id = uuid.uuid4()
        self.stopping = threading.Event()
        self.stop_all = False
        self.background_tasks = list(type(self).background_tasks)
        self._out: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._reply_lock = threading.Lock()
        self._late: queue.SimpleQueue[tuple[float, list[bytes]]] = queue.SimpleQueue()
        self._unroutable: list[tuple[float, list[bytes]]] = []
        """Replies whose client's reply socket had not finished connecting (the main loop
        retries them)."""
        self._wake_r, self._wake_w = os.pipe()
        self._control = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="site-control")
        self._lock_fh: Any = None
        self.engine: Any = None
        self.router: Any = None
        self.replies: Any = None
        self.address = ""
        self.reply_address = ""
        self.public_key = ""
        self.started = 0.0

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Take the state dir, start the engine, bind the socket, write ``endpoint.json``."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._take_lock()
        public, secret = load_or_create_curve_keys(self.state_dir / "keys" / "endpoint.json")
        self._start_engine()
        self.router = _curve_router(public, secret)
        self.address = _bind(self.router)
        self.replies = _curve_router(public, secret)
        # An unknown reply id is an error, not a silent drop: the reply is retried.
        self.replies.router_mandatory = True
        self.reply_address = _bind(self.replies)
        self.public_key = public
        self.started = time.time()
        _write_private_json(self.state_dir / INFO_FILE, self.info())
        threading.Thread(target=self._reap_loop, daemon=True, name="site-reaper").start()
        for task in self.background_tasks:
            threading.Thread(target=self._run_background, args=(task,), daemon=True,
                             name=f"site-bg-{getattr(task, '__name__', 'task')}").start()
        log.info("site %s serving at %s (state dir %s)", self.site.name, self.address,
                 self.state_dir)

    def _start_engine(self) -> None:
        from globus_compute_endpoint.engines import GlobusComputeEngine
        from parsl.providers import LocalProvider

        # Workers are started by the engine from this process's environment: they need the
        # venv's bin on PATH (``globus-compute-endpoint python-exec``) and their site.
        bin_dir = str(Path(sys.executable).parent)
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        os.environ[SITE_ENV] = self.site_ref
        os.environ[STATE_DIR_ENV] = str(self.state_dir)
        run_dir = self.state_dir / "engine"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.engine = GlobusComputeEngine(
            label="fabric-local",
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
            max_workers_per_node=self.site.max_request_workers,
            address="127.0.0.1",
            # Long idle allowance: request workers stay warm; the short strategy period cuts
            # the first task's latency from ~6 s to ~2 s.
            job_status_kwargs={"strategy_period": 0.5, "max_idletime": 3600.0},
        )
        self.engine.start(endpoint_id=self.endpoint_id, run_dir=str(run_dir))

    def info(self) -> dict[str, Any]:
        """What ``endpoint.json`` says about this site."""
        return {"pid": os.getpid(), "address": self.address,
                "reply_address": self.reply_address, "public_key": self.public_key,
                "endpoint_id": str(self.endpoint_id), "state_dir": str(self.state_dir),
                "site": self.site.name, "site_ref": self.site_ref, "started": self.started,
                "workers": self.site.max_request_workers, "state": "ready",
                "log": str(self.state_dir / "logs" / "site.log")}

    def serve_forever(self) -> None:
        """Route tasks to the engine and results back until ``stop``/SIGTERM."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self.stopping.is_set():
            ready = dict(poller.poll(5 if self._unroutable else 1000))
            if self.router in ready:
                for _ in range(1000):  # bounded so replies are not starved
                    try:
                        frames = self.router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._dispatch(frames)
            if self._wake_r in ready:
                os.read(self._wake_r, 65536)
            self._flush()
            while not self._late.empty():
                self._unroutable.append(self._late.get_nowait())
            if self._unroutable:
                self._retry_replies()
        self._flush()

    def request_stop(self) -> None:
        """Ask the serving loop to end (signal-safe)."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def shutdown(self) -> None:
        """Stop background tasks and the engine, close the socket, remove ``endpoint.json``."""
        self.stopping.set()
        if self._lock_fh is None:
            return  # never owned the state dir (another site runs there): touch nothing
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / INFO_FILE).unlink()
        if self.engine is not None:
            try:
                self.engine.shutdown()
            except Exception:
                log.exception("engine shutdown failed")
        self._control.shutdown(wait=False, cancel_futures=True)
        for sock in (self.router, self.replies):
            if sock is not None:
                sock.close(0)
        self._lock_fh.close()
        log.info("site %s stopped", self.site.name)

    # -- message handling -----------------------------------------------------------------

    def _dispatch(self, frames: list[bytes]) -> None:
        # [ident, kind, body] answered on the main socket, or [ident, kind, body, reply id]
        # answered on the reply socket to the client socket with that routing id.
        kind = frames[1] if len(frames) > 1 else b""
        if len(frames) not in (3, 4) or kind not in (TASK, CONTROL):
            log.warning("dropping malformed message (%d frames)", len(frames))
            return
        to = _Reply(frames[0], frames[3] if len(frames) == 4 else None)
        if kind == TASK:
            self._submit_task(to, frames[2])
        else:
            self._control.submit(self._answer_control, to, frames[2])

    def _submit_task(self, to: _Reply, packed: bytes) -> None:
        from globus_compute_endpoint.engines.base import GCFuture

        from fabric.client.gcwire import pack_error_result, task_id_of

        try:
            task_id = task_id_of(packed)
        except Exception as exc:
            self._reply(to, [CONTROL, _pack({"op": "error", "error": f"bad task: {exc}"})])
            return
        fut = GCFuture(task_id)

        def done(f: cf.Future[Any]) -> None:
            self._reply(to, [RESULT, str(task_id).encode(), f.result()])

        fut.add_done_callback(done)
        try:
            self.engine.submit(fut, packed, resource_specification={})
        except Exception as exc:  # the engine refused it: answer, and keep serving others
            log.exception("engine refused task %s", task_id)
            fut.set_result(pack_error_result(task_id, "EngineSubmitError",
                                             f"{type(exc).__name__}: {exc}"))

    def _answer_control(self, to: _Reply, raw: bytes) -> None:
        msg = msgpack.unpackb(raw, raw=False)
        op = msg.get("op")
        reply: dict[str, Any] = {"op": op, "id": msg.get("id")}
        try:
            if op == "status":
                reply.update(self.status(health=bool(msg.get("health", True))))
            elif op == "stop":
                self.stop_all = bool(msg.get("all"))
                if self.stop_all:
                    reply["undeployed"] = self._undeploy_all()
                reply["stopping"] = True
            elif op == "ping":
                reply["pid"] = os.getpid()
            else:
                reply["error"] = f"unknown control op {op!r}; known: status, stop, ping"
        except Exception as exc:
            reply["error"] = f"{type(exc).__name__}: {exc}"
            reply["traceback"] = traceback.format_exc()
        self._reply(to, [CONTROL, _pack(reply)])
        if op == "stop":
            self.request_stop()

    def status(self, health: bool = True) -> dict[str, Any]:
        """pid, address, state dir, workers and deployments (with their server health)."""
        from fabric.endpoint.deployments import DeploymentManager

        mgr = DeploymentManager(self.site, self.state_dir)
        deployments = mgr.list_all() if health else [d.to_dict() for d in mgr.db.query()]
        return {**self.info(), "uptime_s": round(time.time() - self.started, 1),
                "deployments": deployments}

    def _undeploy_all(self) -> list[str]:
        from fabric.endpoint.deployments import DeploymentManager

        mgr = DeploymentManager(self.site, self.state_dir)
        done = []
        for dep in mgr.db.query(states=("queued", "loading", "ready", "draining")):
            mgr.undeploy(dep.id, drain_wait_s=5.0)
            done.append(dep.id)
        return done

    def _reply(self, to: _Reply, frames: list[bytes]) -> None:
        """Send ``frames`` to the client ``to`` names, from whichever thread has them."""
        if to.reply_id is None:
            self._post([to.ident, *frames])
            return
        message = [to.reply_id, *frames]
        with self._reply_lock:
            try:
                self.replies.send_multipart(message)
                return
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    log.warning("dropping a reply: %s", exc)
                    return
        # The client's reply socket has not finished its handshake yet: the main loop retries.
        self._late.put((time.monotonic(), message))
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _retry_replies(self) -> None:
        now = time.monotonic()
        keep: list[tuple[float, list[bytes]]] = []
        with self._reply_lock:
            for first, message in self._unroutable:
                try:
                    self.replies.send_multipart(message)
                except zmq.ZMQError:
                    if now - first < REPLY_RETRY_S:
                        keep.append((first, message))
                    else:
                        log.warning("dropping a reply: its client never connected")
        self._unroutable = keep

    def _post(self, frames: list[bytes]) -> None:
        # For the main socket, which only the main loop touches.
        self._out.put(frames)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _flush(self) -> None:
        while True:
            try:
                frames = self._out.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(zmq.ZMQError):
                self.router.send_multipart(frames)

    def _reap_loop(self) -> None:
        # Mark servers that exited (idle timeout, crash, walltime) dead even when no request
        # comes, so `fabric deployments` and status show the truth.
        from fabric.endpoint.deployments import DeploymentManager

        mgr = DeploymentManager(self.site, self.state_dir)
        while not self.stopping.wait(REAP_INTERVAL_S):
            try:
                mgr.reap()
            except Exception:
                log.exception("reaping deployments failed")

    def _run_background(self, task: BackgroundTask) -> None:
        try:
            task(self, self.stopping)
        except Exception:
            log.exception("background task %r failed", task)

    def _take_lock(self) -> None:
        fh = (self.state_dir / "endpoint.lock").open("a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise SystemExit(f"a site is already running with state dir {self.state_dir}"
                             ) from None
        self._lock_fh = fh


class _Reply:
    """Where a message's answer goes: its main-socket sender, or a reply-socket routing id."""

    __slots__ = ("ident", "reply_id")

    def __init__(self, ident: bytes, reply_id: bytes | None) -> None:
        self.ident = ident
        self.reply_id = reply_id


def _curve_router(public: str, secret: str) -> Any:
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_publickey = public.encode()
    sock.curve_secretkey = secret.encode()
    sock.linger = 0
    return sock


def _bind(sock: Any) -> str:
    return f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"


def load_or_create_curve_keys(path: Path) -> tuple[str, str]:
    """The site's CURVE key pair ``(public, secret)`` (z85), created mode 0600 on first use."""
    if path.exists():
        data = json.loads(path.read_text())
        return str(data["public"]), str(data["secret"])
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = zmq.curve_keypair()
    _write_private_json(path, {"public": public.decode(), "secret": secret.decode()})
    return public.decode(), secret.decode()


def _write_private_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)  # atomic: readers never see half a file


def _pack(msg: dict[str, Any]) -> bytes:
    return bytes(msgpack.packb(msg, use_bin_type=True, default=str))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the site process."""
    parser = argparse.ArgumentParser(prog="python -m fabric.endpoint.site",
                                     description="Run a fabric site (the local endpoint).")
    parser.add_argument("--site", default="local", help="site name or definition path")
    parser.add_argument("--state-dir", default=None, help="override the site's state dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("parsl", "globus_compute_endpoint", "globus_compute_sdk"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ref = args.site
    if Path(ref).exists():
        ref = str(Path(ref).resolve())  # workers run in another cwd
    site = load_site(ref)
    state_dir = Path(args.state_dir).expanduser() if args.state_dir \
        else site.resolved_state_dir()
    proc = SiteProcess(site, ref, state_dir)
    proc.background_tasks.append(importlib.import_module("fabric.campaign.scheduler").site_task)
    signal.signal(signal.SIGTERM, lambda *_: proc.request_stop())
    signal.signal(signal.SIGINT, lambda *_: proc.request_stop())
    try:
        proc.start()
        proc.serve_forever()
    finally:
        proc.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
