"""Direct streams over the client's one connection per model server (``DirectResults``),
against a scripted front door: a real CURVE ROUTER socket that answers as a model server
does, or stays silent as a dead one does."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from fabric.client.checks import build_request
from fabric.client.direct import DirectResults
from fabric.client.streaming import DirectSource, Stream
from fabric.errors import ModelServerUnavailable
from fabric.protocol import pack, unpack
from tests.plugins.site import wait_until
from tests.test_sdk_validation import result_dict


class ScriptedServer:
    """Accepts each submit after ``admit_after_s`` (never if None), then sends ``script``:
    messages, or a number of seconds to stay silent. Answers health only if ``alive``;
    answers cancel with "running" and then the stream's Cancelled error."""

    def __init__(self, script: list[Any], alive: bool = True,
                 admit_after_s: float | None = 0.0) -> None:
        self.script, self.alive, self.admit_after_s = script, alive, admit_after_s
        public, secret = zmq.curve_keypair()
        self.public_key = public.decode()
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.curve_server = True
        self.sock.curve_secretkey = secret
        self.sock.curve_publickey = public
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.identities: set[bytes] = set()
        self.health_asked = 0
        self.cancels: list[str] = []
        self._due: list[tuple[float, bytes, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(10):
                identity, frame = self.sock.recv_multipart()
                self.identities.add(identity)
                self._on(identity, unpack(frame))
            now = time.monotonic()
            for item in [d for d in self._due if d[0] <= now]:
                self._due.remove(item)
                self.sock.send_multipart([item[1], pack(item[2])])
        self.sock.close(0)

    def _on(self, identity: bytes, msg: dict[str, Any]) -> None:
        if msg["op"] == "health":
            self.health_asked += 1
            if self.alive:
                self.sock.send_multipart([identity, pack({"op": "health", "state": "ready"})])
        elif msg["op"] == "submit" and self.admit_after_s is not None:
            rid = msg["request"]["request_id"]
            at = time.monotonic() + self.admit_after_s
            self._due.append((at, identity, {"op": "accepted", "request_id": rid}))
            for step in self.script:
                if isinstance(step, int | float):
                    at += step
                else:
                    self._due.append((at, identity, {**step, "request_id": rid}))
        elif msg["op"] == "cancel":
            rid = msg["request_id"]
            self.cancels.append(rid)
            self._due = [d for d in self._due if d[2]["request_id"] != rid]
            self.sock.send_multipart([identity, pack({"op": "cancelled", "request_id": rid,
                                                      "was": "running"})])
            error = {"code": "cancelled", "message": "cancelled by the client"}
            self.sock.send_multipart([identity, pack({"op": "error", "request_id": rid,
                                                      "error": error})])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def direct() -> Iterator[DirectResults]:
    results = DirectResults()
    yield results
    results.close()


def _open(server: ScriptedServer, direct: DirectResults, **patience: float) -> DirectSource:
    request = build_request("generate", model="m", prompt="x")
    info = {"request_id": request.request_id, "address": server.address,
            "public_key": server.public_key, "ticket": "tk"}
    return DirectSource(info, request, direct, **patience)


def event(text: str, token: int) -> dict[str, Any]:
    return {"op": "event", "token_ids": [token], "text": text}


DONE = {"op": "done", "result": result_dict()}
IMPATIENT = {"silence_s": 0.05, "probe_timeout_s": 0.3}


@pytest.mark.parametrize("alive", [True, False])
def test_a_silence_is_waited_out_only_while_the_server_answers(
        direct: DirectResults, alive: bool) -> None:
    # A dead server sends nothing more; a live one answers health and goes on after 0.5 s.
    script = [event("a", 1), 0.5, event("b", 2), DONE] if alive else [event("a", 1)]
    server = ScriptedServer(script, alive=alive)
    try:
        stream = Stream(_open(server, direct, **IMPATIENT))
        if alive:
            assert list(stream) == ["a", "b"] and stream.result is not None
        else:
            assert next(stream) == "a"
            with pytest.raises(ModelServerUnavailable):
                next(stream)
        assert server.health_asked >= 1  # the silence was asked about, not just waited out
    finally:
        server.close()


@pytest.mark.parametrize("alive", [True, False])
def test_a_silent_admission_is_waited_out_only_while_the_server_answers(
        direct: DirectResults, alive: bool) -> None:
    """A server silent about admitting a stream is asked for its health (a federation moves
    such a stream to another site when it is gone)."""
    server = ScriptedServer([event("a", 1), DONE], alive=alive,
                            admit_after_s=0.5 if alive else None)
    try:
        if alive:
            assert list(Stream(_open(server, direct, **IMPATIENT))) == ["a"]
        else:
            with pytest.raises(ModelServerUnavailable):
                _open(server, direct, **IMPATIENT)
        assert server.health_asked >= 1
    finally:
        server.close()


def test_streams_share_one_connection_and_cancel_over_it(direct: DirectResults) -> None:
    server = ScriptedServer([event("a", 1), 30.0, DONE])
    try:
        streams = [Stream(_open(server, direct)) for _ in range(3)]
        assert [next(s) for s in streams] == ["a", "a", "a"]
        assert len(server.identities) == 1  # one socket for all three
        assert streams[1].cancel() == "running"
        assert list(streams[1]) == [] and streams[1].cancelled  # ends quietly
        for s in (streams[0], streams[2]):
            s.close()  # cancels: the server is still "generating" (30 s to go)
        assert sorted(server.cancels) == sorted(s.request_id for s in streams)
    finally:
        server.close()


def test_more_open_streams_than_a_process_has_sockets(direct: DirectResults) -> None:
    """1100 streams open at once in one process: one socket each would stop at ZMQ's 1023
    (``Too many open files``); over the client's one connection they all run."""
    server = ScriptedServer([event("a", 1), DONE])
    try:
        streams = [Stream(_open(server, direct)) for _ in range(1100)]
        assert len(server.identities) == 1
        assert all(list(s) == ["a"] and s.result is not None for s in streams)
    finally:
        server.close()


def test_a_stream_dropped_unfinished_is_cancelled(direct: DirectResults) -> None:
    """``for chunk in fab.stream(...): break`` with no ``with``: once the stream is collected
    its request is cancelled at the server (before, it ran to ``max_tokens`` for nobody) and
    the connection goes on serving."""
    server = ScriptedServer([event("a", 1), 30.0, DONE])
    try:
        stream = Stream(_open(server, direct))
        rid = stream.request_id
        for _chunk in stream:
            break
        del stream
        wait_until(lambda: rid in server.cancels, 10, "the dropped stream's cancel")
        wait_until(lambda: not any(s.feeds for s in list(direct._servers.values())), 10,
                   "the dropped stream's feed to go")
        server.script = [event("b", 2), DONE]
        assert list(Stream(_open(server, direct))) == ["b"]
        assert server.cancels == [rid]  # a finished stream is not cancelled when dropped
    finally:
        server.close()
