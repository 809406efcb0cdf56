"""``CallScope``: stop, from another thread, a blocking call and the request it waits on.

``AsyncFabric`` runs ``Fabric.generate`` (and ``chat``, ``logprobs``, ``hidden_states``) on a
pool thread. When the task awaiting it is cancelled (``asyncio.wait_for``, ``task.cancel()``,
a failing ``TaskGroup``, a gateway client that hung up) it cancels the call's scope::

    event loop                          pool thread
    scope = CallScope()
    pool.submit(scope.run, fab.generate, ...)
                                        Fabric._run: start(request_future) --> watched
    task cancelled: scope.cancel()  --> the request's future cancelled: cancelled at the
                                        server (``RequestPath.future``); the call raises
                                        ``concurrent.futures.CancelledError`` and its thread
                                        is free at once

A call made outside any scope (plain ``Fabric``) is untouched. A federation's call starts a
future per site it tries: each is watched, and once the scope is cancelled no further site is
tried.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from contextvars import ContextVar
from typing import Any, TypeVar

__all__ = ["CallScope", "start"]

T = TypeVar("T")

_CURRENT: ContextVar[CallScope | None] = ContextVar("fabric_call_scope", default=None)


class CallScope:
    """The requests one call started, so that another thread can cancel them (see the
    module doc). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: list[Future[Any]] = []
        self.cancelled = False
        """True once ``cancel`` was called."""

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` with this scope current (on this thread)."""
        token = _CURRENT.set(self)
        try:
            return fn(*args, **kwargs)
        finally:
            _CURRENT.reset(token)

    def cancel(self) -> None:
        """Cancel every request the call started and any it would start later."""
        with self._lock:
            self.cancelled = True
            futures, self._futures = self._futures, []
        for future in futures:
            future.cancel()

    def _start(self, make: Callable[[], Future[T]]) -> Future[T]:
        if self.cancelled:
            raise CancelledError()  # nothing sent
        future = make()
        with self._lock:
            if not self.cancelled:
                self._futures.append(future)
                return future
        future.cancel()  # cancelled while it was being sent
        return future


def start(make: Callable[[], Future[T]]) -> Future[T]:
    """``make()``, a request's future whose ``cancel`` stops the request, watched by the
    current scope if there is one: cancelling the scope cancels it. In a scope already
    cancelled nothing is made and ``concurrent.futures.CancelledError`` is raised."""
    scope = _CURRENT.get()
    return make() if scope is None else scope._start(make)
