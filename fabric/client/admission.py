"""``Admissions``: a client's admissions (``open_stream``) sent as few tasks as they can be.

Every hand-off call starts with an admission task at the site, and the site runs a task per
request worker at a time: 32 streams opened at once through 4 workers used to queue in 8
waves, and behind Globus Compute each admission is one more task for the ``Executor``'s rate
limit. So a client sends its admissions through one queue per (model, mode, hold):

.. code:: text

    admit(request) --> queue --(a slot free, the window over)--> one task:
                                    1 queued:  open_stream(request, ...)
                                    more:      open_streams([...])   (each its own answer)
         <-- its future: the request's info (or its own typed error)

At most ``slots`` admission tasks are in flight (the site's request workers: more would only
queue at the site); what arrives meanwhile queues, and each slot that frees takes its share of
the queue (``ceil(queued / slots)``, so the workers admit a burst side by side, not one worker
all of it). With ``window_s`` (remote sites, where a task costs a round trip of about a second
and one more submission under the ``Executor``'s rate limit) a queue waits that long for the
rest of a burst and then goes whole, in one task; on the local site a request that finds a
slot free goes at once.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fabric.client.transport import settle, submit_or_fail
from fabric.errors import FabricError

if TYPE_CHECKING:
    from fabric.client.transport import Transport

MAX_BATCH = 64
"""Most admissions in one task (the site takes up to 64)."""

Key = tuple[int, str, str | None, str, float, bool]
"""(id of the auth, model, version, mode, hold_s, first_events): what one task's admissions
share. The queue holds its auth, so no other auth object can take that id while it exists."""

_OWN: Any = object()
"""``admit``'s default auth: the one the ``Admissions`` was made with."""


@dataclass
class _Queue:
    since: float
    """When its oldest admission came."""
    auth: Any
    """The credentials its task is sent with."""
    items: list[tuple[dict[str, Any], Future[dict[str, Any]]]] = field(default_factory=list)


class Admissions:
    """Coalesces one client's admissions at one site (see the module doc). Thread-safe."""

    def __init__(self, transport: Transport, auth: Any, *, slots: int, window_s: float = 0.0,
                 batches: bool = True) -> None:
        """``slots``: admission tasks in flight at most; ``window_s``: how long a queue's
        first admission waits for others; ``batches``: False where the site cannot run
        ``open_streams`` (its operator registered the functions before it existed): then
        every admission is its own task, as before."""
        self.transport = transport
        self.auth = auth
        self.slots = max(1, int(slots))
        self.window_s = max(0.0, float(window_s))
        self.batches = batches
        self.tasks = 0
        """Admission tasks sent so far (tests and benchmarks read it)."""
        self._queues: dict[Key, _Queue] = {}
        self._inflight = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def admit(self, body: dict[str, Any], mode: str, hold_s: float = 0.0,
              first_events: bool = False, *, auth: Any = _OWN) -> Future[dict[str, Any]]:
        """Admit the request ``body`` (an ``InferenceRequest`` as JSON) with ``auth`` (by
        default the one given at construction: ``with_auth`` twins share one queue and pass
        their own; a task never mixes two); the future holds what ``open_stream`` returns."""
        auth = self.auth if auth is _OWN else auth
        if not self.batches:
            return self._send_one(body, mode, hold_s, first_events, auth)
        future: Future[dict[str, Any]] = Future()
        key: Key = (id(auth), str(body.get("model")), body.get("version"), mode, float(hold_s),
                    bool(first_events))
        with self._cond:
            if self._closed:
                from fabric.errors import EndpointError

                raise EndpointError("the client is closed")
            queue = self._queues.setdefault(key, _Queue(time.monotonic(), auth))
            queue.items.append((body, future))
            self._ensure_thread()
            self._cond.notify_all()
        return future

    def close(self) -> None:
        """Stop; admissions still queued fail with ``EndpointError``."""
        from fabric.errors import EndpointError

        with self._cond:
            self._closed = True
            queues, self._queues = list(self._queues.values()), {}
            self._cond.notify_all()
        for queue in queues:
            for _, future in queue.items:
                settle(future, exc=EndpointError("the client closed its connection"))

    # -- the sending thread ------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name="fabric-admissions")
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                ready = self._next()
                while not self._closed and ready is None:
                    self._cond.wait(self._pause())
                    ready = self._next()
                if self._closed or ready is None:
                    return
                self._inflight += 1
                self.tasks += 1
            self._send(*ready)

    def _pause(self) -> float | None:
        """How long until the oldest queue's window is over (None: wait to be told)."""
        if self._inflight >= self.slots or not self._queues:
            return None
        oldest = min(q.since for q in self._queues.values())
        return max(0.001, oldest + self.window_s - time.monotonic())

    def _next(self) -> tuple[Key, Any, list[tuple[dict[str, Any], Future[dict[str, Any]]]]
                             ] | None:
        """The share of the oldest queue whose window is over, to send now (under the lock),
        or None while no slot is free or nothing may go."""
        if self._inflight >= self.slots:
            return None
        now = time.monotonic()
        # Dicts keep insertion order: the first due queue is the oldest.
        key = next((k for k, q in self._queues.items()
                    if now >= q.since + self.window_s or len(q.items) >= MAX_BATCH), None)
        if key is None:
            return None
        queue = self._queues[key]
        # Gathered in a window: all of it in one task (one submission, one worker). Queued
        # behind busy slots: this slot's share, so the workers admit the rest side by side.
        take = min(MAX_BATCH, len(queue.items) if self.window_s
                   else math.ceil(len(queue.items) / self.slots))
        items, queue.items = queue.items[:take], queue.items[take:]
        if not queue.items:
            del self._queues[key]
        return key, queue.auth, items

    def _send(self, key: Key, auth: Any,
              items: list[tuple[dict[str, Any], Future[dict[str, Any]]]]) -> None:
        _, _, _, mode, hold_s, first_events = key
        if len(items) == 1:
            body, out = items[0]
            fut = self._send_one(body, mode, hold_s, first_events, auth)

            def one_done(f: Future[Any]) -> None:
                self._done()
                _copy(f, out)

            fut.add_done_callback(one_done)
            return
        from fabric.wire.functions import open_streams

        batch = [{"request": body, "mode": mode, "hold_s": hold_s, "first_events": first_events}
                 for body, _ in items]
        fut = submit_or_fail(self.transport, open_streams, batch, auth)

        def batch_done(f: Future[Any]) -> None:
            self._done()
            _settle(f, items)

        fut.add_done_callback(batch_done)

    def _send_one(self, body: dict[str, Any], mode: str, hold_s: float,
                  first_events: bool, auth: Any) -> Future[Any]:
        from fabric.wire.functions import open_stream

        args: tuple[Any, ...] = (body, auth, mode, hold_s)
        if first_events:
            args += (True,)
        return submit_or_fail(self.transport, open_stream, *args)

    def _done(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()


def _copy(inner: Future[Any], outer: Future[dict[str, Any]]) -> None:
    try:
        value = dict(inner.result())
    except BaseException as exc:
        settle(outer, exc=exc)
        return
    settle(outer, value)


def _settle(fut: Future[Any], items: list[tuple[dict[str, Any], Future[dict[str, Any]]]]
            ) -> None:
    """Each queued admission's own answer from an ``open_streams`` reply (all fail together
    only when the task itself failed)."""
    try:
        answers = list(fut.result())
        if len(answers) != len(items):
            raise FabricError(f"open_streams answered {len(answers)} admissions of "
                              f"{len(items)}")
    except BaseException as exc:
        for _, out in items:
            settle(out, exc=exc)
        return
    for (_, out), answer in zip(items, answers, strict=True):
        if answer.get("error"):
            settle(out, exc=FabricError.from_dict(answer["error"]))
        else:
            settle(out, dict(answer.get("info") or {}))
