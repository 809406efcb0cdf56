"""Parquet copies of a campaign's committed output (``output_format: parquet``).

While a campaign runs its lines are appended to ``results.jsonl`` and ``errors.jsonl``: the
exactly-once rule (write and fsync the lines, then commit their length in the ledger; on restart
cut the files back to that length) needs a file that can be appended to and truncated, which a
Parquet file cannot be. Parquet is therefore an export: ``results.parquet`` and
``errors.parquet`` are written from the committed JSONL lines when the campaign finishes, and on
demand by ``fabric campaign results NAME --format parquet`` (a snapshot of a running one).

One row per committed line, the line's keys as columns. ``model``, ``usage`` and ``error`` have a
fixed shape and are structs; ``response`` and ``error.details`` depend on the campaign's kind
(text and token ids, an embedding, log-probabilities) and, with ``provenance``
(``fabric.provenance``), are JSON text. Keys a line lacks (a bad
input line has no ``nonce``, ``shard`` or ``site``) are nulls.

Needs pyarrow (``pip install 'tpm-fabric[parquet]'``), which is not a dependency of the fabric.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fabric.campaign import store
from fabric.errors import FabricError, InvalidManifest

RESULTS_PARQUET, ERRORS_PARQUET = "results.parquet", "errors.parquet"
BATCH_ROWS = 10_000
"""Rows per write: a million-line campaign is exported without holding it all in memory."""


def parquet_modules(purpose: str) -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``; raise ``InvalidManifest`` saying how to get them."""
    try:
        import pyarrow as pa  # optional: not a dependency of the fabric
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidManifest(f"{purpose} needs pyarrow: pip install 'tpm-fabric[parquet]' "
                              "(or pip install pyarrow), or use JSONL") from None
    return pa, pq


def schema(pa: Any, errors: bool) -> Any:
    """The Parquet schema of ``results.jsonl`` lines (or of ``errors.jsonl`` lines)."""
    model = pa.struct([("name", pa.string()), ("version", pa.string()),
                       ("sha256", pa.string())])
    usage = pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])
    head = [("custom_id", pa.string()), ("line", pa.int64()), ("model", model),
            ("usage", usage)]
    tail = [("nonce", pa.string()), ("attempt", pa.int64()), ("shard", pa.string()),
            ("site", pa.string())]
    if errors:
        error = pa.struct([("kind", pa.string()), ("message", pa.string()),
                           ("details", pa.string())])
        return pa.schema([*head, ("error", error), ("attempts", pa.int64()), *tail])
    return pa.schema([*head, ("response", pa.string()), ("provenance", pa.string()), *tail])


def to_row(record: dict[str, Any], errors: bool) -> dict[str, Any]:
    """One JSONL record as a row of ``schema(errors)`` (varying parts as JSON text)."""
    row = dict(record)
    if errors:
        error = dict(row.get("error") or {})
        error["details"] = json.dumps(error.get("details") or {}, default=str)
        row["error"] = error
    else:
        row["response"] = json.dumps(row.get("response"), default=str)
        provenance = row.get("provenance")
        row["provenance"] = None if provenance is None else json.dumps(provenance, default=str)
    return row


def write_parquet(folder: Path, *, errors: bool = False, path: str | Path | None = None
                  ) -> tuple[Path, int]:
    """Write the campaign's committed result (or error) lines as Parquet; ``(path, rows)``.

    ``path`` defaults to ``results.parquet`` (``errors.parquet``) in the manifest's output
    folder. The file is written beside its target and renamed, so a reader never sees half.
    Raises ``FabricError`` if a line does not fit the schema or the file cannot be written.
    """
    pa, pq = parquet_modules("writing Parquet output")
    m = store.load(Path(folder))
    target = Path(path) if path is not None else \
        Path(m.output) / (ERRORS_PARQUET if errors else RESULTS_PARQUET)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    table_schema = schema(pa, errors)
    rows = 0
    try:
        with pq.ParquetWriter(tmp, table_schema) as writer:
            for chunk in _chunks(store.read_records(Path(folder), errors=errors)):
                writer.write_table(pa.Table.from_pylist(
                    [to_row(r, errors) for r in chunk], schema=table_schema))
                rows += len(chunk)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except (pa.ArrowException, OSError) as exc:
        raise FabricError(f"writing {target} failed: {type(exc).__name__}: {exc}",
                          path=str(target)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target, rows


def write_all(folder: Path) -> list[Path]:
    """``results.parquet`` and ``errors.parquet`` in the output folder (both, even if empty,
    so a script can always open both)."""
    return [write_parquet(folder, errors=e)[0] for e in (False, True)]


def _chunks(records: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= BATCH_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
