"""The campaign manifest: what to run, on which model, over which inputs, where, and when.

A manifest is YAML validated by pydantic; unknown keys are errors (a typo such as
``max_attemps`` must not silently fall back to a default on a million-prompt run). Relative
paths (``input.path``, ``output``) resolve against the manifest file's folder, so a manifest
and its inputs can travel together.

.. code:: yaml

    name: abstracts-2026
    model: smollm2-135m
    version: instruct-q4_1-0.1.2      # optional pin; results carry version + sha256 anyway
    kind: chat                        # generate | chat | embed | score
    sampling: {max_tokens: 32, temperature: 0.0}
    input: {path: prompts.jsonl}      # or {path: x.csv, format: csv, column: text, id_column: id}
                                      # (Parquet likewise: format: parquet; needs pyarrow)
    output: out/                      # results.jsonl and errors.jsonl land here
    output_format: jsonl              # or parquet: results.parquet etc. too when it finishes
    sites: [{name: local, weight: 1, max_in_flight: 2}]
    shard_size: 64
    max_attempts: 3
    on_bad_line: reject               # or record: bad lines go to errors.jsonl, the rest runs
    schedule: {every: "0 2 * * *"}    # or {at: "2026-11-27T02:00:00Z"}; omit to run now
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fabric.campaign.cron import CronSpec
from fabric.errors import InvalidManifest
from fabric.protocol import SamplingParams

Kind = Literal["generate", "chat", "embed", "score"]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    """Where the inputs are and how to read them."""

    path: str
    """JSONL (one request per line), CSV or Parquet file."""
    format: Literal["jsonl", "csv", "parquet"] | None = None
    """Taken from the file's suffix when omitted."""
    column: str = "prompt"
    """CSV/Parquet: the column holding the text."""
    id_column: str = "custom_id"
    """CSV/Parquet: the column holding the ``custom_id``."""
    max_line_bytes: int = Field(1_000_000, gt=0)
    """Longer lines are bad lines (a runaway line must not be read into every shard)."""


class SiteSpec(_Strict):
    """One site the campaign may use."""

    name: str
    """Site name (``endpoints/<name>``) or path to a site folder."""
    weight: float = Field(1.0, gt=0)
    """Share of shards relative to the other sites (2.0 gets twice as many)."""
    max_in_flight: int = Field(2, ge=1)
    """Shards running at this site at once (a cap, so one campaign cannot flood a site)."""
    state_dir: str | None = None
    """Override the site's state dir (tests, or a second copy of a site)."""


class Schedule(_Strict):
    """When to run: once at ``at``, or on every match of the cron expression ``every``."""

    at: str | None = None
    """ISO 8601 time (``2026-11-27T02:00:00Z``; no zone means UTC) or ``now``."""
    every: str | None = None
    """Five-field cron expression in UTC (``minute hour day month weekday``)."""

    @field_validator("every")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            CronSpec.parse(value)  # raises ValueError with the bad field
        return value

    @field_validator("at")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None and value != "now":
            parse_time(value)
        return value

    def first_run(self, now: float) -> float:
        """Epoch seconds of the first run."""
        if self.every:
            return CronSpec.parse(self.every).next_after(now)
        if self.at and self.at != "now":
            return parse_time(self.at)
        return now


class Manifest(_Strict):
    """A validated campaign manifest (see the module docstring for an example)."""

    name: str
    """Campaign name: letters, digits, ``._-`` (it names a folder)."""
    model: str
    """Catalog model name."""
    version: str | None = None
    """Version pin; ``None`` takes the site catalog's latest."""
    kind: Kind = "generate"
    """``generate`` (prompt), ``chat`` (messages), ``embed`` (text -> vector) or ``score``
    (log-probabilities of ``continuation`` given ``prompt``)."""
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    """Defaults for every input; a line's own ``max_tokens``/``temperature``/... win."""
    input: InputSpec
    output: str
    """Folder for ``results.jsonl`` and ``errors.jsonl``."""
    output_format: Literal["jsonl", "parquet"] = "jsonl"
    """``parquet``: also write ``results.parquet`` and ``errors.parquet`` when the campaign
    finishes (needs pyarrow). The JSONL files are always written: they carry the exactly-once
    guarantee, and the Parquet files are made from their committed lines."""
    sites: list[SiteSpec] = Field(default_factory=lambda: [SiteSpec(name="local")])
    shard_size: int = Field(32, ge=1, le=10_000)
    """Inputs per shard (one endpoint task)."""
    max_attempts: int = Field(3, ge=1, le=100)
    """Executions an input may get before its last error is final."""
    on_bad_line: Literal["reject", "record"] = "reject"
    """``reject``: a malformed input line stops the campaign before it runs; ``record``: the
    line goes to ``errors.jsonl`` and the others run."""
    shard_timeout_s: float = Field(3600.0, gt=0)
    """A shard with no answer after this long is presumed lost and its inputs retried."""
    concurrency: int = Field(64, ge=1, le=4096)
    """Requests a shard keeps in flight at its model server (continuous batching does the
    rest); keep it at or below the server's ``max_queue_requests``."""
    schedule: Schedule | None = None
    audit: bool = False
    """Every execution at the site is recorded in the site's own audit file
    (``<site state dir>/campaigns/audit/<name>.jsonl``, one JSON line ``{custom_id, nonce}``
    each): the evidence that an input ran exactly once. The site chooses the place; a
    caller-chosen path (the old ``audit_log``) is refused."""

    @model_validator(mode="before")
    @classmethod
    def _no_audit_path(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "audit_log" not in data:
            return data
        if data["audit_log"] is None:  # a manifest stored before the field went: harmless
            return {k: v for k, v in data.items() if k != "audit_log"}
        raise ValueError("audit_log (a path written by the site) is no longer accepted; use "
                         "'audit: true': the site records executions in "
                         "<site state dir>/campaigns/audit/<name>.jsonl")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError("name must be 1-100 letters, digits, '.', '_' or '-', starting "
                             "with a letter or digit")
        return value

    @field_validator("sites")
    @classmethod
    def _sites(cls, value: list[SiteSpec]) -> list[SiteSpec]:
        if not value:
            raise ValueError("give at least one site")
        names = [s.name for s in value]
        if len(set(names)) != len(names):
            raise ValueError(f"sites are listed twice: {names}")
        return value

    def input_format(self) -> str:
        """``jsonl``, ``csv`` or ``parquet``."""
        if self.input.format:
            return self.input.format
        suffix = Path(self.input.path).suffix.lower()
        return {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(suffix, "jsonl")


def load_manifest(source: str | Path | dict[str, Any], base: Path | None = None) -> Manifest:
    """Validate a manifest (YAML path, YAML text or dict); paths become absolute.

    Raises ``InvalidManifest`` naming every bad field (and the YAML line for syntax errors).
    """
    if isinstance(source, dict):
        data: Any = dict(source)
        base = base or Path.cwd()
    else:
        path = Path(source)
        text = path.read_text() if path.exists() else None
        if text is None:
            if isinstance(source, Path) or "\n" not in str(source):
                raise InvalidManifest(f"manifest {source} does not exist", path=str(source))
            text = str(source)
        else:
            base = base or path.resolve().parent
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            raise InvalidManifest(f"manifest is not valid YAML (line {line}): {exc}",
                                  line=line) from None
    if not isinstance(data, dict):
        raise InvalidManifest("manifest must be a YAML mapping of keys to values")
    return resolve_paths(validate(data), base or Path.cwd())


def validate(data: dict[str, Any]) -> Manifest:
    """``Manifest.model_validate``; its errors become one ``InvalidManifest`` naming each."""
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'manifest'}: {err['msg']}"
            for err in exc.errors())
        raise InvalidManifest(f"invalid manifest: {problems}", errors=problems) from None


def resolve_paths(manifest: Manifest, base: Path) -> Manifest:
    """The manifest with input, output and site folders made absolute."""
    def absolute(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    m = manifest.model_copy(deep=True)
    m.input.path = absolute(m.input.path)
    m.output = absolute(m.output)
    for site in m.sites:
        # A relative folder that exists is a site path; otherwise it is a site name.
        if (base / site.name).is_dir() and not Path(site.name).is_absolute():
            site.name = str((base / site.name).resolve())
        if site.state_dir:
            site.state_dir = absolute(site.state_dir)
    return m


def parse_time(text: str) -> float:
    """Epoch seconds of an ISO 8601 time (UTC when it names no zone)."""
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time such as 2026-11-27T02:00:00Z"
                         ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()
