"""How much does batching change bf16 outputs? Greedy tokens of N chat prompts run in one batch
vs each alone, through the fabric's own stage model (pp=1, tp=1), in fp32 and in bf16.

Prints JSON: per dtype, how many of the N outputs differ and at which token they first diverge.
Usage: python benchmarks/bf16_batching.py [--n 16] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fabric.catalog import Catalog
from fabric.engine.loader import build_stage
from fabric.engine.runner import StageRunner
from fabric.engine.sampling import pick
from fabric.engine.steps import SampleSpec, SeqWork, StepPlan
from fabric.weights import prepare

TOPICS = ["photosynthesis", "black holes", "protein folding", "plate tectonics", "vaccines",
          "superconductors", "the water cycle", "DNA replication", "neutron stars", "enzymes",
          "climate models", "quantum tunnelling", "coral reefs", "batteries", "volcanoes",
          "antibiotics"]


def generate(stage: StageRunner, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy tokens for ``prompts`` decoded together in one continuous batch."""
    seqs = {f"s{i}": p for i, p in enumerate(prompts)}
    out: dict[str, list[int]] = {k: [] for k in seqs}
    plan = StepPlan(0, [SeqWork(k, 0, v, len(v) + n, sample=SampleSpec())
                        for k, v in seqs.items()])
    for step in range(n):
        x = stage.forward(plan, None)
        logits = stage.logits(stage.head_rows(plan, x))
        nxt = []
        for row, s in zip(logits, plan.seqs, strict=True):
            token, _ = pick(row, SampleSpec())
            out[s.seq_id].append(token)
            nxt.append(SeqWork(s.seq_id, s.start + s.n, [token], 0, sample=SampleSpec()))
        plan = StepPlan(step + 1, nxt, free=[])
    for seq_id in seqs:
        stage.drop(seq_id)
    return [out[f"s{i}"] for i in range(len(prompts))]


def main() -> None:
    """Run both dtypes and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    folder = Path(prepare(Catalog().get("smollm2-135m")).path)
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Explain {t} briefly."}],
                                       add_generation_prompt=True, tokenize=True)
               for t in TOPICS[:args.n]]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    report: dict[str, object] = {"model": "smollm2-135m", "n": args.n, "tokens": args.tokens,
                                 "threads": torch.get_num_threads()}
    for dtype in ("float32", "bfloat16"):
        stage = StageRunner(build_stage(folder, 0, 1, 1, dtype, None)[0])
        t0 = time.perf_counter()
        batched = generate(stage, prompts, args.tokens)
        alone = [generate(stage, [p], args.tokens)[0] for p in prompts]
        first = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
                 for x, y in zip(batched, alone, strict=True)]
        report[dtype] = {"outputs_differing": sum(f is not None for f in first),
                         "first_divergence": first, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
