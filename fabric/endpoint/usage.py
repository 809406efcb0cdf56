"""Usage and quota counters of one site: ``<state_dir>/usage.sqlite``.

Two tables. ``usage`` holds raw rows (one per admitted request, one per finished request's
tokens) for ``fabric usage`` and audits; it is pruned after the site's
``limits.usage_retention_days``. ``quota_counts`` holds per-identity, per-model counters in
fixed time buckets (``REQUESTS``: 5 s buckets, a minute's window; ``TOKENS``: 5 min buckets, a
day's window), bumped with one UPSERT. A quota admission reads at most one window's buckets
(12 or 288 rows, found by the primary key) and writes one bucket and one raw row, whatever
the history: its cost does not grow with the days of usage behind it (the raw table is never
read to admit). Buckets older than their window are deleted with old raw rows, at most once a
``PRUNE_EVERY_S`` per process.

The windows slide by whole buckets: a minute's quota counts the last 12 five-second buckets
(55 to 60 s of history), a day's the last 288 five-minute ones.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric.sqlitefs import journal_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """A quota window made of ``count`` fixed buckets of ``width_s`` seconds."""

    kind: str
    width_s: int
    count: int

    @property
    def span_s(self) -> int:
        """The window's length."""
        return self.width_s * self.count

    def bucket(self, ts: float) -> int:
        """The bucket ``ts`` falls in."""
        return int(ts // self.width_s)


REQUESTS = Window("requests", 5, 12)
"""Requests per minute: 12 buckets of 5 s."""
TOKENS = Window("tokens", 300, 288)
"""Tokens per day: 288 buckets of 5 min."""
WINDOWS = (REQUESTS, TOKENS)

PRUNE_EVERY_S = 60.0
"""Least seconds between two prunes of one state dir by one process."""
USAGE_FLUSH_S = 1.0
"""Most seconds a usage row of an admission without quotas waits before it is written. Each
request worker commits its own rows: at 50 ms, 2 workers' commits and wake-ups cost a no-op
``fab.submit`` ~0.3 ms of CPU on 2 cores (benchmarks/overhead.py)."""


def clock() -> float:
    # One place to read the clock (tests move it to build history and age it out).
    return time.time()


_CONNECTIONS: dict[Path, sqlite3.Connection] = {}
_CONNECTIONS_LOCK = threading.Lock()


@contextmanager
def db(state_dir: Path) -> Iterator[sqlite3.Connection]:
    """This process's connection to the usage database (kept open: closing the last
    connection of a WAL database checkpoints it with an fsync, ~10 ms a request)."""
    path = Path(state_dir) / "usage.sqlite"
    with _CONNECTIONS_LOCK:
        conn = _CONNECTIONS.get(path)
        if conn is None or not path.exists():
            conn = _open(path)
            _CONNECTIONS[path] = conn
        # One statement sequence at a time per connection (workers may use threads).
        yield conn


@contextmanager
def transaction(state_dir: Path) -> Iterator[sqlite3.Connection]:
    """An immediate (write-locked) transaction on the usage database."""
    with db(state_dir) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _open(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists()
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    if fresh:
        os.chmod(path, 0o600)  # who used what is not for other local users to read
    # WAL with synchronous=NORMAL: a commit needs no fsync (benchmarks/overhead.py); a power
    # cut may lose the last few usage rows, never corrupt the file.
    conn.execute(f"PRAGMA journal_mode={journal_mode(path)}")  # no WAL on GPFS/Lustre/NFS
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS usage (ts REAL NOT NULL, identity TEXT NOT "
                     "NULL, model TEXT NOT NULL, requests INTEGER NOT NULL, tokens INTEGER NOT "
                     "NULL, request_id TEXT)")
        conn.execute("CREATE INDEX IF NOT EXISTS usage_by_caller ON usage(identity, model, ts)")
        conn.execute("CREATE INDEX IF NOT EXISTS usage_by_time ON usage(ts)")
        _add_split_columns(conn)
        counters = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND "
                                "name='quota_counts'").fetchone()
        conn.execute("CREATE TABLE IF NOT EXISTS quota_counts (identity TEXT NOT NULL, model "
                     "TEXT NOT NULL, kind TEXT NOT NULL, bucket INTEGER NOT NULL, amount "
                     "INTEGER NOT NULL, PRIMARY KEY (identity, model, kind, bucket))"
                     " WITHOUT ROWID")
        conn.execute("CREATE INDEX IF NOT EXISTS quota_counts_by_bucket ON "
                     "quota_counts(kind, bucket)")
        if counters is None:
            _backfill(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return conn


def _add_split_columns(conn: sqlite3.Connection) -> None:
    """Prompt and completion tokens apart (``fabric usage``), added to a table made before
    them; old rows keep only their total (``tokens``)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(usage)")}
    for column in ("prompt_tokens", "completion_tokens"):
        if column not in have:
            with contextlib.suppress(sqlite3.OperationalError):  # another process added it
                conn.execute(f"ALTER TABLE usage ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")


_INSERT = "INSERT INTO usage (ts, identity, model, requests, tokens, request_id)"
"""Columns named: the table has gained columns since (``_add_split_columns``)."""


def _backfill(conn: sqlite3.Connection) -> None:
    """Counters of a database written before they existed, from its last day of raw rows
    (once: quotas do not reset on upgrade)."""
    now = clock()
    for window, column in ((REQUESTS, "requests"), (TOKENS, "tokens")):
        conn.execute(
            f"INSERT INTO quota_counts SELECT identity, model, ?, CAST(ts / ? AS INTEGER) AS b,"
            f" SUM({column}) FROM usage WHERE {column} > 0 AND ts > ?"
            " GROUP BY identity, model, b",
            (window.kind, window.width_s, now - window.span_s))


_UPSERT = ("INSERT INTO quota_counts VALUES (?,?,?,?,?) ON CONFLICT (identity, model, kind, "
           "bucket) DO UPDATE SET amount = amount + excluded.amount")


def _bump(conn: sqlite3.Connection, identity: str, model: str, window: Window, ts: float,
          amount: int) -> None:
    conn.execute(_UPSERT, (identity, model, window.kind, window.bucket(ts), amount))


def window_usage(conn: sqlite3.Connection, identity: str, model: str, window: Window,
                 now: float) -> list[tuple[int, int]]:
    """``(bucket, amount)`` of the window that ends now, oldest first (at most
    ``window.count`` rows, read through the primary key)."""
    current = window.bucket(now)
    return [(int(b), int(a)) for b, a in conn.execute(
        "SELECT bucket, amount FROM quota_counts WHERE identity=? AND model=? AND kind=?"
        " AND bucket>? AND bucket<=? ORDER BY bucket",
        (identity, model, window.kind, current - window.count, current))]


def wait_for(buckets: list[tuple[int, int]], window: Window, excess: int, now: float) -> float:
    """Seconds until enough of the oldest buckets leave the window to free ``excess``."""
    wait = 0.0
    for bucket, amount in buckets:
        excess -= amount
        wait = (bucket + window.count) * window.width_s - now
        if excess <= 0:
            break
    return max(0.0, wait)


def add_request(conn: sqlite3.Connection, identity: str, model: str, now: float) -> None:
    """Record one admitted request (raw row and counter), inside the caller's transaction."""
    _bump(conn, identity, model, REQUESTS, now, 1)
    conn.execute(_INSERT + " VALUES (?,?,?,?,?,NULL)", (now, identity, model, 1, 0))


def record_tokens(state_dir: Path, identity: str, model: str, tokens: int,
                  request_id: str | None = None, *, prompt_tokens: int = 0,
                  completion_tokens: int = 0, ts: float | None = None) -> None:
    """Add the tokens a finished request consumed to its caller's raw usage and counter
    (``prompt_tokens``/``completion_tokens``: the split, where the caller knows it; ``ts``:
    when the request finished, where that was before now, e.g. a server's tally collected
    later)."""
    now = clock() if ts is None else float(ts)
    with transaction(Path(state_dir)) as conn:
        conn.execute("INSERT INTO usage (ts, identity, model, requests, tokens, request_id,"
                     " prompt_tokens, completion_tokens) VALUES (?,?,?,?,?,?,?,?)",
                     (now, identity, model, 0, int(tokens), request_id, int(prompt_tokens),
                      int(completion_tokens)))
        if tokens > 0:
            _bump(conn, identity, model, TOKENS, now, int(tokens))


def prune(conn: sqlite3.Connection, now: float, retention_s: float) -> int:
    """Delete raw rows older than ``retention_s`` and counters older than their window (both
    found through an index); returns how many rows went."""
    gone = conn.execute("DELETE FROM usage WHERE ts < ?", (now - retention_s,)).rowcount
    for window in WINDOWS:
        gone += conn.execute("DELETE FROM quota_counts WHERE kind=? AND bucket<=?",
                             (window.kind, window.bucket(now) - window.count)).rowcount
    return int(gone)


_LAST_PRUNE: dict[Path, float] = {}


def maybe_prune(state_dir: Path, retention_s: float) -> None:
    """Prune ``state_dir``'s usage if this process has not in the last ``PRUNE_EVERY_S``."""
    state_dir, now = Path(state_dir), clock()
    with _CONNECTIONS_LOCK:
        if now - _LAST_PRUNE.get(state_dir, float("-inf")) < PRUNE_EVERY_S:
            return
        _LAST_PRUNE[state_dir] = now
    try:
        with transaction(state_dir) as conn:
            gone = prune(conn, now, retention_s)
        if gone:
            log.info("pruned %d usage rows and counters in %s", gone, state_dir)
    except sqlite3.Error:
        log.exception("pruning usage in %s failed (retried in %.0f s)", state_dir,
                      PRUNE_EVERY_S)


def report(state_dir: Path, since_s: float = 86400.0) -> list[dict[str, Any]]:
    """Requests and tokens per identity and model over the last ``since_s`` seconds."""
    WRITER.flush()
    with db(Path(state_dir)) as conn:
        rows = conn.execute(
            "SELECT identity, model, SUM(requests), SUM(tokens) FROM usage WHERE ts>?"
            " GROUP BY identity, model ORDER BY identity, model",
            (clock() - since_s,)).fetchall()
    return [{"identity": i, "model": m, "requests": r, "tokens": t} for i, m, r, t in rows]


class _UsageWriter:
    """Usage rows of admissions that enforce no quota, written in batches by one daemon thread
    per process: the request does not wait for SQLite (a commit is ~0.4 ms in a request
    worker, a fifth of the fabric's whole overhead on a no-op user function). No quota reads
    these rows, so a second's delay changes no decision; quota admissions stay synchronous,
    in one transaction. ``flush`` writes what is pending at once (also at exit; a worker
    killed outright loses its last second of such rows)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # Also after a fork: the child starts with no rows, no thread and fresh locks.
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._rows: dict[Path, list[tuple[Any, ...]]] = {}
        self._thread: threading.Thread | None = None
        self._idle = False

    def add(self, state_dir: Path, row: tuple[Any, ...]) -> None:
        """Queue one request row ``(ts, identity, model)`` for ``state_dir``."""
        with self._cond:
            self._rows.setdefault(state_dir, []).append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                 name="fabric-usage-writer")
                self._thread.start()
            if self._idle:  # under steady traffic the thread polls: no wake-up per request
                self._cond.notify()

    def flush(self) -> None:
        """Write every queued row now (returns once they are committed)."""
        with self._write_lock:  # also waits for a batch the thread is writing
            with self._cond:
                batch, self._rows = self._rows, {}
            for state_dir, rows in batch.items():
                try:
                    with transaction(state_dir) as conn:
                        conn.executemany(_INSERT + " VALUES (?,?,?,1,0,NULL)", rows)
                        # Counters too: a quota the operator adds later sees this traffic.
                        conn.executemany(_UPSERT, [(i, m, REQUESTS.kind, REQUESTS.bucket(ts), 1)
                                                   for ts, i, m in rows])
                except Exception:
                    log.exception("lost %d usage rows for %s", len(rows), state_dir)

    def _run(self) -> None:
        quiet = 0
        while True:
            with self._cond:
                if not self._rows and quiet >= 2:  # two periods without requests: sleep
                    self._idle = True
                    while not self._rows:
                        self._cond.wait()
                    self._idle = False
            time.sleep(USAGE_FLUSH_S)  # one transaction for the rows of a burst
            quiet = 0 if self._rows else quiet + 1
            self.flush()


WRITER = _UsageWriter()
os.register_at_fork(after_in_child=WRITER._reset)
os.register_at_fork(after_in_child=_LAST_PRUNE.clear)
atexit.register(WRITER.flush)
