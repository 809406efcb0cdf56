"""Tiny random Llama checkpoints for fast tests, and the real SmolLM2 weights for slow ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.catalog import CatalogEntry, WeightSource
from fabric.testing.tiny import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers, 4 heads, 2 KV heads, tied embeddings (heads divisible by tp=2)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_odd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's head layout in miniature: 9 heads, 3 KV heads (uneven under tp=2), untied,
    and an odd vocabulary (383 rows: uneven vocab-parallel splits under tp=2 and tp=3)."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama-odd"),
        hidden=72, heads=9, kv_heads=3, intermediate=144, layers=5, tie=False, seed=1,
        vocab=383,
    )


def tiny_entry(name: str, path: Path) -> CatalogEntry:
    """A catalog entry serving a tiny checkpoint from a local path."""
    return CatalogEntry(
        name=name, version="test", source=WeightSource(kind="path", path=str(path)),
        description="tiny random Llama for tests",
    )


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct weights (converted from the GGUF once, then cached)."""
    from fabric.catalog import Catalog
    from fabric.weights import prepare

    return prepare(Catalog().get("smollm2-135m")).path


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mixtral in miniature: 4 layers, 8 experts, top-2, untied head."""
    from fabric.testing.tiny import build_tiny_moe

    return build_tiny_moe(tmp_path_factory.mktemp("tiny-mixtral"), "mixtral")
