"""Collecting the tokens servers counted on streams, after an admission has answered.

An admission (``open_stream``, ``open_streams``) collects the earlier streams' usage from the
servers it used (``DeploymentManager.collect_usage``: an operator ticket, a CURVE handshake
and a ``usage`` round trip per server, 2-3 ms on this VM). Done before the task returned,
every admission's answer, and so every user's first token, waited for it. Now the task hands
the deployments to this process's collector and returns; one daemon thread collects:

.. code:: text

    admission task:  admit ... answer -> COLLECTOR.soon(manager, deps)    (returns at once)
    collector thread:   DELAY_S later: collect_usage(dep) for each pending deployment
    a token quota:   COLLECTOR.join() before it counts (``policy._admit``)

A token quota sees what it saw before: the admission that asked for a collection answered
before it ran in either case, and the next quota check in this process waits for it. The
site's reaper still collects from every server every few seconds (``site._reap_loop``). A
worker killed outright loses only what a collection under way had taken (as before): a
server keeps its entries until a collection takes them.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("fabric.endpoint.collector")

JOIN_TIMEOUT_S = 10.0
"""Longest ``join`` waits: a collection asks each server once with a 3 s timeout."""
DELAY_S = 0.05
"""How long a collection waits after it is asked for: the task's answer goes out first (a
collector thread holding the GIL would hold it back up to the 5 ms switch interval), and the
admissions of a burst share one collection."""


class _Collector:
    """The pending collections of this process and the one thread that runs them."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # Also after a fork: the child starts with nothing pending, no thread, fresh locks.
        self._cond = threading.Condition()
        self._pending: dict[str, tuple[Any, Any]] = {}
        self._busy = False
        self._now = False  # a join is waiting: skip the delay
        self._thread: threading.Thread | None = None

    def soon(self, manager: Any, deps: Iterable[Any]) -> None:
        """Collect the usage of ``deps`` (deployments) with ``manager`` on the collector
        thread; a deployment already pending is collected once."""
        with self._cond:
            for dep in deps:
                if dep is not None:
                    self._pending[dep.id] = (manager, dep)
            if not self._pending:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="fabric-usage-collector")
                self._thread.start()
            self._cond.notify_all()

    def join(self, timeout_s: float = JOIN_TIMEOUT_S) -> bool:
        """Wait until every collection asked for so far has run; False on timeout."""
        with self._cond:
            if self._pending:
                self._now = True
                self._cond.notify_all()
            return self._cond.wait_for(lambda: not self._pending and not self._busy,
                                       timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending))
                self._cond.wait_for(lambda: self._now, DELAY_S)
                batch, self._pending = list(self._pending.values()), {}
                self._busy, self._now = True, False
            try:
                for manager, dep in batch:
                    try:
                        manager.collect_usage(dep)
                    except Exception:  # the server keeps its entries; the reaper retries
                        log.debug("collecting usage from %s failed", dep.id, exc_info=True)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


COLLECTOR = _Collector()
os.register_at_fork(after_in_child=COLLECTOR._reset)
atexit.register(COLLECTOR.join)
