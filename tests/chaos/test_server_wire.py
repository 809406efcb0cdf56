"""Malformed wire messages from a peer that holds only the server's public key.

Each gets a typed error where the server can reply (or is dropped when it cannot), and the
front door keeps serving: it answers health and a valid request right after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.chaos.server_raw import RawPeer, still_serves
from tests.plugins.servers import ServerHandle

MiB = 1 << 20


@pytest.fixture(scope="module")
def server(model_server: Any, tiny_llama_dir: Path) -> ServerHandle:
    return model_server(tiny_llama_dir, name="tiny_llama", max_running=4)


def _forged(server: ServerHandle) -> str:
    raw, _ = server.ticket.rsplit(".", 1)
    return f"{raw}.é{'0' * 63}"


MESSAGES: dict[str, Any] = {
    "request-is-a-string": {"op": "submit", "ticket": "t", "request": "xyz"},
    "health-with-request": {"op": "health", "request": "x"},
    "not-a-map": [1, 2, 3],
    "op-not-a-string": {"op": ["submit"]},
    "unknown-op": {"op": "explode"},
    "no-op": {"request_id": "x"},
    "poll-bad-cursor": {"op": "poll", "ticket": "t", "request_id": "x", "cursor": "abc"},
    "cancel-id-is-map": {"op": "cancel", "ticket": "t", "request_id": {"a": 1}},
    "ticket-is-int": {"op": "submit", "ticket": 7, "request": {}},
    "ticket-bytes": {"op": "drain", "ticket": b"\xff\xfe.\x00"},
}


@pytest.mark.parametrize("name", list(MESSAGES))
def test_malformed_message_gets_typed_error(server: ServerHandle, name: str) -> None:
    peer = RawPeer(server)
    peer.send(MESSAGES[name])
    reply = peer.recv(10)
    peer.close()
    assert reply is not None, "the front door did not answer"
    assert reply["op"] == "error", reply
    assert reply["error"]["kind"] in ("InvalidRequest", "TicketInvalid"), reply
    still_serves(server)


def test_non_ascii_signature_is_ticket_invalid(server: ServerHandle) -> None:
    peer = RawPeer(server)
    for op in ({"op": "submit", "request": {"model": server.name, "prompt": "hi"}},
               {"op": "poll", "request_id": "x"}, {"op": "cancel", "request_id": "x"},
               {"op": "drain"}):
        reply = peer.ask({**op, "ticket": _forged(server)})
        assert reply is not None and reply["error"]["kind"] == "TicketInvalid", (op, reply)
    peer.close()
    still_serves(server)


@pytest.mark.parametrize("frames", [[b"a", b"b"], [b"", b"", b""], [b""]],
                         ids=["two-frames", "three-empty", "one-empty"])
def test_wrong_frame_count_gets_typed_error(server: ServerHandle, frames: list[bytes]) -> None:
    peer = RawPeer(server)
    peer.send_frames(frames)
    reply = peer.recv(10)
    peer.close()
    assert reply is not None and reply["error"]["kind"] == "InvalidRequest", reply
    still_serves(server)


def test_unauthenticated_request_learns_nothing(server: ServerHandle) -> None:
    """The ticket is checked before the request: a bad request with a bad ticket is
    refused for its ticket, so an unauthenticated peer cannot probe the validator."""
    peer = RawPeer(server)
    reply = peer.ask({"op": "submit", "ticket": "nope", "request": {"model": 5}})
    peer.close()
    assert reply is not None and reply["error"]["kind"] == "TicketInvalid", reply


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_oversize_frame_is_dropped_unread(server: ServerHandle) -> None:
    pid = int(server.info["pid"])
    before = _peak_rss(pid)
    peer = RawPeer(server)
    peer.send_frames([b"x" * (256 * MiB)])
    assert peer.recv(5) is None  # the connection is dropped, nothing is answered
    peer.close()
    still_serves(server)
    assert _peak_rss(pid) - before < 64 * MiB, "the server read the oversize frame"
