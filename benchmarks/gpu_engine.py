"""The fabric's own engine step on one GPU (issues 3 and 4).

``fabric.engine.model.StageModel`` is the step function every model-server rank runs: the
step's tokens packed into one matrix for the projections, attention per sequence against that
sequence's own KV cache, logits to the CPU for per-request sampling. This script runs exactly
that code (``forward_step`` -> ``head_rows`` -> ``logits`` -> ``pipeline.outputs_from``, as a
pp=1 tp=1 server does each step) on a CUDA device:

1. equivalence: a small random Llama in fp32 on the GPU; 4 prompts of different lengths decoded
   together through the engine's steps give the same greedy tokens as transformers
   ``generate`` for each prompt alone;
2. decode throughput: Llama-3-8B shape with random bf16 weights drawn on the GPU (the model of
   ``gpu_decode.py``), 128-token prompts, ``--new`` decode steps at batch 1 and 16 (median of
   ``--repeats``), next to transformers eager ``generate`` on the same weights; tokens/s and the
   fraction of the HBM roofline (steps/s x all weight bytes / measured copy bandwidth, the
   definition in ``gpu_decode.py``).

    python benchmarks/gpu_engine.py [--tiny] [--new 64] [--repeats 3]

Prints one JSON object; with $OUT set, also writes $OUT/gpu_engine.json. ``--tiny`` runs a
2-layer model (also on CPU) to check that the script works.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_decode import build_model, hf_generate_timed, measure_bandwidth, sync  # noqa: E402

from fabric.engine.batch import SampleSpec, SeqWork, StepPlan  # noqa: E402
from fabric.engine.model import StageModel  # noqa: E402
from fabric.engine.partition import plan_ranks  # noqa: E402
from fabric.engine.pipeline import outputs_from  # noqa: E402

T0 = time.monotonic()


def log(msg: str) -> None:
    """Progress on stderr."""
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def engine_from(hf: Any, device: torch.device, dtype: torch.dtype) -> StageModel:
    """A pp=1 tp=1 ``StageModel`` sharing the transformers model's weight tensors."""
    state = hf.state_dict()
    shapes = {name: list(t.shape) for name, t in state.items()}
    shard = plan_ranks(hf.config, shapes, 1, 1)[0]
    model = StageModel(hf.config, shard, None, device)
    model.load({s.name: state[s.name] for s in shard.slices}, dtype)
    return model


class Decoder:
    """Drives the engine's step function the way the serving loop does (greedy)."""

    def __init__(self, model: StageModel) -> None:
        self.model = model
        self.n = 0

    def step(self, work: list[SeqWork]) -> list[int]:
        """One step; returns each sequence's next token."""
        self.n += 1
        plan = StepPlan(self.n, work)
        x = self.model.forward_step(plan, None)
        outs = outputs_from(plan, self.model.logits(self.model.head_rows(plan, x)))
        return [int(o.token) for o in outs if o.token is not None]

    def generate(self, prompts: list[list[int]], new: int) -> tuple[list[list[int]], dict]:
        """Prefill every prompt in one step, then ``new - 1`` decode steps of the whole batch."""
        ids = [f"s{self.n}-{i}" for i in range(len(prompts))]
        sync(self.model.device)
        t0 = time.perf_counter()
        first = self.step([SeqWork(i, 0, p, len(p) + new, sample=SampleSpec())
                           for i, p in zip(ids, prompts, strict=True)])
        t1 = time.perf_counter()
        out = [[t] for t in first]
        for k in range(1, new):
            nxt = self.step([SeqWork(i, len(p) + k - 1, [o[-1]], 0, sample=SampleSpec(index=k))
                             for i, p, o in zip(ids, prompts, out, strict=True)])
            for o, t in zip(out, nxt, strict=True):
                o.append(t)
        t2 = time.perf_counter()
        for i in ids:  # the server drops finished sequences' caches the same way
            self.model.cache.pop(i, None)
        return out, {"total_s": t2 - t0, "prefill_s": t1 - t0, "decode_s": t2 - t1}


def equivalence(device: torch.device) -> dict[str, Any]:
    """Greedy tokens of the engine (4 prompts batched) vs transformers (each alone), fp32."""
    hf = build_model(True, device, torch.float32, rope_type="llama3")
    dec = Decoder(engine_from(hf, device, torch.float32))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 500, (n,), generator=gen).tolist() for n in (5, 17, 33, 64)]
    ours, _ = dec.generate(prompts, 16)
    same = []
    for p, o in zip(prompts, ours, strict=True):
        _, want = hf_generate_timed(hf, torch.tensor([p], device=device), 16, device)
        same.append(want[0].tolist() == o)
    del hf, dec
    return {"prompts": 4, "new_tokens": 16, "dtype": "float32", "identical": same,
            "all_identical": all(same)}


def throughput(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Engine vs transformers eager decode at batch 1 and 16 on the 8B-shaped model."""
    bw = measure_bandwidth(device, 2 << 30 if device.type == "cuda" else 64 << 20)
    log(f"copy bandwidth {bw['copy_GBps']:.0f} GB/s")
    hf = build_model(args.tiny, device, torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    dec = Decoder(engine_from(hf, device, torch.bfloat16))
    gen = torch.Generator().manual_seed(1)
    vocab = hf.config.vocab_size
    out: dict[str, Any] = {"bandwidth": bw, "weight_bytes": weight_bytes, "batches": {}}
    for batch in args.batches:
        prompts = [torch.randint(1, vocab, (128,), generator=gen).tolist()
                   for _ in range(batch)]
        entry: dict[str, Any] = {}
        for name in ("engine", "transformers_eager"):
            runs = []
            for r in range(args.repeats + 1):  # the first is warm-up
                if name == "engine":
                    _, t = dec.generate(prompts, args.new)
                else:
                    t, _ = hf_generate_timed(hf, torch.tensor(prompts, device=device), args.new,
                                             device)
                if r:
                    runs.append(t)
            steps_s = (args.new - 1) / statistics.median(r["decode_s"] for r in runs)
            entry[name] = {
                "decode_steps_per_s": round(steps_s, 2),
                "decode_tok_per_s": round(steps_s * batch, 1),
                "roofline_fraction": round(steps_s * weight_bytes / (bw["copy_GBps"] * 1e9), 4),
                "decode_s_all": [round(r["decode_s"], 4) for r in runs],
                "prefill_s_median": round(statistics.median(r["prefill_s"] for r in runs), 4)}
            log(f"batch {batch} {name}: {entry[name]['decode_tok_per_s']} tok/s, "
                f"{100 * entry[name]['roofline_fraction']:.1f}% of roofline")
        out["batches"][str(batch)] = entry
    return out


def main() -> None:
    """Run both parts and print the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="2-layer model: check the script")
    p.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"benchmark": "gpu_engine", "device": str(device),
                              "torch": torch.__version__}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    with torch.no_grad():
        result["equivalence"] = equivalence(device)
        log(f"equivalence: {result['equivalence']['identical']}")
        result["throughput"] = throughput(args, device)
    text = json.dumps(result, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_engine.json").write_text(text)


if __name__ == "__main__":
    main()
