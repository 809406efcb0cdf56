"""``DirectResults``: handed-off requests sent straight to model servers the client can reach.

On the local site (or through a tunnel) the client reaches the model servers, so a request
worker only admits a request (``open_stream``: policy, a warm server, a single-use ticket for
this exact request) and the client submits it itself. One I/O thread holds one CURVE DEALER
socket per server for every request of this client and settles each request's future when the
server sends its result; nothing waits out the generation at the site, and no thread waits per
request here (``AsyncFabric`` awaits the futures).

A long silence is normal (a long generation, a queue), a dead server is not: after
``silence_s`` without a message from a server with requests open, the thread asks it for its
health and fails its requests with ``ModelServerUnavailable`` if it does not answer.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from fabric.errors import EndpointError, FabricError, ModelServerUnavailable

if TYPE_CHECKING:
    from fabric.protocol import InferenceRequest
    from fabric.serverclient import ServerClient

SILENCE_S = 10.0
"""Silence from a server with requests open before its health is asked."""
PING_S = 5.0
"""How long a health ping may go unanswered before the server is taken for dead."""


class _Server:
    __slots__ = ("client", "heard", "pending", "pinged")

    def __init__(self, client: ServerClient) -> None:
        self.client = client
        self.pending: dict[str, Future[dict[str, Any]]] = {}
        self.heard = time.monotonic()
        self.pinged: float | None = None


class DirectResults:
    """Submits admitted requests to their servers and collects results on one thread."""

    def __init__(self, silence_s: float = SILENCE_S) -> None:
        self.silence_s = silence_s
        self._todo: queue.SimpleQueue[tuple[dict[str, Any], InferenceRequest,
                                            Future[dict[str, Any]]]] = queue.SimpleQueue()
        self._servers: dict[str, _Server] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()

    def submit(self, info: dict[str, Any], request: InferenceRequest) -> Future[dict[str, Any]]:
        """Send ``request`` (admitted as ``info`` by ``open_stream`` mode ``direct``) to its
        server; the future holds the result's dict or the server's typed error."""
        missing = [k for k in ("address", "public_key", "ticket") if not info.get(k)]
        if missing:
            raise EndpointError(f"the site's admission of {request.request_id} lacks "
                                f"{', '.join(missing)}: it cannot be sent to its server")
        rid = str(info.get("request_id") or request.request_id)
        if request.request_id != rid:  # the ticket is signed for exactly this id
            request = request.model_copy(update={"request_id": rid})
        fut: Future[dict[str, Any]] = Future()
        with self._lock:
            if self._closed:
                raise EndpointError("the client's direct connection is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="fabric-direct")
                self._thread.start()
        self._todo.put((info, request, fut))
        self._wake()
        return fut

    def close(self) -> None:
        """Stop the thread; requests still open fail with ``EndpointError``."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        if thread is None or not thread.is_alive():
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    # -- the I/O thread -----------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _loop(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._closed:
                ready = dict(poller.poll(1000))
                if self._wake_r in ready:
                    os.read(self._wake_r, 65536)
                self._send_new(poller)
                for address, server in list(self._servers.items()):
                    if ready.get(server.client.socket):
                        self._receive(server)
                    self._check(poller, address, server)
        finally:
            err = EndpointError("the client's direct connection was closed")
            for server in self._servers.values():
                self._fail(server, err)
                server.client.close()
            self._servers.clear()
            while not self._todo.empty():
                _, _, fut = self._todo.get()
                if not fut.done():
                    fut.set_exception(err)

    def _send_new(self, poller: Any) -> None:
        import zmq

        from fabric.serverclient import ServerClient

        while not self._todo.empty():
            info, request, fut = self._todo.get()
            address = str(info["address"])
            try:
                server = self._servers.get(address)
                if server is None:
                    server = self._servers[address] = _Server(
                        ServerClient(address, str(info["public_key"])))
                    poller.register(server.client.socket, zmq.POLLIN)
                if not server.pending:
                    server.heard = time.monotonic()  # silence counts from the first request
                server.pending[request.request_id] = fut
                server.client.send_submit(request, str(info["ticket"]))
            except Exception as exc:  # a bad key or address: this request fails, not the thread
                if address in self._servers:
                    self._servers[address].pending.pop(request.request_id, None)
                if not fut.done():
                    fut.set_exception(EndpointError(
                        f"cannot send {request.request_id} to the model server at {address}: "
                        f"{type(exc).__name__}: {exc}"))

    def _receive(self, server: _Server) -> None:
        server.heard = time.monotonic()
        server.pinged = None
        for msg in server.client.recv_now():
            rid = msg.get("request_id")
            op = msg.get("op")
            if rid is None or op not in ("done", "error"):
                continue  # "accepted", a health reply
            fut = server.pending.pop(str(rid), None)
            if fut is None or fut.done():
                continue
            if op == "error":
                fut.set_exception(FabricError.from_dict(msg["error"]))
            else:
                fut.set_result(dict(msg["result"]))

    def _check(self, poller: Any, address: str, server: _Server) -> None:
        now = time.monotonic()
        if not server.pending:
            if now - server.heard > 60.0:  # idle: let the socket go
                poller.unregister(server.client.socket)
                server.client.close()
                del self._servers[address]
            return
        if server.pinged is None and now - server.heard > self.silence_s:
            server.client.send_health()
            server.pinged = now
        elif server.pinged is not None and now - server.pinged > PING_S:
            self._fail(server, ModelServerUnavailable(
                f"the model server at {address} stopped answering (no health reply within "
                f"{PING_S:.0f} s); it may have died (the next request relaunches it)",
                address=address))
            poller.unregister(server.client.socket)
            server.client.close()
            del self._servers[address]

    @staticmethod
    def _fail(server: _Server, err: FabricError) -> None:
        pending, server.pending = server.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)
