"""Campaigns over Parquet: inputs read by column, bad files refused, Parquet output exported.

No site: inputs are checked with ``read_inputs``/``store.create`` and campaigns run with the
fake transport of ``test_campaign_unit`` (it answers ``"ok " + custom_id`` for each input), so
every expected value below is derived from the rows the test wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from fabric.campaign import export, store
from fabric.campaign.dispatch import CampaignRunner
from fabric.campaign.inputs import read_inputs
from fabric.campaign.manifest import load_manifest
from fabric.errors import FabricError, InvalidManifest
from tests.test_campaign_unit import FakeTransport, check_invariant

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_table(path: Path, columns: dict[str, list[Any]], types: dict[str, Any] | None = None
                ) -> Path:
    """A Parquet file with these columns (types inferred unless given)."""
    types = types or {}
    arrays = {name: pa.array(values, type=types.get(name)) for name, values in columns.items()}
    pq.write_table(pa.table(arrays), path)
    return path


def spec(tmp: Path, name: str = "pq", fmt: str = "parquet", **fields: Any) -> dict[str, Any]:
    """A manifest dict reading ``in.<fmt>`` by the ``text``/``id`` columns."""
    return {"name": name, "model": "smollm2-135m", "output": "out", "shard_size": 4,
            "input": {"path": f"in.{fmt}", "format": fmt, "column": "text", "id_column": "id"},
            "sites": [{"name": "local", "max_in_flight": 2}], **fields}


def run(folder: Path, transport: FakeTransport) -> str:
    return CampaignRunner(folder, transports={"local": transport}, poll_s=0.05).run()


# -- inputs -------------------------------------------------------------------------------------

def test_parquet_input_read_by_columns(tmp_path: Path) -> None:
    ids = [f"doc-{i}" for i in range(7)]
    texts = [f"Abstract {i}: the cell" for i in range(7)]
    # An unused wide column is not read, and the column order does not matter.
    write_table(tmp_path / "in.parquet", {"text": texts, "blob": ["x" * 1000] * 7, "id": ids})
    m = load_manifest(spec(tmp_path, sampling={"max_tokens": 5}), base=tmp_path)
    items, bad = read_inputs(m)
    assert bad == []
    assert [(i.custom_id, i.line, i.request["prompt"]) for i in items] == \
        list(zip(ids, range(1, 8), texts, strict=True))
    assert all(i.request["kind"] == "generate" and i.request["sampling"]["max_tokens"] == 5
               for i in items)
    # Integer ids (an int64 column) become their decimal text; chat wraps the text.
    write_table(tmp_path / "in.parquet", {"id": [10, 20], "text": texts[:2]})
    m = load_manifest(spec(tmp_path, kind="chat"), base=tmp_path)
    items, _ = read_inputs(m)
    assert [i.custom_id for i in items] == ["10", "20"]
    assert items[1].request["messages"] == [{"role": "user", "content": texts[1]}]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("missing", ["text", "id"])
def test_missing_column_refuses_the_file(tmp_path: Path, fmt: str, missing: str) -> None:
    columns = {"id": ["a", "b"], "text": ["one", "two"], "other": ["x", "y"]}
    del columns[missing]
    if fmt == "parquet":
        write_table(tmp_path / "in.parquet", columns)
    else:
        rows = [",".join(columns)] + [",".join(v) for v in zip(*columns.values(), strict=True)]
        (tmp_path / "in.csv").write_text("\n".join(rows) + "\n")
    # Refused as a whole even with on_bad_line: record (every row would fail the same way).
    m = load_manifest(spec(tmp_path, fmt=fmt, on_bad_line="record"), base=tmp_path)
    with pytest.raises(InvalidManifest) as info:
        store.create(m, tmp_path / "home")
    assert f"no column {missing!r}" in info.value.message
    assert info.value.details["columns"] == list(columns)
    assert not (tmp_path / "home" / "pq").exists()  # nothing was created


def test_parquet_duplicate_ids_name_the_rows(tmp_path: Path) -> None:
    ids = ["a", "b", "c", "b", "e", "a"]
    write_table(tmp_path / "in.parquet", {"id": ids, "text": [f"t{i}" for i in range(6)]})
    m = load_manifest(spec(tmp_path, on_bad_line="record"), base=tmp_path)
    with pytest.raises(InvalidManifest) as info:
        store.create(m, tmp_path / "home")
    assert "'b' on rows 2 and 4" in info.value.message
    assert "'a' on rows 1 and 6" in info.value.message
    assert not (tmp_path / "home" / "pq").exists()


def test_non_string_text_rejected_with_row_numbers(tmp_path: Path) -> None:
    write_table(tmp_path / "in.parquet", {"id": ["a", "b", "c"], "text": [7, 8, 9]})
    m = load_manifest(spec(tmp_path), base=tmp_path)  # on_bad_line: reject (the default)
    with pytest.raises(InvalidManifest) as info:
        store.create(m, tmp_path / "home")
    assert info.value.details["lines"] == [1, 2, 3]
    assert "3 bad input row(s)" in info.value.message
    assert "row 2: prompt must be a string, got int" in info.value.message
    # The same cells in a chat campaign name the type too, not "needs messages".
    with pytest.raises(InvalidManifest, match="row 1: prompt must be a string, got int"):
        read_inputs(load_manifest(spec(tmp_path, kind="chat"), base=tmp_path))
    # With on_bad_line: record each row becomes an error under its own id instead.
    items, bad = read_inputs(load_manifest(spec(tmp_path, on_bad_line="record"), base=tmp_path))
    assert items == []
    assert [(b.line, b.key(), b.message) for b in bad] == [
        (i + 1, cid, "prompt must be a string, got int") for i, cid in enumerate("abc")]


def test_bad_cells_recorded_when_asked(tmp_path: Path) -> None:
    ids = ["1", "2", "3", "4", "5"]
    texts = ["first", None, "third", "fourth", "fifth"]
    write_table(tmp_path / "in.parquet", {"id": ids, "text": texts})
    m = load_manifest(spec(tmp_path, on_bad_line="record"), base=tmp_path)
    items, bad = read_inputs(m)
    assert [i.custom_id for i in items] == [c for c, t in zip(ids, texts, strict=True) if t]
    assert [(b.line, b.custom_id, b.message) for b in bad] == [(2, "2", "missing field 'prompt'")]
    # Float ids would become text nobody typed ("3.5", "nan"): the row is bad, with no id.
    write_table(tmp_path / "in.parquet", {"id": [1.0, 2.0, 3.5], "text": ["a", "b", "c"]})
    items, bad = read_inputs(m)
    assert items == [] and [b.key() for b in bad] == ["@line:1", "@line:2", "@line:3"]
    assert bad[2].message == "'id' must be a string or an integer, got float 3.5"


def test_unreadable_parquet_file(tmp_path: Path) -> None:
    (tmp_path / "in.parquet").write_text('{"custom_id": "a", "prompt": "not parquet"}\n')
    with pytest.raises(InvalidManifest, match="not a readable Parquet file"):
        read_inputs(load_manifest(spec(tmp_path), base=tmp_path))


# -- output -------------------------------------------------------------------------------------

def test_parquet_output_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 13
    ids = [f"q{i:02d}" for i in range(n)]
    texts = [None if i == 5 else f"Prompt {i}" for i in range(n)]  # row 6 is a bad cell
    write_table(tmp_path / "in.parquet", {"id": ids, "text": texts})
    m = load_manifest(spec(tmp_path, on_bad_line="record", output_format="parquet"),
                      base=tmp_path)
    folder = store.create(m, tmp_path / "home")
    fake = FakeTransport(site="local", poison={"q09"})
    assert run(folder, fake) == "done"
    out, err = check_invariant(folder, n)

    results = pq.read_table(tmp_path / "out" / export.RESULTS_PARQUET).to_pylist()
    errors = pq.read_table(tmp_path / "out" / export.ERRORS_PARQUET).to_pylist()
    assert len(results) + len(errors) == n  # one row per input
    assert sorted(r["custom_id"] for r in results + errors) == ids
    assert {r["custom_id"] for r in errors} == {"q05", "q09"}
    row_of = {cid: i + 1 for i, cid in enumerate(ids)}
    by_id = {r["custom_id"]: r for r in out}
    for row in results:
        cid = row["custom_id"]
        assert row["line"] == row_of[cid]
        assert json.loads(row["response"])["text"] == "ok " + cid
        # Every column holds what the JSONL line holds.
        line = by_id[cid]
        assert {**row, "response": json.loads(row["response"])} == line
    bad = {r["custom_id"]: r for r in errors}
    assert bad["q05"]["line"] == 6 and bad["q05"]["attempts"] == 0
    assert bad["q05"]["error"]["message"] == "missing field 'prompt'"
    assert bad["q05"]["nonce"] is None and bad["q05"]["site"] is None
    assert bad["q09"]["error"]["kind"] == "ContextLengthExceeded"
    assert bad["q09"]["attempts"] == m.max_attempts and bad["q09"]["site"] == "local"
    assert json.loads(bad["q09"]["error"]["details"]) == {}
    assert len(err) == 2

    # The CLI writes the same rows anywhere, on demand.
    from fabric.cli.main import main

    dest = tmp_path / "copy.parquet"
    assert main(["campaign", "results", "pq", "--home", str(tmp_path / "home"), "--format",
                 "parquet", "--out", str(dest), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(dest), "rows": len(results)}
    assert pq.read_table(dest).to_pylist() == results


def test_export_failure_fails_the_campaign_and_resume_rewrites(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 9
    write_table(tmp_path / "in.parquet", {"id": [f"r{i}" for i in range(n)],
                                          "text": [f"t{i}" for i in range(n)]})
    m = load_manifest(spec(tmp_path, output_format="parquet"), base=tmp_path)
    folder = store.create(m, tmp_path / "home")
    real = export.write_all

    def disk_full(folder: Path) -> list[Path]:
        raise FabricError("writing results.parquet failed: OSError: No space left on device")

    monkeypatch.setattr(export, "write_all", disk_full)
    fake = FakeTransport(site="local")
    with pytest.raises(FabricError, match="No space left"):
        run(folder, fake)
    status = store.status(folder)
    assert status["status"] == "failed" and "No space left" in status["last_error"]
    assert not (tmp_path / "out" / export.RESULTS_PARQUET).exists()
    monkeypatch.setattr(export, "write_all", real)
    store.mark_resumable(folder)
    assert run(folder, fake) == "done"
    assert pq.read_table(tmp_path / "out" / export.RESULTS_PARQUET).num_rows == n
    assert all(fake.executions[f"r{i}"] == 1 for i in range(n))  # nothing ran twice


def test_parquet_without_pyarrow_fails_before_anything(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "in.jsonl").write_text(json.dumps({"custom_id": "a", "prompt": "x"}) + "\n")
    m = load_manifest({**spec(tmp_path, output_format="parquet"),
                       "input": {"path": "in.jsonl"}}, base=tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    with pytest.raises(InvalidManifest, match="needs pyarrow"):
        store.create(m, tmp_path / "home")
    assert not (tmp_path / "home" / "pq").exists()


def _committed_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     records: list[dict[str, Any]], errors: bool) -> Path:
    """A created campaign whose committed result (or error) lines are ``records``."""
    (tmp_path / "in.jsonl").write_text(json.dumps({"custom_id": "a", "prompt": "x"}) + "\n")
    m = load_manifest({**spec(tmp_path), "input": {"path": "in.jsonl"}}, base=tmp_path)
    folder = store.create(m, tmp_path / "home")

    of_errors = errors

    def read_records(where: Path, errors: bool = False) -> Any:
        assert where == folder
        return iter(records if errors == of_errors else [])

    monkeypatch.setattr(store, "read_records", read_records)
    return folder


def test_export_in_several_batches_writes_each_line_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More lines than ``BATCH_ROWS``: written a batch at a time, every line exactly once."""
    monkeypatch.setattr(export, "BATCH_ROWS", 2)
    records = [{"custom_id": f"c{i}", "line": i + 1, "response": {"text": f"t{i}"}}
               for i in range(5)]
    folder = _committed_lines(tmp_path, monkeypatch, records, errors=False)
    path, rows = export.write_parquet(folder, path=tmp_path / "r.parquet")
    got = pq.read_table(path).to_pylist()
    assert rows == len(records)
    assert [(r["custom_id"], r["line"], json.loads(r["response"])) for r in got] == \
        [(r["custom_id"], r["line"], r["response"]) for r in records]


def test_export_keeps_provenance_and_error_details(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    provenance = {"model": "m", "version": "v", "sha256": "ab" * 32, "seed": 7,
                  "plan": {"pp": 2, "tp": 1}, "hooks": 1}
    results = [{"custom_id": "p", "line": 1, "response": {"text": "x"}, "provenance": provenance},
               {"custom_id": "q", "line": 2, "response": {"text": "y"}}]
    folder = _committed_lines(tmp_path, monkeypatch, results, errors=False)
    path, _ = export.write_parquet(folder, path=tmp_path / "r.parquet")
    got = {r["custom_id"]: r for r in pq.read_table(path).to_pylist()}
    assert json.loads(got["p"]["provenance"]) == provenance
    assert got["q"]["provenance"] is None  # a line without one: null, not "null"

    details = {"limit": 2048, "tokens": 4096, "site": "a"}
    error_lines = [{"custom_id": "e", "line": 3, "attempts": 2,
                    "error": {"kind": "ContextLengthExceeded", "message": "too long",
                              "details": details}}]
    (tmp_path / "e").mkdir()
    folder = _committed_lines(tmp_path / "e", monkeypatch, error_lines, errors=True)
    path, rows = export.write_parquet(folder, errors=True, path=tmp_path / "e.parquet")
    (row,) = pq.read_table(path).to_pylist()
    assert rows == 1 and row["attempts"] == 2
    assert row["error"]["kind"] == "ContextLengthExceeded"
    assert json.loads(row["error"]["details"]) == details
