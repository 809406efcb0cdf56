"""The campaign ledger: one SQLite database (WAL) holding every input's state.

.. code:: text

    items   custom_id (key) | seq | line | request | state | attempts | shard | site | nonce ...
            pending --claim--> running(attempt, shard, site) --settle--> done | failed
                                      \\--shard lost / retryable error--> pending (attempts kept)
    shards  id | site | state (running/ok/failed/lost) | n | started | finished | error
    meta    manifest, status, schedule, out_offset, err_offset, ...

Exactly-once output rests on one rule: *the ledger commits after the output file*. A settled
shard's lines are appended to ``results.jsonl`` / ``errors.jsonl`` and fsynced, then one
transaction marks the inputs done/failed **and** records the files' new lengths
(``out_offset``/``err_offset``). A crash between the two leaves lines past the recorded
lengths for inputs the ledger still calls running; ``recover`` truncates the files back to
the recorded lengths and requeues those inputs. So every committed line belongs to exactly one
done/failed input, and no input is done without its line.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fabric.sqlitefs import journal_mode

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS items (
    custom_id TEXT PRIMARY KEY, seq INTEGER, line INTEGER, request TEXT,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, shard TEXT, site TEXT,
    nonce TEXT, error_kind TEXT, error TEXT, tokens INTEGER DEFAULT 0, updated REAL);
CREATE INDEX IF NOT EXISTS items_state ON items(state, attempts, seq);
CREATE INDEX IF NOT EXISTS items_shard ON items(shard);
CREATE TABLE IF NOT EXISTS shards (
    id TEXT PRIMARY KEY, site TEXT, state TEXT, n INTEGER, started REAL, finished REAL,
    error TEXT, ok INTEGER DEFAULT 0, failed INTEGER DEFAULT 0, tokens INTEGER DEFAULT 0);
"""
STATES = ("pending", "running", "done", "failed")
TERMINAL_STATUSES = ("done", "cancelled", "failed")
"""Campaign statuses after which nothing more runs (unless resumed)."""


class Ledger:
    """One campaign's SQLite ledger (``<campaign dir>/ledger.sqlite``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE) so a settle is one
        # atomic step; timeout: the CLI reads while the runner writes.
        self.conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                                    check_same_thread=False)
        self.conn.execute(f"PRAGMA journal_mode={journal_mode(self.path)}")  # WAL if local
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- meta ---------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """A meta value (JSON-decoded)."""
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set(self, **values: Any) -> None:
        """Set meta values in one transaction."""
        with self.tx() as c:
            self._set(c, values)

    def transition(self, status: str, unless: tuple[str, ...], **values: Any) -> str:
        """Set ``status`` (and ``values``) unless the status now is one of ``unless``, in one
        transaction: a cancel written between a runner's read and its write is not lost.
        Returns the status in force afterwards."""
        with self.tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key='status'").fetchone()
            current = None if row is None else json.loads(row[0])
            if current in unless:
                return str(current)
            self._set(c, {"status": status, **values})
            return status

    @staticmethod
    def _set(c: sqlite3.Connection, values: dict[str, Any]) -> None:
        c.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                      [(k, json.dumps(v)) for k, v in values.items()])

    # -- filling ------------------------------------------------------------------------------

    def fill(self, items: Iterable[tuple[str, int, dict[str, Any]]],
             bad: Iterable[tuple[str, int, str, str]], meta: dict[str, Any]) -> None:
        """Insert pending items ``(custom_id, line, request)`` and already-failed bad lines
        ``(key, line, kind, message)`` (their error lines are written by the caller first)."""
        now = time.time()
        with self.tx() as c:
            c.executemany(
                "INSERT INTO items(custom_id, seq, line, request, state, updated) "
                "VALUES (?, ?, ?, ?, 'pending', ?)",
                ((cid, line, line, json.dumps(req), now) for cid, line, req in items))
            c.executemany(
                "INSERT INTO items(custom_id, seq, line, state, error_kind, error, updated) "
                "VALUES (?, ?, ?, 'failed', ?, ?, ?)",
                ((key, line, line, kind, msg, now) for key, line, kind, msg in bad))
            self._set(c, meta)

    # -- the runner's verbs -------------------------------------------------------------------

    def claim(self, shard_id: str, site: str, size: int) -> list[tuple[str, int, dict[str, Any]]]:
        """Move up to ``size`` pending inputs into a new running shard; returns
        ``(custom_id, attempt, request)``. Inputs already tried go in smaller shards
        (``size >> attempts``) so that one input that kills its worker cannot keep sinking the
        same shard-mates: after a few failures it runs alone."""
        with self.tx() as c:
            row = c.execute("SELECT MIN(attempts) FROM items WHERE state='pending'").fetchone()
            if row is None or row[0] is None:
                return []
            level = int(row[0])
            limit = max(1, size >> level)
            rows = c.execute(
                "SELECT custom_id, attempts, request FROM items WHERE state='pending' AND "
                "attempts=? ORDER BY seq LIMIT ?", (level, limit)).fetchall()
            now = time.time()
            c.executemany(
                "UPDATE items SET state='running', attempts=attempts+1, shard=?, site=?, "
                "updated=? WHERE custom_id=?", [(shard_id, site, now, r[0]) for r in rows])
            c.execute("INSERT INTO shards(id, site, state, n, started) VALUES (?,?,?,?,?)",
                      (shard_id, site, "running", len(rows), now))
        return [(cid, attempts + 1, json.loads(req)) for cid, attempts, req in rows]

    def running_in(self, shard_id: str) -> dict[str, int]:
        """``custom_id -> attempt`` of the inputs still running in ``shard_id``."""
        rows = self.conn.execute("SELECT custom_id, attempts FROM items WHERE state='running' "
                                 "AND shard=?", (shard_id,)).fetchall()
        return {cid: int(a) for cid, a in rows}

    def settle(self, shard_id: str, *, done: list[tuple[str, str, int]],
               failed: list[tuple[str, str, str]], retry: list[str], shard_state: str,
               shard_error: str | None, offsets: tuple[int, int]) -> None:
        """Commit one shard's outcome and the output files' new lengths, atomically.

        ``done``: ``(custom_id, nonce, tokens)``; ``failed``: ``(custom_id, kind, message)``;
        ``retry``: back to pending. Only inputs still running in this shard change.
        """
        now = time.time()
        with self.tx() as c:
            c.executemany(
                "UPDATE items SET state='done', nonce=?, tokens=?, error_kind=NULL, error=NULL,"
                " updated=? WHERE custom_id=? AND state='running' AND shard=?",
                [(nonce, tokens, now, cid, shard_id) for cid, nonce, tokens in done])
            c.executemany(
                "UPDATE items SET state='failed', error_kind=?, error=?, updated=? "
                "WHERE custom_id=? AND state='running' AND shard=?",
                [(kind, msg, now, cid, shard_id) for cid, kind, msg in failed])
            c.executemany(
                "UPDATE items SET state='pending', updated=? WHERE custom_id=? AND "
                "state='running' AND shard=?", [(now, cid, shard_id) for cid in retry])
            tokens = sum(t for _, _, t in done)
            c.execute("UPDATE shards SET state=?, finished=?, error=?, ok=?, failed=?, tokens=? "
                      "WHERE id=?", (shard_state, now, shard_error, len(done), len(failed),
                                     tokens, shard_id))
            self._set(c, {"out_offset": offsets[0], "err_offset": offsets[1]})

    def requeue_running(self) -> int:
        """After a crash: inputs left running go back to pending (their lost attempt is
        refunded: the runner died, not the input) and open shards are marked lost."""
        now = time.time()
        with self.tx() as c:
            n = c.execute("UPDATE items SET state='pending', attempts=MAX(attempts-1, 0), "
                          "updated=? WHERE state='running'", (now,)).rowcount
            c.execute("UPDATE shards SET state='lost', finished=?, error='runner restarted' "
                      "WHERE state='running'", (now,))
        return int(n)

    def retry_failed(self) -> int:
        """``resume --retry-failed``: failed inputs (not bad lines) get fresh attempts.
        Their old error lines stay in errors.jsonl, so the caller must rewrite that file."""
        with self.tx() as c:
            return int(c.execute("UPDATE items SET state='pending', attempts=0 WHERE "
                                 "state='failed' AND request IS NOT NULL").rowcount)

    # -- reading ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Inputs per state (every state present, zero if none)."""
        out = dict.fromkeys(STATES, 0)
        for state, n in self.conn.execute("SELECT state, COUNT(*) FROM items GROUP BY state"):
            out[str(state)] = int(n)
        return out

    def errors_by_kind(self) -> dict[str, int]:
        """Failed inputs per error kind."""
        rows = self.conn.execute("SELECT error_kind, COUNT(*) FROM items WHERE state='failed' "
                                 "GROUP BY error_kind").fetchall()
        return {str(k): int(n) for k, n in rows}

    def per_site(self) -> dict[str, dict[str, Any]]:
        """Shards and inputs per site: running/ok/failed/lost shards, inputs done, tokens."""
        out: dict[str, dict[str, Any]] = {}
        for site, state, shards, ok, tokens in self.conn.execute(
                "SELECT site, state, COUNT(*), SUM(ok), SUM(tokens) FROM shards "
                "GROUP BY site, state"):
            rec = out.setdefault(str(site), {"shards": {}, "inputs_done": 0, "tokens": 0})
            rec["shards"][str(state)] = int(shards)
            rec["inputs_done"] += int(ok or 0)
            rec["tokens"] += int(tokens or 0)
        return out

    def recent(self, window_s: float) -> tuple[int, int, float]:
        """``(inputs settled, tokens, seconds covered)`` over the last ``window_s``."""
        since = time.time() - window_s
        row = self.conn.execute("SELECT COALESCE(SUM(ok)+SUM(failed),0), COALESCE(SUM(tokens),0),"
                                " MIN(started) FROM shards WHERE finished>=?", (since,)).fetchone()
        first = row[2] if row[2] is not None else since
        return int(row[0]), int(row[1]), max(1e-6, time.time() - max(first, since))

    def tokens_done(self) -> int:
        """Tokens over every done input."""
        row = self.conn.execute("SELECT COALESCE(SUM(tokens),0) FROM items WHERE state='done'")
        return int(row.fetchone()[0])
