"""Tiny random Llama checkpoints for fast tests, and the real SmolLM2 weights for slow ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.catalog import CatalogEntry, WeightSource
from fabric.testing.tiny import build_tiny, build_tiny_llama


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


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2: q/k/v biases, tied embeddings, and sliding-window attention on layers 2 and 3
    only (``max_window_layers=2``), with a window of 6 that the test prompts outgrow."""
    return build_tiny(tmp_path_factory.mktemp("tiny-qwen2"), family="qwen2", seed=2,
                      use_sliding_window=True, sliding_window=6, max_window_layers=2)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3: qk-norm, head_dim 24 (not hidden / heads = 10), 6 heads / 3 KV heads (uneven
    under tp=2), untied, odd vocabulary, and ``attention_bias`` (off in released Qwen3s, but
    it puts a bias on o_proj too, which tp ranks must add once, after their all-reduce)."""
    return build_tiny(tmp_path_factory.mktemp("tiny-qwen3"), family="qwen3", hidden=60,
                      heads=6, kv_heads=3, head_dim=24, tie=False, seed=3, vocab=383,
                      attention_bias=True)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mistral: a sliding window of 8 on every layer (the test prompts outgrow it), untied."""
    return build_tiny(tmp_path_factory.mktemp("tiny-mistral"), family="mistral", tie=False,
                      seed=4, sliding_window=8)


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


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3-MoE in miniature: qk-norm attention, 8 experts top-2 renormalised, layer 1 dense."""
    from fabric.testing.tiny import build_tiny_moe

    return build_tiny_moe(tmp_path_factory.mktemp("tiny-qwen3-moe"), "qwen3_moe", seed=3)


@pytest.fixture(scope="session")
def tiny_qwen2_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2-MoE in miniature: q/k/v biases, a shared expert behind a sigmoid gate, top-2 of
    8 experts not renormalised."""
    from fabric.testing.tiny import build_tiny_moe

    return build_tiny_moe(tmp_path_factory.mktemp("tiny-qwen2-moe"), "qwen2_moe", seed=4)


@pytest.fixture(scope="session")
def tiny_deepseek_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-V3 (Kimi K2's architecture) in miniature: latent attention with a low-rank
    query, yarn rope, interleaved; layer 0 dense, layers 1-2 with 8 routed experts in 4
    groups (top-2 from the best 2 groups) and a shared expert."""
    from fabric.testing.tiny import build_tiny_deepseek

    return build_tiny_deepseek(tmp_path_factory.mktemp("tiny-deepseek"), seed=5)
