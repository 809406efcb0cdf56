"""Health pings to model servers over kept connections: one per server, thread and process.

Every admission checks its warm server with a health ping (``DeploymentManager.refresh``,
``quick``). A fresh ``ServerClient`` per ping pays a TCP connect and a CURVE handshake: 1.9 ms
of the 3.7 ms an admission took at the site on this VM. A kept connection pays one round
trip. Connections are kept per thread (a ``ServerClient`` is not thread-safe) and per
process (a zmq socket must not cross a fork). One whose ping fails is closed and forgotten,
so a late reply is never read as the next ping's answer; at most ``MAX_KEPT`` are kept per
thread, the least recently used closed first.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from fabric.errors import FabricError

MAX_KEPT = 16
"""Connections one thread keeps (servers it pinged lately)."""

_LOCAL = threading.local()


def health(address: str, public_key: str, timeout_s: float) -> dict[str, Any] | None:
    """The server's health reply, or None if it does not answer within ``timeout_s``."""
    from fabric.serverclient import ServerClient

    kept = _kept()
    key = (address, public_key)
    client = kept.pop(key, None) or ServerClient(address, public_key, timeout_s=timeout_s)
    try:
        reply = dict(client.health(timeout_s))
    except BaseException as exc:
        client.close()
        if isinstance(exc, FabricError):
            return None
        raise
    kept[key] = client  # most recently used last
    while len(kept) > MAX_KEPT:
        kept.pop(next(iter(kept))).close()
    return reply


def forget(address: str) -> None:
    """Close this thread's kept connections to ``address`` (its server is gone)."""
    kept = _kept()
    for key in [k for k in kept if k[0] == address]:
        kept.pop(key).close()


def _kept() -> dict[tuple[str, str], Any]:
    if getattr(_LOCAL, "pid", None) != os.getpid():
        # A child of a fork: the parent's sockets are not this process's to use or close.
        _LOCAL.pid, _LOCAL.clients = os.getpid(), {}
    clients: dict[tuple[str, str], Any] = _LOCAL.clients
    return clients
