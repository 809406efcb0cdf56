"""Mixtures of experts: greedy tokens and log-probs equal transformers', experts split over ep.

In-process (fast): whole tiny Mixtral, Qwen3-MoE and Qwen2-MoE models on one rank against
transformers, token for token and logit for logit;
every rank of an ep plan reads only its experts' bytes (counted by the reader, checked against
the checkpoint's own header); plans the model cannot take are refused with ``InvalidPlan``.
Multi-rank (slow): real model servers on CPU/gloo against transformers: Mixtral at tp=2 x ep=2,
pp=2 x tp=2 x ep=2 and tp=2 x ep=1, Qwen3-MoE at pp=2 x tp=2 x ep=2 (a dense layer among the
sparse ones), Qwen2-MoE at tp=2 x ep=2 (the shared expert split over tp).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fabric.engine.experts import even_ranges, expert_share, moe_spec
from fabric.engine.loader import build_stage, load_config
from fabric.engine.runner import StageRunner
from fabric.engine.steps import SeqWork, StepPlan
from fabric.errors import InvalidPlan
from fabric.testing.greedy import runner_greedy
from tests.plugins.servers import (
    check_served_against_transformers,
    hf_model,
    hf_tokenizer,
)

PROMPTS = ["The", "The mitochondria is the powerhouse",
           "Tensor parallel splits each layer; pipeline parallel splits the stack of layers. "
           "Proteins fold into shapes"]
MAX_NEW = 10


def _hf_greedy_ids(weights: Path, ids: list[int], n: int) -> list[int]:
    model = hf_model(weights)
    with torch.no_grad():
        got = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return got[0, len(ids):].tolist()


MOE_FIXTURES = ["tiny_mixtral_dir", "tiny_qwen3_moe_dir", "tiny_qwen2_moe_dir"]


@pytest.mark.parametrize("fixture", MOE_FIXTURES)
def test_whole_moe_greedy_and_logits_equal_transformers(request: pytest.FixtureRequest,
                                                        fixture: str) -> None:
    weights: Path = request.getfixturevalue(fixture)
    tok = hf_tokenizer(weights)
    prompts = [tok(p).input_ids for p in PROMPTS]
    model = build_stage(weights, 0, 1, 1, "float32", None)[0]
    assert model.sparse
    runner = StageRunner(model)
    got = runner_greedy(runner, prompts, MAX_NEW)
    want = [_hf_greedy_ids(weights, p, MAX_NEW) for p in prompts]
    assert got == want
    assert len({tuple(w) for w in want}) == len(want)  # the prompts lead somewhere different
    # Every position's logits, not only the argmax (one prefill of the longest prompt).
    ids = prompts[-1]
    plan = StepPlan(99, [SeqWork("x", 0, ids, len(ids),
                                 score_targets=[*ids[1:], ids[0]])])
    logits = runner.logits(runner.head_rows(plan, runner.forward(plan, None)))
    with torch.no_grad():
        ref = hf_model(weights)(torch.tensor([ids])).logits[0].float()
    np.testing.assert_allclose(logits.numpy(), ref.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fixture", MOE_FIXTURES)
def test_whole_moe_bf16_logits_equal_transformers_bit_for_bit(
        request: pytest.FixtureRequest, fixture: str) -> None:
    """In bf16 the order of roundings shows: routing weights in float32 (Mixtral) or bf16
    (Qwen), the top-k terms summed in float32 and cast once, as transformers' experts do."""
    from transformers import AutoModelForCausalLM

    weights: Path = request.getfixturevalue(fixture)
    ids = hf_tokenizer(weights)(PROMPTS[-1]).input_ids
    runner = StageRunner(build_stage(weights, 0, 1, 1, "bfloat16", None)[0])
    plan = StepPlan(0, [SeqWork("x", 0, ids, len(ids), score_targets=ids)])
    logits = runner.logits(runner.head_rows(plan, runner.forward(plan, None)))
    hf = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert torch.equal(logits, ref)


def _header(folder: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of the checkpoint's one file and its size in bytes (read here,
    not by the engine)."""
    (path,) = folder.glob("*.safetensors")
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _nbytes(meta: dict[str, Any]) -> int:
    a, b = meta["data_offsets"]
    return int(b - a)


@pytest.mark.parametrize("tp,ep", [(2, 2), (2, 1), (1, 1)])
def test_each_rank_reads_only_its_share_of_the_experts(tiny_mixtral_dir: Path, tp: int,
                                                       ep: int) -> None:
    header, hlen = _header(tiny_mixtral_dir)
    experts_total = sum(_nbytes(m) for k, m in header.items() if ".experts." in k)
    # Every rank reads the norms and the routers whole; the rest (attention, embedding, head)
    # is split over tp as for a dense model (evenly here: 2 KV heads, 384 vocabulary rows).
    whole = sum(_nbytes(m) for k, m in header.items() if "norm" in k or ".gate." in k)
    split = sum(_nbytes(m) for k, m in header.items() if ".experts." not in k) - whole
    n_experts = 8
    held = [0] * tp
    for rank in range(tp):
        model, report = build_stage(tiny_mixtral_dir, rank, 1, tp, "float32", None, ep=ep)
        share = model.shard.experts
        assert share is not None
        group_experts = even_ranges(n_experts, ep)[share.group]
        assert share.experts == group_experts
        block = model.layers["0"].block_sparse_moe  # type: ignore[union-attr]
        assert sorted(int(e) for e in block.experts) == list(group_experts)
        want_expert_bytes = sum(_nbytes(m) for k, m in header.items() if ".experts." in k
                                and int(k.split(".experts.")[1].split(".")[0]) in group_experts)
        want_expert_bytes //= tp // ep  # each held expert is split over the group's ranks
        expert_bytes = sum(t.numel() * t.element_size()
                           for name, t in model.state_dict().items() if ".experts." in name)
        assert expert_bytes == want_expert_bytes
        held[rank] = expert_bytes
        # The reader's count is exactly the header, this rank's experts and its share of the
        # rest: not one byte of another group's experts.
        assert report.bytes_read == hlen + expert_bytes + whole + split // tp
    # Together the stage's ranks read every expert byte exactly once.
    assert sum(held) == experts_total


def test_expert_groups_split_tp_ranks(tiny_mixtral_dir: Path) -> None:
    spec = moe_spec(load_config(tiny_mixtral_dir))
    assert spec is not None and spec.experts == 8 and spec.top_k == 2
    shares = [expert_share(spec, 4, 2, t) for t in range(4)]
    assert [s.experts for s in shares] == [range(0, 4)] * 2 + [range(4, 8)] * 2
    assert [(s.inter_start, s.inter_stop) for s in shares] == [(0, 24), (24, 48)] * 2


def test_plans_the_model_cannot_take_are_refused(tiny_llama_dir: Path,
                                                 tiny_mixtral_dir: Path) -> None:
    with pytest.raises(InvalidPlan, match="dense"):
        build_stage(tiny_llama_dir, 0, 1, 2, "float32", None, ep=2)
    with pytest.raises(InvalidPlan, match="divide"):
        build_stage(tiny_mixtral_dir, 0, 1, 2, "float32", None, ep=3)
    with pytest.raises(InvalidPlan) as err:
        build_stage(tiny_mixtral_dir, 0, 1, 1, "float32", None, ep=2)
    assert err.value.details == {"ep": 2, "tp": 1}
    assert not err.value.retryable


@pytest.mark.parametrize("moe", ["tiny_mixtral_dir", "tiny_qwen3_moe_dir", "tiny_qwen2_moe_dir",
                                 "tiny_deepseek_dir"])
def test_the_site_refuses_ep_for_a_dense_model_from_its_config(
        request: pytest.FixtureRequest, tiny_llama_dir: Path, moe: str, tmp_path: Path) -> None:
    """``check_plan_fits`` reads config.json as the engine does: ep > 1 on a dense model is
    refused before any rank starts (it used to load, then die); a mixture of experts passes,
    Kimi K2's ``kimi_k2`` type included, and a config that leaves an MoE field to
    transformers' default is left to the server."""
    from fabric.catalog import CatalogEntry, WeightSource
    from fabric.weights import check_plan_fits

    entry = CatalogEntry(name="m", version="1", source=WeightSource(kind="path", path="/x"))
    with pytest.raises(InvalidPlan, match="ep=2 needs a mixture-of-experts model") as err:
        check_plan_fits(entry, 1, 2, tiny_llama_dir, ep=2)
    assert err.value.details == {"ep": 2, "tp": 2}
    check_plan_fits(entry, 1, 2, tiny_llama_dir)
    folder = request.getfixturevalue(moe)
    check_plan_fits(entry, 1, 2, folder, ep=2)
    config = json.loads((folder / "config.json").read_text())
    if config["model_type"] == "deepseek_v3":
        config["model_type"] = "kimi_k2"
    else:  # transformers' name for the field varies with its version
        config.pop("num_experts", None)
        config.pop("num_local_experts", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    check_plan_fits(entry, 1, 2, tmp_path, ep=2)


# --- multi-rank servers (slow) -------------------------------------------------------------

PLANS = [("tiny_mixtral_dir", 1, 2, 2), ("tiny_mixtral_dir", 2, 2, 2),
         ("tiny_mixtral_dir", 1, 2, 1), ("tiny_qwen3_moe_dir", 2, 2, 2),
         ("tiny_qwen2_moe_dir", 1, 2, 2)]


@pytest.fixture(scope="module", params=[
    pytest.param(p, marks=pytest.mark.slow,
                 id=f"{p[0].removeprefix('tiny_').removesuffix('_dir')}-pp{p[1]}-tp{p[2]}-ep{p[3]}")
    for p in PLANS])
def served(request: pytest.FixtureRequest, model_server: Any) -> tuple[Any, Path]:
    fixture, pp, tp, ep = request.param
    weights: Path = request.getfixturevalue(fixture)
    name = fixture.removesuffix("_dir").replace("_", "-")
    server = model_server(weights, pp=pp, tp=tp, ep=ep, name=name)
    assert {k: server.health()["plan"][k] for k in ("pp", "tp", "ep")} == \
        {"pp": pp, "tp": tp, "ep": ep}
    return server, weights


def test_served_greedy_and_logprobs_equal_transformers(served: tuple[Any, Path]) -> None:
    server, weights = served
    check_served_against_transformers(server, weights, PROMPTS, MAX_NEW)


def test_neuron_ablation_is_refused_on_sparse_layers(tiny_qwen3_moe_dir: Path) -> None:
    """Qwen3-MoE's layer 1 is dense (``mlp_only_layers``), the others are experts: ablating
    neurons is accepted on the first and refused, typed, on the others."""
    from fabric.engine.experts import sparse_layers
    from fabric.engine.prepare import ModelLimits, Preparer
    from fabric.errors import InvalidHook
    from fabric.protocol import Hook, InferenceRequest

    c = load_config(tiny_qwen3_moe_dir)
    assert sparse_layers(c) == frozenset({0, 2, 3})
    prep = Preparer(hf_tokenizer(tiny_qwen3_moe_dir), ModelLimits(
        c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size, 512,
        4096, sparse_layers=sparse_layers(c)))

    def request(layer: int) -> InferenceRequest:
        return InferenceRequest(model="m", prompt="The", hooks=[
            Hook(kind="ablate_neurons", layer=layer, neurons=[0, 3])])

    assert prep.prepare(request(1)).hooks[0].neurons == [0, 3]
    for layer in (0, -1):
        with pytest.raises(InvalidHook, match="mixture of experts"):
            prep.prepare(request(layer))


def test_shard_folder_for_an_ep_plan_loads_the_same_experts(tiny_qwen2_moe_dir: Path,
                                                           tmp_path: Path) -> None:
    """``fabric shard --ep`` writes each rank exactly what an ep plan reads from the full
    checkpoint (Qwen2-MoE: experts split over the groups, the shared expert over tp), and a
    folder written for another ep is refused."""
    from fabric.engine.presplit import write_shards
    from fabric.errors import DeploymentError

    manifest = write_shards(tiny_qwen2_moe_dir, tmp_path / "s", 1, 2, ep=2)
    assert manifest["ep"] == 2
    for rank in range(2):
        direct = build_stage(tiny_qwen2_moe_dir, rank, 1, 2, "float32", None, ep=2)[0]
        sharded = build_stage(tiny_qwen2_moe_dir, rank, 1, 2, "float32", None,
                              shard_dir=tmp_path / "s", ep=2)[0]
        a, b = direct.state_dict(), sharded.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        shared = a["layers.0.mlp.shared_expert.gate_proj.weight"]
        assert shared.shape[0] == 96 // 2  # the shared expert's 96 neurons over tp=2
        assert sorted({k.split(".")[4] for k in a if ".experts." in k}) == \
            [str(e) for e in range(4 * rank, 4 * rank + 4)]
    with pytest.raises(DeploymentError, match="ep=2"):
        build_stage(tiny_qwen2_moe_dir, 0, 1, 2, "float32", None, shard_dir=tmp_path / "s")


def test_a_deploy_plan_whose_ep_does_not_divide_tp_is_refused(tmp_path: Path) -> None:
    """A plan override is checked at the site before any job starts (a dense model with
    ep > 1 is refused once its weights' folder is known: ``check_plan_fits``)."""
    from fabric.catalog import CatalogEntry, WeightSource
    from fabric.endpoint.context import SiteContext
    from fabric.sites import SiteConfig

    ctx = SiteContext(SiteConfig.model_validate({"name": "local"}), tmp_path)
    entry = CatalogEntry(name="m", version="1", source=WeightSource(kind="path", path="/x"))
    plan = ctx.plan(entry, {"tp": 4, "ep": 2})
    assert plan is not None and (plan.tp, plan.ep) == (4, 2)
    with pytest.raises(InvalidPlan, match="ep=3 must divide tp=4") as err:
        ctx.plan(entry, {"tp": 4, "ep": 3})
    assert err.value.details == {"ep": 3, "tp": 4}
