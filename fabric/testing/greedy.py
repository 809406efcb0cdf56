"""Greedy decoding straight on a ``StageRunner``, no server: what the family, MoE and FP8
tests and benchmarks compare with transformers."""

from __future__ import annotations

from typing import Any


def runner_greedy(runner: Any, prompts: list[list[int]], n: int, *,
                  drop: bool = False) -> list[list[int]]:
    """Greedy continuations (``n`` tokens) of all ``prompts``, batched in every step (one
    prefill, then decodes), on a whole-model ``fabric.engine.runner.StageRunner``; ``drop``
    frees the sequences' KV slots afterwards (for a runner used again)."""
    from fabric.engine.steps import SampleSpec, SeqWork, StepPlan

    out: list[list[int]] = [[] for _ in prompts]
    seqs = [SeqWork(f"s{i}", 0, p, len(p) + n, sample=SampleSpec())
            for i, p in enumerate(prompts)]
    for step in range(n):
        plan = StepPlan(step, seqs)
        nxt = runner.logits(runner.head_rows(plan, runner.forward(plan, None))).argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            out[i].append(t)
        seqs = [SeqWork(f"s{i}", len(p) + step, [out[i][-1]], 0, sample=SampleSpec())
                for i, p in enumerate(prompts)]
    if drop:
        for i in range(len(prompts)):
            runner.drop(f"s{i}")
    return out
