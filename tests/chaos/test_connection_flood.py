"""1,100 idle connections to the site's socket: it refuses those over its limit and serves on.

Before the limit, ``accept()`` raised EMFILE once the site's descriptors ran out (a 1,024 soft
limit is the common default) and the site exited, orphaning its worker pool.
"""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import time
from pathlib import Path

import pytest

from fabric.client.local import LocalTransport, read_info
from tests.chaos.common import report, throwaway_site, worker_pid
from tests.plugins.site import wait_until

pytestmark = pytest.mark.slow

FLOOD = 1100
SITE_NOFILE = 1024
"""The site runs under this soft open-file limit (the common default), as in the report."""


@contextlib.contextmanager
def nofile(soft: int):  # type: ignore[no-untyped-def]
    """This process's soft open-file limit set to ``soft`` (children inherit it)."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < soft:
        pytest.fail(f"the open-file hard limit {hard} is under {soft}: raise it to run this")
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


def connect(sock: socket.socket, path: str, timeout_s: float = 30.0) -> None:
    """Connect, waiting while the site's accept queue is full (EAGAIN on a Unix socket)."""
    sock.setblocking(False)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def hung_up(sock: socket.socket) -> bool:
    """True if the site closed this connection (it refused it)."""
    poller = select.poll()  # select() cannot take descriptors past 1024
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except OSError:
        return True


def test_connection_flood_is_refused_not_fatal(tmp_path: Path) -> None:
    folder = tmp_path / "flood"
    crashes = lost = 0
    socks: list[socket.socket] = []
    with contextlib.ExitStack() as stack:
        with nofile(SITE_NOFILE):  # the site inherits it
            state, info = stack.enter_context(throwaway_site(folder, workers=1))
        stack.enter_context(nofile(max(FLOOD + 1024,
                                       resource.getrlimit(resource.RLIMIT_NOFILE)[0])))
        stack.callback(lambda: [sock.close() for sock in socks])
        client = stack.enter_context(LocalTransport(site=str(folder), state_dir=state,
                                                    autostart=False))
        assert isinstance(client.submit(worker_pid).result(timeout=180), int)
        for _ in range(FLOOD):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            connect(sock, info["socket"])

        def settled() -> dict[str, int] | None:
            status = client.control("status", health=False)
            return status if status["clients"] + status["refused"] >= FLOOD + 1 else None

        status = wait_until(settled, 60, "the site to take or refuse every connection")
        refused = int(status["refused"])
        seen = wait_until(lambda: sum(map(hung_up, socks)) >= refused, 30,
                          "the refused clients to see their connection closed")
        seen = sum(map(hung_up, socks))
        # The client that came first is served throughout, and the site lives on.
        lost += not isinstance(client.submit(worker_pid).result(timeout=60), int)
        now = read_info(state)
        crashes += now is None or now["pid"] != info["pid"]
        for sock in socks:
            sock.close()
        wait_until(lambda: client.control("status", health=False)["clients"] == 1, 30,
                   "the site to see the idle connections close")
        with LocalTransport(site=str(folder), state_dir=state, autostart=False) as late:
            lost += not isinstance(late.submit(worker_pid).result(timeout=60), int)
    report("connection-flood", inputs=FLOOD, refused=refused, refusals_seen=seen,
           crashes=crashes, lost=lost, max_clients=int(status["max_clients"]))
    assert crashes == 0 and lost == 0
    assert 0 < refused == seen and status["max_clients"] < FLOOD
