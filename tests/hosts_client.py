"""A client run on one namespace host by ``tests/test_hosts_cluster.py``: streams a greedy
SmolLM2 answer from the site and prints JSON with the text and every ``connect()`` this process
made (Python's ``socket.connect`` audit event), so the test can see where it connected.

``python -m tests.hosts_client SITE STATE_DIR MODE PROMPT MAX_TOKENS``; MODE is ``poll`` (the
laptop: the site's long-poll path, as a client that cannot reach model servers) or ``direct``
(a login-node client: ZMQ straight to the server's advertised address).
"""

from __future__ import annotations

import json
import sys
from typing import Any

CONNECTS: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect":
        CONNECTS.append(repr(args[1]))


def main(argv: list[str]) -> int:
    """Stream once and print ``{"text", "connects", "error"}`` as JSON."""
    sys.addaudithook(_audit)
    site, state_dir, mode, prompt, max_tokens = argv
    from fabric.client.fabric import Fabric
    from fabric.client.local import LocalTransport

    transport = LocalTransport(site, state_dir=state_dir, autostart=False)
    transport.can_reach_servers = mode == "direct"  # type: ignore[misc]
    out: dict[str, Any] = {"text": "", "connects": CONNECTS, "error": None}
    fab = Fabric(site, transport=transport)
    try:
        with fab.stream(prompt, model="smollm2-135m", max_tokens=int(max_tokens),
                        temperature=0.0) as stream:
            out["text"] = "".join(stream)
    except Exception as exc:  # reported to the test, which decides
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        fab.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
