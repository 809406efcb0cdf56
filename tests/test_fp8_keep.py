"""FP8 weights kept resident (``Plan.fp8 = "keep"``) and multiplied with ``torch._scaled_mm``.

What is compared with what (``docs/parallelism.md``, "FP8"):

* the kept weights with the weight-only method (FP8 bytes, dequantized per call) give exactly
  the dequantized model's logits and greedy tokens: storage and sharding lose nothing;
* the scaled matmuls also round each activation row to FP8, which the dequantized model does
  not: their reference is transformers on the dequantized weights with every projection's input
  rounded through FP8 the same way (``fabric.testing.fp8.fake_quant``, written apart from the
  engine). Greedy tokens equal that reference's; logits are within ``REF_ATOL`` of it, and
  within ``DEQ_REL`` (relative L2) of the dequantized model's: the FP8 activation error, which
  on these tiny random models is enough to change greedy tokens after a few steps;
* a kept model holds about half the weight bytes of the bf16 one (real tensor storage);
* ``keep`` is refused, typed, where the hardware has no FP8 matmul, and a tp split through
  scale blocks is refused naming the sizes.

The served fixture quantizes the tiny Llama (hidden 64) with 16 x 16 blocks so its tp=2 splits
fall on blocks; the in-process one (the odd Llama, 32 x 32 blocks, a per-row o_proj and an e5m2
per-tensor LM head) mixes every scale layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fabric.engine import fp8
from fabric.engine.checkpoint import Fp8Slice, SafetensorsReader
from fabric.engine.fp8 import Fp8Linear, resolve_mode, weight_bytes
from fabric.engine.loader import build_stage
from fabric.engine.runner import StageRunner
from fabric.engine.steps import SeqWork, StepPlan
from fabric.errors import Fp8MatmulUnavailable, Fp8SplitMisaligned, InvalidPlan
from fabric.sites import Plan
from fabric.testing.fp8 import (
    add_fake_quant_hooks,
    dequantize,
    fake_quant,
    quantize,
    write_fp8_pair,
)
from fabric.testing.greedy import runner_greedy
from tests.plugins.servers import ServerFactory, hf_tokenizer

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ["The", "The mitochondria is the powerhouse",
           "Tensor parallel splits each layer; pipeline parallel splits the stack. Proteins fold"]
MAX_NEW = 10
REF_ATOL = 2e-2
"""Logits of the kept model vs transformers with FP8-rounded activations, float32: fp32 sums in
another order can round a single activation to the neighbouring FP8 value (measured max 1e-6 to
3e-3)."""
DEQ_REL = 0.25
"""Relative L2 distance of the kept model's logits from the dequantized model's: the FP8
activation error (measured 0.08-0.15 on these fixtures, float32 and bfloat16)."""


def _scheme_aligned(name: str) -> tuple[torch.dtype, tuple[int, int] | str] | None:
    leaf = name.split(".")[-2]
    return (E4M3, (16, 16)) if leaf in PROJ else None


def _scheme_mixed(name: str) -> tuple[torch.dtype, tuple[int, int] | str] | None:
    leaf = name.split(".")[-2]
    if name == "lm_head.weight":
        return E5M2, "tensor"
    if leaf == "o_proj" and ".layers.1." in name:
        return E4M3, "row"
    if leaf == "down_proj" and ".layers.2." in name:
        return E5M2, "tensor"
    return (E4M3, (32, 32)) if leaf in PROJ else None


@pytest.fixture(scope="module")
def aligned(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fp8-keep")
    write_fp8_pair(tiny_llama_dir, root / "fp8", root / "ref", _scheme_aligned, (16, 16))
    return root / "fp8", root / "ref"


@pytest.fixture(scope="module")
def mixed(tiny_llama_odd_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fp8-mixed")
    write_fp8_pair(tiny_llama_odd_dir, root / "fp8", root / "ref", _scheme_mixed, (32, 32))
    return root / "fp8", root / "ref"


def _fake_quant_hf(fp8_dir: Path, ref_dir: Path, dtype: torch.dtype = torch.float32) -> object:
    """transformers on the dequantized weights, each kept projection's input rounded through
    FP8 per token and per scale block (the whole row for per-row / per-tensor scales)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=dtype).eval()
    reader = SafetensorsReader.from_folder(fp8_dir)
    try:
        groups: dict[str, int | None] = {}
        for name in reader.names():
            block = reader.fp8_block(name)
            if block is None or not name.startswith("model.layers."):
                continue
            cols = reader.shape(name)[1]
            groups[name.removesuffix(".weight")] = block[1] if block[1] < cols else None
    finally:
        reader.close()
    assert len(groups) == 7 * model.config.num_hidden_layers
    add_fake_quant_hooks(model, groups)
    return model


def _all_logits(runner: StageRunner, ids: list[int]) -> torch.Tensor:
    plan = StepPlan(0, [SeqWork("all", 0, ids, len(ids), score_targets=[*ids[1:], ids[0]])])
    out = runner.logits(runner.head_rows(plan, runner.forward(plan, None)))
    runner.drop("all")
    return out


def _hf_greedy(model: object, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        got = model.generate(torch.tensor([ids]), max_new_tokens=n,  # type: ignore[attr-defined]
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return list(got[0, len(ids):].tolist())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# --- the module ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,block", [(E4M3, (16, 16)), (E4M3, (16, 32)), (E4M3, (1, 64)),
                                         (E4M3, (48, 64)), (E5M2, (16, 16)), (E5M2, (48, 64))])
def test_fp8_linear_is_the_scaled_product_of_fp8_operands(dtype: torch.dtype,
                                                          block: tuple[int, int]) -> None:
    """scaled_mm: equal to FP8-rounded activations times the dequantized weight (fp32 sums in
    another order); the weight-only method: bit for bit the dequantized weight's product."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(48, 64, generator=gen) * 0.2
    q, scale = quantize(w, dtype, block)
    wd = dequantize(q, scale, block)
    x = torch.randn(5, 64, generator=gen)
    lin = Fp8Linear(Fp8Slice(q, scale, block, (0, 0)), bias=False)
    group = block[1] if block[1] < 64 else None
    torch.testing.assert_close(lin(x), fake_quant(x, group) @ wd.t(), rtol=1e-5, atol=1e-5)
    assert (lin(x) - x @ wd.t()).abs().max() > 1e-3  # the activations really are rounded
    exact = Fp8Linear(Fp8Slice(q, scale, block, (0, 0)), bias=False, method="dequantize")
    assert torch.equal(exact(x), torch.nn.functional.linear(x, wd))
    assert lin(x[:0]).shape == (0, 48)


# --- modes and refusals ------------------------------------------------------------------------

def test_modes_resolve_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_mode("auto", "cpu") == "dequantize"  # the CPU kernel is a slow reference
    assert resolve_mode("keep", "cpu") == "keep"
    assert resolve_mode("dequantize", "cuda") == "dequantize"
    if not torch.cuda.is_available():
        assert resolve_mode("auto", "cuda") == "dequantize"
        with pytest.raises(Fp8MatmulUnavailable, match="no CUDA device is visible"):
            resolve_mode("keep", "cuda")
    # The capability rule, on the values torch.cuda would report for an A100 and an H100.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None: "GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None: (8, 0))
    with pytest.raises(Fp8MatmulUnavailable, match=r"compute capability 8\.0; FP8 matmuls need "
                                                   r"8\.9") as err:
        resolve_mode("keep", "cuda:0")
    assert err.value.retryable is False and err.value.details["device"] == "cuda:0"
    assert resolve_mode("auto", "cuda:0") == "dequantize"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None: (9, 0))
    assert resolve_mode("auto", "cuda:0") == "keep"
    assert resolve_mode("keep", "cuda:0") == "keep"
    with pytest.raises(Fp8MatmulUnavailable, match="xpu"):
        resolve_mode("keep", "xpu")


def test_plan_validates_the_fp8_setting() -> None:
    assert Plan().fp8 == "auto"
    assert Plan.model_validate({"fp8": "keep", "device": "cuda"}).fp8 == "keep"
    with pytest.raises(ValueError, match="fp8"):
        Plan.model_validate({"fp8": "halve"})
    with pytest.raises(ValueError, match="fp8: keep needs scaled FP8 matmuls"):
        Plan.model_validate({"fp8": "keep", "device": "xpu"})
    assert issubclass(Fp8SplitMisaligned, InvalidPlan)


def test_keep_refused_on_a_device_without_fp8_matmul(aligned: tuple[Path, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(Fp8MatmulUnavailable):
        build_stage(aligned[0], 0, 1, 1, "bfloat16", None, device="cuda", fp8="keep")


def test_a_tp_split_through_blocks_is_refused_naming_the_sizes(mixed: tuple[Path, Path]
                                                              ) -> None:
    """The odd Llama's 3 KV heads of 8 split 2+1 under tp=2: k_proj rows 0:16 and 16:24,
    not on 32-row blocks. Every rank refuses the same way; dequantize serves the plan."""
    fp8_dir, _ = mixed
    for rank in (0, 1):
        with pytest.raises(Fp8SplitMisaligned) as err:
            build_stage(fp8_dir, rank, 1, 2, "float32", None, fp8="keep")
        msg = str(err.value)
        assert "32-wide block boundaries" in msg and "blocks 32x32" in msg, msg
        assert err.value.details["block"] == [32, 32]
        assert err.value.details["start"] % 32 or err.value.details["stop"] % 32
    model, report = build_stage(fp8_dir, 0, 1, 2, "float32", None, fp8="dequantize")
    assert report.fp8 == "dequantize" and not model.kept_fp8


def test_a_checkpoint_without_fp8_ignores_keep(tiny_llama_dir: Path) -> None:
    model, report = build_stage(tiny_llama_dir, 0, 1, 1, "float32", None, fp8="keep")
    assert report.fp8 == "" and not model.kept_fp8


# --- whole models in-process --------------------------------------------------------------------

def test_kept_model_holds_half_the_bf16_bytes(aligned: tuple[Path, Path]) -> None:
    fp8_dir, _ = aligned
    kept, report = build_stage(fp8_dir, 0, 1, 1, "bfloat16", None, fp8="keep")
    plain, plain_report = build_stage(fp8_dir, 0, 1, 1, "bfloat16", None, fp8="dequantize")
    assert report.fp8 == "keep" and kept.kept_fp8
    k, p = weight_bytes(kept), weight_bytes(plain)
    n_proj = sum(m.weight.numel() for m in kept.modules() if isinstance(m, Fp8Linear))
    # q, o 64x64; k, v 32x64; gate, up 128x64; down 64x128; 4 layers
    assert n_proj == 4 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)
    assert k["fp8"] == n_proj  # one byte a value, in storage
    proj_bf16 = 2 * n_proj
    assert k["scales"] == 4 * n_proj // (16 * 16)  # one fp32 per 16 x 16 block
    assert p["fp8"] == 0 and p["total"] - k["total"] == proj_bf16 - k["fp8"] - k["scales"]
    assert k["fp8"] + k["scales"] < 0.54 * proj_bf16  # ~half (scales: 1/64 more here)
    assert report.shard_bytes < plain_report.shard_bytes


@pytest.mark.parametrize("fixture", ["aligned", "mixed"])
def test_weight_only_kept_model_equals_the_dequantized_one(request: pytest.FixtureRequest,
                                                           fixture: str) -> None:
    fp8_dir, _ = request.getfixturevalue(fixture)
    tok = hf_tokenizer(fp8_dir)
    prompts = [tok(p).input_ids for p in PROMPTS]
    kept = StageRunner(build_stage(fp8_dir, 0, 1, 1, "float32", None, fp8="keep",
                                   fp8_method="dequantize")[0])
    plain = StageRunner(build_stage(fp8_dir, 0, 1, 1, "float32", None, fp8="dequantize")[0])
    assert torch.equal(_all_logits(kept, prompts[-1]), _all_logits(plain, prompts[-1]))
    assert runner_greedy(kept, prompts, MAX_NEW) == runner_greedy(plain, prompts, MAX_NEW)


@pytest.mark.parametrize("fixture", ["aligned", "mixed"])
def test_scaled_mm_model_equals_fp8_activation_reference(request: pytest.FixtureRequest,
                                                         fixture: str) -> None:
    fp8_dir, ref_dir = request.getfixturevalue(fixture)
    tok = hf_tokenizer(fp8_dir)
    prompts = [tok(p).input_ids for p in PROMPTS]
    kept = StageRunner(build_stage(fp8_dir, 0, 1, 1, "float32", None, fp8="keep")[0])
    plain = StageRunner(build_stage(fp8_dir, 0, 1, 1, "float32", None, fp8="dequantize")[0])
    ref = _fake_quant_hf(fp8_dir, ref_dir)
    got = runner_greedy(kept, prompts, MAX_NEW)
    assert got == [_hf_greedy(ref, p, MAX_NEW) for p in prompts]
    assert len({tuple(g) for g in got}) == len(got)
    ids = prompts[-1]
    logits = _all_logits(kept, ids)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].float()  # type: ignore[operator]
    np.testing.assert_allclose(logits.numpy(), want.numpy(), atol=REF_ATOL, rtol=0)
    deq = _all_logits(plain, ids)
    assert 1e-3 < _rel(logits, deq) < DEQ_REL


def test_bf16_kept_model_is_close_to_the_bf16_dequantized_one(aligned: tuple[Path, Path]
                                                              ) -> None:
    fp8_dir, _ = aligned
    ids = hf_tokenizer(fp8_dir)(PROMPTS[-1]).input_ids
    kept = StageRunner(build_stage(fp8_dir, 0, 1, 1, "bfloat16", None, fp8="keep")[0])
    plain = StageRunner(build_stage(fp8_dir, 0, 1, 1, "bfloat16", None, fp8="dequantize")[0])
    assert _rel(_all_logits(kept, ids), _all_logits(plain, ids)) < DEQ_REL


def test_routers_and_the_head_stay_dequantized(mixed: tuple[Path, Path]) -> None:
    model, _ = build_stage(mixed[0], 0, 1, 1, "float32", None, fp8="keep")
    assert model.lm_head is not None and model.lm_head.weight.dtype == torch.float32
    kept = [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
    assert len(kept) == 7 * 5
    assert fp8.is_router(model, "lm_head") is False


# --- served (real model servers, gloo at tp=2) ---------------------------------------------------

@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_served_keep_equals_the_reference(aligned: tuple[Path, Path],
                                          model_server: ServerFactory, tp: int) -> None:
    """A server with ``fp8: keep`` (each tp rank holding its FP8 slices and their block
    scales) gives the FP8-activation reference's greedy tokens, log-probs close to the
    dequantized model's, and records ``fp8: keep`` in every result's provenance."""
    fp8_dir, ref_dir = aligned
    server = model_server(fp8_dir, tp=tp, name="tiny-fp8-keep", fp8="keep")
    client = server.client()
    ref = _fake_quant_hf(fp8_dir, ref_dir)
    tok = hf_tokenizer(fp8_dir)
    for prompt in PROMPTS:
        res = server.run(client, prompt=prompt, sampling={"max_tokens": MAX_NEW})
        assert res["token_ids"] == _hf_greedy(ref, tok(prompt).input_ids, MAX_NEW), prompt
        assert res["provenance"]["plan"]["fp8"] == "keep"
    ids = tok(PROMPTS[-1]).input_ids
    res = server.run(client, kind="logprobs", prompt=PROMPTS[-1])
    plain = StageRunner(build_stage(fp8_dir, 0, 1, 1, "float32", None, fp8="dequantize")[0])
    logp = torch.log_softmax(_all_logits(plain, ids), -1)
    want = [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]
    got = np.asarray(res["logprobs"])
    assert 0 < np.abs(got - want).max() < 1.0
    with torch.no_grad():
        ref_logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), -1)  # type: ignore[operator]
    np.testing.assert_allclose(got, [float(ref_logp[j - 1, ids[j]]) for j in range(1, len(ids))],
                               atol=REF_ATOL, rtol=0)


# --- mixtures of experts: ep and pp shares ------------------------------------------------------

def _scheme_moe(name: str) -> tuple[torch.dtype, tuple[int, int] | str] | None:
    leaf = name.split(".")[-2]
    if leaf == "gate":  # the router: stored FP8 here, served dequantized
        return E4M3, "tensor"
    return (E4M3, (16, 16)) if leaf in PROJ or leaf in ("w1", "w2", "w3") else None


@pytest.fixture(scope="module")
def moe_fp8(tiny_mixtral_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fp8-moe")
    write_fp8_pair(tiny_mixtral_dir, root / "fp8", root / "ref", _scheme_moe, (16, 16))
    return root / "fp8"


def test_moe_kept_model_matches_and_routers_stay_dequantized(moe_fp8: Path) -> None:
    ids = hf_tokenizer(moe_fp8)(PROMPTS[-1]).input_ids
    kept_model = build_stage(moe_fp8, 0, 1, 1, "float32", None, fp8="keep")[0]
    routers = [m for n, m in kept_model.named_modules() if n.endswith("block_sparse_moe.gate")]
    assert routers and all(type(m) is torch.nn.Linear for m in routers)
    experts = [n for n, m in kept_model.named_modules()
               if isinstance(m, Fp8Linear) and ".experts." in n]
    assert len(experts) == 4 * 8 * 3
    plain = StageRunner(build_stage(moe_fp8, 0, 1, 1, "float32", None, fp8="dequantize")[0])
    exact = StageRunner(build_stage(moe_fp8, 0, 1, 1, "float32", None, fp8="keep",
                                    fp8_method="dequantize")[0])
    want = _all_logits(plain, ids)
    assert torch.equal(_all_logits(exact, ids), want)
    assert _rel(_all_logits(StageRunner(kept_model), ids), want) < DEQ_REL


@pytest.mark.parametrize("pp,tp,ep", [(1, 2, 2), (2, 2, 2), (2, 1, 1)])
def test_every_rank_keeps_its_share_with_its_blocks_scales(moe_fp8: Path, pp: int, tp: int,
                                                           ep: int) -> None:
    """Each rank's kept weights and factors are exactly its slice of the checkpoint's FP8
    tensors and the scale rows/columns of those blocks (read here from the file's header)."""
    from safetensors import safe_open

    with safe_open(str(moe_fp8 / "model.safetensors"), "pt") as fh:
        stored = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    seen: set[str] = set()
    for rank in range(pp * tp):
        model, report = build_stage(moe_fp8, rank, pp, tp, "float32", None, ep=ep, fp8="keep")
        assert report.fp8 == "keep"
        for name, mod in model.named_modules():
            if not isinstance(mod, Fp8Linear):
                continue
            key = f"model.{name}.weight"
            full, scale = stored[key], stored[key + "_scale_inv"]
            s = next(x for x in model.shard.slices if x.name == key)
            if s.dim is None:
                want, want_scale = full, scale
            else:
                stop = full.shape[s.dim] if s.stop is None else s.stop
                want = full.narrow(s.dim, s.start, stop - s.start)
                want_scale = scale.narrow(s.dim, s.start // 16, -(-stop // 16) - s.start // 16)
            assert mod.weight.dtype == E4M3 and torch.equal(mod.weight.view(torch.uint8),
                                                            want.view(torch.uint8)), key
            assert torch.equal(mod.weight_scale_inv, want_scale), key
            seen.add(key)
    every = {k for k in stored if k.endswith(".weight") and k + "_scale_inv" in stored
             and not k.endswith("gate.weight")}
    assert seen == every  # the plan's ranks together keep every FP8 projection


def test_moe_tp_split_of_experts_through_blocks_is_refused(moe_fp8: Path) -> None:
    """tp=2 x ep=1 splits each expert's 48 neurons 24 + 24: not on 16-wide blocks."""
    with pytest.raises(Fp8SplitMisaligned, match=r"experts\.0\.w1\.weight \[48, 64\]"):
        build_stage(moe_fp8, 0, 1, 2, "float32", None, ep=1, fp8="keep")


def test_kept_projections_with_biases(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    """Qwen3 with ``attention_bias``: q/k/v biases added by the kept layer, o_proj's bias once
    after the (here absent) all-reduce; per-tensor scales on every projection."""
    def scheme(name: str) -> tuple[torch.dtype, str] | None:
        return (E4M3, "tensor") if name.split(".")[-2] in PROJ and name.endswith(".weight") \
            else None

    write_fp8_pair(tiny_qwen3_dir, tmp_path / "fp8", tmp_path / "ref", scheme, (128, 128))
    ids = hf_tokenizer(tmp_path / "fp8")(PROMPTS[-1]).input_ids
    model = build_stage(tmp_path / "fp8", 0, 1, 1, "float32", None, fp8="keep",
                        fp8_method="dequantize")[0]
    o_proj = model.layers["0"].self_attn.o_proj
    assert isinstance(o_proj, Fp8Linear) and o_proj.bias is not None
    plain = StageRunner(build_stage(tmp_path / "fp8", 0, 1, 1, "float32", None,
                                    fp8="dequantize")[0])
    want = _all_logits(plain, ids)
    assert torch.equal(_all_logits(StageRunner(model), ids), want)
    kept = StageRunner(build_stage(tmp_path / "fp8", 0, 1, 1, "float32", None, fp8="keep")[0])
    assert _rel(_all_logits(kept, ids), want) < DEQ_REL


def test_per_row_scales_split_anywhere(tiny_llama_odd_dir: Path, tmp_path: Path) -> None:
    """Per-row scales have no blocks to cut: tp=2 of the odd Llama (uneven heads and MLP
    shares) keeps every slice, each holding exactly its part of the dequantized weight, and a
    row-parallel slice (columns from the middle) uses its rows' factors."""
    from safetensors.torch import load_file

    def scheme(name: str) -> tuple[torch.dtype, str] | None:
        return (E4M3, "row") if name.split(".")[-2] in PROJ else None

    write_fp8_pair(tiny_llama_odd_dir, tmp_path / "fp8", tmp_path / "ref", scheme, (128, 128))
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    middle = 0
    for rank in (0, 1):
        model, report = build_stage(tmp_path / "fp8", rank, 1, 2, "float32", None, fp8="keep")
        assert report.fp8 == "keep"
        for name, mod in model.named_modules():
            if isinstance(mod, Fp8Linear):
                key = f"model.{name}.weight"
                s = next(x for x in model.shard.slices if x.name == key)
                full = ref[key]
                stop = full.shape[s.dim] if s.stop is None else s.stop
                want = full.narrow(s.dim, s.start, stop - s.start)
                assert torch.equal(mod.dequantized(torch.float32), want), key
                x = torch.randn(3, mod.in_features)
                torch.testing.assert_close(mod(x), fake_quant(x, None) @ want.t(),
                                           rtol=1e-5, atol=1e-5)
                middle += s.dim == 1 and s.start > 0
    assert middle > 0
