"""A request as the scheduler tracks it: tokens, KV reservation, progress, timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fabric.engine.steps import CaptureSpec, HookSpec, SampleSpec
from fabric.protocol import InferenceRequest


@dataclass
class Sequence:
    """One request inside the model server."""

    request: InferenceRequest
    prompt_ids: list[int]
    reserve: int
    """KV-cache tokens reserved for it (prompt + max new tokens for generation)."""
    seed: int = 0
    score_targets: list[int] | None = None
    """For logprobs requests: the token to score at each prompt position (-1: none)."""
    capture: CaptureSpec | None = None
    hooks: list[HookSpec] = field(default_factory=list)
    stream: bool = False
    computed: int = 0
    """Tokens already in the KV cache."""
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    """Per generated (or, for scoring, scored) token: the most likely tokens there, if asked."""
    scores: list[float] = field(default_factory=list)
    captures: dict[int, Any] = field(default_factory=dict)
    text_sent: str = ""
    busy: bool = False
    """A step holding this sequence is in flight."""
    cancelled: bool = False
    finished: bool = False
    arrived: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    """When its latest token was sampled (the inter-token latency counts from here)."""
    prefill_done: float | None = None

    @property
    def request_id(self) -> str:
        """The request's id."""
        return self.request.request_id

    @property
    def generates(self) -> bool:
        """True for generate/chat requests; False for prefill-only kinds."""
        return self.request.kind == "generate"

    @property
    def in_prefill(self) -> bool:
        """True until every prompt token is in the KV cache."""
        return self.computed < len(self.prompt_ids)

    @property
    def deadline(self) -> float | None:
        """Monotonic time at which the request expires."""
        timeout = self.request.timeout
        return None if timeout is None else self.arrived + timeout

    def sample_spec(self) -> SampleSpec:
        """How to draw this sequence's next token."""
        s = self.request.sampling
        return SampleSpec(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          seed=self.seed, index=len(self.generated), logprobs=s.logprobs,
                          top_logprobs=s.top_logprobs)
