"""The usage database's quota counters and their upkeep (``fabric.endpoint.usage``), without a
policy: the window a quota reads, the wait it names, what pruning keeps, the counters a database
written before them gains, and the counters of rows written in the background."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fabric.endpoint import usage
from fabric.endpoint.usage import REQUESTS, TOKENS

NOW = 1_800_000_003.0  # inside a 5 s bucket, not on its edge


def _counters(state_dir: Path, window: usage.Window, now: float = NOW) -> list[tuple[int, int]]:
    with usage.db(state_dir) as conn:
        return usage.window_usage(conn, "alice", "m", window, now)


def _bump_at(state_dir: Path, window: usage.Window, bucket: int, amount: int) -> None:
    with usage.transaction(state_dir) as conn:
        usage._bump(conn, "alice", "m", window, bucket * window.width_s, amount)


def test_the_window_is_its_count_of_buckets_ending_now(tmp_path: Path) -> None:
    """A minute's quota reads 12 five-second buckets: the 13th back is outside it."""
    current = REQUESTS.bucket(NOW)
    _bump_at(tmp_path, REQUESTS, current - REQUESTS.count, 7)  # just left the window
    _bump_at(tmp_path, REQUESTS, current - REQUESTS.count + 1, 2)  # the oldest inside
    _bump_at(tmp_path, REQUESTS, current, 1)
    _bump_at(tmp_path, REQUESTS, current + 1, 5)  # the future (another host's clock)
    assert _counters(tmp_path, REQUESTS) == [(current - REQUESTS.count + 1, 2), (current, 1)]


def test_wait_is_until_the_bucket_that_frees_enough_leaves(tmp_path: Path) -> None:
    """Freeing exactly what is needed is enough: the wait ends when that bucket leaves the
    window, not one bucket later."""
    buckets = [(100, 2), (101, 3), (102, 1)]
    now = 101 * 5 + 2.0
    leaves = [(b + REQUESTS.count) * REQUESTS.width_s - now for b, _ in buckets]
    assert usage.wait_for(buckets, REQUESTS, 2, now) == leaves[0]  # 2 - 2 = 0: enough
    assert usage.wait_for(buckets, REQUESTS, 3, now) == leaves[1]
    assert usage.wait_for(buckets, REQUESTS, 5, now) == leaves[1]
    assert usage.wait_for(buckets, REQUESTS, 6, now) == leaves[2]
    assert usage.wait_for([], REQUESTS, 1, now) == 0.0


def test_prune_keeps_every_counter_of_the_window_and_raw_rows_within_retention(
        tmp_path: Path) -> None:
    current = REQUESTS.bucket(NOW)
    _bump_at(tmp_path, REQUESTS, current - REQUESTS.count, 4)  # outside: goes
    _bump_at(tmp_path, REQUESTS, current - REQUESTS.count + 1, 3)  # oldest inside: stays
    retention = 3600.0
    with usage.transaction(tmp_path) as conn:
        usage.add_request(conn, "alice", "m", NOW - retention - 1)  # past retention: goes
        usage.add_request(conn, "alice", "m", NOW - retention + 60)  # within it: stays
    with usage.transaction(tmp_path) as conn:
        usage.prune(conn, NOW, retention)
    assert _counters(tmp_path, REQUESTS) == [(current - REQUESTS.count + 1, 3)]
    with usage.db(tmp_path) as conn:
        kept = [ts for (ts,) in conn.execute("SELECT ts FROM usage ORDER BY ts")]
    assert kept == [NOW - retention + 60]


def test_a_database_written_before_the_counters_gets_them_from_its_raw_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Upgrading a site does not reset its quotas: the last window of raw rows is counted."""
    monkeypatch.setattr(usage, "clock", lambda: NOW)
    old = sqlite3.connect(tmp_path / "usage.sqlite")
    old.execute("CREATE TABLE usage (ts REAL NOT NULL, identity TEXT NOT NULL, model TEXT NOT"
                " NULL, requests INTEGER NOT NULL, tokens INTEGER NOT NULL, request_id TEXT)")
    old.executemany("INSERT INTO usage VALUES (?, 'alice', 'm', ?, ?, NULL)", [
        (NOW - 10, 1, 0), (NOW - 10, 0, 40), (NOW - 3 * 86400, 1, 500)])  # the last: too old
    old.commit()
    old.close()
    assert [a for _, a in _counters(tmp_path, REQUESTS)] == [1]
    assert [a for _, a in _counters(tmp_path, TOKENS)] == [40]


def test_rows_written_in_the_background_count_for_a_quota_added_later(tmp_path: Path) -> None:
    writer = usage._UsageWriter()
    for _ in range(3):
        writer.add(tmp_path, (NOW, "alice", "m"))
    writer.flush()
    assert _counters(tmp_path, REQUESTS) == [(REQUESTS.bucket(NOW), 3)]
    with usage.db(tmp_path) as conn:
        assert conn.execute("SELECT SUM(requests) FROM usage").fetchone() == (3,)


def test_maybe_prune_prunes_once_per_period(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call of a process prunes; another within ``PRUNE_EVERY_S`` does not."""
    now = [NOW]
    monkeypatch.setattr(usage, "clock", lambda: now[0])
    monkeypatch.setattr(usage, "_LAST_PRUNE", {})

    def rows() -> int:
        with usage.db(tmp_path) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0])

    with usage.transaction(tmp_path) as conn:
        usage.add_request(conn, "alice", "m", NOW - 7200)
    usage.maybe_prune(tmp_path, 3600.0)
    assert rows() == 0
    with usage.transaction(tmp_path) as conn:
        usage.add_request(conn, "alice", "m", NOW - 7200)
    now[0] = NOW + usage.PRUNE_EVERY_S / 2
    usage.maybe_prune(tmp_path, 3600.0)
    assert rows() == 1
    now[0] = NOW + usage.PRUNE_EVERY_S + 1
    usage.maybe_prune(tmp_path, 3600.0)
    assert rows() == 0


def test_report_counts_the_period_asked_for(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage, "clock", lambda: NOW)
    with usage.transaction(tmp_path) as conn:
        usage.add_request(conn, "alice", "m", NOW - 60)
        usage.add_request(conn, "alice", "m", NOW - 7200)
    usage.record_tokens(tmp_path, "alice", "m", 30, ts=NOW - 60)
    usage.record_tokens(tmp_path, "alice", "m", 500, ts=NOW - 7200)
    assert usage.report(tmp_path, since_s=3600.0) == [
        {"identity": "alice", "model": "m", "requests": 1, "tokens": 30}]
    assert usage.report(tmp_path)[0]["tokens"] == 530
