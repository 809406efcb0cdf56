"""Per-request token choice: greedy, temperature, top-k, top-p, seeded.

Sampling is stateless: the draw for a request's i-th token uses a generator seeded from
(seed, i), so the same seed gives the same output whatever else shares the batch and on
whichever rank samples.
"""

from __future__ import annotations

from typing import Any

import torch

from fabric.engine.steps import SampleSpec, SeqOutput, StepPlan

_MIX = 0x9E3779B97F4A7C15


def pick(logits: torch.Tensor, spec: SampleSpec
         ) -> tuple[int, float | None, list[tuple[int, float]] | None]:
    """The next token for one row of logits ``[vocab]`` and, if asked, its log-probability and
    the ``top_logprobs`` most likely tokens (the model's distribution, before temperature and
    filters, as the log-probability is)."""
    logits = logits.float()
    if spec.temperature == 0.0:
        token = int(torch.argmax(logits))
    else:
        probs = _filtered_probs(logits / spec.temperature, spec.top_k, spec.top_p)
        gen = torch.Generator().manual_seed((spec.seed * _MIX + spec.index) % (2**63))
        token = int(torch.multinomial(probs, 1, generator=gen))
    if not spec.logprobs:
        return token, None, None
    logp = torch.log_softmax(logits, -1)
    return token, float(logp[token]), top_of(logp, spec.top_logprobs)


def top_of(logp: torch.Tensor, k: int) -> list[tuple[int, float]] | None:
    """The ``k`` most likely ``(token, log-probability)`` of one row, most likely first."""
    if not k:
        return None
    values, ids = torch.topk(logp, min(k, logp.numel()))
    return list(zip(ids.tolist(), values.tolist(), strict=True))


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


def score(logits: torch.Tensor, targets: list[int], top: int = 0
          ) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
    """Log-probabilities of ``targets[j]`` under row j of ``logits`` ``[n, vocab]`` and, with
    ``top``, each row's most likely tokens."""
    logp = torch.log_softmax(logits.float(), -1)
    idx = torch.tensor(targets, dtype=torch.long)
    scores = [float(v) for v in logp[torch.arange(len(targets)), idx]]
    if not top:
        return scores, None
    return scores, [top_of(row, top) or [] for row in logp]


def outputs_from(plan: StepPlan, logits: torch.Tensor) -> list[SeqOutput]:
    """Per-sequence outputs of a step from its head rows' logits: token, scores, captures.

    A sequence whose rows are not finite (NaN or infinity, e.g. from an extreme steer hook)
    gets ``error`` set instead of a token: sampling never raises for one row, so one request
    cannot take down the step (or, with pp > 1, the last stage's rank)."""
    outputs, row = [], 0
    finite = torch.isfinite(logits).all(-1).tolist() if logits.numel() else []
    for s in plan.seqs:
        out = SeqOutput(s.seq_id, captures=plan.captures.get(s.seq_id, {}))
        n = (len([t for t in s.score_targets if t >= 0]) if s.score_targets is not None
             else 0) + (s.sample is not None)
        if not all(finite[row:row + n]):
            out.error = "the model's logits for this request are not finite (NaN or infinity)"
        else:
            _fill(out, s.score_targets, s.sample, logits[row:row + n], s.score_top)
        if out.error is None and not _captures_finite(out.captures):
            out.error = "the captured hidden states of this request are not finite"
        row += n
        outputs.append(out)
    return outputs


def _fill(out: SeqOutput, score_targets: list[int] | None, sample: SampleSpec | None,
          rows: torch.Tensor, score_top: int = 0) -> None:
    """Scores and the sampled token of one sequence from its (finite) logit rows."""
    targets = [t for t in score_targets or [] if t >= 0]
    if score_targets is not None:
        out.scores, out.score_tops = score(rows[:len(targets)], targets, score_top) \
            if targets else ([], None)
    if sample is not None:
        try:
            out.token, out.logprob, out.top = pick(rows[len(targets)], sample)
        except RuntimeError as exc:  # e.g. probabilities that do not sum to a positive number
            out.error = f"sampling failed for this request: {exc}"


def _captures_finite(captures: dict[int, Any]) -> bool:
    """True when every captured tensor (or (sum, count) pair) is finite."""
    for value in captures.values():
        parts = value if isinstance(value, tuple | list) else [value]
        for part in parts:
            if isinstance(part, torch.Tensor) and not bool(torch.isfinite(part).all()):
                return False
    return True
