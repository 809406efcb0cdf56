"""FP8 checkpoints: DeepSeek-V3-style block scales, per-tensor and per-row scales, read whole or
as a rank's slice, dequantized at load to what the model built from the dequantized weights
holds, and served token for token like transformers on those weights.

The fixture quantizes the tiny odd Llama (uneven tp splits) with 32 x 32 blocks, so the slices
of tp=2 and tp=3 plans start and stop inside blocks. The reference weights are dequantized
block by block by ``fabric.testing.fp8``, the way DeepSeek-V3's ``weight_dequant`` kernel does
it, not with the reader's code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fabric.engine.checkpoint import SafetensorsReader, fp8_block_size, fp8_matmul_available
from fabric.engine.loader import build_stage, load_config, rank_shards
from fabric.errors import UnsupportedCheckpoint
from fabric.testing.fp8 import write_fp8_pair
from tests.plugins.servers import ServerFactory, hf_greedy, hf_model, hf_tokenizer

BLOCK = 32
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
BLOCK_SCALED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ["The mitochondria is the powerhouse", "Scientists call models through a federated"]


def _scheme(name: str) -> tuple[torch.dtype, tuple[int, int] | str] | None:
    """How the fixture stores ``name``: block-scaled e4m3 for most projections, one layer's
    o_proj per row, the LM head per tensor in e5m2; embeddings and norms stay fp32."""
    leaf = name.split(".")[-2]
    if name == "lm_head.weight":
        return E5M2, "tensor"
    if leaf == "o_proj":
        return E4M3, "row" if ".layers.1." in name else (BLOCK, BLOCK)
    if leaf in BLOCK_SCALED:
        return E4M3, (BLOCK, BLOCK)
    return None


@pytest.fixture(scope="module")
def fp8_pair(tiny_llama_odd_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, Path]:
    """(FP8 checkpoint, the same model with the dequantized weights in fp32)."""
    root = tmp_path_factory.mktemp("fp8")
    fp8_dir, ref_dir = root / "fp8", root / "dequantized"
    write_fp8_pair(tiny_llama_odd_dir, fp8_dir, ref_dir, _scheme, (BLOCK, BLOCK))
    return fp8_dir, ref_dir


def test_reader_dequantizes_whole_tensors(fp8_pair: tuple[Path, Path],
                                          tiny_llama_odd_dir: Path) -> None:
    fp8_dir, ref_dir = fp8_pair
    ref = load_file(str(ref_dir / "model.safetensors"))
    reader = SafetensorsReader.from_folder(fp8_dir)
    assert fp8_block_size(fp8_dir) == (BLOCK, BLOCK)
    try:
        assert sorted(reader.names()) == sorted(ref)  # scale companions hidden
        kinds = {str(reader._index[n][2]) for n in reader.names()}
        assert {"F8_E4M3", "F8_E5M2", "F32"} <= kinds
        for name, want in ref.items():
            got = reader.read(name)
            assert got.dtype == torch.float32
            assert torch.equal(got, want), name
    finally:
        reader.close()
    # The quantization is lossy: the test would notice a reader that skipped the scales.
    original = load_file(str(tiny_llama_odd_dir / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(original[name], ref[name])
    torch.testing.assert_close(original[name], ref[name], atol=0.05, rtol=0.1)


@pytest.mark.parametrize("pp,tp", [(1, 2), (2, 2), (1, 3)])
def test_rank_slices_line_up_with_their_blocks(fp8_pair: tuple[Path, Path], pp: int,
                                               tp: int) -> None:
    """Every slice a rank reads equals the same slice of the dequantized tensor, including
    slices that start or stop inside a block."""
    fp8_dir, ref_dir = fp8_pair
    ref = load_file(str(ref_dir / "model.safetensors"))
    config = load_config(fp8_dir)
    shards = rank_shards(fp8_dir, config, pp, tp)
    assert [s.slices for s in shards] == [s.slices for s in rank_shards(ref_dir, config, pp, tp)]
    reader = SafetensorsReader.from_folder(fp8_dir)
    unaligned = 0
    try:
        for shard in shards:
            for s in shard.slices:
                got = reader.read(s.name, s.dim, s.start, s.stop)
                full = ref[s.name]
                want = full if s.dim is None else full.narrow(
                    s.dim, s.start, (full.shape[s.dim] if s.stop is None else s.stop) - s.start)
                assert torch.equal(got, want), (shard.rank, s)
                unaligned += reader.is_fp8(s.name) and s.dim is not None and (
                    s.start % BLOCK != 0 or (s.stop or 0) % BLOCK != 0)
    finally:
        reader.close()
    assert unaligned > 0  # the plan really cuts through blocks


def test_a_slice_reads_only_its_blocks_scales(fp8_pair: tuple[Path, Path]) -> None:
    fp8_dir, _ = fp8_pair
    name = "model.layers.0.mlp.down_proj.weight"  # 72 x 144: 3 x 5 blocks of 32
    reader = SafetensorsReader.from_folder(fp8_dir)
    try:
        rows, cols = reader.shape(name)
        before = reader.bytes_read
        reader.read(name, 1, 40, 100)  # columns 40..99: blocks 1..3
        assert reader.bytes_read - before == rows * 60 + 3 * 3 * 4
        before = reader.bytes_read
        reader.read(name, 0, 10, 40)  # rows 10..39: block rows 0..1
        assert reader.bytes_read - before == 30 * cols + 2 * 5 * 4
    finally:
        reader.close()


def test_stage_model_holds_the_dequantized_weights(fp8_pair: tuple[Path, Path]) -> None:
    """The loader reads the FP8 checkpoint into the plan's dtype: the same parameters as
    loading the dequantized checkpoint."""
    fp8_dir, ref_dir = fp8_pair
    for dtype in ("float32", "bfloat16"):
        got, report = build_stage(fp8_dir, 0, 1, 1, dtype, None)
        want, _ = build_stage(ref_dir, 0, 1, 1, dtype, None)
        a, b = got.state_dict(), want.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (dtype, k)
        assert report.shard_bytes > 0


def test_unknown_dtype_and_bad_scales_are_typed_errors(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2, 2, dtype=torch.int8)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(UnsupportedCheckpoint, match="dtype I8"):
        SafetensorsReader([tmp_path / "a.safetensors"])
    w = torch.zeros(64, 64, dtype=E4M3)
    save_file({"w": w, "w_scale_inv": torch.ones(3, 2)}, str(tmp_path / "b.safetensors"))
    reader = SafetensorsReader([tmp_path / "b.safetensors"], block=(32, 32))
    try:
        with pytest.raises(UnsupportedCheckpoint, match=r"must be \[2, 2\]"):
            reader.read("w")
    finally:
        reader.close()


def test_fp8_matmul_is_not_claimed_on_cpu() -> None:
    assert fp8_matmul_available("cpu") is False


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_served_fp8_checkpoint_equals_transformers_on_dequantized(
        fp8_pair: tuple[Path, Path], model_server: ServerFactory, tp: int) -> None:
    """A model server on the FP8 checkpoint (each rank dequantizing its own slices at tp=2)
    gives transformers' greedy tokens and logprobs on the dequantized weights."""
    fp8_dir, ref_dir = fp8_pair
    server = model_server(fp8_dir, tp=tp, name="tiny-fp8")
    client = server.client()
    for prompt in PROMPTS:
        res = server.run(client, prompt=prompt, sampling={"max_tokens": 12})
        assert res["token_ids"] == hf_greedy(ref_dir, prompt, 12), prompt
    tok, model = hf_tokenizer(ref_dir), hf_model(ref_dir)
    ids = tok(PROMPTS[0]).input_ids
    res = server.run(client, kind="logprobs", prompt=PROMPTS[0])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    want = [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]
    np.testing.assert_allclose(res["logprobs"], want, atol=1e-4, rtol=0)
