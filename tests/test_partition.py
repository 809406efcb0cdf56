"""Partitioning and loading: balanced contiguous stages, AutoTP splits, bytes read per rank."""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fabric.engine.loader import SHARD_MANIFEST, build_stage, load_config, rank_shards
from fabric.engine.partition import RankShard, assign_layers
from fabric.engine.presplit import write_shards

PLANS = [(2, 1), (1, 2), (2, 2)]


def _brute_force_best(params: list[int], pp: int, first: int, last: int) -> int:
    n, best = len(params), None
    for cuts in itertools.combinations(range(1, n), pp - 1):
        bounds = [0, *cuts, n]
        costs = [sum(params[a:b]) for a, b in itertools.pairwise(bounds)]
        costs[0] += first
        costs[-1] += last
        best = max(costs) if best is None else min(best, max(costs))
    assert best is not None
    return best


@pytest.mark.parametrize("params,pp,first,last", [
    ([10] * 8, 2, 0, 0), ([10] * 8, 4, 0, 0), ([10] * 7, 3, 25, 25),
    ([5, 1, 1, 9, 3, 3, 8], 3, 4, 2), ([10] * 30, 2, 40, 41), ([1, 100, 1, 1, 1], 2, 0, 0),
    ([3, 3, 3], 3, 0, 0),
])
def test_layer_assignment_is_contiguous_and_balanced(params: list[int], pp: int, first: int,
                                                     last: int) -> None:
    stages = assign_layers(params, pp, first, last)
    assert len(stages) == pp
    assert [i for r in stages for i in r] == list(range(len(params)))  # contiguous, complete
    assert all(len(r) >= 1 for r in stages)
    costs = [sum(params[i] for i in r) for r in stages]
    costs[0] += first
    costs[-1] += last
    assert max(costs) == _brute_force_best(params, pp, first, last)


def test_layer_assignment_rejects_impossible_plans() -> None:
    with pytest.raises(ValueError, match="stages"):
        assign_layers([1, 2, 3], 4, 0, 0)


def _shapes(folder: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = list(fh.get_slice(name).get_shape())
    return out


@pytest.mark.parametrize("tp,q_heads,kv_heads", [(2, [6, 3], [2, 1]), (3, [3, 3, 3], [1, 1, 1])])
def test_autotp_splits_uneven_heads(tiny_llama_odd_dir: Path, tp: int, q_heads: list[int],
                                    kv_heads: list[int]) -> None:
    config = load_config(tiny_llama_odd_dir)
    shards = rank_shards(tiny_llama_odd_dir, config, 1, tp)
    assert [s.q_heads for s in shards] == q_heads
    assert [s.kv_heads for s in shards] == kv_heads
    assert [s.head_offset for s in shards] == [sum(q_heads[:i]) for i in range(tp)]
    inter = config.intermediate_size
    assert sum(s.inter for s in shards) == inter
    # Each rank's attention + MLP parameters per layer are even to within one neuron's worth,
    # also when the heads split unevenly (the MLP makes up the difference).
    hidden, head_dim = config.hidden_size, config.hidden_size // config.num_attention_heads
    per_rank = [hidden * head_dim * (2 * s.q_heads + 2 * s.kv_heads) + 3 * hidden * s.inter
                for s in shards]
    assert max(per_rank) - min(per_rank) <= 3 * hidden * tp, per_rank
    if len(set(q_heads)) == 1:
        assert max(s.inter for s in shards) - min(s.inter for s in shards) <= 64  # AutoTP's
    assert [s.inter_offset for s in shards] == [sum(x.inter for x in shards[:i])
                                                for i in range(tp)]
    # GQA groups stay together: each rank's query heads are exactly its KV heads' groups.
    group = config.num_attention_heads // config.num_key_value_heads
    assert [q // k for q, k in zip(q_heads, kv_heads, strict=True)] == [group] * tp


def test_tp_beyond_kv_heads_is_refused(tiny_llama_odd_dir: Path) -> None:
    config = load_config(tiny_llama_odd_dir)
    with pytest.raises(ValueError, match="key/value heads"):
        rank_shards(tiny_llama_odd_dir, config, 1, 4)


def _unique_param_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def _header_bytes(folder: Path) -> int:
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with f.open("rb") as fh:
            total += 8 + struct.unpack("<Q", fh.read(8))[0]
    return total


def _full(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _check_slices(model: torch.nn.Module, full: dict[str, torch.Tensor], config: Any,
                  shard: RankShard) -> None:
    """Every loaded tensor equals the AutoTP slice of the checkpoint tensor, computed here."""
    head_dim = config.hidden_size // config.num_attention_heads
    kv_group = config.num_attention_heads // config.num_key_value_heads
    q0, qn = shard.head_offset * head_dim, shard.q_heads * head_dim
    k0, kn = shard.head_offset // kv_group * head_dim, shard.kv_heads * head_dim
    m0, mn = shard.inter_offset, shard.inter
    state = model.state_dict()
    for layer in shard.layers:
        p = f"model.layers.{layer}."
        lp = f"layers.{layer}."
        expect = {
            "self_attn.q_proj.weight": full[p + "self_attn.q_proj.weight"][q0:q0 + qn],
            "self_attn.k_proj.weight": full[p + "self_attn.k_proj.weight"][k0:k0 + kn],
            "self_attn.v_proj.weight": full[p + "self_attn.v_proj.weight"][k0:k0 + kn],
            "self_attn.o_proj.weight": full[p + "self_attn.o_proj.weight"][:, q0:q0 + qn],
            "mlp.gate_proj.weight": full[p + "mlp.gate_proj.weight"][m0:m0 + mn],
            "mlp.up_proj.weight": full[p + "mlp.up_proj.weight"][m0:m0 + mn],
            "mlp.down_proj.weight": full[p + "mlp.down_proj.weight"][:, m0:m0 + mn],
            "input_layernorm.weight": full[p + "input_layernorm.weight"],
            "post_attention_layernorm.weight": full[p + "post_attention_layernorm.weight"],
        }
        for name, want in expect.items():
            assert torch.equal(state[lp + name], want), (layer, name)
    _check_vocab_rows(state, full, config, shard)


def _check_vocab_rows(state: dict[str, torch.Tensor], full: dict[str, torch.Tensor], config: Any,
                      shard: RankShard) -> None:
    """Embedding and LM head: this rank's contiguous share of the vocabulary rows, computed
    here as an even split over the stage's tp ranks."""
    vocab = config.vocab_size
    embed = full["model.embed_tokens.weight"]
    head = full.get("lm_head.weight", embed)
    lo, hi = shard.vocab_start, shard.vocab_stop
    assert 0 <= lo < hi <= vocab
    if shard.first:
        assert torch.equal(state["embed_tokens.weight"], embed[lo:hi])
    else:
        assert "embed_tokens.weight" not in state
    if shard.head:
        assert torch.equal(state["lm_head.weight"], head[lo:hi])
    else:
        assert "lm_head.weight" not in state


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_llama_odd_dir"])
@pytest.mark.parametrize("pp,tp", PLANS)
def test_bytes_read_per_rank_from_full_checkpoint(request: pytest.FixtureRequest,
                                                  model_fixture: str, pp: int, tp: int) -> None:
    folder: Path = request.getfixturevalue(model_fixture)
    full = _full(folder)
    config = load_config(folder)
    header = _header_bytes(folder)
    total_bytes = sum(t.numel() * t.element_size() for t in full.values())
    per_rank, shards = [], []
    for rank in range(pp * tp):
        model, report = build_stage(folder, rank, pp, tp, "float32", None)
        shards.append(model.shard)
        tensor_bytes = _unique_param_bytes(model)
        assert report.shard_bytes == tensor_bytes
        assert report.bytes_read == header + tensor_bytes, rank
        assert report.io_bytes >= report.bytes_read  # the kernel saw at least those reads
        _check_slices(model, full, config, model.shard)
        per_rank.append(tensor_bytes)
    # No rank reads the whole model; together they read it exactly once plus the norms, which
    # every tp rank keeps (the embedding and LM head are split by vocabulary rows, and a tied
    # head is computed on the first stage, so it is not read twice).
    assert max(per_rank) < total_bytes
    norm_bytes = sum(t.numel() * t.element_size() for n, t in full.items() if "norm" in n)
    assert total_bytes <= sum(per_rank) <= total_bytes + (tp - 1) * norm_bytes
    # Each stage's tp ranks split the vocabulary into contiguous, near-equal row ranges.
    for stage in range(pp):
        spans = [(s.vocab_start, s.vocab_stop) for s in shards[stage * tp:(stage + 1) * tp]]
        assert spans[0][0] == 0 and spans[-1][1] == config.vocab_size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        sizes = [b - a for a, b in spans]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("pp,tp", PLANS)
def test_bytes_read_per_rank_from_shard_folder(tiny_llama_odd_dir: Path, tmp_path: Path,
                                               pp: int, tp: int) -> None:
    folder = tiny_llama_odd_dir
    out = tmp_path / "shards"
    manifest = write_shards(folder, out, pp, tp, source_sha256="abc")
    on_disk = json.loads((out / SHARD_MANIFEST).read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert (on_disk["pp"], on_disk["tp"]) == (pp, tp)
    assert len(on_disk["ranks"]) == pp * tp
    for entry in on_disk["ranks"]:
        path = out / entry["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert path.stat().st_size == entry["bytes"]
    full = _full(folder)
    config = load_config(folder)
    for rank in range(pp * tp):
        model, report = build_stage(folder, rank, pp, tp, "float32", None, shard_dir=out)
        size = (out / on_disk["ranks"][rank]["file"]).stat().st_size
        assert report.bytes_read == size
        assert report.shard_bytes == _unique_param_bytes(model)
        _check_slices(model, full, config, model.shard)
        ref, _ = build_stage(folder, rank, pp, tp, "float32", None)
        a, b = model.state_dict(), ref.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_shard_folder_for_another_plan_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from fabric.errors import DeploymentError

    write_shards(tiny_llama_dir, tmp_path / "s", 2, 1)
    with pytest.raises(DeploymentError, match="fabric shard"):
        build_stage(tiny_llama_dir, 0, 1, 2, "float32", None, shard_dir=tmp_path / "s")
