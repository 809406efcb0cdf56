"""What the model server's preparer accepts of a science-mode request and what it captures, on
the tiny Llama's tokenizer without a model: layers and positions at their bounds, hook layers,
capture hooks keyed as hidden-state indices, an embedding model's one layer, and the pooling
each request asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fabric.engine.prepare import ModelLimits, Preparer
from fabric.errors import InvalidHook, InvalidRequest
from fabric.protocol import InferenceRequest
from tests.plugins.servers import hf_tokenizer

N = 4  # decoder layers: hidden states 0 (embeddings) .. 4 (final norm)
TEXT = "The mitochondria is the powerhouse"


@pytest.fixture(scope="module")
def prep(tiny_llama_dir: Path) -> Preparer:
    return Preparer(hf_tokenizer(tiny_llama_dir), ModelLimits(N, 64, 4, 128, 512, 4096))


def _req(**fields: Any) -> InferenceRequest:
    return InferenceRequest(model="m", prompt=TEXT, **fields)


def test_positions_inside_the_prompt_only(prep: Preparer) -> None:
    n = len(prep.tok(TEXT).input_ids)
    assert prep.prepare(_req(kind="hidden_states", positions=[0, n - 1, -n])).capture
    for bad in (n, -n - 1):
        with pytest.raises(InvalidRequest, match=rf"positions \[{bad}\] are outside"):
            prep.prepare(_req(kind="hidden_states", positions=[bad]))


def test_hidden_state_layers_run_from_0_to_the_final_norm(prep: Preparer) -> None:
    seq = prep.prepare(_req(kind="hidden_states", layers=[N, 0, -1, -(N + 1)]))
    assert seq.capture is not None and seq.capture.layers == [0, N]
    for bad in (N + 1, -(N + 2)):
        with pytest.raises(InvalidRequest, match=f"layer {bad} is out of range"):
            prep.prepare(_req(kind="embed", layers=[bad]))


def test_hook_layers_are_decoder_layers_and_a_capture_is_keyed_by_its_output(
        prep: Preparer) -> None:
    seq = prep.prepare(_req(hooks=[{"kind": "capture", "layer": N - 1},
                                   {"kind": "capture", "layer": 0}]))
    # Decoder layer i's output is hidden state i + 1.
    assert seq.capture is not None and seq.capture.layers == [1, N]
    assert seq.capture.mode == "all"
    with pytest.raises(InvalidHook, match=f"layer={N} is out of range"):
        prep.prepare(_req(hooks=[{"kind": "capture", "layer": N}]))
    with pytest.raises(InvalidHook, match=f"layer={N} is out of range"):
        prep.prepare(_req(hooks=[{"kind": "steer", "layer": N, "vector": [0.0] * 64}]))


def test_every_head_of_an_ablation_is_kept(prep: Preparer) -> None:
    seq = prep.prepare(_req(hooks=[{"kind": "ablate_heads", "layer": 1, "heads": [3, 0, 3]}]))
    assert [(h.kind, h.layer, h.heads) for h in seq.hooks] == [("ablate_heads", 1, [0, 3])]


@pytest.mark.parametrize(("pooling", "mode"), [("mean", "mean"), ("first", "first"),
                                               ("last", "last")])
def test_an_embedding_captures_what_its_pooling_needs(prep: Preparer, pooling: str,
                                                      mode: str) -> None:
    seq = prep.prepare(_req(kind="embed", layers=[2], pooling=pooling))
    assert seq.capture is not None and (seq.capture.layers, seq.capture.mode) == ([2], mode)


def test_an_embedding_model_returns_its_final_layer_only(tiny_llama_dir: Path) -> None:
    encoder = Preparer(hf_tokenizer(tiny_llama_dir),
                       ModelLimits(N, 64, 4, 128, 512, 4096, causal=False))
    for ok in ([-1], [N]):
        seq = encoder.prepare(_req(kind="embed", layers=ok, pooling="first"))
        assert seq.capture is not None and seq.capture.layers == [N]
    with pytest.raises(InvalidRequest, match=r"final layer only: use layers=\[-1\], not \[2\]"):
        encoder.prepare(_req(kind="embed", layers=[2]))
