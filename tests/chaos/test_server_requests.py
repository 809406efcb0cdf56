"""One bad request gets a typed error; the model server goes on serving everyone else.

Each request here is sent as raw wire maps (as a client that skips the SDK's validation
would), so the server's own checks are what is tested; the same inputs built through
``InferenceRequest`` are refused before they leave the client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from fabric.errors import InvalidHook, InvalidRequest
from fabric.protocol import validate_request
from tests.chaos.server_raw import RawPeer, still_serves
from tests.plugins.servers import ServerHandle


@pytest.fixture(scope="module")
def server(model_server: Any, tiny_llama_dir: Path) -> ServerHandle:
    return model_server(tiny_llama_dir, name="tiny_llama", max_running=4)


def _submit(server: ServerHandle, **request: Any) -> dict[str, Any]:
    """Send one raw submit and return the server's final word on it (error or done)."""
    peer = RawPeer(server)
    try:
        body = {"model": server.name, "prompt": "The cell", **request}
        reply = peer.ask({"op": "submit", "ticket": server.ticket, "request": body}, 30)
        assert reply is not None, "the server did not answer a submit"
        if reply["op"] == "accepted":
            reply = peer.recv(60)
            assert reply is not None, "the server accepted the request but never finished it"
        return reply
    finally:
        peer.close()


def _kind(reply: dict[str, Any]) -> str:
    assert reply["op"] == "error", reply
    return str(reply["error"]["kind"])


HUGE_STEER = {"kind": "steer", "layer": 1, "vector": [1e30] * 64, "scale": 1.0}


@pytest.mark.parametrize(("request_", "kind", "says"), [
    ({"sampling": {"temperature": 1e-50, "max_tokens": 4}}, "InvalidRequest", "temperature"),
    ({"sampling": {"temperature": 0.7, "max_tokens": 4}, "hooks": [HUGE_STEER]},
     "InvalidHook", "steer"),
    ({"messages": [{"content": "hi"}], "prompt": None}, "InvalidRequest", "role"),
    ({"messages": [{"role": "wizard", "content": "hi"}], "prompt": None}, "InvalidRequest",
     "'user'"),
    ({"messages": [{"role": "user", "content": 3}], "prompt": None}, "InvalidRequest",
     "content"),
    ({"sampling": {"seed": 2**64 - 1, "max_tokens": 4}}, "InvalidRequest", "seed"),
    ({"sampling": {"max_tokens": 2**64 - 1}}, "InvalidRequest", "max_tokens"),
], ids=["tiny-temperature", "huge-steer", "no-role", "bad-role", "content-not-str",
        "seed-overflow", "max-tokens-overflow"])
def test_bad_request_is_typed_and_contained(server: ServerHandle, request_: dict[str, Any],
                                            kind: str, says: str) -> None:
    reply = _submit(server, **request_)
    assert _kind(reply) == kind, reply
    assert says in reply["error"]["message"], reply
    still_serves(server)


def test_undecodable_text_is_typed_and_contained(server: ServerHandle) -> None:
    """A lone surrogate cannot be valid UTF-8 on the wire: packed anyway, it is refused."""
    peer = RawPeer(server)
    body = {"model": server.name, "prompt": "a\ud800b"}
    frame = msgpack.packb({"op": "submit", "ticket": server.ticket, "request": body},
                          use_bin_type=True, unicode_errors="surrogatepass")
    peer.send_frames([frame])
    reply = peer.recv(30)
    peer.close()
    assert reply is not None and _kind(reply) == "InvalidRequest", reply
    still_serves(server)


@pytest.mark.parametrize(("fields", "says"), [
    ({"sampling": {"seed": 2**70}}, "seed"),
    ({"sampling": {"temperature": 1e-50}}, "temperature"),
    ({"prompt": "a\ud800b"}, "surrogate"),
    ({"prompt": None, "messages": [{"role": "user", "content": "\udfff"}]}, "surrogate"),
    ({"prompt": None, "messages": [{"content": "hi"}]}, "role"),
    ({"hooks": [HUGE_STEER]}, "steer"),
    ({"sampling": {"temperature": float("nan")}}, "temperature"),
], ids=["seed", "temperature", "surrogate", "surrogate-in-message", "no-role", "huge-steer",
        "nan"])
def test_client_side_validation_is_typed(fields: dict[str, Any], says: str) -> None:
    """The same inputs never leave the client: ``InvalidRequest`` naming the field."""
    with pytest.raises(InvalidRequest) as info:
        validate_request({"model": "m", "prompt": "hi", **fields})
    assert says in str(info.value)
    assert isinstance(info.value, InvalidRequest | InvalidHook)
