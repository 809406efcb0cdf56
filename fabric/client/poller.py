"""``Poller``: one long-poll for all of a client's open requests at a site it cannot reach.

Behind Globus Compute every task is a web-service submission that the ``Executor`` rate-limits,
and a stream polled with a task per poll (or a cold start watched with a status task every two
seconds) would spend that budget per stream. The poller spends it per *client*:

.. code:: text

    track(open_stream's info, events=True|False)     watch(model)  (a cold start's status)
            \\                                              /
             one thread: a ``poll_requests`` task naming every tracked request not already in
             a task in flight, and the watched models; at most ``max_inflight`` tasks out at
             once, at least ``interval_s`` apart; the site holds each until there is news
             (``fabric.endpoint.relay``)
            <-- replies: a stream's events go to its queue; a final result (or typed error)
                settles its future; a status goes to its callback; the rest poll again

So the number of tasks grows with how often there is news, not with how many streams are
open. A request tracked while the tasks in flight hold the others joins the next one. The
thread ends after ``idle_exit_s`` with nothing to follow and starts again on the next
``track`` or ``watch``: a gateway keeps a client per caller, and a thread parked for ever in
each caller's poller would add up.

A site whose endpoint dies answers nothing, and Globus Compute keeps accepting (and holding)
tasks for it: without a bound its open requests would wait for ever. The site answers a poll
within ``wait_s``, so when tasks are out and none has come back for ``wait_s + lost_after_s``
the site counts as lost: the requests in those tasks fail with ``EndpointError`` (retryable),
and a late answer is dropped. Any answer, even to another task, shows the site alive: tasks
queued behind others at a busy endpoint do not trip it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fabric.client.transport import submit_or_fail
from fabric.errors import EndpointError, FabricError

if TYPE_CHECKING:
    from fabric.client.transport import Transport

log = logging.getLogger("fabric.client.poller")

WAIT_S = 10.0
"""How long the site holds a poll task with no news."""
MAX_PER_TASK = 512
"""Most requests one poll task names (the site takes up to 1024)."""
IDLE_EXIT_S = 30.0
"""How long the polling thread waits with nothing to follow before it ends."""
MAX_INFLIGHT = 2
"""Poll tasks out at once: one holds the open requests, one more lets a new request start
without waiting for the held one to come back."""
LOST_AFTER_S = 60.0
"""How long past a poll's hold (``wait_s``) the site may stay silent before it counts as lost."""


@dataclass
class Tracked:
    """One open request: its events (a stream) or its final result (a plain request)."""

    request_id: str
    model: str
    ticket: str
    cursor: int
    events: bool
    future: Future[dict[str, Any]] = field(default_factory=Future)
    """The final result's dict, or its typed error."""
    queue: queue.SimpleQueue[dict[str, Any] | BaseException] = field(
        default_factory=queue.SimpleQueue)
    """A stream's events, then ``{"op": "done", ...}`` or the error (``events=True`` only)."""
    covered: bool = False
    """In a poll task in flight now."""


@dataclass(eq=False)
class _Task:
    """One ``poll_requests`` task out: what it carries; settled once (answer or loss)."""

    batch: list[Tracked]
    watches: list[_Watch]
    settled: bool = False


@dataclass
class _Watch:
    model: str
    version: str | None
    callback: Callable[[dict[str, Any]], None]
    state: str | None = None


class Poller:
    """Multiplexes a client's open requests and status watches into few ``poll_requests``
    tasks (see the module doc). Thread-safe; one per transport."""

    def __init__(self, transport: Transport, auth: Any = None, *, wait_s: float = WAIT_S,
                 max_inflight: int = MAX_INFLIGHT, interval_s: float = 0.0,
                 idle_exit_s: float = IDLE_EXIT_S, lost_after_s: float = LOST_AFTER_S
                 ) -> None:
        self.transport = transport
        self.auth = auth
        self.wait_s = wait_s
        self.lost_after_s = lost_after_s
        self.max_inflight = max(1, max_inflight)
        self.interval_s = interval_s
        self.idle_exit_s = idle_exit_s
        self.tasks_submitted = 0
        """``poll_requests`` tasks sent so far (tests and benchmarks read it)."""
        self.requests_named = 0
        """Requests those tasks named, summed: over ``tasks_submitted``, how many open
        requests one poll served on average (1.0 would be a poll per request)."""
        self._open: dict[str, Tracked] = {}
        self._watches: dict[int, _Watch] = {}
        self._keys = itertools.count(1)
        self._watching = False  # the watches ride in a task in flight
        self._out: set[_Task] = set()
        self._heard = 0.0  # when the site last answered (or, with nothing out, was first asked)
        self._last_submit = 0.0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- what callers use -----------------------------------------------------------------

    def track(self, info: dict[str, Any], model: str, *, events: bool) -> Tracked:
        """Follow the request ``open_stream`` (mode ``poll``) admitted; ``events`` for a
        stream (its tokens as they come), else only its final result. Events, a result or an
        error the admission brought inline are delivered first."""
        tracked = Tracked(str(info["request_id"]), model, str(info["ticket"]),
                          int(info.get("cursor") or 0), events)
        if info.get("events") or info.get("done") or info.get("error"):
            # What the admission brought inline (``open_stream``'s hold) comes first.
            _deliver(tracked, info)
            if info.get("done") or info.get("error"):
                return tracked
        with self._cond:
            if self._closed:
                raise EndpointError("the poller is closed")
            self._open[tracked.request_id] = tracked
            self._ensure_thread()
            self._cond.notify_all()
        return tracked

    @property
    def busy(self) -> bool:
        """True while any request is being followed (a poll is, or is about to be, out)."""
        with self._cond:
            return bool(self._open)

    def forget(self, request_id: str) -> None:
        """Stop following a request (a stream closed or cancelled)."""
        with self._cond:
            self._open.pop(request_id, None)

    def watch(self, model: str, version: str | None,
              callback: Callable[[dict[str, Any]], None], state: str | None = None) -> int:
        """Report ``model``'s deployment state to ``callback`` when it is not ``state`` (the
        last one seen; folded into the polls); returns a key for ``unwatch``."""
        with self._cond:
            key = next(self._keys)
            self._watches[key] = _Watch(model, version, callback, state)
            self._ensure_thread()
            self._cond.notify_all()
        return key

    def unwatch(self, key: int) -> None:
        """Stop a status watch."""
        with self._cond:
            self._watches.pop(key, None)

    def close(self) -> None:
        """Stop polling; requests still open fail with ``EndpointError``."""
        with self._cond:
            self._closed = True
            pending, self._open = list(self._open.values()), {}
            self._cond.notify_all()
        for tracked in pending:
            _fail(tracked, EndpointError("the client closed its connection to the site"))

    # -- the polling thread ---------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name="fabric-poller")
            self._thread.start()

    def _loop(self) -> None:
        while True:
            lost: list[_Task] = []
            with self._cond:
                batch, watches = self._next_batch()
                idle_since: float | None = None
                while not self._closed and batch is None:
                    lost = self._lost()
                    if lost:
                        break
                    if self._open or self._watches or self._out:
                        idle_since = None
                        self._cond.wait(self._timeout())
                    else:
                        now = time.monotonic()
                        idle_since = now if idle_since is None else idle_since
                        if now - idle_since >= self.idle_exit_s:
                            self._thread = None  # the next track or watch starts one
                            return
                        self._cond.wait(idle_since + self.idle_exit_s - now)
                    batch, watches = self._next_batch()
                if self._closed:
                    return
                task = None if batch is None else self._start(batch, watches)
            for gone in lost:
                self._settle(gone, {}, EndpointError(
                    f"the site answered no poll for {self.wait_s + self.lost_after_s:.0f} s "
                    f"(it answers one within {self.wait_s:.0f} s): its endpoint is down or "
                    "cut off; retry later or at another site"), heard=False)
            if task is not None:
                self._submit(task)

    def _start(self, batch: list[Tracked], watches: list[_Watch]) -> _Task:
        """Count a task out (under the lock)."""
        task = _Task(batch, watches)
        now = time.monotonic()
        if not self._out:
            self._heard = now  # the silence is counted from the first task out
        self._out.add(task)
        self._last_submit = now
        self.tasks_submitted += 1
        self.requests_named += len(batch)
        return task

    def _lost(self) -> list[_Task]:
        """The tasks out, if the site has been silent too long (under the lock)."""
        silent = time.monotonic() - self._heard
        return list(self._out) if self._out and silent >= self._silence_s() else []

    def _silence_s(self) -> float:
        return self.wait_s + self.lost_after_s

    def _timeout(self) -> float | None:
        """How long the loop may sleep: until the next submission may go, or the site would
        count as lost."""
        waits = [w for w in (self._pause(),) if w is not None]
        if self._out:
            waits.append(max(0.0, self._heard + self._silence_s() - time.monotonic()))
        return min(waits) if waits else None

    def _pause(self) -> float | None:
        wait = self._last_submit + self.interval_s - time.monotonic()
        return wait if wait > 0 else None

    def _next_batch(self) -> tuple[list[Tracked] | None, list[_Watch]]:
        """What the next task carries (under the lock), or None while it must wait."""
        if len(self._out) >= self.max_inflight or (self._pause() or 0) > 0:
            return None, []
        batch = [t for t in self._open.values() if not t.covered][:MAX_PER_TASK]
        watches = [] if self._watching else list(self._watches.values())
        if not batch and not watches:
            return None, []
        for t in batch:
            t.covered = True
        self._watching = self._watching or bool(watches)
        return batch, watches

    def _submit(self, task: _Task) -> None:
        from fabric.wire.functions import poll_requests

        polls = [{"model": t.model, "request_id": t.request_id, "ticket": t.ticket,
                  "cursor": t.cursor, "events": t.events} for t in task.batch]
        statuses = [{"model": w.model, "version": w.version, "state": w.state}
                    for w in task.watches]
        fut = submit_or_fail(self.transport, poll_requests, polls, self.wait_s, statuses,
                             self.auth)
        fut.add_done_callback(lambda f: self._answered(f, task))

    def _answered(self, fut: Future[Any], task: _Task) -> None:
        try:
            reply, error = dict(fut.result()), None
        except BaseException as exc:  # the poll itself failed: its requests fail with it
            reply, error = {}, exc
        self._settle(task, reply, error)

    def _settle(self, task: _Task, reply: dict[str, Any], error: BaseException | None,
                heard: bool = True) -> None:
        """Deliver ``task``'s answer (or ``error`` to each of its requests), once; ``heard``:
        the site answered (False: it was counted lost)."""
        replies = reply.get("replies") or {}
        batch, watches = task.batch, task.watches
        with self._cond:
            if task.settled:  # its answer came after the site was counted lost: too late
                return
            task.settled = True
            self._out.discard(task)
            if heard:
                self._heard = time.monotonic()
            if watches:
                self._watching = False
            for t in batch:
                t.covered = False
                got = replies.get(t.request_id)
                if error is not None or (got is not None and got.get("done")):
                    self._open.pop(t.request_id, None)
                elif got is not None:
                    t.cursor = int(got.get("cursor", t.cursor))
            self._cond.notify_all()
        for t in batch:
            got = replies.get(t.request_id)
            if error is not None:
                _fail(t, error)
            elif got is not None:
                _deliver(t, got)
        for status in (reply.get("statuses") or {}).values():
            for w in watches:
                if w.model == status.get("model"):
                    w.state = status.get("state")
                    with contextlib.suppress(Exception):  # a caller's callback
                        w.callback(dict(status))
        if error is not None:
            for w in watches:  # the watcher asks again later
                log.debug("a status poll for %s failed: %s", w.model, error)
                with contextlib.suppress(Exception):
                    w.callback({})


def _deliver(t: Tracked, got: dict[str, Any]) -> None:
    if t.events:
        for event in got.get("events") or []:
            t.queue.put({"op": "event", **event})
    if got.get("error"):
        _fail(t, FabricError.from_dict(got["error"]))
    elif got.get("done"):
        result = dict(got.get("result") or {})
        if t.events:
            t.queue.put({"op": "done", "result": result})
        if not t.future.done():
            t.future.set_result(result)


def _fail(t: Tracked, err: BaseException) -> None:
    if t.events:
        t.queue.put(err)
    if not t.future.done():
        t.future.set_exception(err)
