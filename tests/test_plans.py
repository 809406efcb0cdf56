"""Plans that fit (``fabric.plans``, ``fabric plan``): parameter counts against real models and
published sizes, bytes and token budgets by hand, refusals with their numbers, and the plans
the shipped sites document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fabric.cli.main import main
from fabric.errors import InvalidRequest, InvalidSiteConfig, PlanDoesNotFit, UnknownModel
from fabric.plans import (
    GIB,
    ModelShape,
    fit,
    known_models,
    load_model_config,
    shape_from_config,
    size_plan,
)
from fabric.sites import NodeShape, SiteConfig, load_site

POLARIS = NodeShape(gpus=4, gpu_memory_gib=40)
AURORA = NodeShape(gpus=6, gpu_memory_gib=128)


def _shape(name: str) -> ModelShape:
    return shape_from_config(load_model_config(name)[1], name)


@pytest.mark.parametrize(("name", "billions"), [
    # Published totals: Llama 3.1 405B / 70B, DeepSeek-V3 671B (main model, without the 14B
    # MTP module), Kimi K2 "1T", Qwen3-235B-A22B, Mixtral 8x7B 46.7B.
    ("llama-3.1-405b", 405.85), ("llama-3.1-70b", 70.55), ("deepseek-v3", 671.03),
    ("kimi-k2", 1026.4), ("qwen3-235b-a22b", 235.09), ("mixtral-8x7b", 46.70),
])
def test_parameter_counts_match_published_sizes(name: str, billions: float) -> None:
    assert _shape(name).total_params() / 1e9 == pytest.approx(billions, abs=0.01)
    assert name in known_models()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mixtral", "qwen3_moe", "deepseek_v3",
                                  "qwen3", "mistral", "llama_bias"])
def test_parameter_counts_equal_transformers_models(kind: str) -> None:
    """The count from the config equals the parameters transformers builds (tiny configs with
    every field the sizing reads: GQA and MLA, biases, shared experts, dense first layers)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
            "tie_word_embeddings": False}
    extra = {
        "llama": {"tie_word_embeddings": True},
        "qwen2": {},
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
        "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                      "decoder_sparse_step": 2, "mlp_only_layers": [3], "head_dim": 16},
        "deepseek_v3": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
                        "moe_intermediate_size": 32, "first_k_dense_replace": 1,
                        "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                        "qk_rope_head_dim": 8, "v_head_dim": 8, "num_key_value_heads": 4,
                        "n_group": 1, "topk_group": 1},
        # head_dim unlike hidden / heads; biases on q, k, v and o
        "qwen3": {"head_dim": 24, "attention_bias": True, "tie_word_embeddings": True},
        "mistral": {"sliding_window": 8},
        "llama_bias": {"attention_bias": True, "head_dim": 8},
    }[kind]
    config = {**base, **extra, "model_type": kind.removesuffix("_bias")}
    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    want = sum(p.numel() for p in model.parameters())
    assert shape_from_config(config, kind).total_params() == want


def test_llama_405b_in_bf16_needs_6_polaris_nodes() -> None:
    model = _shape("llama-3.1-405b")
    plan = fit(model, POLARIS, "bfloat16")
    assert (plan.pp, plan.tp, plan.ep, plan.nodes) == (6, 4, 1, 6)
    # Every byte once, except the norms, which each of a stage's 4 ranks holds.
    norms = (2 * 126 + 1) * 16384 * 2
    assert plan.weight_bytes == 2 * model.total_params() + 3 * norms
    # 126 layers over 6 stages = 21 each; KV per token per GPU: 21 layers x (k, v) x 2 of the
    # 8 KV heads x 128 x 2 bytes.
    assert [s.layers for s in plan.stages] == [(21 * i, 21 * (i + 1)) for i in range(6)]
    assert plan.kv_bytes_per_token == 21 * 2 * 2 * 128 * 2 == 21504
    usable = int(40 * GIB * 0.9 - 2 * GIB)
    first = plan.stages[0]
    assert first.kv_tokens == (usable - first.weight_bytes) // 21504
    assert 32 * GIB < plan.weight_bytes_per_rank < usable
    assert plan.kv_tokens == min(s.kv_tokens for s in plan.stages) > 90_000
    with pytest.raises(PlanDoesNotFit, match=r"at most 5 nodes.*needs 38\.6 GiB of weights, "
                       r"34\.0 GiB usable") as err:
        fit(model, POLARIS, "bfloat16", max_nodes=5)
    closest = err.value.details["closest"]
    assert closest["nodes"] == 5 and closest["weight_bytes_per_rank"] > closest["usable_bytes"]
    assert not size_plan(model, POLARIS, 5, 4).weights_fit


def test_deepseek_v3_in_fp8_fits_one_aurora_node() -> None:
    """671B in FP8 (674 GB with the bf16 embeddings, norms and routers) on 6 x 128 GiB: 105 GiB
    of weights per GPU of 113 GiB usable. Dequantized to bf16 it needs two nodes."""
    model = _shape("deepseek-v3")
    plan = fit(model, AURORA, "fp8")
    assert (plan.pp, plan.tp, plan.ep, plan.nodes) == (1, 6, 2, 1)
    assert 104 * GIB < plan.weight_bytes_per_rank < 105 * GIB < plan.usable_bytes
    assert plan.weight_bytes / 1e9 == pytest.approx(674.2, abs=0.1)
    # MLA keeps the compressed latent (512 + 64 values) per layer, on every tp rank.
    assert plan.kv_bytes_per_token == 61 * (512 + 64) * 2
    assert plan.kv_tokens == 130_592
    bf16 = fit(model, AURORA, "bfloat16")
    assert (bf16.pp, bf16.tp, bf16.nodes) == (2, 6, 2)


def test_kimi_k2_and_smaller_models() -> None:
    assert fit(_shape("kimi-k2"), AURORA, "fp8").nodes == 2
    assert fit(_shape("kimi-k2"), POLARIS, "fp8").nodes == 8
    assert fit(_shape("kimi-k2"), POLARIS, "bfloat16").nodes == 15
    # 70B: the pp=2 x tp=4 plan Polaris hosts it with.
    seventy = fit(_shape("llama-3.1-70b"), POLARIS)
    assert (seventy.pp, seventy.tp, seventy.nodes) == (2, 4, 2)
    # Mixtral on one node: whole experts per rank (8 experts, ep=4).
    mixtral = fit(_shape("mixtral-8x7b"), POLARIS)
    assert (mixtral.pp, mixtral.tp, mixtral.ep, mixtral.nodes) == (1, 4, 4, 1)


def test_token_budget_and_bad_plans_are_refused() -> None:
    model = _shape("llama-3.1-405b")
    with pytest.raises(PlanDoesNotFit, match=r"KV cache holds .* fewer than the 10000000"):
        fit(model, POLARIS, "bfloat16", min_tokens=10_000_000, max_nodes=8)
    with pytest.raises(InvalidRequest, match=r"tp=8 must be 1\.\.4"):
        size_plan(model, POLARIS, 1, 8)
    with pytest.raises(InvalidRequest, match="be 1 for a dense model"):
        size_plan(model, POLARIS, 6, 4, ep=2)
    with pytest.raises(InvalidRequest, match="no GPU node shape"):
        fit(model, NodeShape())


def test_kv_cache_bytes_follow_the_weights_dtype_and_a_plan_over_the_node_limit_is_refused(
        ) -> None:
    """fp32 weights keep an fp32 KV cache (4 bytes a value; 2 for 16-bit and FP8 weights): for
    Llama 3.1 70B (8 KV heads of 128, 80 layers) at pp=2 tp=4 a rank holds 40 layers of
    2 x 2 x 128 values per token. A plan on more nodes than allowed says so."""
    from fabric.plans import check_fits, shortfall

    model = _shape("llama-3.1-70b")
    per_rank_16 = 40 * 2 * 2 * 128 * 2
    assert size_plan(model, POLARIS, 2, 4, weights="bfloat16").kv_bytes_per_token == per_rank_16
    assert size_plan(model, POLARIS, 2, 4, weights="fp8").kv_bytes_per_token == per_rank_16
    assert size_plan(model, POLARIS, 2, 4, weights="float32").kv_bytes_per_token == \
        2 * per_rank_16
    plan = size_plan(model, POLARIS, 2, 4)
    assert plan.nodes == 2 and shortfall(plan, POLARIS, 1000, max_nodes=2) == ""
    assert shortfall(plan, POLARIS, 1000, max_nodes=1) == \
        "it needs 2 nodes, more than the 1 allowed"
    with pytest.raises(PlanDoesNotFit, match="more than the 1 allowed"):
        check_fits(plan, POLARIS, 1000, max_nodes=1)


@pytest.mark.parametrize("site", ["polaris", "perlmutter", "aurora"])
def test_shipped_capacity_plans_are_what_fabric_plan_computes(site: str) -> None:
    s = load_site(site)
    assert s.node.gpus in (4, 6) and s.node.gpu_memory_gib > 0 and s.node.interconnect
    sizes = set()
    for entry in s.capacity:
        model = _shape(entry.model)
        plan = fit(model, s.node, entry.weights)
        assert (plan.pp, plan.tp, plan.ep, plan.nodes, plan.kv_tokens) == \
            (entry.pp, entry.tp, entry.ep, entry.nodes, entry.kv_tokens), entry
        sizes.add((model.total_params() >= 400e9, model.is_moe and model.total_params() > 1e12))
    assert (True, False) in sizes and (True, True) in sizes  # >= 400B dense and ~1T MoE


def test_node_shape_is_validated() -> None:
    with pytest.raises(ValueError, match="gpu_memory_gib"):
        NodeShape(gpus=4, gpu_memory_gib=-1)
    with pytest.raises(ValueError, match="memory_fraction"):
        NodeShape(gpus=4, gpu_memory_gib=40, memory_fraction=1.5)
    assert SiteConfig(name="x").node.gpus == 0  # default: unknown, nothing is planned
    assert issubclass(InvalidSiteConfig, InvalidRequest)


def test_config_from_a_path_and_unknown_names(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(load_model_config("mixtral-8x7b")[1]))
    name, config = load_model_config(str(folder))
    assert name == "my-model" and config["num_local_experts"] == 8
    with pytest.raises(UnknownModel, match="deepseek-v3"):
        load_model_config("no-such-model")


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "llama-3.1-405b", "--site", "polaris", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["site"], out["pp"], out["tp"], out["nodes"]) == ("polaris", 6, 4, 6)
    assert main(["plan", "deepseek-v3", "--site", "aurora", "--weights", "fp8"]) == 0
    text = capsys.readouterr().out
    assert "pp=1 x tp=6 x ep=2 = 6 GPUs on 1 node" in text and "130,592" in text
    assert main(["plan", "llama-3.1-405b", "--site", "polaris", "--pp", "5", "--tp", "4"]) == 2
    assert "38.6 GiB of weights" in capsys.readouterr().err
    assert main(["plan", "llama-3.1-405b", "--site", "polaris", "--nodes", "5"]) == 2
    assert main(["plan", "llama-3.1-405b", "--site", "local"]) == 2
    assert "no GPU node shape" in capsys.readouterr().err


def test_plan_takes_the_names_a_sites_catalog_serves(tmp_path: Path, tiny_llama_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``fabric plan NAME`` for a model the site lists (``fabric sites``, ``fabric models``)
    failed "no config for NAME": only shipped configs and paths were read."""
    from fabric.models_registry import ModelRegistry

    # polaris's llama-3.1-70b-instruct: weights on polaris, sized by the shipped llama-3.1-70b
    assert main(["plan", "llama-3.1-70b-instruct", "--site", "polaris", "--json"]) == 0
    captured = capsys.readouterr()
    assert "shipped config llama-3.1-70b" in captured.err
    out = json.loads(captured.out)
    assert out["model"] == "llama-3.1-70b-instruct" and (out["pp"], out["tp"]) == (2, 4)
    assert abs(out["params"] - 70.55e9) < 1e7  # Llama 3.1 70B's size
    site = tmp_path / "site"
    site.mkdir()
    (site / "fabric.yaml").write_text(f"name: gpus\nnode: {{gpus: 4, gpu_memory_gib: 40}}\n"
                                      f"state_dir: {tmp_path / 'state'}\n")
    ModelRegistry(tmp_path / "state").add(tiny_llama_dir, "my-llama", "1")  # fabric models add
    assert main(["plan", "my-llama", "--site", str(site), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][-1]["layers"][1] == 4  # its 4 layers
    assert main(["plan", "nope", "--site", str(site)]) == 2
    assert "site 'gpus' serves minilm-l6, my-llama, smollm2-135m" in capsys.readouterr().err


def test_cli_checks_a_given_plan_with_its_ep_and_needs_tp_with_pp(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "mixtral-8x7b", "--site", "polaris", "--pp", "1", "--tp", "4",
                 "--ep", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["pp"], out["tp"], out["ep"]) == (1, 4, 2)
    assert main(["plan", "mixtral-8x7b", "--site", "polaris", "--pp", "1", "--tp", "4",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ep"] == 4  # whole experts per rank
    assert main(["plan", "mixtral-8x7b", "--site", "polaris", "--pp", "2"]) == 2
    assert capsys.readouterr().err == \
        "error: --pp needs --tp (or leave both out to search)\n"


def test_plans_honour_the_sites_limits_and_placement(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    """``fabric plan`` suggested pp=10 on 10 nodes where polaris's limits (what deploy checks)
    allow 8, and 90 ranks on 23 nodes, which no launcher places evenly."""
    from fabric.endpoint.jobs import check_placement

    limits = load_site("polaris").limits
    assert main(["plan", "deepseek-v3", "--site", "polaris"]) == 2
    assert f"at most {limits.max_nodes} nodes" in capsys.readouterr().err
    assert main(["plan", "deepseek-v3", "--site", "polaris", "--pp", "30", "--tp", "3"]) == 2
    err = capsys.readouterr().err
    plan = size_plan(_shape("deepseek-v3"), POLARIS, 30, 3)
    check_placement(plan.ranks, plan.nodes)
    assert f"on {plan.nodes} nodes" in err and f"the {limits.max_nodes} allowed" in err


def test_plan_limit_on_gpus_is_deploys(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    """A site whose limits allow fewer GPUs than one node holds: a plan on that node is
    refused by the rule deploy refuses it with (``limits.max_gpus``)."""
    site = tmp_path / "small"
    site.mkdir()
    (site / "fabric.yaml").write_text("name: small\nnode: {gpus: 4, gpu_memory_gib: 40}\n"
                                      "limits: {max_nodes: 8, max_gpus: 2}\n")
    assert main(["plan", "mixtral-8x7b", "--site", str(site), "--pp", "1", "--tp", "4"]) == 2
    assert "limits.max_gpus = 2 (it asks for 4)" in capsys.readouterr().err


def test_a_broken_config_json_is_a_typed_error(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from fabric.errors import InvalidModelFolder

    folder = tmp_path / "badjson"
    folder.mkdir()
    (folder / "config.json").write_text("{not json{")
    with pytest.raises(InvalidModelFolder, match="not a readable JSON config"):
        load_model_config(str(folder))
    assert main(["plan", str(folder), "--site", "polaris"]) == 2
    assert str(folder / "config.json") in capsys.readouterr().err
    with pytest.raises(InvalidModelFolder, match="'hidden_size'"):
        shape_from_config({"num_hidden_layers": 2}, "x")
