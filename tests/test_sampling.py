"""What temperature, top-k and top-p do to a draw, against transformers' own logits warpers.

The engine's tests compare its sampled paths with themselves (batched vs alone, graphs vs
eager, one seed twice); here the distribution a request samples from is checked against an
independent reference: ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and
``TopPLogitsWarper`` applied in the order ``generate`` applies them.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fabric.engine.sampling import _filtered_probs, pick
from fabric.engine.steps import SampleSpec

VOCAB = 50


def reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float
              ) -> torch.Tensor:
    """transformers' sampling distribution for one row of logits."""
    scores = logits[None].clone()
    ids = torch.zeros((1, 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.softmax(scores[0], -1)


CASES = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.9), (1.0, 0, 0.3),
         (0.8, 10, 0.8), (1.3, 3, 0.95), (1.0, 1, 1.0), (1.0, 0, 0.01), (0.5, 49, 0.5)]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), CASES)
def test_the_distribution_is_transformers(temperature: float, top_k: int, top_p: float) -> None:
    gen = torch.Generator().manual_seed(hash((temperature, top_k, top_p)) % 2**31)
    for _ in range(20):
        logits = torch.randn(VOCAB, generator=gen) * 3
        ours = _filtered_probs(logits / temperature, top_k, top_p)
        theirs = reference(logits, temperature, top_k, top_p)
        assert torch.equal(ours > 0, theirs > 0), "a different set of tokens is kept"
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
        assert abs(float(ours.sum()) - 1.0) < 1e-5


def test_draws_stay_in_the_kept_set_and_follow_its_distribution() -> None:
    """2000 seeded draws (index 0..1999) from one row: every token is in transformers' kept
    set, and each kept token's share is near its probability (binomial, 5 sigma)."""
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(7)) * 2
    spec = dict(temperature=0.9, top_k=12, top_p=0.85, seed=1234)
    probs = reference(logits, 0.9, 12, 0.85)
    kept = set(torch.nonzero(probs).flatten().tolist())
    assert 1 < len(kept) < 12  # top-p cut inside the top-k set: both filters matter here
    draws = 2000
    counts = torch.zeros(VOCAB)
    for i in range(draws):
        token, _, _ = pick(logits, SampleSpec(index=i, **spec))  # type: ignore[arg-type]
        assert token in kept
        counts[token] += 1
    for token in kept:
        p = float(probs[token])
        sigma = (draws * p * (1 - p)) ** 0.5
        assert abs(float(counts[token]) - draws * p) < 5 * sigma + 1, (token, p, counts[token])


def test_a_seed_and_index_fix_the_draw_and_greedy_ignores_the_filters() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    spec = SampleSpec(temperature=1.0, top_k=20, top_p=0.9, seed=5, index=3)
    assert len({pick(logits, spec)[0] for _ in range(5)}) == 1
    others = {pick(logits, SampleSpec(temperature=1.0, seed=5, index=i))[0] for i in range(40)}
    assert len(others) > 1  # the index moves the draw
    greedy = SampleSpec(temperature=0.0, top_k=1, top_p=0.01, seed=9)
    assert pick(logits, greedy)[0] == int(torch.argmax(logits))
    token, logprob, _ = pick(logits, SampleSpec(temperature=0.0, logprobs=True))
    assert logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]), abs=1e-6)
