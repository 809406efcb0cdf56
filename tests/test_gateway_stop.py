"""``fabric serve`` interrupted (Ctrl-C) while a stream is open: the stream ends with a
retryable error event and the gateway exits at once, with no traceback in its log.

Before, the stream just stopped (no error event, no ``[DONE]``: the client read an incomplete
chunked body) after uvicorn's 5 s of graceful shutdown, and the log held a 55-line "Exception
in ASGI application ... CancelledError".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fabric import Fabric
from tests.plugins.site import (
    LONG_TOKENS,
    TINY_MODEL,
    assert_stopped_early,
    server_idle,
    server_pid,
)
from tests.plugins.throttle import throttle_process
from tests.test_gateway_unit import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fab(local_site: Any) -> Iterator[Fabric]:
    transport = local_site.transport()
    with Fabric(site=str(local_site.site_dir), transport=transport, on_status=None) as client:
        client.generate("The cell", model=TINY_MODEL, max_tokens=1)  # warm the server
        yield client


def test_ctrl_c_ends_open_streams_with_an_error_event(local_site: Any, fab: Fabric,
                                                      long_prompt: str, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fabric.cli.main", "serve", "--site", str(local_site.site_dir),
         "--port", str(port), "--home", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    before = server_idle(fab)["tokens_total"]
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": TINY_MODEL, "prompt": long_prompt, "max_tokens": LONG_TOKENS,
                "temperature": 0, "stream": True}
        events: list[str] = []
        with throttle_process(server_pid(fab)), \
                httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body,
                             timeout=60) as reply:
            for line in reply.iter_lines():
                if line:
                    events.append(line)
                    if len(events) == 1:
                        proc.send_signal(signal.SIGINT)
                        interrupted = time.monotonic()
        assert proc.wait(30) == 0
        exited = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = proc.stderr.read().decode() if proc.stderr else ""
    assert events[-1] != "data: [DONE]" and events[-1].startswith("data: {\"error\""), events
    error = json.loads(events[-1][len("data: "):])["error"]
    assert error["code"] == "gateway_stopping" and error["type"] == "server_error"
    assert exited < 4, f"gateway took {exited:.1f} s to exit (its graceful timeout is 5 s)"
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
    assert_stopped_early(fab, before)  # the generation was cancelled at the server
