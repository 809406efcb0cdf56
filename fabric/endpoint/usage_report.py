"""Reading the site's usage table (``<state_dir>/usage.sqlite``, written by ``policy``): what
``fabric usage`` prints and exports.

One row per identity and model (or per identity, or per model): requests admitted, prompt
tokens, generation tokens and their total. Rows recorded before the table split prompt from
generation tokens count only in ``total_tokens``. The database is opened read-only: reading
usage never creates or changes a site's files.
"""

from __future__ import annotations

import csv
import re
import sqlite3
import time
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

from fabric.errors import InvalidRequest

By = Literal["identity", "model", "both"]
BY_CHOICES: tuple[str, ...] = ("both", "identity", "model")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class UsageRow:
    """Usage of one identity and model (``*`` where grouped away)."""

    identity: str
    model: str
    requests: int
    prompt_tokens: int
    generation_tokens: int
    total_tokens: int


def parse_since(text: str, now: float | None = None) -> float:
    """The epoch time ``text`` names: a duration back from now (``90s``, ``30m``, ``24h``,
    ``7d``, ``2w``; ``-5m`` is ``5m``) or an ISO date or date-time (``2026-12-01``,
    ``2026-12-01T08:00``; UTC unless it says otherwise). ``InvalidRequest`` for anything
    else."""
    now = time.time() if now is None else now
    text = text.strip()
    m = re.fullmatch(r"-?(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"--since {text!r}: give a duration (90s, 30m, 24h, 7d, 2w) or an "
                             "ISO date (2026-12-01, 2026-12-01T08:00)", param="since") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def usage_rows(state_dir: Path, since: float | None = None, by: By = "both") -> list[UsageRow]:
    """Usage at the site whose state dir is ``state_dir`` since epoch ``since`` (all time for
    ``None``), grouped by identity and model, identity, or model."""
    if by not in BY_CHOICES:
        raise InvalidRequest(f"--by {by!r}: one of {', '.join(BY_CHOICES)}", param="by")
    path = Path(state_dir) / "usage.sqlite"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        have = {row[1] for row in conn.execute("PRAGMA table_info(usage)")}
        split = {"prompt_tokens", "completion_tokens"} <= have
        ident = "identity" if by in ("identity", "both") else "'*'"
        model = "model" if by in ("model", "both") else "'*'"
        prompt = "SUM(prompt_tokens)" if split else "0"
        gen = "SUM(completion_tokens)" if split else "0"
        rows = conn.execute(
            f"SELECT {ident}, {model}, SUM(requests), {prompt}, {gen}, SUM(tokens) FROM usage"
            f" WHERE ts >= ? GROUP BY 1, 2 ORDER BY 1, 2",
            (float("-inf") if since is None else since,)).fetchall()
    finally:
        conn.close()
    return [UsageRow(str(i), str(m), int(r or 0), int(p or 0), int(g or 0), int(t or 0))
            for i, m, r, p, g, t in rows]


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(UsageRow))


def write_csv(rows: list[UsageRow], path: Path | IO[str]) -> None:
    """The rows as CSV with a header line (``COLUMNS``), to a file or an open stream."""
    if not isinstance(path, Path):
        _write_rows(rows, path)
        return
    try:
        with path.open("w", newline="") as fh:
            _write_rows(rows, fh)
    except OSError as exc:
        from fabric.errors import InvalidRequest

        raise InvalidRequest(f"cannot write the CSV to {path}: {exc.strerror}",
                             path=str(path)) from None


def _write_rows(rows: list[UsageRow], fh: IO[str]) -> None:
    writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))


def table(rows: list[UsageRow]) -> str:
    """The rows as an aligned text table, with a total line."""
    head = ["IDENTITY", "MODEL", "REQUESTS", "PROMPT", "GENERATION", "TOTAL"]
    body = [[r.identity, r.model, str(r.requests), str(r.prompt_tokens),
             str(r.generation_tokens), str(r.total_tokens)] for r in rows]
    if rows:
        body.append(["total", "", *(str(sum(getattr(r, c) for r in rows)) for c in COLUMNS[2:])])
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    out = []
    for line in [head, *body]:
        cells = [c.ljust(w) if i < 2 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
