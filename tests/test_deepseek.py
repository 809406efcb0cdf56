"""DeepSeek-V3 / Kimi K2 (``DeepseekV3ForCausalLM``): latent attention and grouped sigmoid
routing give transformers' tokens and logits, on one rank and split over pp, tp and ep.

In-process (fast): tiny random models (``fabric.testing.tiny.build_tiny_deepseek``) against
transformers 5.17, greedy tokens and every position's logits: the fixture (low-rank queries,
yarn rope, interleaved) and a variant (full ``q_proj``, unscaled rope over halves, biases);
chunked prefill; bf16 bit for bit; the router op for op; what each rank of a tp x ep plan
reads, and ``fabric shard`` for it; the KV cache's bytes against ``fabric.plans``; refusals.
Multi-rank (slow): real model servers on CPU/gloo at pp=2, tp=2, tp=2 x ep=2 and
pp=2 x tp=2 x ep=2 against transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fabric.engine.architectures import SERVED
from fabric.engine.deepseek import mla_spec
from fabric.engine.kv import KVStore
from fabric.engine.loader import build_stage, load_config
from fabric.engine.moe import MoeBlock
from fabric.engine.runner import StageRunner
from fabric.engine.steps import SeqWork, StepPlan
from fabric.errors import UnsupportedArchitecture, UnsupportedModelConfig
from fabric.plans import shape_from_config, size_plan
from fabric.sites import NodeShape
from fabric.testing.greedy import runner_greedy
from fabric.testing.tiny import build_tiny_deepseek
from tests.plugins.servers import (
    check_served_against_transformers,
    hf_model,
    hf_tokenizer,
)
from tests.test_moe import MAX_NEW, PROMPTS, _hf_greedy_ids


def _logits(runner: StageRunner, ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """Logits of every position of ``ids``, prefilled in chunks of ``chunk`` tokens (later
    chunks attend to the cached latents of earlier ones)."""
    chunk = chunk or len(ids)
    out = []
    for step, start in enumerate(range(0, len(ids), chunk)):
        part = ids[start:start + chunk]
        plan = StepPlan(step, [SeqWork("x", start, part, len(ids), score_targets=part)])
        out.append(runner.logits(runner.head_rows(plan, runner.forward(plan, None))))
    return torch.cat(out)


def _check_whole(weights: Path) -> None:
    tok = hf_tokenizer(weights)
    prompts = [tok(p).input_ids for p in PROMPTS]
    model = build_stage(weights, 0, 1, 1, "float32", None)[0]
    assert model.sparse and model.mla is not None and not model.fast_path_capable
    runner = StageRunner(model)
    got = runner_greedy(runner, prompts, MAX_NEW)
    want = [_hf_greedy_ids(weights, p, MAX_NEW) for p in prompts]
    assert got == want
    assert len({tuple(w) for w in want}) == len(want)  # the prompts lead somewhere different
    ids = prompts[-1]
    with torch.no_grad():
        ref = hf_model(weights)(torch.tensor([ids])).logits[0].float()
    for chunk in (None, 5):  # one prefill; chunks that start mid-sequence
        np.testing.assert_allclose(_logits(StageRunner(model), ids, chunk).numpy(),
                                   ref.numpy(), atol=1e-4, rtol=1e-4)


def test_whole_model_greedy_and_logits_equal_transformers(tiny_deepseek_dir: Path) -> None:
    _check_whole(tiny_deepseek_dir)


def test_full_q_proj_unscaled_rope_over_halves_and_biases(tmp_path: Path) -> None:
    """The other branches of the attention: ``q_lora_rank`` null (one ``q_proj``), no rope
    scaling (no mscale), ``rope_interleave`` false, ``attention_bias`` (on ``q``/``kv`` low-rank
    projections and ``o_proj``)."""
    weights = build_tiny_deepseek(tmp_path / "ds", q_lora_rank=None, rope=None,
                                  interleave=False, attention_bias=True, seed=6)
    spec = mla_spec(load_config(weights))
    assert spec is not None and spec.q_lora_rank is None and not spec.interleave and spec.bias
    assert spec.scale == pytest.approx(24 ** -0.5)
    _check_whole(weights)


def test_yarn_mscale_is_in_the_softmax_scale(tiny_deepseek_dir: Path) -> None:
    """Yarn with ``mscale_all_dim`` scales the softmax by ``(0.1 ln(factor) + 1) ** 2`` (the
    fixture: factor 4), and leaving it out changes the logits: the scale is exercised."""
    import math

    model = build_stage(tiny_deepseek_dir, 0, 1, 1, "float32", None)[0]
    assert model.mla is not None
    assert model.mla.scale == pytest.approx(24 ** -0.5 * (0.1 * math.log(4.0) + 1.0) ** 2)
    ids = hf_tokenizer(tiny_deepseek_dir)(PROMPTS[-1]).input_ids
    with torch.no_grad():
        ref = hf_model(tiny_deepseek_dir)(torch.tensor([ids])).logits[0].float()
    from dataclasses import replace

    plain = replace(model.mla, scale=24 ** -0.5)
    for layer in model.layers.values():
        layer.self_attn.spec = plain  # type: ignore[union-attr]
    assert (_logits(StageRunner(model), ids) - ref).abs().max() > 1e-3


def test_bf16_logits_equal_transformers_bit_for_bit(tiny_deepseek_dir: Path) -> None:
    """In bf16 the order of roundings shows; the router bias stays float32, as transformers
    keeps it (in bf16 it would choose other experts for near-ties)."""
    from transformers import AutoModelForCausalLM

    ids = hf_tokenizer(tiny_deepseek_dir)(PROMPTS[-1]).input_ids
    model = build_stage(tiny_deepseek_dir, 0, 1, 1, "bfloat16", None)[0]
    bias = model.layers["1"].mlp.gate.e_score_correction_bias  # type: ignore[union-attr]
    assert bias.dtype == torch.float32
    assert model.layers["1"].mlp.gate.weight.dtype == torch.bfloat16  # type: ignore[union-attr]
    logits = _logits(StageRunner(model), ids)
    hf = AutoModelForCausalLM.from_pretrained(tiny_deepseek_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert torch.equal(logits, ref)


def test_router_chooses_as_transformers_does(tiny_deepseek_dir: Path) -> None:
    """Experts and weights of every token equal ``DeepseekV3TopkRouter``'s, the experts come
    from ``topk_group`` groups only, and the correction bias changes the choice."""
    model = build_stage(tiny_deepseek_dir, 0, 1, 1, "float32", None)[0]
    block: MoeBlock = model.layers["2"].mlp  # type: ignore[assignment,union-attr]
    router = hf_model(tiny_deepseek_dir).model.layers[2].mlp.gate
    h = torch.randn(200, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weights, ids = block.route(h)
        _, want_w, want_ids = router(h)
    order, want_order = ids.sort(-1), want_ids.sort(-1)
    assert torch.equal(order.values, want_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices),
                               want_w.gather(1, want_order.indices), atol=0, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.full((200,), 2.5), atol=1e-5, rtol=0)
    assert max(len(set((ids // 2).tolist()[t])) for t in range(200)) <= 2  # 2 of 4 groups
    with torch.no_grad():
        block.gate.e_score_correction_bias.zero_()
        unbiased = block.route(h)[1].sort(-1).values
    assert not torch.equal(unbiased, order.values)


def _nbytes(model: Any, part: str) -> int:
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if part in n)


@pytest.mark.parametrize("tp,ep", [(2, 2), (2, 1)])
def test_ranks_hold_their_heads_and_experts(tiny_deepseek_dir: Path, tp: int, ep: int) -> None:
    full = build_stage(tiny_deepseek_dir, 0, 1, 1, "float32", None)[0].state_dict()
    held: dict[str, int] = {}
    for rank in range(tp):
        model = build_stage(tiny_deepseek_dir, rank, 1, tp, "float32", None, ep=ep)[0]
        sd = model.state_dict()
        assert model.shard.q_heads == 2 and model.shard.head_offset == 2 * rank
        # Head rows of the per-head maps, the whole latent path.
        kv_b = "layers.1.self_attn.kv_b_proj.weight"
        assert torch.equal(sd[kv_b], full[kv_b][rank * 56:(rank + 1) * 56])
        q_b = "layers.1.self_attn.q_b_proj.weight"
        assert torch.equal(sd[q_b], full[q_b][rank * 48:(rank + 1) * 48])
        o = "layers.1.self_attn.o_proj.weight"
        assert torch.equal(sd[o], full[o][:, rank * 24:(rank + 1) * 24])
        for whole in ("q_a_proj.weight", "kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight"):
            name = f"layers.1.self_attn.{whole}"
            assert torch.equal(sd[name], full[name])
        experts = sorted({int(n.split(".")[4]) for n in sd if ".experts." in n})
        assert experts == (list(range(4 * rank, 4 * rank + 4)) if ep == 2 else list(range(8)))
        assert torch.equal(sd["layers.2.mlp.gate.e_score_correction_bias"],
                           full["layers.2.mlp.gate.e_score_correction_bias"])
        shared = sd["layers.2.mlp.shared_experts.gate_proj.weight"]
        assert shared.shape[0] == 32 // tp  # the shared expert split over tp like an MLP
        for part in (".experts.", "shared_experts", "self_attn"):
            held[part] = held.get(part, 0) + _nbytes(model, part)
    # The experts and the per-head maps are read once over the stage; the latent path tp times.
    assert held[".experts."] == _nbytes_of(full, ".experts.")
    assert held["shared_experts"] == _nbytes_of(full, "shared_experts")
    latent = _nbytes_of(full, "self_attn") - sum(
        _nbytes_of(full, f".{m}.") for m in ("q_b_proj", "kv_b_proj", "o_proj"))
    assert held["self_attn"] == _nbytes_of(full, "self_attn") + (tp - 1) * latent


def _nbytes_of(sd: dict[str, torch.Tensor], part: str) -> int:
    return sum(t.numel() * t.element_size() for n, t in sd.items() if part in n)


def test_kv_cache_holds_what_the_plan_sizes(tiny_deepseek_dir: Path) -> None:
    """The engine caches the latent and the rotated key (``kv_lora_rank + qk_rope_head_dim``
    values per token and layer, on every tp rank): exactly what ``fabric plan`` counts."""
    config = json.loads((tiny_deepseek_dir / "config.json").read_text())
    shape = shape_from_config(config)
    assert (shape.kv_values, shape.kv_split) == (24 + 8, False)
    plan = size_plan(shape, NodeShape(gpus=2, gpu_memory_gib=1), 1, 2, 2, "bfloat16")
    for rank in range(2):
        model = build_stage(tiny_deepseek_dir, rank, 1, 2, "bfloat16", None, ep=2)[0]
        store = KVStore(model.kv_layout)
        tokens = 10
        cache = store.caches([SeqWork("s", 0, [1], tokens)])[0]
        held = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for k, v in cache)
        assert held == plan.kv_bytes_per_token * tokens


def test_unsupported_rope_scaling_is_refused_typed(tiny_deepseek_dir: Path,
                                                   tmp_path: Path) -> None:
    folder = tmp_path / "linear"
    shutil.copytree(tiny_deepseek_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelConfig, match="linear") as err:
        build_stage(folder, 0, 1, 1, "float32", None)
    assert err.value.details["supported"] == ["default", "yarn"]
    assert not err.value.retryable


def test_deepseek_is_listed_among_the_served(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert SERVED["DeepseekV3ForCausalLM"] == "causal-lm"
    folder = tmp_path / "neox"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture) as err:
        build_stage(folder, 0, 1, 1, "float32", None)
    assert "DeepseekV3ForCausalLM" in err.value.details["supported"]
    assert "DeepseekV3ForCausalLM" in err.value.message


# --- multi-rank servers (slow) -------------------------------------------------------------

PLANS = [(2, 1, 1), (1, 2, 1), (1, 2, 2), (2, 2, 2)]


@pytest.fixture(scope="module", params=[
    pytest.param(p, marks=pytest.mark.slow, id=f"pp{p[0]}-tp{p[1]}-ep{p[2]}") for p in PLANS])
def served(request: pytest.FixtureRequest, model_server: Any,
           tiny_deepseek_dir: Path) -> Any:
    pp, tp, ep = request.param
    server = model_server(tiny_deepseek_dir, pp=pp, tp=tp, ep=ep, name="tiny-deepseek")
    assert {k: server.health()["plan"][k] for k in ("pp", "tp", "ep")} == \
        {"pp": pp, "tp": tp, "ep": ep}
    return server


def test_served_greedy_and_logprobs_equal_transformers(served: Any,
                                                       tiny_deepseek_dir: Path) -> None:
    weights = tiny_deepseek_dir
    check_served_against_transformers(served, weights, PROMPTS, MAX_NEW)


def test_shard_folder_for_a_tp_ep_plan_loads_the_same_weights(tiny_deepseek_dir: Path,
                                                              tmp_path: Path) -> None:
    """``fabric shard`` writes each rank exactly what the plan reads from the checkpoint."""
    from fabric.engine.presplit import write_shards

    write_shards(tiny_deepseek_dir, tmp_path / "s", 1, 2, ep=2)
    for rank in range(2):
        a = build_stage(tiny_deepseek_dir, rank, 1, 2, "float32", None, ep=2)[0].state_dict()
        b = build_stage(tiny_deepseek_dir, rank, 1, 2, "float32", None,
                        shard_dir=tmp_path / "s", ep=2)[0].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FP8_BLOCK = 16
PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj")


def _to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 weight, its scale_inv per 16 x 16 block, the weight dequantized block by block,
    written here with ``repeat_interleave``, not with the reader's code)."""
    rows, cols = w.shape
    nb = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    padded = torch.zeros(nb[0] * FP8_BLOCK, nb[1] * FP8_BLOCK)
    padded[:rows, :cols] = w
    tiles = padded.view(nb[0], FP8_BLOCK, nb[1], FP8_BLOCK).abs().amax(dim=(1, 3))
    scale = tiles.clamp(min=1e-12) / 448.0

    def spread(s: torch.Tensor) -> torch.Tensor:
        full = s.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
        return full[:rows, :cols]

    q = (w / spread(scale)).to(torch.float8_e4m3fn)
    return q, scale, q.float() * spread(scale)


def test_fp8_checkpoint_loads_as_its_dequantized_weights(tiny_deepseek_dir: Path,
                                                         tmp_path: Path) -> None:
    """DeepSeek-V3 and Kimi K2 ship block-scaled FP8: every projection (latent, per-head and
    experts) in e4m3 with ``weight_scale_inv``; a tp=2 x ep=2 rank (whose ``kv_b_proj`` head
    rows start inside a block) holds the dequantized checkpoint's weights."""
    from safetensors.torch import load_file, save_file

    fp8_dir, ref_dir = tmp_path / "fp8", tmp_path / "ref"
    for d in (fp8_dir, ref_dir):
        shutil.copytree(tiny_deepseek_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
    stored, ref = {}, {}
    for name, w in load_file(str(tiny_deepseek_dir / "model.safetensors")).items():
        if w.dim() == 2 and name.split(".")[-2] in PROJECTIONS:
            stored[name], stored[name + "_scale_inv"], ref[name] = _to_fp8(w)
        else:
            stored[name] = ref[name] = w
    save_file(stored, str(fp8_dir / "model.safetensors"))
    save_file(ref, str(ref_dir / "model.safetensors"))
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    for rank in range(2):
        got = build_stage(fp8_dir, rank, 1, 2, "float32", None, ep=2)[0].state_dict()
        want = build_stage(ref_dir, rank, 1, 2, "float32", None, ep=2)[0].state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)
    kv_b = "model.layers.1.self_attn.kv_b_proj.weight"  # FP8 rounding changed the weights
    assert not torch.equal(ref[kv_b], load_file(str(tiny_deepseek_dir /
                                                    "model.safetensors"))[kv_b])


def test_kimi_k2_config_is_read_as_deepseek_v3(tmp_path: Path) -> None:
    """Kimi K2's config.json says ``model_type: kimi_k2`` (unknown to transformers, with remote
    code in ``auto_map``), one expert group, yarn as legacy ``rope_scaling``: the engine reads
    it as DeepSeek-V3's without running remote code, and gives the logits transformers
    computes from the same weights under the DeepSeek-V3 config they were written with.
    (transformers itself cannot be the reference on the edited folder: it loads a
    ``kimi_k2`` checkpoint without converting the experts to its fused layout.)"""
    weights = build_tiny_deepseek(tmp_path / "kimi", groups=1, topk_groups=1, seed=7)
    ids = hf_tokenizer(weights)(PROMPTS[-1]).input_ids
    with torch.no_grad():
        ref = hf_model(weights)(torch.tensor([ids])).logits[0].float()
    config = json.loads((weights / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(model_type="kimi_k2", rope_theta=rope.pop("rope_theta"),
                  rope_scaling={"type": "yarn", **{k: v for k, v in rope.items()
                                                   if k != "rope_type"}},
                  auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
                  scoring_func="sigmoid", topk_method="noaux_tc")
    (weights / "config.json").write_text(json.dumps(config))
    model = build_stage(weights, 0, 1, 1, "float32", None)[0]
    assert model.config.model_type == "deepseek_v3" and model.mla is not None
    assert model.config.rope_parameters["rope_type"] == "yarn"
    np.testing.assert_allclose(_logits(StageRunner(model), ids).numpy(), ref.numpy(),
                               atol=1e-4, rtol=1e-4)
