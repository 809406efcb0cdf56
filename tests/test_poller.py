"""``fabric.client.poller.Poller`` against a scripted site: many open requests, few tasks.

The site side (``poll_requests``) is played by a transport that answers each poll task after a
short hold with one new event per named stream (done at the fifth), so the test sees exactly
what the poller sends: how many tasks, how many at once, and what each names.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from fabric.client.poller import Poller
from fabric.errors import AccessDenied, EndpointError

EVENTS = 5


class ScriptedSite:
    """Answers ``poll_requests`` tasks after ``hold_s``; records what each carried."""

    can_reach_servers = False
    site = "scripted"

    def __init__(self, hold_s: float = 0.02, fail: Exception | None = None,
                 first_hold_s: dict[str, float] | None = None) -> None:
        self.hold_s = hold_s
        self.fail = fail
        self.first_hold_s = dict(first_hold_s or {})
        """A longer hold for the first task naming a request (a task queued at the site)."""
        self.answering = threading.Event()
        """Cleared: the site is silent (answers wait until it is set again)."""
        self.answering.set()
        self.tasks: list[list[str]] = []
        self.inflight = 0
        self.most_inflight = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], polls: list[dict[str, Any]], wait_s: float,
               statuses: list[dict[str, Any]], auth: Any) -> Future[Any]:
        assert fn.__name__ == "poll_requests"
        with self._lock:
            self.tasks.append([p["request_id"] for p in polls])
            self.inflight += 1
            self.most_inflight = max(self.most_inflight, self.inflight)
        fut: Future[Any] = Future()
        hold = max([self.first_hold_s.pop(p["request_id"], self.hold_s) for p in polls]
                   or [self.hold_s])

        def answer() -> None:
            time.sleep(hold)
            self.answering.wait()
            with self._lock:
                self.inflight -= 1
            if self.fail is not None:
                fut.set_exception(self.fail)
                return
            replies = {}
            for p in polls:
                cursor = p["cursor"] + 1
                done = cursor >= EVENTS
                replies[p["request_id"]] = {
                    "events": [{"text": f"{p['request_id']}:{cursor}"}] if p["events"] else [],
                    "cursor": cursor, "done": done,
                    "result": {"text": p["request_id"]} if done else None, "error": None}
            states = {s["model"]: {"model": s["model"], "state": "loading"} for s in statuses
                      if s["state"] != "loading"}
            fut.set_result({"replies": replies, "statuses": states})

        threading.Thread(target=answer, daemon=True).start()
        return fut

    def close(self) -> None:
        pass


def _drain(tracked: Any) -> list[Any]:
    out = []
    while True:
        item = tracked.queue.get(timeout=10)
        out.append(item)
        if isinstance(item, BaseException) or item.get("op") == "done":
            return out


def test_many_open_requests_cost_tasks_per_round_not_per_request() -> None:
    site = ScriptedSite()
    poller = Poller(site, wait_s=1.0)  # type: ignore[arg-type]
    try:
        streams = [poller.track({"request_id": f"s{i}", "ticket": "t"}, "m", events=True)
                   for i in range(10)]
        plain = [poller.track({"request_id": f"r{i}", "ticket": "t"}, "m", events=False)
                 for i in range(10)]
        for i, t in enumerate(streams):
            got = _drain(t)
            assert [e["text"] for e in got[:-1]] == [f"s{i}:{k}" for k in range(1, EVENTS + 1)]
            assert got[-1] == {"op": "done", "result": {"text": f"s{i}"}}
        assert [t.future.result(timeout=10) for t in plain] == [
            {"text": f"r{i}"} for i in range(10)]
    finally:
        poller.close()
    # 20 requests x 5 polls each would be 100 tasks polled one by one.
    assert len(site.tasks) <= 3 * EVENTS, len(site.tasks)
    assert site.most_inflight <= 2
    assert poller.tasks_submitted == len(site.tasks)


def test_the_thread_ends_when_idle_and_starts_again_on_demand() -> None:
    """A gateway keeps a client per caller: an idle poller must not keep a thread."""
    site = ScriptedSite(hold_s=0.0)
    poller = Poller(site, idle_exit_s=0.2)  # type: ignore[arg-type]
    try:
        for name in ("a", "b"):
            tracked = poller.track({"request_id": name, "ticket": "t"}, "m", events=True)
            assert _drain(tracked)[-1] == {"op": "done", "result": {"text": name}}
            thread = poller._thread
            assert thread is not None
            thread.join(timeout=10)
            assert not thread.is_alive() and poller._thread is None
    finally:
        poller.close()


def test_interval_paces_the_tasks() -> None:
    site = ScriptedSite(hold_s=0.0)
    poller = Poller(site, interval_s=0.2)  # type: ignore[arg-type]
    t0 = time.monotonic()
    try:
        tracked = poller.track({"request_id": "a", "ticket": "t"}, "m", events=True)
        _drain(tracked)
    finally:
        poller.close()
    # 5 rounds at least 0.2 s apart after the first.
    assert time.monotonic() - t0 >= 0.2 * (EVENTS - 1) - 0.05


def test_a_failed_poll_fails_its_requests_typed() -> None:
    site = ScriptedSite(fail=AccessDenied("no", rule="policy.default"))
    poller = Poller(site)  # type: ignore[arg-type]
    try:
        stream = poller.track({"request_id": "a", "ticket": "t"}, "m", events=True)
        plain = poller.track({"request_id": "b", "ticket": "t"}, "m", events=False)
        (err,) = _drain(stream)
        assert isinstance(err, AccessDenied) and err.details == {"rule": "policy.default"}
        with pytest.raises(AccessDenied):
            plain.future.result(timeout=10)
    finally:
        poller.close()


def test_status_watch_rides_the_poll_and_reports_changes() -> None:
    site = ScriptedSite()
    poller = Poller(site)  # type: ignore[arg-type]
    heard: list[dict[str, Any]] = []
    done = threading.Event()

    def callback(status: dict[str, Any]) -> None:
        heard.append(status)
        done.set()

    try:
        key = poller.watch("m", None, callback)
        assert done.wait(10)
        poller.unwatch(key)
    finally:
        poller.close()
    assert heard[0] == {"model": "m", "state": "loading"}


def test_a_silent_site_fails_its_open_requests_and_a_late_answer_is_dropped() -> None:
    """A site whose endpoint died answers no poll (Globus Compute holds the tasks): after
    ``wait_s + lost_after_s`` of silence the open requests fail with a retryable
    ``EndpointError`` instead of waiting for ever; answers that come later are dropped, and
    the poller serves new requests once the site answers again."""
    site = ScriptedSite(hold_s=0.05)
    poller = Poller(site, wait_s=0.2, lost_after_s=0.4)  # type: ignore[arg-type]
    try:
        stream = poller.track({"request_id": "a", "ticket": "t"}, "m", events=True)
        assert stream.queue.get(timeout=10) == {"op": "event", "text": "a:1"}
        site.answering.clear()
        silent_from = time.monotonic()
        plain = poller.track({"request_id": "b", "ticket": "t"}, "m", events=False)
        got = []
        while not got or not isinstance(got[-1], BaseException):
            got.append(stream.queue.get(timeout=10))
        waited = time.monotonic() - silent_from
        err = got[-1]
        assert isinstance(err, EndpointError) and err.retryable
        assert "answered no poll for 1 s" in str(err)
        assert 0.6 - 0.1 <= waited < 5, waited  # not before the silence limit (0.2 + 0.4 s)
        with pytest.raises(EndpointError):
            plain.future.result(timeout=10)
        site.answering.set()  # the late answers come: dropped
        time.sleep(0.3)
        assert stream.queue.empty()
        again = poller.track({"request_id": "c", "ticket": "t"}, "m", events=True)
        assert _drain(again)[-1] == {"op": "done", "result": {"text": "c"}}
    finally:
        poller.close()


def test_answers_to_other_tasks_show_a_busy_site_alive() -> None:
    """A poll queued at a busy endpoint comes back late, but the site answers other tasks
    meanwhile: no request fails."""
    site = ScriptedSite(hold_s=0.2, first_hold_s={"queued": 1.5})  # alone, 1.5 s trips it
    poller = Poller(site, wait_s=0.2, lost_after_s=0.8)  # type: ignore[arg-type]
    try:
        queued = poller.track({"request_id": "queued", "ticket": "t"}, "m", events=True)
        time.sleep(0.05)  # its first task is out: the next request goes in a task of its own
        busy = poller.track({"request_id": "busy", "ticket": "t"}, "m", events=True)
        for tracked, name in ((busy, "busy"), (queued, "queued")):
            got = _drain(tracked)
            assert got[-1] == {"op": "done", "result": {"text": name}}, got
    finally:
        poller.close()


class FailingOneSite(ScriptedSite):
    """A ``ScriptedSite`` whose replies for ``failing`` come back done with an error."""

    def __init__(self, failing: str) -> None:
        super().__init__()
        self.failing = failing

    def submit(self, fn: Callable[..., Any], polls: list[dict[str, Any]], wait_s: float,
               statuses: list[dict[str, Any]], auth: Any) -> Future[Any]:
        inner = super().submit(fn, polls, wait_s, statuses, auth)
        out: Future[Any] = Future()

        def rewrite(f: Future[Any]) -> None:
            reply = f.result()
            if self.failing in reply["replies"]:
                reply["replies"][self.failing] = {
                    "events": [], "cursor": 0, "done": True, "result": None,
                    "error": AccessDenied("not yours", rule="request-owner").to_dict()}
            out.set_result(reply)

        inner.add_done_callback(rewrite)
        return out


def test_a_request_done_with_an_error_is_not_polled_again() -> None:
    site = FailingOneSite("bad")
    poller = Poller(site)  # type: ignore[arg-type]
    try:
        bad = poller.track({"request_id": "bad", "ticket": "t"}, "m", events=True)
        good = poller.track({"request_id": "good", "ticket": "t"}, "m", events=True)
        (err,) = _drain(bad)
        assert isinstance(err, AccessDenied) and err.details == {"rule": "request-owner"}
        assert _drain(good)[-1] == {"op": "done", "result": {"text": "good"}}
    finally:
        poller.close()
    named = [task for task in site.tasks if "bad" in task]
    assert len(named) == 1, site.tasks  # the first poll only
    assert len(site.tasks) >= EVENTS  # the good stream went on being polled


def test_a_status_watch_hears_only_its_own_models_status() -> None:
    site = ScriptedSite()
    poller = Poller(site)  # type: ignore[arg-type]
    heard: dict[str, list[dict[str, Any]]] = {"m": [], "n": []}
    both = threading.Event()

    def callback(model: str) -> Callable[[dict[str, Any]], None]:
        def call(status: dict[str, Any]) -> None:
            heard[model].append(status)
            if heard["m"] and heard["n"]:
                both.set()
        return call

    try:
        with poller._cond:  # both watches ride the first task
            keys = [poller.watch(model, None, callback(model)) for model in ("m", "n")]
        assert both.wait(10)
        for key in keys:
            poller.unwatch(key)
    finally:
        poller.close()
    assert site.tasks[0] == []  # a status-only task
    assert heard == {"m": [{"model": "m", "state": "loading"}],
                     "n": [{"model": "n", "state": "loading"}]}
