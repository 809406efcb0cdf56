"""Plan balance: ``params`` evens out the weights per stage, ``compute`` the work per step.

The two spread the layers differently when a tied LM head sits on stage 0 (its matrix is
memory there, but only a fraction of it is work), and the outputs must not change.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fabric.engine.loader import SHARD_MANIFEST, build_stage, load_config, rank_shards
from fabric.engine.partition import plan_ranks, stage_costs
from fabric.engine.presplit import write_shards
from fabric.engine.runner import StageRunner
from fabric.engine.steps import SampleSpec, SeqWork, StepPlan
from fabric.errors import DeploymentError
from fabric.testing.tiny import build_tiny_llama


def _smollm2_shapes() -> tuple[SimpleNamespace, dict[str, list[int]]]:
    """SmolLM2-135M's tensor shapes (30 layers, tied 49152 x 576 embedding)."""
    config = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                             hidden_size=576, intermediate_size=1536, head_dim=64)
    shapes = {"model.embed_tokens.weight": [49152, 576], "model.norm.weight": [576]}
    for i in range(30):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": [576, 576],
                       p + "self_attn.k_proj.weight": [192, 576],
                       p + "self_attn.v_proj.weight": [192, 576],
                       p + "self_attn.o_proj.weight": [576, 576],
                       p + "mlp.gate_proj.weight": [1536, 576],
                       p + "mlp.up_proj.weight": [1536, 576],
                       p + "mlp.down_proj.weight": [576, 1536],
                       p + "input_layernorm.weight": [576],
                       p + "post_attention_layernorm.weight": [576]})
    return config, shapes


def test_smollm2_splits() -> None:
    config, shapes = _smollm2_shapes()
    layers = {b: [len(s.layers) for s in plan_ranks(config, shapes, 2, 1, b)]
              for b in ("params", "compute")}
    # params: the 28M-parameter embedding weighs like ~8 layers on stage 0; compute: the tied
    # head's matmul costs a quarter of that, so stage 0 takes three more layers.
    assert layers == {"params": [11, 19], "compute": [14, 16]}


def test_stage_costs() -> None:
    assert stage_costs(100, 100, 1, True, "params") == (100.0, 1.0)
    assert stage_costs(100, 80, 1, False, "params") == (100.0, 81.0)
    assert stage_costs(100, 100, 1, True, "compute") == (25.0, 1.0)
    assert stage_costs(100, 80, 1, False, "compute") == (0.0, 21.0)
    with pytest.raises(ValueError, match="balance"):
        stage_costs(100, 100, 1, True, "bytes")


@pytest.fixture(scope="module")
def wide_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tied, 6 narrow layers, an embedding worth ~1.3 layers: the balances split it 2 + 4
    (params) and 3 + 3 (compute)."""
    return build_tiny_llama(tmp_path_factory.mktemp("wide-vocab"), layers=6, intermediate=32,
                            seed=3)


def _run(stages: list[StageRunner], plan: StepPlan) -> torch.Tensor:
    x = stages[0].forward(plan, None)
    x = stages[1].forward(plan, x)
    return stages[0].logits(stages[1].head_rows(plan, x))


def test_outputs_do_not_depend_on_the_balance(wide_vocab_dir: Path) -> None:
    config = load_config(wide_vocab_dir)
    splits = {b: [s.layers for s in rank_shards(wide_vocab_dir, config, 2, 1, b)]
              for b in ("params", "compute")}
    assert splits["params"] != splits["compute"]
    assert len(splits["compute"][0]) > len(splits["params"][0])
    prompt = [5, 17, 300, 42, 7, 99, 123, 8]
    logits = {}
    for balance in splits:
        stages = [StageRunner(build_stage(wide_vocab_dir, r, 2, 1, "float32", None,
                                          balance=balance)[0]) for r in range(2)]
        greedy = SampleSpec()
        steps = [_run(stages, StepPlan(1, [SeqWork("a", 0, prompt, 16, sample=greedy)]))]
        token = int(steps[0][-1].argmax())
        steps.append(_run(stages, StepPlan(2, [SeqWork("a", len(prompt), [token], 16,
                                                         sample=greedy)])))
        logits[balance] = torch.cat(steps)
    assert torch.equal(logits["params"], logits["compute"])
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(wide_vocab_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([[*prompt, token]])).logits[0]
    torch.testing.assert_close(logits["compute"], ref[-2:], rtol=1e-4, atol=1e-4)


def test_shards_remember_their_balance(wide_vocab_dir: Path, tmp_path: Path) -> None:
    manifest = write_shards(wide_vocab_dir, tmp_path / "s", 2, 1, balance="compute")
    assert manifest["balance"] == "compute"
    model, _ = build_stage(wide_vocab_dir, 0, 2, 1, "float32", None, tmp_path / "s",
                           balance="compute")
    assert model.shard.layers == plan_ranks(
        load_config(wide_vocab_dir), manifest["full_shapes"], 2, 1, "compute")[0].layers
    with pytest.raises(DeploymentError, match="balance=compute"):
        build_stage(wide_vocab_dir, 0, 2, 1, "float32", None, tmp_path / "s")


def test_shard_folder_split_another_way_is_refused_clearly(wide_vocab_dir: Path,
                                                           tmp_path: Path) -> None:
    """A folder whose manifest matches the plan but whose files were split another way (as an
    older fabric did) is refused with advice, not a shape error deep in loading."""
    import json

    write_shards(wide_vocab_dir, tmp_path / "s", 2, 1, balance="compute")
    path = tmp_path / "s" / SHARD_MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["balance"]  # what a manifest from before balances looked like
    path.write_text(json.dumps(manifest))
    for rank in (0, 1):
        with pytest.raises(DeploymentError, match="sharded differently: run `fabric shard`"):
            build_stage(wide_vocab_dir, rank, 2, 1, "float32", None, tmp_path / "s")
