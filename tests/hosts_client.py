"""A client run on one namespace host by ``tests/test_hosts_cluster.py``: streams a greedy
SmolLM2 answer from the site and prints JSON with the text, every ``connect()`` Python made
(the ``socket.connect`` audit event) and the remote addresses of every TCP connection this
process had open (or opening) each time a chunk arrived (``/proc/net/tcp`` matched against its
socket fds: this also sees ZMQ's connections, which its C threads open), so the test can see
where the client connected.

``python -m tests.hosts_client SITE STATE_DIR MODE PROMPT MAX_TOKENS``; MODE is ``poll`` (the
laptop: the site's long-poll path, as a client that cannot reach model servers) or ``direct``
(a login-node client: ZMQ straight to the server's advertised address).
"""

from __future__ import annotations

import json
import sys
from typing import Any

CONNECTS: list[str] = []
PEERS: set[str] = set()
_OPEN = {"01", "02", "03"}  # ESTABLISHED, SYN_SENT, SYN_RECV


def _tcp_peers() -> set[str]:
    """Remote IPv4 addresses of this process's open (or opening) TCP connections."""
    import ipaddress
    import os
    import socket
    import struct

    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            mine.add(link[8:-1])
    peers = set()
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if state in _OPEN and inode in mine:
                raw = struct.pack("<I", int(remote.split(":")[0], 16))
                peers.add(str(ipaddress.IPv4Address(socket.inet_ntoa(raw))))
    return peers


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect":
        CONNECTS.append(repr(args[1]))


def main(argv: list[str]) -> int:
    """Stream once and print ``{"text", "connects", "peers", "error"}`` as JSON."""
    sys.addaudithook(_audit)
    site, state_dir, mode, prompt, max_tokens = argv
    from fabric.client.fabric import Fabric
    from fabric.client.local import LocalTransport

    transport = LocalTransport(site, state_dir=state_dir, autostart=False)
    transport.can_reach_servers = mode == "direct"  # type: ignore[misc]
    out: dict[str, Any] = {"text": "", "connects": CONNECTS, "peers": [], "error": None}
    fab = Fabric(site, transport=transport)
    try:
        with fab.stream(prompt, model="smollm2-135m", max_tokens=int(max_tokens),
                        temperature=0.0) as stream:
            chunks = []
            for chunk in stream:
                PEERS.update(_tcp_peers())
                chunks.append(chunk)
            out["text"] = "".join(chunks)
    except Exception as exc:  # reported to the test, which decides
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        fab.close()
    out["peers"] = sorted(PEERS)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
