"""Health pings over kept connections (``fabric.endpoint.pings``), against a CURVE ROUTER
that answers ``health`` as a model server's front door does and counts its peers: one
connection per server, thread and process, and a fresh one after a ping that failed."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import zmq

from fabric.endpoint import pings
from fabric.protocol import pack, unpack


@dataclass
class HealthServer:
    """Answers every ``health`` with ``ready`` unless ``silent``; ``peers``: the connection
    identity of every ping it got."""

    address: str
    public_key: str
    peers: list[bytes] = field(default_factory=list)
    silent: threading.Event = field(default_factory=threading.Event)


@contextlib.contextmanager
def health_server() -> Iterator[HealthServer]:
    """A ``HealthServer`` on a loopback port, answering from its own thread."""
    ctx = zmq.Context.instance()
    public, secret = zmq.curve_keypair()
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server, sock.curve_secretkey, sock.linger = True, secret, 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    srv = HealthServer(f"tcp://127.0.0.1:{port}", public.decode())
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not sock.poll(50):
                continue
            peer, frame = sock.recv_multipart()
            assert unpack(frame)["op"] == "health"
            srv.peers.append(peer)
            if not srv.silent.is_set():
                sock.send_multipart([peer, pack({"op": "health", "state": "ready"})])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        stop.set()
        thread.join(5)
        sock.close(0)
        pings.forget(srv.address)


@pytest.fixture
def server() -> Iterator[HealthServer]:
    with health_server() as srv:
        yield srv


def test_pings_from_one_thread_share_a_connection(server: HealthServer) -> None:
    for _ in range(3):
        assert pings.health(server.address, server.public_key, 5.0) == {
            "op": "health", "state": "ready"}
    assert len(server.peers) == 3 and len(set(server.peers)) == 1


def test_each_thread_and_process_has_its_own(server: HealthServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert pings.health(server.address, server.public_key, 5.0) is not None
    other = threading.Thread(target=pings.health, args=(server.address, server.public_key,
                                                        5.0))
    other.start()
    other.join(10)
    real = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real + 1)  # as in a forked child
    assert pings.health(server.address, server.public_key, 5.0) is not None
    monkeypatch.setattr(os, "getpid", lambda: real)
    assert len(server.peers) == 3 and len(set(server.peers)) == 3


def test_a_failed_ping_drops_its_connection(server: HealthServer) -> None:
    assert pings.health(server.address, server.public_key, 5.0) is not None
    server.silent.set()
    assert pings.health(server.address, server.public_key, 0.3) is None
    server.silent.clear()
    # A new connection: the unanswered ping's reply can never be read as this one's.
    assert pings.health(server.address, server.public_key, 5.0) is not None
    assert server.peers[0] == server.peers[1] != server.peers[2]


def test_forget_closes_and_the_kept_are_bounded(server: HealthServer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert pings.health(server.address, server.public_key, 5.0) is not None
    pings.forget(server.address)
    assert pings.health(server.address, server.public_key, 5.0) is not None
    assert len(set(server.peers)) == 2  # forgotten: a new connection
    monkeypatch.setattr(pings, "MAX_KEPT", 1)
    with health_server() as second:
        assert pings.health(second.address, second.public_key, 5.0) is not None
        assert list(pings._kept()) == [(second.address, second.public_key)]
        assert pings.health(server.address, server.public_key, 5.0) is not None
    assert len(set(server.peers)) == 3  # the least recently used had been closed
