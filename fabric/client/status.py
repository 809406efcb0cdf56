"""What the SDK says while a call waits for a model server (queued, loading, ...)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import IO, Any

StatusCallback = Callable[[dict[str, Any]], None]
"""Called with a deployment-status dict (``state``: queued/loading/ready/dead, ``queue_position``,
...) while a call waits for a model server."""

log = logging.getLogger("fabric.client")


class StatusPrinter:
    """Default ``on_status``: one stderr line per change of a deployment's state.

    A cold start can take minutes at a real site; a silent call looks like a hang, so by
    default the SDK says what it is waiting for (``Fabric(on_status=None)`` keeps it quiet).
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream
        self._last: dict[str, str] = {}

    def __call__(self, status: dict[str, Any]) -> None:
        model = str(status.get("model", "?"))
        line = describe_status(status)
        if self._last.get(model) == line:
            return
        self._last[model] = line
        log.info("model server %s: %s", model, line)
        print(f"fabric: {model}: {line}", file=self._stream or sys.stderr, flush=True)


def describe_status(status: dict[str, Any]) -> str:
    """One human line for a deployment-status dict (what a spinner shows)."""
    state = str(status.get("state") or "absent")
    job = f" (job {status['job_id']})" if status.get("job_id") else ""
    if state == "absent":
        return "launching a model server"
    if state == "starting-site":
        return "starting the site process (first use)"
    if state == "queued":
        line = "queued in the batch scheduler"
        if status.get("queue_position") is not None:
            line += f", position {status['queue_position']}"
        if status.get("estimated_start"):
            line += f", estimated start {status['estimated_start']}"
        if status.get("job_reason"):
            line += f" ({status['job_reason']})"
        return line + job
    if state == "loading":
        return "loading the model" + job
    if state == "dead" and status.get("message"):
        return f"dead: {status['message']}"
    return state + job
