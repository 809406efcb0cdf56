"""A live progress display for a campaign, fed by polling its ledger.

The display reads the ledger rather than hooking into the runner, so it works the same for a
campaign run in this process and one run by the site's scheduler. On a terminal it is a rich
progress bar (done / total, errors, tokens/s, ETA); elsewhere one plain line every few seconds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

from fabric.campaign import store
from fabric.campaign.ledger import TERMINAL_STATUSES

StatusFn = Callable[[], dict[str, Any]]


def watch(folder: Any, *, stream: IO[str] | None = None, poll_s: float = 0.5,
          until: Callable[[dict[str, Any]], bool] | None = None,
          line_every_s: float = 5.0) -> dict[str, Any]:
    """Show progress until ``until(status)`` (default: a final status); returns the status."""
    stream = stream if stream is not None else sys.stderr
    finished = until or store.is_final
    if not getattr(stream, "isatty", lambda: False)():
        return _plain(folder, stream, poll_s, finished, line_every_s)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(file=stream)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(folder.name, total=None, info="")
        while True:
            status = store.status(folder)
            bar.update(task, total=status["total"], completed=status["done"] + status["failed"],
                       info=describe(status))
            if finished(status):
                return status
            time.sleep(poll_s)


def describe(status: dict[str, Any], counts: bool = True) -> str:
    """One line: the state, failures and inputs in flight (``counts``), the rates (tokens
    are prompt plus completion), and the time left while it runs."""
    parts = [f"{status['failed']} failed, {status['running']} in flight"] if counts else []
    parts.append(f"{status['tokens_per_s']:.0f} tokens/s (prompt + completion), "
                 f"{status['inputs_per_s']:.1f} inputs/s")
    if status["status"] not in TERMINAL_STATUSES:
        eta = status.get("eta_s")
        parts.append(f"ETA {'?' if eta is None else _duration(float(eta))}")
    return f"{status['status']}: " + ", ".join(parts)


def _plain(folder: Any, stream: IO[str], poll_s: float, finished: Callable[[dict[str, Any]],
           bool], every_s: float) -> dict[str, Any]:
    last = 0.0
    while True:
        status = store.status(folder)
        done = finished(status)
        if done or time.monotonic() - last >= every_s:
            last = time.monotonic()
            print(f"{status['name']}: {status['done'] + status['failed']}/{status['total']}  "
                  f"{describe(status)}", file=stream, flush=True)
        if done:
            return status
        time.sleep(poll_s)


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
