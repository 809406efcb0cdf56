"""Site events the ``/metrics`` listener counts: cold starts and refusals.

Request workers are separate processes (on a cluster, separate nodes sharing the state dir),
so what they see is written to ``<state_dir>/events.sqlite`` and the site process reads it at
each scrape. One row per event; a cold start is keyed by its deployment, so the workers that
all notice the same server turn ready record it once. Writing never fails a request: metrics
are best effort (an error is logged at debug level and the row dropped).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from fabric.errors import (
    AccessDenied,
    AuthError,
    FabricError,
    InvalidRequest,
    Overloaded,
    QuotaExceeded,
)
from fabric.sqlitefs import journal_mode

log = logging.getLogger(__name__)

FILE = "events.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    ts REAL NOT NULL, kind TEXT NOT NULL, model TEXT NOT NULL, label TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '', seconds REAL, key TEXT UNIQUE);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, model);
"""
REFUSAL_RULES: tuple[str, ...] = ("quota", "policy", "validation", "overloaded")
"""The ``rule`` label of a refusal (``refusal_rule``)."""


def refusal_rule(err: FabricError) -> str | None:
    """Which rule refused a call (``quota``, ``policy``, ``validation``, ``overloaded``), or
    ``None`` when ``err`` is no refusal (a failure while serving: timeouts, server errors)."""
    if isinstance(err, QuotaExceeded):
        return "quota"
    if isinstance(err, (AccessDenied, AuthError)):
        return "policy"
    if isinstance(err, InvalidRequest):
        return "validation"
    if isinstance(err, Overloaded):
        return "overloaded"
    return None


def _connect(state_dir: Path) -> sqlite3.Connection:
    path = Path(state_dir) / FILE
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode={journal_mode(path)}")
    conn.executescript(_SCHEMA)
    return conn


def _insert(state_dir: Path, row: tuple[object, ...]) -> None:
    try:
        conn = _connect(state_dir)
        try:
            conn.execute("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?)", row)
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:  # never fail the request over a metric
        log.debug("could not record a site event: %s", exc)


def record_cold_start(state_dir: Path, model: str, deployment_id: str, seconds: float) -> None:
    """A model server became ready ``seconds`` after its launch (once per deployment)."""
    _insert(state_dir, (time.time(), "cold_start", model, "", "", float(seconds),
                        f"cold_start:{deployment_id}"))


def record_refusal(state_dir: Path, model: str, err: FabricError) -> None:
    """An endpoint function refused a call with ``err`` (nothing if it is no refusal)."""
    rule = refusal_rule(err)
    if rule is not None:
        _insert(state_dir, (time.time(), "refusal", model, rule, type(err).__name__, None, None))


def cold_starts(state_dir: Path) -> dict[str, list[float]]:
    """Every recorded cold start's duration, by model."""
    if not (Path(state_dir) / FILE).exists():
        return {}
    conn = _connect(state_dir)
    try:
        rows = conn.execute("SELECT model, seconds FROM events WHERE kind='cold_start'"
                            " ORDER BY ts").fetchall()
    finally:
        conn.close()
    out: dict[str, list[float]] = {}
    for model, seconds in rows:
        out.setdefault(model, []).append(float(seconds))
    return out


def refusals(state_dir: Path) -> dict[tuple[str, str, str], int]:
    """Refusals counted by (model, rule, error class)."""
    if not (Path(state_dir) / FILE).exists():
        return {}
    conn = _connect(state_dir)
    try:
        rows = conn.execute("SELECT model, label, error, COUNT(*) FROM events"
                            " WHERE kind='refusal' GROUP BY model, label, error").fetchall()
    finally:
        conn.close()
    return {(m, r, e): int(n) for m, r, e, n in rows}
