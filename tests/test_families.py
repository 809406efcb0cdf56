"""Each dense family the engine serves gives transformers' logits and greedy tokens, and an
architecture it does not serve is refused with a typed error wherever a model enters.

In-process on the CPU, step by step: a prompt longer than the sliding windows is prefilled in
chunks (so chunks start mid-sequence, where the window mask and the cache offsets matter), then
decoded greedily; every step's logits are compared with a full transformers forward over the
same tokens. Multi-rank plans (pp=2, tp=2) and the decode fast path are covered per family by
the parametrisations of ``test_engine_equivalence`` and ``test_decode_graphs``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fabric import weights
from fabric.catalog import CatalogEntry, WeightSource
from fabric.cli.main import main
from fabric.engine.architectures import SERVED, family_of
from fabric.engine.loader import build_stage
from fabric.engine.runner import StageRunner
from fabric.engine.steps import SampleSpec, SeqWork, StepPlan
from fabric.errors import UnsupportedArchitecture
from fabric.models_registry import ModelRegistry
from tests.plugins.servers import hf_greedy, hf_model, hf_tokenizer
from tests.plugins.site import write_site

FAMILIES = ["tiny_qwen2_dir", "tiny_qwen3_dir", "tiny_mistral_dir"]
PROMPT = ("Tensor parallel splits each layer; pipeline parallel splits the stack of layers. "
          "Proteins fold")
NEW, CHUNK = 10, 7


def _run(weights_dir: Path, ids: list[int], windows: bool = True
         ) -> tuple[list[int], list[torch.Tensor], list[int]]:
    """Chunked prefill then greedy decode on a pp=1 stage; the tokens, each step's logits and
    the columns of each layer's KV cache (``windows=False``: the engine with its sliding
    windows switched off)."""
    model, _ = build_stage(weights_dir, 0, 1, 1, "float32", None)
    if not windows:  # neither in attention nor in the caches' layout
        for layer in model.layers.values():
            layer.self_attn.window = None  # type: ignore[union-attr]
        model.spec = replace(model.spec, windows=(None,) * len(model.spec.windows))
    runner = StageRunner(model)
    capacity = len(ids) + NEW
    step, logits, out = 0, [], []
    for start in range(0, len(ids), CHUNK):
        last = start + CHUNK >= len(ids)
        plan = StepPlan(step, [SeqWork("s", start, ids[start:start + CHUNK], capacity,
                                       sample=SampleSpec() if last else None)])
        x = runner.forward(plan, None)
        step += 1
    while len(out) < NEW:
        rows = runner.logits(runner.head_rows(plan, x))
        logits.append(rows[0])
        out.append(int(rows[0].argmax()))
        plan = StepPlan(step, [SeqWork("s", len(ids) + len(out) - 1, [out[-1]], capacity,
                                       sample=SampleSpec())])
        x = runner.forward(plan, None)
        step += 1
    cache = runner.kv.caches([SeqWork("s", 0, [], capacity)])[0]
    return out, logits, [keys.shape[1] for keys, _ in cache]


@pytest.mark.parametrize("fixture", FAMILIES)
def test_logits_and_greedy_tokens_equal_transformers(fixture: str,
                                                     request: pytest.FixtureRequest) -> None:
    weights_dir: Path = request.getfixturevalue(fixture)
    ids = hf_tokenizer(weights_dir)(PROMPT).input_ids
    tokens, logits, columns = _run(weights_dir, ids)
    hf = hf_model(weights_dir)
    with torch.no_grad():
        want = hf(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].float()
    torch.testing.assert_close(torch.stack(logits), want, atol=1e-4, rtol=1e-4)
    assert tokens == hf_greedy(weights_dir, PROMPT, NEW)
    model = build_stage(weights_dir, 0, 1, 1, "float32", None)[0]
    windows = model.spec.windows
    # A sliding layer keeps a ring of `window` keys; the others, every position.
    assert columns == [len(ids) + NEW if w is None else w for w in windows]
    if any(w is not None for w in windows):
        # The prompt outgrows the window, so the window must change what the model computes:
        # without it, the engine's logits are not transformers'.
        assert max(w or 0 for w in windows) < len(ids)
        _, unwindowed, _ = _run(weights_dir, ids, windows=False)
        assert (torch.stack(unwindowed) - want).abs().max() > 1e-2


def test_family_knobs_are_read_from_the_config(tiny_qwen2_dir: Path, tiny_qwen3_dir: Path,
                                               tiny_mistral_dir: Path) -> None:
    specs = {d.name: build_stage(d, 0, 1, 1, "float32", None)[0].spec
             for d in (tiny_qwen2_dir, tiny_qwen3_dir, tiny_mistral_dir)}
    qwen2, qwen3, mistral = specs.values()
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm) == (True, False, False)
    assert qwen2.windows == (None, None, 6, 6)  # max_window_layers=2: layers 2 and 3 slide
    assert (qwen3.qkv_bias, qwen3.o_bias, qwen3.qk_norm) == (True, True, True)
    assert qwen3.windows == (None,) * 4
    assert (mistral.qkv_bias, mistral.qk_norm, mistral.windows) == (False, False, (8,) * 4)
    assert (mistral.uniform_window, qwen2.uniform_window, qwen3.uniform_window) == (8, None, None)
    model = build_stage(tiny_qwen3_dir, 0, 1, 1, "float32", None)[0]
    attn = model.layers["0"].self_attn  # type: ignore[union-attr]
    assert attn.q_norm.weight.shape == (24,) and model.head_dim == 24  # not 60 / 6


def _with_architecture(src: Path, dest: Path, arch: str) -> Path:
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config["architectures"] = [arch]
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_unsupported_architecture_is_refused_at_every_entry(
        tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _with_architecture(tiny_llama_dir, tmp_path / "neox", "GPTNeoXForCausalLM")
    causal = sorted(a for a, f in SERVED.items() if f == "causal-lm")
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
            "MistralForCausalLM"} <= set(causal)
    # The engine, as a model server builds its stage (before reading any weights).
    with pytest.raises(UnsupportedArchitecture) as err:
        build_stage(folder, 0, 1, 1, "float32", None)
    assert "GPTNeoXForCausalLM" in err.value.message
    assert err.value.details["supported"] == causal
    # The catalog: preparing an entry's weights (what a deployment does first).
    entry = CatalogEntry(name="neox", version="1",
                         source=WeightSource(kind="path", path=str(folder)))
    with pytest.raises(UnsupportedArchitecture, match="GPTNeoXForCausalLM"):
        weights.prepare(entry)
    # An encoder is served, but not as a causal LM.
    bert = _with_architecture(tiny_llama_dir, tmp_path / "bert", "BertModel")
    with pytest.raises(UnsupportedArchitecture, match="not served as causal-lm"):
        weights.prepare(CatalogEntry(name="b", version="1",
                                     source=WeightSource(kind="path", path=str(bert))))
    with pytest.raises(UnsupportedArchitecture):
        build_stage(bert, 0, 1, 1, "float32", None)
    # fabric models add (the CLI: exit 2 and the list of what is served, nothing registered).
    site_dir = write_site(tmp_path / "site")
    assert main(["models", "add", str(folder), "--name", "x", "--version", "1",
                 "--site", str(site_dir)]) == 2
    stderr = capsys.readouterr().err
    assert "GPTNeoXForCausalLM" in stderr and "Qwen3ForCausalLM" in stderr
    assert not (site_dir / "state" / "models.json").exists()


@pytest.mark.parametrize("fixture", FAMILIES)
def test_models_add_registers_each_family(fixture: str, request: pytest.FixtureRequest,
                                          tmp_path: Path) -> None:
    weights_dir: Path = request.getfixturevalue(fixture)
    config = json.loads((weights_dir / "config.json").read_text())
    record = ModelRegistry(tmp_path / "state").add(weights_dir, "m", "1")
    assert record.family == family_of(config) == "causal-lm"
    assert record.architecture == config["architectures"][0]
    assert weights.prepare(record.entry()).sha256 == record.sha256


@pytest.mark.parametrize("fixture", FAMILIES)
def test_fabric_plan_reads_each_family_from_its_config(
        fixture: str, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Parameters (biases, qk-norm, tied heads included) and KV bytes per token (kv heads x
    head_dim from the config, not hidden / heads) as the weights and the config give them."""
    from fabric.models_registry import count_params
    from fabric.weights import weight_files

    weights_dir: Path = request.getfixturevalue(fixture)
    config = json.loads((weights_dir / "config.json").read_text())
    assert main(["plan", str(weights_dir), "--site", "polaris", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["params"] == count_params(weight_files(weights_dir))
    kv = 2 * config["num_key_value_heads"] * config["head_dim"] * config["num_hidden_layers"]
    assert plan["kv_bytes_per_token"] == kv * 2  # bfloat16


def test_a_model_whose_layers_all_slide_is_budgeted_by_its_window() -> None:
    """Every layer sliding (Mistral): a sequence holds at most `window` KV tokens, so the
    scheduler admits by that and the front door refuses only what the window cannot hold."""
    import threading

    from fabric.engine.prepare import ModelLimits, Preparer
    from fabric.engine.scheduler import Limits, Scheduler
    from fabric.engine.sequence import Sequence
    from fabric.errors import ContextLengthExceeded
    from fabric.protocol import InferenceRequest

    def admitted(window: int | None) -> tuple[int, int]:
        sched = Scheduler(Limits(20, 64, 8, kv_window=window), lambda seq, out: None,
                          lambda *a: None, threading.RLock())
        for _ in range(3):  # 3 sequences of 30 positions each
            sched.add(Sequence(request=InferenceRequest(model="m", prompt="x"),
                               prompt_ids=[1] * 26, reserve=30))
        sched._admit()
        return len(sched.running), sched.kv_used

    assert admitted(None) == (1, 30)  # the first runs even over budget; no more
    assert admitted(8) == (2, 16)
    for window, fits in ((None, False), (8, True), (25, False)):
        limits = ModelLimits(4, 64, 4, 128, context=512, kv_budget=20, kv_window=window)
        prep = Preparer(None, limits)
        if fits:
            prep._check_length(26, 4)
        else:
            with pytest.raises(ContextLengthExceeded, match="budget is 20"):
                prep._check_length(26, 4)
