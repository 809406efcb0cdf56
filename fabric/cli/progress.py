"""A spinner that tells the user why the CLI is waiting (queued, loading a model, ...).

A cold start at a real site can sit in a batch queue and then spend minutes loading weights; a
silent terminal looks like a hang. On a terminal the spinner is a rich status line that
disappears when the first output arrives; when stderr is not a terminal (logs, CI, pipes) each
change of state is written once as a plain line instead of an animation.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import IO, Any

from fabric.client.status import describe_status

__all__ = ["StatusSpinner"]


class StatusSpinner:
    """Shows deployment status while waiting; pass ``update`` as ``Fabric(on_status=...)``.

    Nothing is shown until the first status arrives (the SDK reports only calls that are slow),
    so warm requests print no spinner at all.
    """

    def __init__(self, label: str, stream: IO[str] | None = None) -> None:
        self.label = label
        self._stream = stream if stream is not None else sys.stderr
        self._animated = bool(getattr(self._stream, "isatty", lambda: False)())
        self._status: Any = None
        self._last = ""
        self._stopped = False

    def update(self, status: dict[str, Any]) -> None:
        """Show one deployment-status dict (see ``fabric.client.status.describe_status``)."""
        if self._stopped:
            return
        line = f"{self.label}: {describe_status(status)}"
        if line == self._last:
            return
        self._last = line
        if not self._animated:
            print(line, file=self._stream, flush=True)
            return
        if self._status is None:
            from rich.console import Console

            console = Console(file=self._stream)
            self._status = console.status(line, spinner="dots")
            self._status.start()
        else:
            self._status.update(line)

    def message(self, text: str) -> None:
        """Show a free-form line (e.g. "submitting job") in the same place."""
        self.update({"state": text})

    def stop(self) -> None:
        """Remove the spinner (idempotent); later updates are ignored."""
        self._stopped = True
        if self._status is not None:
            self._status.stop()
            self._status = None

    def __enter__(self) -> StatusSpinner:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
