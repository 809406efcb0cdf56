"""The torch.distributed rendezvous port, chosen where the master rank runs.

A port probed on the submitting host (the login node) says nothing about the compute node that
runs rank 0: it may be taken there, and a probe-then-rebind is racy even on one host. So rank 0
binds the rendezvous store on port 0 on its own node (the kernel picks a free port, with no
window for another process to take it) and publishes ``{token, addr, port}`` in the job's run
folder (next to the info file, on the file system every rank already reads ``launch.json``
from). The other ranks wait for that file, with the launch's token so a file from an earlier
launch is never used, and connect. A Slurm requeue rewrites the file with the same token: a
rank that read the old one fails to connect within ``connect_s`` and reads it again.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from fabric.errors import RendezvousTimeout


def publish(path: Path, token: str, addr: str, port: int) -> None:
    """Atomically write the rendezvous file (rank 0)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"token": token, "addr": addr, "port": port}))
    tmp.replace(path)


def read(path: Path, token: str) -> tuple[str, int] | None:
    """``(addr, port)`` from the rendezvous file if it belongs to this launch, else ``None``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("token") != token:
        return None
    return str(data["addr"]), int(data["port"])


def master_store(path: Path, token: str, addr: str, world: int,
                 timeout: timedelta) -> dist.TCPStore:
    """Rank 0: bind the store on a free port of this node and publish ``addr`` and the port."""
    store = dist.TCPStore(addr, 0, world, True, timeout=timeout, wait_for_workers=False)
    publish(path, token, addr, int(store.port))
    return store


def client_store(path: Path, token: str, world: int, timeout: timedelta,
                 connect_s: float = 10.0, poll_s: float = 0.2) -> tuple[str, dist.TCPStore]:
    """Other ranks: wait for this launch's rendezvous file and connect to the store it names.

    Bounded by ``timeout`` overall; each connection try by ``connect_s``. Returns the master's
    address (for choosing the socket interface) and the store.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    last: Exception | None = None
    while time.monotonic() < deadline:
        found = read(path, token)
        if found is None:
            time.sleep(poll_s)
            continue
        addr, port = found
        left = max(1.0, min(connect_s, deadline - time.monotonic()))
        try:
            return addr, dist.TCPStore(addr, port, world, False,
                                       timeout=timedelta(seconds=left))
        except (RuntimeError, OSError) as exc:  # a stale port (requeued job): read again
            last = exc
            time.sleep(poll_s)
    raise RendezvousTimeout(f"no rendezvous from rank 0 in {path} within "
                            f"{timeout.total_seconds():.0f} s" + (f" ({last})" if last else ""),
                            path=str(path))
