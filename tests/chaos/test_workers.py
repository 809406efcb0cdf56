"""The site runs as many request workers as it says it does.

With Parsl's default of one core per worker, a 2-core machine got 2 request workers while the
site was configured with (and ``fabric endpoint status`` showed) 4.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fabric.client.local import LocalTransport, site_status
from tests.chaos.common import report, throwaway_site

pytestmark = pytest.mark.slow

WORKERS = min((os.cpu_count() or 1) + 1, 17)
"""More workers than cores (the case that fell short), but not a crowd on a big machine."""


def busy_pid(seconds: float) -> int:
    """Hold a worker for ``seconds``: tasks that overlap must run in different workers."""
    time.sleep(seconds)
    return os.getpid()


def test_the_configured_workers_all_run(tmp_path: Path) -> None:
    folder = tmp_path / "workers"
    with throwaway_site(folder, workers=WORKERS) as (state, _), \
            LocalTransport(site=str(folder), state_dir=state, autostart=False) as client:
        status = site_status(str(folder), state, health=False)
        assert status is not None and status["workers"] == WORKERS
        client.submit(busy_pid, 0.0).result(timeout=180)  # the pool is up
        started = time.monotonic()
        futures = [client.submit(busy_pid, 4.0) for _ in range(WORKERS)]
        pids = {f.result(timeout=120) for f in futures}
        took = time.monotonic() - started
    report("request-workers", inputs=WORKERS, lost=WORKERS - len(pids), workers_seen=len(pids))
    assert len(pids) == WORKERS, f"{len(pids)} workers ran {WORKERS} overlapping tasks"
    assert took < 4.0 * 2, "the tasks did not overlap"
