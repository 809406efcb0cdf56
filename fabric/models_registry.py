"""Models a site's operator registered (``fabric models add``): bring your own checkpoint.

A registered model is a Hugging Face-style folder (``config.json``, ``*.safetensors``, tokenizer
files) under a name and version. ``add`` validates the folder (typed errors name what is missing
or unsupported), hashes its weights once, in parallel (``fabric.weights.file_digests``), and
records the hash with a size/mtime stamp in ``models.json`` in the site's state dir (written
atomically, mode 0600, in a 0700 dir). The entries join the site's catalog (``site_catalog``),
so requests can pin the version by name or by hash, and serving uses the recorded hash instead
of hashing again (``fabric.weights.prepare``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fabric.catalog import Catalog, CatalogEntry, Family, WeightSource
from fabric.engine.architectures import SERVED, family_of
from fabric.errors import InvalidModelFolder, InvalidRequest, UnknownModel
from fabric.weights import (
    file_digests,
    known_identity,
    stamp_of,
    weight_files,
    weights_sha256,
)

REGISTRY_FILE = "models.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.txt")
"""Any one of these makes a folder's tokenizer loadable by transformers."""
DTYPES = ("float32", "bfloat16", "float16")


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
"""What a registered model's name may be."""


class RegisteredModel(BaseModel):
    """One registered model version and the identity of its weights."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, pattern=NAME_PATTERN)
    version: str = Field(min_length=1)
    path: str
    """Absolute path of the folder."""
    family: Family
    architecture: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Weights hash (``fabric.weights.weights_sha256``)."""
    files: dict[str, str]
    """``{safetensors file name: sha256}`` (what ``sha256sum`` prints for each)."""
    stamp: list[str]
    """Name, size and mtime of each weights file when hashed."""
    size_bytes: int
    params: int = 0
    dtype: str = "float32"
    description: str = ""
    added: float = 0.0

    def entry(self) -> CatalogEntry:
        """The catalog entry the site serves for this version."""
        source = WeightSource(kind="path", path=self.path, sha256=self.sha256, stamp=self.stamp)
        dtype = self.dtype if self.dtype in DTYPES else "float32"
        return CatalogEntry(name=self.name, version=self.version, family=self.family,
                            source=source, params=self.params, dtype=dtype,
                            description=self.description or f"registered from {self.path}")


def inspect_folder(folder: Path) -> tuple[dict[str, Any], Family, list[Path]]:
    """``(config, family, weight files)`` of a servable folder, else a typed error naming what
    is missing (``InvalidModelFolder``) or unsupported (``UnsupportedArchitecture``)."""
    if not folder.is_dir():
        raise InvalidModelFolder(f"{folder} is not a folder", path=str(folder))
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise InvalidModelFolder(f"{folder} has no config.json (a Hugging Face model folder "
                                 "holds config.json, *.safetensors and tokenizer files)",
                                 path=str(folder), missing="config.json") from None
    except json.JSONDecodeError as exc:
        raise InvalidModelFolder(f"{folder}/config.json is not JSON: {exc}",
                                 path=str(folder)) from None
    family = family_of(config)
    files = weight_files(folder)
    if not files:
        found = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt"))
        raise InvalidModelFolder(
            f"{folder} has no *.safetensors weights"
            + (f" (found {', '.join(found)}: save them with safe_serialization=True)"
               if found else ""), path=str(folder), missing="*.safetensors")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise InvalidModelFolder(f"{folder} has no tokenizer (one of {', '.join(TOKENIZER_FILES)})",
                                 path=str(folder), missing="tokenizer")
    for path in files:
        check_weights_file(path)
    return config, family, files


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
"""safetensors dtypes a ``*.weight`` tensor may have (FP8 checkpoints included)."""


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name -> dtype, shape, data offsets) and where its
    tensor bytes start; ``InvalidModelFolder`` naming the file when it is not one."""
    try:
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > path.stat().st_size:
                raise ValueError(f"header of {size} bytes is longer than the file")
            header = json.loads(fh.read(size))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        return header, 8 + size
    except FileNotFoundError:
        raise InvalidModelFolder(f"{path} does not exist (a dangling link?)",
                                 path=str(path)) from None
    except (OSError, ValueError, struct.error) as exc:
        raise InvalidModelFolder(f"{path} is not a safetensors file: {exc}",
                                 path=str(path)) from None


def check_weights_file(path: Path) -> None:
    """Refuse a weights file cut short (a copy that stopped: its server would fail with a
    shape error naming no file) or whose ``*.weight`` tensors are not floating point."""
    header, start = safetensors_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = start + max((int(m["data_offsets"][1]) for m in tensors.values()), default=0)
    if path.stat().st_size < end:
        raise InvalidModelFolder(f"{path} is truncated: its header needs {end} bytes, the file "
                                 f"has {path.stat().st_size}", path=str(path))
    for name, meta in tensors.items():
        if name.endswith(".weight") and meta.get("dtype") not in FLOAT_DTYPES:
            raise InvalidModelFolder(f"{path}: tensor {name} is {meta.get('dtype')}; weights "
                                     f"must be one of {', '.join(FLOAT_DTYPES)}",
                                     path=str(path), tensor=name)


def count_params(files: list[Path]) -> int:
    """Parameters in safetensors files, from their headers only (no tensor bytes read)."""
    total = 0
    for path in files:
        header, _ = safetensors_header(path)
        for key, meta in header.items():
            if key != "__metadata__":
                n = 1
                for dim in meta["shape"]:
                    n *= dim
                total += n
    return total


class ModelRegistry:
    """The registered models of one site (``<state_dir>/models.json``)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir).expanduser()
        self.path = self.state_dir / REGISTRY_FILE

    def models(self) -> list[RegisteredModel]:
        """Every registered version, in registration order."""
        if not self.path.exists():
            return []
        data = json.loads(self.path.read_text())
        return [RegisteredModel.model_validate(m) for m in data.get("models", [])]

    def entries(self) -> list[CatalogEntry]:
        """The catalog entries of the registered versions."""
        return [m.entry() for m in self.models()]

    def add(self, folder: Path, name: str, version: str, *, description: str = "",
            existing: Catalog | None = None) -> RegisteredModel:
        """Validate ``folder``, hash its weights once and register it as ``name`` ``version``.

        ``existing`` (the site's catalog) refuses a version that is already served."""
        if not re.fullmatch(NAME_PATTERN, name or ""):
            raise InvalidRequest(f"model name {name!r}: letters, digits and . _ - only, "
                                 "starting with a letter or digit", param="name")
        if not str(version or "").strip():
            raise InvalidRequest("a model version must not be empty", param="version")
        folder = Path(folder).expanduser().resolve()
        config, family, files = inspect_folder(folder)
        stamp = stamp_of(files)
        digests = file_digests(files)
        if stamp_of(files) != stamp:
            raise InvalidModelFolder(f"{folder} changed while it was hashed; try again",
                                     path=str(folder))
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
        model = RegisteredModel(
            name=name, version=version, path=str(folder), family=family,
            architecture=next(a for a in config["architectures"] if a in SERVED),
            sha256=weights_sha256(digests), files=digests, stamp=stamp,
            size_bytes=sum(f.stat().st_size for f in files), params=count_params(files),
            dtype=dtype, description=description, added=time.time())
        with self._locked() as models:
            mine = {m.name for m in models}
            if existing is not None and name not in mine and name in existing.names():
                # A new version would become the name's default: every caller of the
                # shipped (or site-defined) model would silently get these weights.
                raise InvalidRequest(f"model {name!r} is already served by the site (not a "
                                     "registered model); register under a name of its own",
                                     model=name)
            taken = [m for m in models if m.name == name and m.version == version]
            if taken or (existing is not None and _served(existing, name, version)):
                raise InvalidRequest(f"model {name!r} already has a version {version!r}; pick "
                                     "another version (or fabric models remove it first)",
                                     model=name, version=version)
            models.append(model)
        return model

    def remove(self, name: str, version: str | None = None) -> list[RegisteredModel]:
        """Unregister ``name`` (one ``version``, or all); returns what was removed."""
        with self._locked() as models:
            gone = [m for m in models if m.name == name and version in (None, m.version)]
            if not gone:
                known = [f"{m.name} {m.version}" for m in models]
                raise UnknownModel(f"no registered model {name!r}"
                                   + (f" version {version!r}" if version else "")
                                   + f"; registered: {', '.join(known) or 'none'}",
                                   model=name, available=known)
            models[:] = [m for m in models if m not in gone]
        return gone

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[RegisteredModel]]:
        """The list under an exclusive lock; written back atomically when the block ends."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with (self.state_dir / f"{REGISTRY_FILE}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            models = self.models()
            yield models
            self._write(models)

    def _write(self, models: list[RegisteredModel]) -> None:
        # Readers (request workers) must never see half a file: write aside, then rename.
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=f".{REGISTRY_FILE}.")
        try:
            with os.fdopen(fd, "w") as fh:
                os.fchmod(fh.fileno(), 0o600)
                json.dump({"models": [m.model_dump() for m in models]}, fh, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _served(catalog: Catalog, name: str, version: str) -> bool:
    return any(e.name == name and e.version == version for e in catalog.entries())


def site_catalog(site: Any, state_dir: Path | None = None) -> Catalog:
    """The catalog a site serves: the built-in models, the site definition's ``extra_models``
    and the models registered in its state dir (``state_dir`` defaults to the site's)."""
    folder = state_dir if state_dir is not None else site.resolved_state_dir()
    return Catalog().with_entries(site.extra_models).with_entries(
        ModelRegistry(folder).entries(), hash_of=_known_hash(site))


def _known_hash(site: Any) -> Callable[[CatalogEntry], str | None]:
    """The weights hash of an unregistered entry from its manifest (written when it was first
    served), so every served version can be pinned by hash; never hashes."""
    cache = Path(site.weights_dir).expanduser() if site.weights_dir else None

    def hash_of(entry: CatalogEntry) -> str | None:
        known = known_identity(entry, cache)
        return known.sha256 if known else None
    return hash_of
