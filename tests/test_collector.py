"""The stream-usage collector (``fabric.endpoint.collector``): an admission's answer does not
wait for the servers' usage, a token quota does, and a failing server stops nothing."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from fabric.endpoint.collector import _Collector


@dataclass
class Dep:
    id: str


@dataclass
class SlowManager:
    """``collect_usage`` blocks until ``release`` is set; records what it collected."""

    release: threading.Event = field(default_factory=threading.Event)
    collected: list[str] = field(default_factory=list)
    fail: set[str] = field(default_factory=set)

    def collect_usage(self, dep: Dep) -> int:
        assert self.release.wait(10)
        if dep.id in self.fail:
            raise ConnectionError(f"{dep.id} does not answer")
        self.collected.append(dep.id)
        return 1


def test_soon_returns_before_the_collection_and_join_waits_for_it() -> None:
    collector, manager = _Collector(), SlowManager()
    t0 = time.monotonic()
    collector.soon(manager, [Dep("a"), Dep("b"), Dep("a"), None])
    assert time.monotonic() - t0 < 1.0 and manager.collected == []
    assert not collector.join(timeout_s=0.2)  # still blocked in collect_usage
    manager.release.set()
    assert collector.join(timeout_s=10)
    assert sorted(manager.collected) == ["a", "b"]  # each deployment once


def test_a_server_that_fails_stops_neither_the_others_nor_later_collections() -> None:
    collector, manager = _Collector(), SlowManager(fail={"down"})
    manager.release.set()
    collector.soon(manager, [Dep("down"), Dep("up")])
    assert collector.join(timeout_s=10)
    collector.soon(manager, [Dep("later")])
    assert collector.join(timeout_s=10)
    assert manager.collected == ["up", "later"]


def test_nothing_to_collect_starts_no_thread() -> None:
    collector = _Collector()
    collector.soon(SlowManager(), [])
    assert collector._thread is None and collector.join(timeout_s=0)
