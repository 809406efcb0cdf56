"""A task's traceback that says the site's own machinery failed under it, not the function.

Parsl fails a task whose worker pool was lost with ``ManagerLost``, and every task once its
interchange exits with ``BadStateException``. Those are not the function's errors: retrying
helps. The embedded site re-codes such results before they leave it
(``fabric.endpoint.poolwatch.retype_lost``); a site under the ``globus-compute-endpoint``
daemon sends them as they are, and the Globus client re-codes them
(``fabric.globus.transport``). Both read them here.
"""

from __future__ import annotations

import re

__all__ = ["ENGINE_LOST", "POOL_LOST", "lost_failure"]

POOL_LOST = "WorkerPoolLost"
"""The error code of a task whose worker pool was lost under it (retrying helps)."""
ENGINE_LOST = "EngineLost"
"""The error code of a task failed because the interchange exited (retrying helps)."""
LOST = (
    (b"ManagerLost", re.compile(r"^parsl\.executors\.high_throughput\.errors\.ManagerLost\b",
                                re.M), POOL_LOST,
     "the site's worker pool was lost while it ran this task (the site starts a new one); "
     "retrying may help"),
    (b"BadStateException", re.compile(r"^parsl\.executors\.errors\.BadStateException\b", re.M),
     ENGINE_LOST, "the site's Parsl interchange exited under this task; retrying helps once "
                  "the site has started a new one (the embedded site does at the next call)"),
)
"""(quick check, the failure's traceback line, its code, what the client is told)."""


def lost_failure(text: str) -> tuple[str, str] | None:
    """``(code, message)`` if ``text`` (a task's remote traceback) is a failure of the site's
    own machinery (``ManagerLost``: its pool was lost; ``BadStateException``: its interchange
    exited), else None. The site re-codes such results (``retype_lost``); the Globus client,
    which gets them straight from a daemon-run endpoint, raises the same typed, retryable
    error for them (``fabric.globus.transport``)."""
    for quick, pattern, code, message in LOST:
        if quick.decode() in text and pattern.search(text):
            return code, message
    return None
