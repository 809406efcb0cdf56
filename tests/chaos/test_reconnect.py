"""A transport whose site died reconnects on its next call, whatever its I/O thread saw yet.

The CI failure of ``test_autostart_sigterm_and_cli``: after the site was restarted, an existing
transport's next call got ``EndpointError``. Two races: the call reused the dead site's
connection because the I/O thread had not yet noticed the exit (the write then broke), and the
old I/O thread, noticing late, failed every pending call, those already sent to the new site
too. Holding the transport's receive lock (as a thread waiting in ``result()`` does) keeps the
I/O thread from noticing, which makes the window as wide as the test needs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from fabric.client.local import LocalTransport, read_info
from fabric.errors import FabricError
from tests.chaos.common import report, stat, throwaway_site, worker_pid
from tests.plugins.site import REPO_ROOT, wait_until

pytestmark = pytest.mark.slow

ROUNDS = 2


def test_next_call_after_a_site_restart_reconnects(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "restarted"
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    typed = lost = 0
    with throwaway_site(folder, workers=1) as (state, _), \
            LocalTransport(site=str(folder), state_dir=state) as client:
        assert isinstance(client.submit(worker_pid).result(timeout=180), int)
        for _ in range(ROUNDS):
            assert client.info is not None
            dead = int(client.info["pid"])
            with client._recv_lock:  # as a waiter in result() holds it: the I/O thread waits
                os.kill(dead, signal.SIGKILL)
                wait_until(lambda d=dead: (stat(d) or ("X",))[0] in "ZX", 10, "the site to die")
                try:
                    fut = client.submit(worker_pid)  # starts a new site
                except FabricError:
                    typed += 1
                    continue
            try:
                lost += not isinstance(fut.result(timeout=180), int)
            except FabricError:
                typed += 1
            now = read_info(state)
            assert now is not None and now["pid"] != dead
    report("reconnect-after-restart", inputs=ROUNDS, typed_errors=typed, lost=lost)
    assert typed == 0 and lost == 0
