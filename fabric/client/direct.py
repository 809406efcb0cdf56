"""``DirectResults``: handed-off requests and streams sent straight to model servers the
client can reach.

On the local site (or through a tunnel) the client reaches the model servers, so a request
worker only admits a request (``open_stream``: policy, a warm server, a single-use ticket for
this exact request) and the client submits it itself. One I/O thread holds one CURVE DEALER
socket per server for every request and stream of this client::

    submit(info, request)      --> future: the result's dict, or the server's typed error
    withdraw(info, request)    --> nothing: cancel a submitted request, answering no one
    open_stream(info, request) --> StreamFeed: "accepted" (or "error"), events, then "done"
    cancel(feed)               --> future: what the request was ("queued", "running", ...)
    abandon(feed)              --> nothing: cancel, answering no one (a dropped Stream)

Nothing waits out a generation at the site, no thread waits per request here (``AsyncFabric``
awaits the futures), and a thousand open streams are one socket per server, not a thousand
(a process has at most 1023 ZMQ sockets, and each new socket cost a CURVE handshake before
the stream's first token).

A long silence is normal (a long generation, a queue), a dead server is not: after a silence
from a server with requests open, the thread asks it for its health and fails whatever has
waited longer than its own patience for the answer with ``ModelServerUnavailable``. A stream
sets its patience (a federation's is short until the first token, so that a stream whose
server died moves soon); results use ``SILENCE_S`` and ``PING_S``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
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
IDLE_S = 60.0
"""How long a connection with nothing open stays before it is closed."""


Item = dict[str, Any] | FabricError
"""One message of a stream's feed, or the error that ended its connection."""


class StreamFeed:
    """One direct stream's messages, in the server's order: "accepted" or "error" first, then
    "event"s and a "done" (or an "error"); a ``FabricError`` item when the connection failed.
    The I/O thread hands each to ``put``: into ``queue`` for a reading thread, or to ``sink``
    (an event loop's reader, ``fabric.client.loopfeed``). ``silence_s``/``probe_s`` are this
    stream's patience and may change while it runs (``DirectSource.relax``)."""

    def __init__(self, info: dict[str, Any], request_id: str, silence_s: float,
                 probe_s: float, sink: Callable[[Item], None] | None = None) -> None:
        self.request_id = request_id
        self.address = str(info["address"])
        self.ticket = str(info["ticket"])
        self.silence_s = silence_s
        self.probe_s = probe_s
        self.queue: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self.put: Callable[[Item], None] = self.queue.put if sink is None else sink
        """Where the I/O thread delivers; it must not raise (it would stop that thread)."""


class _Server:
    __slots__ = ("cancels", "client", "feeds", "heard", "pending", "pinged")

    def __init__(self, client: ServerClient) -> None:
        self.client = client
        self.pending: dict[str, Future[dict[str, Any]]] = {}
        self.feeds: dict[str, StreamFeed] = {}
        self.cancels: dict[str, Future[str]] = {}
        self.heard = time.monotonic()
        self.pinged: float | None = None

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.feeds or self.cancels)

    def patience(self, silence: float) -> tuple[float, float]:
        """(silence before a ping, wait for its answer): the most impatient open item's."""
        probe = PING_S
        for feed in self.feeds.values():
            silence, probe = min(silence, feed.silence_s), min(probe, feed.probe_s)
        return silence, probe


class DirectResults:
    """Submits admitted requests to their servers and collects results on one thread."""

    def __init__(self, silence_s: float = SILENCE_S) -> None:
        self.silence_s = silence_s
        self._todo: queue.SimpleQueue[Callable[[Any], None]] = queue.SimpleQueue()
        self._servers: dict[str, _Server] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()

    def submit(self, info: dict[str, Any], request: InferenceRequest) -> Future[dict[str, Any]]:
        """Send ``request`` (admitted as ``info`` by ``open_stream`` mode ``direct``) to its
        server; the future holds the result's dict or the server's typed error."""
        request = _admitted(info, request)
        fut: Future[dict[str, Any]] = Future()

        def send(poller: Any) -> None:
            server = self._server(poller, info)
            if not server.busy:
                server.heard = time.monotonic()  # silence counts from the first request
            server.client.send_submit(request, str(info["ticket"]))
            server.pending[request.request_id] = fut  # after the send: it may raise

        self._do(send, fut.set_exception, f"send {request.request_id} to", info)
        return fut

    def open_stream(self, info: dict[str, Any], request: InferenceRequest,
                    silence_s: float = SILENCE_S, probe_s: float = PING_S,
                    sink: Callable[[Item], None] | None = None) -> StreamFeed:
        """Send ``request`` as a stream (the server pushes each step's tokens); its messages
        arrive in the returned feed (or go to ``sink``), starting with the server's
        admission answer."""
        request = _admitted(info, request)
        feed = StreamFeed(info, request.request_id, silence_s, probe_s, sink)

        def send(poller: Any) -> None:
            server = self._server(poller, info)
            if not server.busy:
                server.heard = time.monotonic()
            server.client.send_submit(request, feed.ticket, stream=True)
            server.feeds[feed.request_id] = feed

        self._do(send, feed.put, f"send {request.request_id} to", info)
        return feed

    def cancel(self, feed: StreamFeed) -> Future[str]:
        """Ask the server to stop ``feed``'s request; the future holds what it was. The
        stream's own last message ("error" Cancelled, or "done") still comes to its feed."""
        fut: Future[str] = Future()

        def send(poller: Any) -> None:
            server = self._servers.get(feed.address)
            if server is None:  # its connection failed or went idle: nothing runs for it
                fut.set_result("unknown")
                return
            server.client.send_cancel(feed.request_id, feed.ticket)
            server.cancels[feed.request_id] = fut

        self._do(send, fut.set_exception, f"cancel {feed.request_id} at", {"address": feed.address})
        return fut

    def withdraw(self, info: dict[str, Any], request: InferenceRequest) -> None:
        """Cancel a request ``submit`` sent, answering no one: its caller stopped waiting.
        Its future is left unsettled (the server's answers to it are dropped); a request
        whose connection is gone, or a closed client, needs nothing."""
        rid = _admitted(info, request).request_id
        address, ticket = str(info["address"]), str(info["ticket"])

        def send(poller: Any) -> None:
            server = self._servers.get(address)
            if server is None or server.pending.pop(rid, None) is None:
                return  # its connection failed or it has ended: nothing runs for it
            server.client.send_cancel(rid, ticket)

        with contextlib.suppress(EndpointError):
            self._do(send, lambda exc: None, f"cancel {rid} at", info)

    def forget(self, feed: StreamFeed) -> None:
        """Stop routing ``feed``'s messages (its reader is gone; a late message is dropped)."""
        def drop(poller: Any) -> None:
            server = self._servers.get(feed.address)
            if server is not None:
                server.feeds.pop(feed.request_id, None)

        with contextlib.suppress(EndpointError):  # closed: nothing is routed any more
            self._do(drop, lambda exc: None, "forget", {"address": feed.address})

    def abandon(self, feed: StreamFeed) -> None:
        """Cancel ``feed``'s request and stop routing it, answering no one: its ``Stream``
        was dropped unfinished. Runs in a finalizer, so it takes no lock (a ``SimpleQueue``
        put and a pipe write are safe there); once the connection is closed it does nothing."""
        if self._closed or self._thread is None:
            return

        def drop(poller: Any) -> None:
            server = self._servers.get(feed.address)
            if server is None:  # its connection failed or went idle: nothing runs for it
                return
            server.feeds.pop(feed.request_id, None)
            with contextlib.suppress(Exception):  # the thread must live on
                server.client.send_cancel(feed.request_id, feed.ticket)

        self._todo.put(drop)
        self._wake()

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

    def _do(self, action: Callable[[Any], None], fail: Callable[[FabricError], Any], what: str,
            info: dict[str, Any]) -> None:
        """Run ``action(poller)`` on the I/O thread (sockets are not thread-safe); if it
        raises (a bad key or address), ``fail`` gets the typed error: that request fails,
        not the thread."""
        address = str(info.get("address"))

        def run(poller: Any) -> None:
            try:
                action(poller)
            except Exception as exc:
                fail(EndpointError(f"cannot {what} the model server at {address}: "
                                   f"{type(exc).__name__}: {exc}"))

        with self._lock:
            if self._closed:
                raise EndpointError("the client's direct connection is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="fabric-direct")
                self._thread.start()
            self._todo.put(run)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _loop(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._closed:
                ready = dict(poller.poll(self._next_check_ms()))
                if self._wake_r in ready:
                    os.read(self._wake_r, 65536)
                while not self._todo.empty():
                    self._todo.get()(poller)
                for address, server in list(self._servers.items()):
                    if ready.get(server.client.socket):
                        self._receive(server)
                    self._check(poller, address, server)
        finally:
            with self._lock:  # nothing is queued after this (``_do`` checks under the lock)
                self._closed = True
            err = EndpointError("the client's direct connection was closed")
            for server in self._servers.values():
                _fail(server, err)
                server.client.close()
            self._servers.clear()
            while not self._todo.empty():  # each fails as it finds no thread to run it
                with contextlib.suppress(Exception):
                    self._todo.get()(None)

    def _next_check_ms(self) -> int:
        """Until the next silence or ping answer is due (a federated stream's patience is
        half a second), at most a second."""
        now, due = time.monotonic(), 1.0
        for server in self._servers.values():
            if server.busy:
                silence, probe = server.patience(self.silence_s)
                deadline = (server.heard + silence if server.pinged is None
                            else server.pinged + probe)
                due = min(due, deadline - now)
        return max(10, int(due * 1000) + 1)

    def _server(self, poller: Any, info: dict[str, Any]) -> _Server:
        import zmq

        from fabric.serverclient import ServerClient

        if poller is None:
            raise EndpointError("the client's direct connection was closed")
        address = str(info["address"])
        server = self._servers.get(address)
        if server is None:
            server = self._servers[address] = _Server(
                ServerClient(address, str(info["public_key"])))
            poller.register(server.client.socket, zmq.POLLIN)
        return server

    @staticmethod
    def _receive(server: _Server) -> None:
        server.heard = time.monotonic()
        server.pinged = None
        for msg in server.client.recv_now():
            rid = msg.get("request_id")
            if rid is None:
                continue  # a health reply: hearing it was the point
            rid, op = str(rid), msg.get("op")
            if op == "cancelled":
                done = server.cancels.pop(rid, None)
                if done is not None and not done.done():
                    done.set_result(str(msg.get("was")))
            elif rid in server.feeds:
                server.feeds[rid].put(msg)
                if op in ("done", "error"):
                    del server.feeds[rid]
            elif op in ("done", "error"):  # "accepted" needs nothing for a result
                fut = server.pending.pop(rid, None)
                if fut is not None and not fut.done():
                    if op == "error":
                        fut.set_exception(FabricError.from_dict(msg["error"]))
                    else:
                        fut.set_result(dict(msg["result"]))

    def _check(self, poller: Any, address: str, server: _Server) -> None:
        now = time.monotonic()
        if not server.busy:
            if now - server.heard > IDLE_S:  # idle: let the socket go
                poller.unregister(server.client.socket)
                server.client.close()
                del self._servers[address]
            return
        silence, probe = server.patience(self.silence_s)
        if server.pinged is None and now - server.heard > silence:
            server.client.send_health()
            server.pinged = now
        elif server.pinged is not None and now - server.pinged > probe:
            waited = now - server.pinged
            _fail(server, ModelServerUnavailable(
                f"the model server at {address} stopped answering (no health reply within "
                f"{waited:.1f} s); it may have died (the next request relaunches it)",
                address=address), waited)
            if not server.busy:
                poller.unregister(server.client.socket)
                server.client.close()
                del self._servers[address]


def _fail(server: _Server, err: FabricError, waited: float | None = None) -> None:
    """Fail what of ``server`` has waited ``waited`` s for a ping's answer, longer than its own
    patience allows (``None``: all of it). A stream with more patience waits on."""
    def overdue(limit: float) -> bool:
        return waited is None or waited > limit

    for rid, feed in list(server.feeds.items()):
        if overdue(feed.probe_s):
            del server.feeds[rid]
            feed.put(err)
    if overdue(PING_S):
        futures: list[Future[Any]] = [*server.pending.values(), *server.cancels.values()]
        server.pending, server.cancels = {}, {}
        for fut in futures:
            if not fut.done():
                fut.set_exception(err)


def _admitted(info: dict[str, Any], request: InferenceRequest) -> InferenceRequest:
    """``request`` as its admission ``info`` signed it: the ticket is for exactly one id."""
    missing = [k for k in ("address", "public_key", "ticket") if not info.get(k)]
    if missing:
        raise EndpointError(f"the site's admission of {request.request_id} lacks "
                            f"{', '.join(missing)}: it cannot be sent to its server")
    rid = str(info.get("request_id") or request.request_id)
    return request if request.request_id == rid else request.model_copy(
        update={"request_id": rid})

