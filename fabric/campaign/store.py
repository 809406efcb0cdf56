"""Where campaigns live, and the verbs that need no runner: create, list, status, cancel.

A campaign *home* is a folder of campaigns, one sub-folder each (``manifest.json``,
``ledger.sqlite``, ``runner.lock``); by default it is ``<site state dir>/campaigns`` of the
site whose process schedules them, so ``fabric campaign list`` and that site's scheduler see
the same campaigns. Results go to the manifest's ``output`` folder (``results.jsonl``,
``errors.jsonl``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fabric.campaign.inputs import read_inputs
from fabric.campaign.ledger import TERMINAL_STATUSES, Ledger
from fabric.campaign.manifest import Manifest, load_manifest, validate
from fabric.errors import CampaignOutputLost, InvalidManifest, InvalidRequest

RESULTS, ERRORS = "results.jsonl", "errors.jsonl"
LEDGER, MANIFEST, LOCK = "ledger.sqlite", "manifest.json", "runner.lock"


def default_home(site: str = "local", state_dir: str | Path | None = None) -> Path:
    """``<state dir of site>/campaigns``: the registry that site's scheduler runs."""
    from fabric.sites import resolve_site

    return resolve_site(site, state_dir)[2] / "campaigns"


def campaign_dir(home: Path, name: str) -> Path:
    """A campaign's folder (raises ``InvalidRequest`` naming the known ones if absent)."""
    folder = Path(home) / name
    if not (folder / LEDGER).exists():
        known = ", ".join(list_names(home)) or "none"
        raise InvalidRequest(f"no campaign {name!r} in {home} (known: {known})", name=name)
    return folder


def list_names(home: Path) -> list[str]:
    """Names of the campaigns in ``home``."""
    home = Path(home)
    return sorted(p.name for p in home.iterdir() if (p / LEDGER).exists()) if home.is_dir() \
        else []


def load(folder: Path) -> Manifest:
    """The campaign's stored (validated, paths absolute) manifest."""
    return Manifest.model_validate_json((folder / MANIFEST).read_text())


def check_model(manifest: Manifest) -> None:
    """Raise ``UnknownModel`` unless every site's catalog has the manifest's model+version."""
    from fabric.errors import FabricError
    from fabric.models_registry import site_catalog
    from fabric.sites import load_site

    for spec in manifest.sites:
        try:
            site = load_site(spec.name)
        except FabricError as exc:
            raise InvalidManifest(f"site {spec.name!r}: {exc.message}", site=spec.name) from None
        site_catalog(site).get(manifest.model, manifest.version)


def create(manifest: Manifest | str | Path, home: Path, *, runner: str = "here",
           schedule: dict[str, str] | None = None, now: float | None = None) -> Path:
    """Validate everything (model, every input line) and write the ledger; returns the folder.

    Nothing is sent to a site here: a bad manifest or input fails before any model time.
    ``runner``: ``here`` (this process runs it) or ``site`` (the site's scheduler does).
    ``schedule`` (``{"at": ...}`` or ``{"every": ...}``) overrides the manifest's.
    """
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    if schedule:
        m = validate({**m.model_dump(), "schedule": schedule})  # a bad --every/--at: typed
    folder = Path(home) / m.name
    if (folder / LEDGER).exists():
        raise InvalidManifest(f"campaign {m.name!r} already exists in {home}; resume it, or "
                              "give the manifest another name", name=m.name)
    check_model(m)
    if m.output_format == "parquet":
        from fabric.campaign.export import parquet_modules

        parquet_modules("output_format: parquet")  # fail now, not after the model time
    items, bad = read_inputs(m)
    now = time.time() if now is None else now
    first = m.schedule.first_run(now) if m.schedule else now
    recurring = bool(m.schedule and m.schedule.every)
    out = Path(m.output)
    if not recurring:
        for name in (RESULTS, ERRORS):
            if (out / name).exists() and (out / name).stat().st_size:
                raise InvalidManifest(f"{out / name} already has results; choose another "
                                      "output folder or remove it", path=str(out / name))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(m.model_dump_json(indent=2))
    err_offset = 0
    if bad and not recurring:
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULTS).touch()
        lines = [error_line(b.key(), b.line, {"kind": b.kind, "message": b.message},
                            {"name": m.model, "version": m.version, "sha256": None},
                            attempts=0) for b in bad]
        err_offset = write_lines(out / ERRORS, lines, truncate=True)
    status = "recurring" if recurring else ("scheduled" if first > now else "queued")
    # Fill a temporary ledger and rename it: a crash part-way leaves no half campaign.
    tmp = folder / (LEDGER + ".tmp")
    tmp.unlink(missing_ok=True)
    ledger = Ledger(tmp)
    try:
        meta = {"name": m.name, "status": status, "runner": runner, "created": now,
                "next_run": first, "out_offset": 0, "err_offset": err_offset,
                "inputs": len(items) + len(bad)}
        if recurring:
            ledger.set(**meta)  # the template holds no items; each firing is a new campaign
        else:
            ledger.fill(((i.custom_id, i.line, i.request) for i in items),
                        ((b.key(), b.line, b.kind, b.message) for b in bad), meta)
    finally:
        ledger.close()
    os.replace(tmp, folder / LEDGER)
    return folder


def error_line(cid: str, line: int | None, error: dict[str, Any], model: dict[str, Any],
               *, attempts: int, **extra: Any) -> dict[str, Any]:
    """One ``errors.jsonl`` record."""
    return {"custom_id": cid, "line": line, "model": model,
            "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "error": {"kind": error.get("kind"), "message": error.get("message"),
                      "details": {k: v for k, v in (error.get("details") or {}).items()
                                  if k != "traceback"}},
            "attempts": attempts, **extra}


def write_lines(path: Path, records: list[dict[str, Any]], truncate: bool = False,
                expect: int | None = None) -> int:
    """Append ``records`` as JSON lines, fsync, and return the file's new length;
    ``CampaignOutputLost`` when the file is gone, or (``expect``: the length the ledger
    committed) shorter than that."""
    try:
        with path.open("wb" if truncate else "ab") as fh:
            if expect is not None and fh.tell() < expect:
                raise output_lost(path, expect, fh.tell())
            if records:
                fh.write(b"".join(json.dumps(r, default=str).encode() + b"\n" for r in records))
            fh.flush()
            os.fsync(fh.fileno())
            return fh.tell()
    except FileNotFoundError:
        raise output_lost(path, expect or 0, 0) from None


def output_lost(path: Path, committed: int, found: int) -> CampaignOutputLost:
    """The error for an output file holding less than the ledger committed to it."""
    return CampaignOutputLost(
        f"{path} holds {found} bytes where the campaign's ledger committed {committed}: it "
        "was removed or cut while the campaign ran, and the inputs whose lines it lost would "
        "be reported done. Restore it, or start a new campaign.", path=str(path),
        committed=committed, found=found)


def runner_pid(folder: Path) -> int | None:
    """The pid holding the campaign's runner lock, or None if no runner is alive."""
    with (folder / LOCK).open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            text = fh.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fh, fcntl.LOCK_UN)
        return None


def status(folder: Path) -> dict[str, Any]:
    """Counts, throughput, ETA, per-site progress and errors by kind (JSON-able)."""
    m = load(folder)
    ledger = Ledger(folder / LEDGER)
    try:
        counts = ledger.counts()
        total = sum(counts.values())
        settled, tokens, span = ledger.recent(120.0)
        state = str(ledger.get("status"))
        pid = runner_pid(folder)
        if state == "running" and pid is None:
            # A runner writes its last status before it lets the lock go: read it again, in
            # case it finished between the two reads. Still running: the runner died (kill -9,
            # reboot) and `resume` continues it.
            state = str(ledger.get("status"))
            state = "interrupted" if state == "running" else state
        left = counts["pending"] + counts["running"]
        rate = settled / span if settled else 0.0
        started, finished = ledger.get("started"), ledger.get("finished")
        return {
            "name": m.name, "status": state, "runner": ledger.get("runner"),
            "runner_pid": pid, "model": m.model, "version": m.version, "kind": m.kind,
            "total": total, **counts, "progress": (total - left) / total if total else 1.0,
            "inputs_per_s": round(rate, 3), "tokens_per_s": round(tokens / span, 1),
            "tokens": ledger.tokens_done(),
            "eta_s": round(left / rate, 1) if rate > 0 and left else (0.0 if not left else None),
            "elapsed_s": round((finished or time.time()) - started, 1) if started else None,
            "next_run": ledger.get("next_run"), "schedule": m.schedule.model_dump()
            if m.schedule else None, "sites": ledger.per_site(),
            "errors_by_kind": ledger.errors_by_kind(), "last_error": ledger.get("last_error"),
            "output": str(Path(m.output) / RESULTS), "errors": str(Path(m.output) / ERRORS),
            "folder": str(folder),
        }
    finally:
        ledger.close()


def is_final(status: dict[str, Any]) -> bool:
    """True once nothing more will happen without a ``resume``. An interrupted campaign of
    the site's scheduler is not final: the scheduler resumes it when the site is back."""
    state = status.get("status")
    if state == "interrupted":
        return status.get("runner") != "site"
    return state in TERMINAL_STATUSES


def cancel(folder: Path) -> str:
    """Stop a campaign: a live runner sees ``cancelling`` and stops; otherwise it is
    ``cancelled`` at once. Returns the new status."""
    ledger = Ledger(folder / LEDGER)
    try:
        current = ledger.get("status")
        if current in TERMINAL_STATUSES:
            return str(current)
        new = "cancelling" if runner_pid(folder) is not None else "cancelled"
        ledger.set(status=new, finished=time.time())
        return new
    finally:
        ledger.close()


def mark_resumable(folder: Path, runner: str | None = None, retry_failed: bool = False) -> None:
    """Make a stopped campaign runnable again (queued now), optionally retrying failures."""
    if runner_pid(folder) is not None:
        raise InvalidRequest(f"campaign {folder.name} is running now (pid {runner_pid(folder)})")
    ledger = Ledger(folder / LEDGER)
    try:
        if ledger.get("status") == "recurring":
            raise InvalidRequest(f"{folder.name} is a recurring template; its runs are "
                                 "separate campaigns (resume those)")
        if retry_failed:
            ledger.retry_failed()
            _rewrite_errors(folder, ledger)
        ledger.set(status="queued", next_run=time.time(), finished=None,
                   **({"runner": runner} if runner else {}))
    finally:
        ledger.close()


def _rewrite_errors(folder: Path, ledger: Ledger) -> None:
    """Keep only the error lines of inputs still failed (the requeued ones will get new
    lines); done through a temp file and rename so a crash keeps the old file whole."""
    m = load(folder)
    path = Path(m.output) / ERRORS
    if not path.exists():
        return
    still = {r[0] for r in ledger.conn.execute("SELECT custom_id FROM items WHERE "
                                               "state='failed'")}
    offset = int(ledger.get("err_offset") or 0)
    with path.open("rb") as fh:
        kept = [ln for ln in fh.read(offset).splitlines(keepends=True)
                if json.loads(ln).get("custom_id") in still]
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        fh.write(b"".join(kept))
        fh.flush()
        os.fsync(fh.fileno())
        size = fh.tell()
    os.replace(tmp, path)
    ledger.set(err_offset=size)


def read_records(folder: Path, errors: bool = False) -> Iterator[dict[str, Any]]:
    """The committed lines of ``results.jsonl`` (or ``errors.jsonl``), as dicts."""
    m = load(folder)
    ledger = Ledger(folder / LEDGER)
    try:
        limit = int(ledger.get("err_offset" if errors else "out_offset") or 0)
    finally:
        ledger.close()
    path = Path(m.output) / (ERRORS if errors else RESULTS)
    if not path.exists():
        return
    with path.open("rb") as fh:
        read = 0
        for raw in fh:
            read += len(raw)
            if read > limit:
                return  # past the committed length: a line not yet (or never) committed
            with contextlib.suppress(ValueError):
                yield json.loads(raw)
