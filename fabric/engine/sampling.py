"""Per-request token choice: greedy, temperature, top-k, top-p, seeded.

Sampling is stateless: the draw for a request's i-th token uses a generator seeded from
(seed, i), so the same seed gives the same output whatever else shares the batch and on
whichever rank samples.
"""

from __future__ import annotations

import torch

from fabric.engine.batch import SampleSpec, SeqOutput, StepPlan

_MIX = 0x9E3779B97F4A7C15


def pick(logits: torch.Tensor, spec: SampleSpec) -> tuple[int, float | None]:
    """The next token for one row of logits ``[vocab]`` and, if asked, its log-probability."""
    logits = logits.float()
    if spec.temperature == 0.0:
        token = int(torch.argmax(logits))
    else:
        probs = _filtered_probs(logits / spec.temperature, spec.top_k, spec.top_p)
        gen = torch.Generator().manual_seed((spec.seed * _MIX + spec.index) % (2**63))
        token = int(torch.multinomial(probs, 1, generator=gen))
    logprob = float(torch.log_softmax(logits, -1)[token]) if spec.logprobs else None
    return token, logprob


def _filtered_probs(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = torch.cumsum(sorted_p, 0) - sorted_p >= top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        probs = probs / probs.sum()
    return probs


def score(logits: torch.Tensor, targets: list[int]) -> list[float]:
    """Log-probabilities of ``targets[j]`` under row j of ``logits`` ``[n, vocab]``."""
    logp = torch.log_softmax(logits.float(), -1)
    idx = torch.tensor(targets, dtype=torch.long)
    return [float(v) for v in logp[torch.arange(len(targets)), idx]]


def outputs_from(plan: StepPlan, logits: torch.Tensor) -> list[SeqOutput]:
    """Per-sequence outputs of a step from its head rows' logits: token, scores, captures."""
    outputs, row = [], 0
    for s in plan.seqs:
        out = SeqOutput(s.seq_id, captures=plan.captures.get(s.seq_id, {}))
        if s.score_targets is not None:
            targets = [t for t in s.score_targets if t >= 0]
            out.scores = score(logits[row:row + len(targets)], targets) if targets else []
            row += len(targets)
        if s.sample is not None:
            out.token, out.logprob = pick(logits[row], s.sample)
            row += 1
        outputs.append(out)
    return outputs
