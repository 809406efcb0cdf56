"""What flows through the pipeline each step: the plan (which sequences, which tokens) and the
per-sequence outputs. Plain dataclasses, pickled between ranks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SampleSpec:
    """How the last stage picks this sequence's next token (stateless: seeded per index)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    index: int = 0
    """How many tokens the sequence has generated so far (seeds this draw)."""
    logprobs: bool = False
    top_logprobs: int = 0
    """With ``logprobs``: also the k most likely tokens."""


@dataclass
class CaptureSpec:
    """Hidden states to return: ``layers`` index ``hidden_states`` as transformers counts
    them (0 = embeddings, L = final normed output); ``mode`` all | mean | last | first."""

    layers: list[int]
    mode: str = "all"


@dataclass
class HookSpec:
    """A validated per-request intervention at global decoder layer ``layer`` (0-based)."""

    kind: str
    layer: int
    vector: torch.Tensor | None = None
    scale: float = 1.0
    heads: list[int] = field(default_factory=list)
    neurons: list[int] = field(default_factory=list)


@dataclass
class SeqWork:
    """One sequence's share of a step."""

    seq_id: str
    start: int
    """Tokens already in this sequence's KV cache (position of the first new token)."""
    token_ids: list[int]
    """The new tokens this step (a prefill chunk, or the last sampled token)."""
    capacity: int
    """KV tokens to reserve when the sequence is first seen."""
    sample: SampleSpec | None = None
    """Set when this step should produce the next token."""
    score_targets: list[int] | None = None
    """Token ids whose log-probs to return, one per new token (logprobs requests)."""
    score_top: int = 0
    """With ``score_targets``: also each scored row's k most likely tokens."""
    capture: CaptureSpec | None = None
    hooks: list[HookSpec] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Tokens in this step."""
        return len(self.token_ids)


@dataclass
class StepPlan:
    """One micro-batch step."""

    step_id: int
    seqs: list[SeqWork]
    free: list[str] = field(default_factory=list)
    """Sequences whose KV cache every stage should drop."""
    captures: dict[str, dict[int, Any]] = field(default_factory=dict)
    """Filled on the way through the stages: seq_id -> layer -> captured tensor."""


@dataclass
class SeqOutput:
    """One sequence's result of a step, produced at the last stage."""

    seq_id: str
    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    """The most likely tokens at this position, if asked (``top_logprobs``)."""
    scores: list[float] | None = None
    score_tops: list[list[tuple[int, float]]] | None = None
    """Per scored position, the most likely tokens there, if asked."""
    captures: dict[int, Any] = field(default_factory=dict)
    error: str | None = None
    """Set when this sequence's outputs could not be computed (e.g. its logits are not finite):
    the sequence fails with ``NonFiniteOutput``, the rest of the step stands."""
