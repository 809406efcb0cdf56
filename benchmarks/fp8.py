"""FP8 checkpoints on CPU: weights kept in FP8 vs dequantized at load (issue 19, item 3).

A tiny random Llama (``--hidden``, ``--inter``, ``--layers``; 4 heads, 2 KV heads) is quantized
the DeepSeek-V3 way (every projection ``float8_e4m3fn`` with one fp32 factor per ``--block`` x
``--block`` block) and loaded in-process three ways, compute dtype ``--dtype``:

* ``dequantize``: dequantized at load (``Plan.fp8 = "dequantize"``, the CPU default);
* ``keep``: FP8 weights resident, ``torch._scaled_mm`` with activations rounded to FP8 per token
  and per K block (``Plan.fp8 = "keep"``; K-sliced, as this torch has no CPU blockwise kernel);
* ``keep_weight_only``: the same FP8 bytes, dequantized per call (``Fp8Linear`` method
  ``dequantize``), the fall-back for block scales.

For each: weight bytes held (tensor storage), greedy decode throughput (``--batch`` prompts,
``--tokens`` new tokens, one prefill then decode steps through ``StageRunner``; median of
``--runs`` interleaved runs), the greedy tokens' agreement with ``dequantize``, and the relative
L2 distance of the logits. Then one projection (``4 * --hidden`` square) timed alone per method
at 1, 8 and 32 tokens (``kernels``). ``gpu_fp8_check.py`` runs the same comparison on a GPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import log, median, ratio

from fabric.testing.greedy import runner_greedy

MODES = {"dequantize": ("dequantize", "scaled_mm"), "keep": ("keep", "scaled_mm"),
         "keep_weight_only": ("keep", "dequantize")}
PROMPTS = ["The", "The mitochondria is the powerhouse", "Tensor parallel splits each layer",
           "Proteins fold into shapes", "Scientists call models through a federated",
           "Pipeline stages hand hidden states", "A mixture of experts routes", "Weights in FP8"]


def build(root: Path, hidden: int, inter: int, layers: int, block: int) -> Path:
    """The tiny checkpoint in FP8 (every projection block-scaled e4m3); returns its folder."""
    import torch

    from fabric.testing.fp8 import write_fp8_pair
    from fabric.testing.tiny import build_tiny_llama

    src = build_tiny_llama(root / "src", hidden=hidden, intermediate=inter, layers=layers,
                           heads=4, kv_heads=2)
    proj = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def scheme(name: str) -> tuple[Any, tuple[int, int]] | None:
        return (torch.float8_e4m3fn, (block, block)) if name.split(".")[-2] in proj else None

    write_fp8_pair(src, root / "fp8", root / "ref", scheme, (block, block))
    return root / "fp8"


def all_logits(runner: Any, ids: list[int]) -> Any:
    """Logits at every position of ``ids`` (one prefill)."""
    from fabric.engine.steps import SeqWork, StepPlan

    plan = StepPlan(0, [SeqWork("all", 0, ids, len(ids), score_targets=[*ids[1:], ids[0]])])
    out = runner.logits(runner.head_rows(plan, runner.forward(plan, None)))
    runner.drop("all")
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """How far greedy continuations ``a`` follow ``b``: equal sequences, tokens before the first
    difference (summed), tokens in all."""
    same = sum(x == y for x, y in zip(a, b, strict=True))
    prefix = sum(next((i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), len(x))
                 for x, y in zip(a, b, strict=True))
    return {"equal_sequences": same, "sequences": len(a), "tokens_before_first_difference":
            prefix, "tokens": sum(len(x) for x in a)}


def compare(folder: Path, device: str, dtype: str, batch: int, tokens: int, runs: int
            ) -> dict[str, Any]:
    """The three loadings of ``folder`` side by side (also used by ``gpu_fp8_check.py``)."""
    import torch
    from transformers import AutoTokenizer

    from fabric.engine.fp8 import native_blockwise, weight_bytes
    from fabric.engine.loader import build_stage
    from fabric.engine.runner import StageRunner

    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [tok(p).input_ids for p in (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]]
    runners, out = {}, {}
    for name, (mode, method) in MODES.items():
        model, report = build_stage(folder, 0, 1, 1, dtype, None, device=device, fp8=mode,
                                    fp8_method=method)
        runners[name] = StageRunner(model)
        out[name] = {"weight_bytes": weight_bytes(model), "load_s": round(report.seconds, 3),
                     "fp8": report.fp8}
    texts = {name: runner_greedy(r, prompts, tokens, drop=True)  # warm-up too
             for name, r in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(runs):
        for name, r in runners.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner_greedy(r, prompts, tokens, drop=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
        log(f"run {i + 1}/{runs}", {k: round(v[-1], 3) for k, v in times.items()})
    ref = all_logits(runners["dequantize"], prompts[-1])
    for name in runners:
        got = all_logits(runners[name], prompts[-1])
        out[name].update(
            tokens_per_s=round(batch * tokens / median(times[name]), 2),
            seconds=[round(t, 4) for t in times[name]],
            greedy_vs_dequantize=agreement(texts[name], texts["dequantize"]),
            logits_rel_l2_vs_dequantize=float((got - ref).norm() / ref.norm()),
            logits_max_abs_vs_dequantize=float((got - ref).abs().max()))
    base = out["dequantize"]["weight_bytes"]["total"]
    for name in runners:
        out[name]["weight_bytes_ratio_vs_dequantize"] = ratio(
            out[name]["weight_bytes"]["total"], base)
        out[name]["speed_ratio_vs_dequantize"] = ratio(out[name]["tokens_per_s"],
                                                       out["dequantize"]["tokens_per_s"])
    for name in ("keep", "keep_weight_only"):
        held = out[name]["weight_bytes"]
        # The kept projections' bytes (values + factors) over the same values in bf16.
        out[name]["projection_bytes_ratio_vs_bf16"] = ratio(held["fp8"] + held["scales"],
                                                            2 * held["fp8"])
    block = (128, 128)
    out["native_blockwise_128"] = native_blockwise(torch.device(device), block,
                                                   torch.float8_e4m3fn)
    return out


def kernels(device: str, dtype: str, n: int, k: int, block: int, rows: list[int], reps: int
            ) -> dict[str, Any]:
    """One ``[n, k]`` projection alone: plain ``F.linear`` on the dequantized weight vs the
    kept FP8 weight with the K-sliced scaled matmul and with per-call dequantization (median
    milliseconds per call at each token count)."""
    import torch

    from fabric.engine.checkpoint import Fp8Slice
    from fabric.engine.fp8 import Fp8Linear
    from fabric.testing.fp8 import quantize

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    q, scale = quantize(torch.randn(n, k, generator=gen) * 0.05, torch.float8_e4m3fn,
                        (block, block))
    part = Fp8Slice(q, scale, (block, block), (0, 0)).to(device)
    plain = part.dequantize(dt)
    fns = {"dequantized_linear": lambda x: torch.nn.functional.linear(x, plain),
           "keep_scaled_mm": Fp8Linear(part, bias=False),
           "keep_weight_only": Fp8Linear(part, bias=False, method="dequantize")}
    out: dict[str, Any] = {"shape": [n, k], "block": block}
    for m in rows:
        x = torch.randn(m, k, generator=gen).to(device, dt)
        row: dict[str, float] = {}
        for name, fn in fns.items():
            fn(x)
            samples = []
            for _ in range(reps):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(x)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                samples.append(time.perf_counter() - t0)
            row[name] = round(median(samples) * 1e3, 4)
        out[f"tokens_{m}_ms"] = row
    return out


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.quick:
        args.hidden, args.inter, args.layers, args.tokens, args.runs = 128, 256, 2, 4, 1
    common.set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fabric-fp8-") as tmp:
        folder = build(Path(tmp), args.hidden, args.inter, args.layers, args.block)
        with common.stage("compare"):
            models = compare(folder, "cpu", args.dtype, args.batch, args.tokens, args.runs)
    with common.stage("kernels"):
        kern = kernels("cpu", args.dtype, args.hidden * 4, args.hidden * 4, args.block,
                       [1, 8, 32], 3 if args.quick else 5)
    common.emit({"benchmark": "fp8", "device": "cpu", "dtype": args.dtype,
                 "model": {"hidden": args.hidden, "inter": args.inter, "layers": args.layers,
                           "block": args.block},
                 "batch": args.batch, "tokens": args.tokens, "runs": args.runs,
                 "threads": args.threads, "models": models, "kernels": kern})


if __name__ == "__main__":
    main()
