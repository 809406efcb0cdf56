"""The one client of the model-server wire protocol (see ``docs/protocol.md``).

Used by endpoint functions (inside request workers) and by the SDK when it can reach a server
directly. One ``ServerClient`` owns one CURVE-encrypted DEALER socket; it is not thread-safe,
so use one per thread. Messages for several requests may interleave on the socket; they are
kept per request id until asked for.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Iterator
from typing import Any

import zmq

from fabric.errors import FabricError, ModelServerUnavailable
from fabric.protocol import InferenceRequest, pack, unpack

POLL_GRACE_S = 10.0
"""How long past its long-poll wait a poll's reply may be late before the server counts as gone
(the front door answers from its own thread, so lateness means a dead process or node)."""


class ServerClient:
    """A connection to one model server."""

    def __init__(self, address: str, server_public_key: str, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        public, secret = zmq.curve_keypair()
        self._sock.curve_publickey = public
        self._sock.curve_secretkey = secret
        self._sock.curve_serverkey = server_public_key.encode()
        self._sock.linger = 0
        self._sock.connect(address)
        self._pending: dict[str, deque[dict[str, Any]]] = defaultdict(deque)
        self._control: deque[dict[str, Any]] = deque()

    # --- one-shot operations -------------------------------------------------------------

    def health(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The server's state, queue depth, running batch, KV usage and tokens/s."""
        self._send({"op": "health"})
        return self._wait_control("health", timeout_s)

    def submit(self, request: InferenceRequest, ticket: str, stream: bool = False,
               detach: bool = False) -> None:
        """Hand a request to the server; raise its typed error if it refuses.

        ``stream`` pushes every step's tokens to this socket; ``detach`` pushes nothing and
        buffers the events for ``poll`` instead (the caller may disconnect).
        """
        self.send_submit(request, ticket, stream, detach)
        refusal = self.admission(request.request_id)
        if refusal is not None:
            raise refusal

    def submit_many(self, items: list[tuple[InferenceRequest, str]]) -> list[FabricError | None]:
        """Send every (request, ticket) before reading any answer (one round trip for the
        lot, not one each); returns per request ``None`` (accepted) or its typed refusal."""
        for request, ticket in items:
            self.send_submit(request, ticket)
        return [self.admission(request.request_id) for request, _ in items]

    def cancel(self, request_id: str, ticket: str) -> str:
        """Cancel a request; returns what it was doing ("queued", "running", "done", "unknown")."""
        self.send_cancel(request_id, ticket)
        return str(self._wait_request(request_id, ("cancelled",), self.timeout_s)["was"])

    def poll(self, request_id: str, ticket: str, cursor: int, wait_s: float,
             final: bool = False) -> dict[str, Any]:
        """Events after ``cursor`` (waiting up to ``wait_s`` for new ones): long-poll streaming;
        ``final``: wait for the request's end only."""
        self._send({"op": "poll", "ticket": ticket, "request_id": request_id, "cursor": cursor,
                    "wait": wait_s, "final": final})
        # The front door answers a poll when its wait ends, from its own thread even mid-step:
        # a reply missing for POLL_GRACE_S beyond that means the server (or its node) is gone.
        reply = self._wait_request(request_id, ("events", "error"),
                                   wait_s + min(self.timeout_s, POLL_GRACE_S))
        if reply["op"] == "error" and "events" not in reply:
            raise FabricError.from_dict(reply["error"])
        return reply

    def send_poll(self, request_id: str, ticket: str, cursor: int, wait_s: float,
                  final: bool = False) -> None:
        """Send a ``poll`` without waiting for its answer (several may be out at once: read
        them with ``recv_now``, as the site's multiplexed poll does); ``final``: answer only
        at the request's end (or ``wait_s``), not at each new event."""
        self._send({"op": "poll", "ticket": ticket, "request_id": request_id, "cursor": cursor,
                    "wait": round(max(0.0, wait_s), 3), "final": final})

    def send_health(self) -> None:
        """Ask for health without waiting (the reply carries no request id)."""
        self._send({"op": "health"})

    @property
    def socket(self) -> zmq.Socket[bytes]:
        """The DEALER socket (to wait on several connections with one ``zmq.Poller``)."""
        return self._sock

    def recv_now(self) -> list[dict[str, Any]]:
        """Every message that can be read now, without waiting."""
        out = []
        while self._sock.poll(0):
            out.append(unpack(self._sock.recv()))
        return out

    def usage(self, ticket: str, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Tokens the server delivered on accounted (stream) tickets since the last call
        (operator ticket): ``{request_id, subject, tokens, ts}`` each; the server forgets
        them, so the caller records them."""
        self._send({"op": "usage", "ticket": ticket})
        reply = self._wait_control(("usage", "error"), timeout_s)
        if reply["op"] == "error":
            raise FabricError.from_dict(reply["error"])
        return [dict(e) for e in reply.get("entries") or []]

    def drain(self, ticket: str) -> None:
        """Ask the server to finish running requests, refuse new ones and exit."""
        self._send({"op": "drain", "ticket": ticket})
        reply = self._wait_control(("draining", "error"), None)
        if reply["op"] == "error":  # e.g. TicketInvalid: not an operator ticket
            raise FabricError.from_dict(reply["error"])

    def stats(self, ticket: str, timeout_s: float | None = None) -> dict[str, Any]:
        """The server's cumulative request statistics and load (operator ticket)."""
        self._send({"op": "stats", "ticket": ticket})
        # A refused ticket answers "error" (no request id), not "stats".
        reply = self._wait_control(("stats", "error"), timeout_s)
        if reply["op"] == "error":
            raise FabricError.from_dict(reply["error"])
        return reply

    # --- results of submitted requests ---------------------------------------------------

    def events(self, request_id: str, timeout_s: float | None = None) -> Iterator[dict[str, Any]]:
        """Pushed events of a streamed request, ending with the "done" event."""
        while True:
            msg = self._wait_request(request_id, ("event", "done", "error"), timeout_s)
            if msg["op"] == "error":
                raise FabricError.from_dict(msg["error"])
            yield msg
            if msg["op"] == "done":
                return

    def result(self, request_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait for a request's final result (skipping stream events)."""
        for msg in self.events(request_id, timeout_s):
            if msg["op"] == "done":
                return dict(msg["result"])
        raise ModelServerUnavailable("stream ended without a result")  # pragma: no cover

    def close(self) -> None:
        """Close the socket."""
        self._sock.close(0)

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_cancel(self, request_id: str, ticket: str) -> None:
        """Send a cancel without waiting for its answer ("cancelled", with what it was)."""
        self._send({"op": "cancel", "ticket": ticket, "request_id": request_id})

    def send_submit(self, request: InferenceRequest, ticket: str, stream: bool = False,
                    detach: bool = False) -> None:
        """Send a submit without waiting for its answer (read it with ``admission``)."""
        self._send({"op": "submit", "ticket": ticket, "request": request.model_dump(),
                    "stream": stream, "detach": detach})

    def admission(self, request_id: str, timeout_s: float | None = None) -> FabricError | None:
        """The server's answer to a submit: ``None`` if accepted, else its typed error. No
        answer in time raises ``ModelServerUnavailable`` with ``details['silent']`` (as every
        wait here does), unlike an error the server itself sent."""
        reply = self._wait_request(request_id, ("accepted", "error"), timeout_s)
        return FabricError.from_dict(reply["error"]) if reply["op"] == "error" else None

    # --- plumbing ------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        self._sock.send(pack(message))

    def _recv_one(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._sock.poll(int(remaining * 1000)):
            raise ModelServerUnavailable(
                f"model server at {self.address} did not answer within the timeout; "
                "it may have died (the next request relaunches it)",
                address=self.address, silent=True,
            )
        msg = unpack(self._sock.recv())
        rid = msg.get("request_id")
        if rid is None:
            self._control.append(msg)
        else:
            self._pending[str(rid)].append(msg)

    def _wait_request(self, request_id: str, ops: tuple[str, ...],
                      timeout_s: float | None) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        queue = self._pending[request_id]
        while True:
            for i, msg in enumerate(queue):
                if msg["op"] in ops:
                    del queue[i]
                    if not queue:
                        self._pending.pop(request_id, None)
                    return msg
            self._recv_one(deadline)
            queue = self._pending[request_id]

    def _wait_control(self, op: str | tuple[str, ...],
                      timeout_s: float | None) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        ops = (op,) if isinstance(op, str) else op
        while True:
            for i, msg in enumerate(self._control):
                if msg["op"] in ops:
                    del self._control[i]
                    return msg
            self._recv_one(deadline)
