"""Raw wire access to a model server for chaos tests: any frames, any bytes, no validation.

``RawPeer`` is a CURVE ``DEALER`` that holds only the server's public key (what
``list_deployments`` hands to anyone): exactly what a hostile or careless peer has.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import zmq

from fabric.protocol import pack, unpack
from tests.plugins.servers import ServerHandle


class RawPeer:
    """One connection that sends whatever it is given and reads whatever comes back."""

    def __init__(self, server: ServerHandle) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        public, secret = zmq.curve_keypair()
        self.sock.curve_publickey, self.sock.curve_secretkey = public, secret
        self.sock.curve_serverkey = server.info["public_key"].encode()
        self.sock.linger = 0
        self.sock.connect(server.info["address"])

    def send_frames(self, frames: list[bytes]) -> None:
        """Send a multipart message of exactly these frames."""
        self.sock.send_multipart(frames)

    def send(self, message: Any) -> None:
        """One frame holding ``message`` as msgpack (any value, not only maps)."""
        self.sock.send(msgpack.packb(message, use_bin_type=True))

    def recv(self, timeout_s: float = 10.0) -> dict[str, Any] | None:
        """The next reply, or ``None`` if none came within ``timeout_s``."""
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return unpack(self.sock.recv())

    def drain(self, wait_s: float = 0.0) -> list[dict[str, Any]]:
        """Every reply that is already here (or arrives within ``wait_s``)."""
        out, deadline = [], time.monotonic() + wait_s
        while True:
            left = max(0.0, deadline - time.monotonic())
            if not self.sock.poll(int(left * 1000)):
                return out
            out.append(unpack(self.sock.recv()))

    def ask(self, message: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any] | None:
        """Send one map and return the first reply."""
        self.sock.send(pack(message))
        return self.recv(timeout_s)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(0)


def still_serves(server: ServerHandle, timeout_s: float = 30.0) -> None:
    """Assert the server answers health and serves a greedy request correctly."""
    client = server.client(timeout_s=timeout_s)
    assert client.health(timeout_s)["state"] == "ready"
    out = server.run(client, timeout_s=timeout_s, prompt="The cell", sampling={"max_tokens": 4})
    assert out["finish_reason"] in ("length", "eos") and out["token_ids"]
    assert server.alive()
