"""The site's deployment records: one SQLite database (WAL) in the site state dir.

Request workers are separate processes (and on a cluster, separate nodes sharing the state
dir), so the database, not memory, is the truth about which model servers exist. Every write is
one short transaction; WAL lets readers (``fabric deployments``) run while a worker writes.

WAL keeps its index in shared memory (``-shm``, mmap'd), which works only when every process
is on one host and the file system is local. On the shared file systems of HPC login nodes
(GPFS on Polaris, Lustre and NFS on Perlmutter) ``journal_mode`` picks the rollback journal
instead (``DELETE``: POSIX locks, which those file systems implement across nodes; see
``fabric.sqlitefs``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fabric.sqlitefs import journal_mode

DeploymentState = Literal["queued", "loading", "ready", "draining", "dead"]
LIVE_STATES: tuple[str, ...] = ("queued", "loading", "ready")
"""States of a deployment that may (still) serve requests."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL DEFAULT '',
    plan TEXT NOT NULL DEFAULT '{}',
    job_id TEXT,
    provider TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    address TEXT,
    public_key TEXT,
    walltime TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    info_path TEXT NOT NULL DEFAULT '',
    log_path TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS deployments_model ON deployments (model, version, state);
CREATE TABLE IF NOT EXISTS weights (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    stamp TEXT NOT NULL DEFAULT '[]',
    size_bytes INTEGER NOT NULL DEFAULT 0,
    how TEXT NOT NULL DEFAULT '',
    recorded REAL NOT NULL,
    PRIMARY KEY (model, version)
);
"""


@dataclass
class Deployment:
    """One model server (launched or being launched) for a model version and plan."""

    id: str
    model: str
    version: str
    state: str
    sha256: str = ""
    plan: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None
    provider: str = ""
    address: str | None = None
    public_key: str | None = None
    walltime: str = ""
    created: float = 0.0
    last_used: float = 0.0
    reason: str = ""
    info_path: str = ""
    log_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what ``fabric deployments`` and the SDK see)."""
        return asdict(self)

    @staticmethod
    def new_id() -> str:
        """A short, unique deployment id."""
        return "d-" + uuid.uuid4().hex[:10]


class StateDB:
    """Deployment records in ``<state_dir>/fabric.sqlite``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "fabric.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connect().executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection, made on its first use in this process: an sqlite3
        connection must cross neither a thread nor a fork. Kept, not one per call: opening
        one (and its pragmas) was 0.8 of the 0.9 ms an admission's lookup took."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA journal_mode={journal_mode(self.path)}")
            db.execute("PRAGMA busy_timeout=30000")
            local.db, local.pid = db, os.getpid()
        conn: sqlite3.Connection = local.db
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locked) transaction: the read-then-write of a launch decision."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def insert(self, dep: Deployment, db: sqlite3.Connection | None = None) -> None:
        """Add a record."""
        row = _to_row(dep)
        sql = (f"INSERT INTO deployments ({', '.join(row)}) "
               f"VALUES ({', '.join('?' for _ in row)})")
        if db is not None:
            db.execute(sql, tuple(row.values()))
            return
        with self.transaction() as tx:
            tx.execute(sql, tuple(row.values()))

    def update(self, dep_id: str, **changes: Any) -> Deployment | None:
        """Change fields of one record; returns the updated record."""
        if "plan" in changes:
            changes["plan"] = json.dumps(changes["plan"])
        sets = ", ".join(f"{k} = ?" for k in changes)
        with self.transaction() as tx:
            tx.execute(f"UPDATE deployments SET {sets} WHERE id = ?", (*changes.values(), dep_id))
            found = tx.execute("SELECT * FROM deployments WHERE id = ?", (dep_id,)).fetchone()
        return _from_row(found) if found else None

    def mark_dead(self, dep_id: str, reason: str) -> bool:
        """Record ``dep_id`` dead for ``reason`` unless it already is; True for the one call
        (of all the site's processes) that changed it, which records what its end leaves."""
        with self.transaction() as tx:
            changed = tx.execute("UPDATE deployments SET state = 'dead', reason = ? WHERE id = ?"
                                 " AND state != 'dead'", (reason, dep_id)).rowcount
        return changed == 1

    def get(self, dep_id: str) -> Deployment | None:
        """One record by id."""
        row = self._connect().execute("SELECT * FROM deployments WHERE id = ?",
                                      (dep_id,)).fetchone()
        return _from_row(row) if row else None

    def query(self, *, model: str | None = None, version: str | None = None,
             states: tuple[str, ...] | None = None,
             db: sqlite3.Connection | None = None) -> list[Deployment]:
        """Records, newest first, filtered by model, version and state."""
        where, params = [], []
        if model is not None:
            where.append("model = ?")
            params.append(model)
        if version is not None:
            where.append("version = ?")
            params.append(version)
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params.extend(states)
        sql = "SELECT * FROM deployments"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC"
        rows = (db or self._connect()).execute(sql, params).fetchall()
        return [_from_row(r) for r in rows]

    def record_weights(self, model: str, version: str, weights: dict[str, Any]) -> None:
        """Keep the weights hash a server settled for (model, version) (its info file's
        ``weights``: sha256, stamp, size_bytes, how): the next launch of that version hands
        it to its server instead of having it hashed again."""
        with self.transaction() as tx:
            tx.execute(
                "INSERT OR REPLACE INTO weights (model, version, sha256, stamp, size_bytes, how,"
                " recorded) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (model, version, str(weights["sha256"]), json.dumps(weights.get("stamp") or []),
                 int(weights.get("size_bytes") or 0), str(weights.get("how") or ""),
                 time.time()))

    def weights_of(self, model: str, version: str) -> dict[str, Any] | None:
        """The site's record of (model, version)'s weights hash (``record_weights``), if any."""
        row = self._connect().execute("SELECT * FROM weights WHERE model = ? AND version = ?",
                                      (model, version)).fetchone()
        if row is None:
            return None
        data = dict(row)
        data["stamp"] = json.loads(data["stamp"] or "[]")
        return data

    def touch(self, dep_id: str) -> None:
        """Record a use (idle time counts from here)."""
        self.update(dep_id, last_used=time.time())


def _to_row(dep: Deployment) -> dict[str, Any]:
    row = asdict(dep)
    row["plan"] = json.dumps(dep.plan)
    return row


def _from_row(row: sqlite3.Row) -> Deployment:
    data = dict(row)
    data["plan"] = json.loads(data.get("plan") or "{}")
    return Deployment(**data)
