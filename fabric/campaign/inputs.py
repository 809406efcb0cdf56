"""Read and check a campaign's input file before any model time is spent.

Every line becomes either an ``Item`` (a custom_id plus the ``InferenceRequest`` it asks for,
validated by the same pydantic model the server uses) or a ``BadLine`` (line number, custom_id
if one could be read, and why). Lines follow the OpenAI batch format where it fits:

.. code:: text

    {"custom_id": "a1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}}
    {"custom_id": "a2", "prompt": "The mitochondria is", "max_tokens": 16}
    {"custom_id": "a3", "input": "text to embed"}                      (kind: embed)
    {"custom_id": "a4", "prompt": "Q: 2+2? A:", "continuation": " 4"}  (kind: score)

CSV and Parquet inputs are tables: ``input.column`` holds the text and ``input.id_column`` the
custom_id (a string or an integer); a file without those columns is refused as a whole. A
Parquet input's "line" is its row number, counted from 1.

Duplicate custom_ids are always fatal (the ledger is keyed by them); other bad lines are fatal
or recorded as errors, as the manifest's ``on_bad_line`` says.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric.campaign.manifest import Manifest
from fabric.errors import FabricError, InvalidManifest
from fabric.openai_messages import plain_messages
from fabric.protocol import validate_request

URL_KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "generate",
             "/v1/embeddings": "embed"}
SAMPLING_KEYS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logprobs",
                 "top_logprobs"}
IGNORED_KEYS = {"model", "user", "metadata", "n", "stream"}
"""OpenAI body keys accepted and ignored (the manifest pins the model; ``n`` must be 1)."""
TEXT_KEYS = {"prompt", "messages", "input", "continuation"}


@dataclass
class Item:
    """One valid input: its id, where it came from, and the request (no request id yet)."""

    custom_id: str
    line: int
    request: dict[str, Any]


@dataclass
class BadLine:
    """One input line that cannot run."""

    line: int
    custom_id: str | None
    kind: str
    message: str

    def key(self) -> str:
        """Ledger key: the custom_id, or ``@line:N`` when none could be read."""
        return self.custom_id if self.custom_id is not None else f"@line:{self.line}"


def read_inputs(manifest: Manifest) -> tuple[list[Item], list[BadLine]]:
    """Every item and bad line of the manifest's input; raise ``InvalidManifest`` when the
    campaign must not start (duplicates always; bad lines when ``on_bad_line`` is reject)."""
    items: list[Item] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    dups: list[str] = []
    unit = "row" if manifest.input_format() == "parquet" else "line"
    for line_no, raw, problem in _records(manifest):
        cid = raw.get("custom_id") if isinstance(raw, dict) else None
        cid = cid if isinstance(cid, str) and cid else None
        if cid is not None:
            if cid in seen:
                dups.append(f"{cid!r} on {unit}s {seen[cid]} and {line_no}")
                continue
            seen[cid] = line_no
        if problem is None:
            try:
                if cid is None:
                    raise ValueError("custom_id is missing or not a non-empty string")
                items.append(Item(cid, line_no, request_from_line(manifest, raw)))
                continue
            except (ValueError, FabricError) as exc:
                problem = ("BadLine", getattr(exc, "message", None) or str(exc))
        bad.append(BadLine(line_no, cid, problem[0], problem[1]))
    if dups:
        raise InvalidManifest(f"duplicate custom_id: {'; '.join(dups[:10])}"
                              + (f" (and {len(dups) - 10} more)" if len(dups) > 10 else ""),
                              duplicates=dups[:100])
    if bad and manifest.on_bad_line == "reject":
        shown = "; ".join(f"{unit} {b.line}: {b.message}" for b in bad[:10])
        raise InvalidManifest(
            f"{len(bad)} bad input {unit}(s) in {manifest.input.path} (set on_bad_line: record "
            f"to run the others): {shown}",
            lines=[b.line for b in bad[:100]])
    if not items and not bad:
        raise InvalidManifest(f"input {manifest.input.path} has no inputs")
    return items, bad


def request_from_line(manifest: Manifest, raw: dict[str, Any]) -> dict[str, Any]:
    """The ``InferenceRequest`` dict one input line asks for (validated; no request id)."""
    line = {k: v for k, v in raw.items() if k != "custom_id"}
    body = line.pop("body", None)
    url = line.pop("url", None)
    method = line.pop("method", None)
    if body is not None:
        if not isinstance(body, dict):
            raise ValueError("body must be an object")
        if line:
            raise ValueError(f"give fields either in body or at the top level, not both: "
                             f"{sorted(line)}")
        line = dict(body)
    if method is not None and method != "POST":
        raise ValueError(f"method must be POST, got {method!r}")
    if url is not None:
        want = URL_KINDS.get(str(url))
        compatible = {manifest.kind} | ({"generate"} if manifest.kind == "score" else set())
        if want is None or want not in compatible:
            raise ValueError(f"url {url!r} does not fit a {manifest.kind} campaign "
                             f"(known: {', '.join(URL_KINDS)})")
    unknown = set(line) - SAMPLING_KEYS - IGNORED_KEYS - TEXT_KEYS - {"max_completion_tokens"}
    if unknown and body is None:  # a campaign's own line: a misspelt field is an error
        raise ValueError(f"unsupported field(s) {sorted(unknown)}")
    # An OpenAI batch line is read as the gateway reads the same body live: fields it does
    # not use (presence_penalty, top_logprobs, ...) are ignored, not refused.
    line = {k: v for k, v in line.items() if k not in unknown}
    if isinstance(line.get("logprobs"), int) and not isinstance(line["logprobs"], bool):
        # /v1/completions' logprobs is the count of most likely tokens to list.
        line["top_logprobs"], line["logprobs"] = line["logprobs"], True
    if line.get("n", 1) != 1:
        raise ValueError("n must be 1 (one result per custom_id)")
    sampling = manifest.sampling.model_dump()
    if "max_completion_tokens" in line:
        line["max_tokens"] = line.pop("max_completion_tokens")
    for key in SAMPLING_KEYS & set(line):
        sampling[key] = line[key]
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    req: dict[str, Any] = {"model": manifest.model, "version": manifest.version,
                           "sampling": sampling}
    text = line.get("prompt", line.get("input"))
    if manifest.kind == "chat":
        messages = line.get("messages")
        if messages is not None:
            messages = plain_messages(messages)  # developer, text parts, tool turns
        if messages is None and text is not None:
            messages = [{"role": "user", "content": _text(text, "prompt")}]
        if messages is None:
            raise ValueError("a chat input needs messages (or prompt)")
        req.update(kind="generate", messages=messages)
    elif manifest.kind == "generate":
        if "messages" in line:
            raise ValueError("messages given to a generate campaign (use kind: chat)")
        req.update(kind="generate", prompt=_text(text, "prompt"))
    elif manifest.kind == "embed":
        req.update(kind="embed", prompt=_text(text, "input"))
    else:
        req.update(kind="logprobs", prompt=_text(text, "prompt"),
                   continuation=_text(line.get("continuation"), "continuation"))
    return validate_request(req).model_dump(mode="json", exclude={"request_id"})


def _text(value: Any, field: str) -> str:
    if value is None:
        raise ValueError(f"missing field {field!r}")
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__}")
    return value


def _records(manifest: Manifest) -> Iterator[tuple[int, Any, tuple[str, str] | None]]:
    """``(line number, parsed record or None, problem or None)`` for every input record."""
    path = Path(manifest.input.path)
    if not path.is_file():
        raise InvalidManifest(f"input file {path} does not exist", path=str(path))
    fmt = manifest.input_format()
    if fmt == "jsonl":
        yield from _jsonl(path, manifest.input.max_line_bytes)
    elif fmt == "csv":
        yield from _table(_csv_rows(path, manifest), manifest)
    else:
        yield from _table(_parquet_rows(path, manifest), manifest)


def _jsonl(path: Path, limit: int) -> Iterator[tuple[int, Any, tuple[str, str] | None]]:
    with path.open("rb") as fh:
        line_no = 0
        while True:
            # readline with a limit: an oversize line is skipped without being held in memory.
            chunk = fh.readline(limit + 2)
            if not chunk:
                return
            line_no += 1
            if len(chunk) > limit + 1 or (len(chunk) > limit and not chunk.endswith(b"\n")):
                size = len(chunk)
                while not chunk.endswith(b"\n"):
                    chunk = fh.readline(1 << 20)
                    if not chunk:
                        break
                    size += len(chunk)
                yield line_no, None, ("OversizeLine",
                                      f"line is {size} bytes; the limit is {limit} "
                                      "(input.max_line_bytes)")
                continue
            text = chunk.strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except (ValueError, UnicodeDecodeError) as exc:
                yield line_no, None, ("BadJSON", f"not valid JSON: {exc}")
                continue
            if not isinstance(record, dict):
                yield line_no, None, ("BadLine", "a line must be a JSON object")
                continue
            yield line_no, record, None


def _table(rows: Iterator[tuple[int, dict[str, Any]]], manifest: Manifest
           ) -> Iterator[tuple[int, Any, tuple[str, str] | None]]:
    spec = manifest.input
    text_key = {"chat": "prompt", "embed": "input"}.get(manifest.kind, "prompt")
    for line_no, row in rows:  # the columns were checked (``_check_columns``)
        cid = row.get(spec.id_column)
        # Integer ids (a Parquet int64 column) are fine as text; a float or a list is not: 1.0
        # or NaN would become an id nobody typed.
        if cid is not None and not isinstance(cid, str) and (
                isinstance(cid, bool) or not isinstance(cid, int)):
            yield line_no, None, ("BadLine", f"{spec.id_column!r} must be a string or an "
                                             f"integer, got {type(cid).__name__} {cid!r}")
            continue
        record = {"custom_id": None if cid in (None, "") else str(cid),
                  text_key: row.get(spec.column)}
        if manifest.kind == "score":
            record["continuation"] = row.get("continuation")
        yield line_no, record, None


def _check_columns(path: Path, columns: list[str], manifest: Manifest) -> None:
    """Refuse a table without the manifest's columns once, not once per row."""
    spec = manifest.input
    need = [(spec.column, "input.column"), (spec.id_column, "input.id_column")]
    if manifest.kind == "score":
        need.append(("continuation", "a score campaign"))
    for column, why in need:
        if column not in columns:
            raise InvalidManifest(f"input {path} has no column {column!r} (needed by {why}); "
                                  f"its columns are {columns}", path=str(path), column=column,
                                  columns=columns)


def _csv_rows(path: Path, manifest: Manifest) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is not None:  # None: an empty file ("has no inputs" later)
            _check_columns(path, list(reader.fieldnames), manifest)
        for row in reader:
            yield reader.line_num, dict(row)


def _parquet_rows(path: Path, manifest: Manifest) -> Iterator[tuple[int, dict[str, Any]]]:
    from fabric.campaign.export import parquet_modules

    pa, pq = parquet_modules("reading a Parquet input")
    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidManifest(f"input {path} is not a readable Parquet file: {exc}",
                              path=str(path)) from None
    with table:
        columns = list(table.schema_arrow.names)
        _check_columns(path, columns, manifest)
        spec = manifest.input
        # Only the columns the campaign uses, a batch at a time: a wide or huge file is not
        # read into memory whole.
        wanted = [c for c in dict.fromkeys((spec.id_column, spec.column, "continuation"))
                  if c in columns]
        row = 0
        try:
            for batch in table.iter_batches(batch_size=8192, columns=wanted):
                for record in batch.to_pylist():
                    row += 1
                    yield row, record
        except (pa.ArrowException, OSError) as exc:
            raise InvalidManifest(f"input {path}: Parquet row {row + 1} cannot be read: "
                                  f"{exc}", path=str(path), line=row + 1) from None
