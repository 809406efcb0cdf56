"""Batched embed requests at the front door: many texts in, one message out.

A batch (``InferenceRequest.prompts``) enters the engine as one sequence per text (member
``f"{id}#{i}"``), so the scheduler and the encoder's length-sorted sub-batches treat its texts
like separate requests. The front door folds the members' results back into one: per asked
layer an ``(n, dim)`` float32 array (wire form ``{"dtype", "shape", "data"}``), the summed token
usage and the slowest member's timings. The first member that fails fails the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fabric.wire.arrays import encode_array

TIMING_KEYS = ("queue_s", "prefill_s", "decode_s", "total_s")


@dataclass
class Batch:
    """The members of one batched request still being computed, and what they gave."""

    request_id: str
    size: int
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    """Per layer (as the caller named it), one row per member."""
    first: str = ""
    """The layer whose vectors are the result's ``embeddings`` (the first asked)."""
    pending: set[int] = field(default_factory=set)
    prompt_tokens: int = 0
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMING_KEYS, 0.0))
    model: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    """The members' provenance (one server, one request: the same for all)."""

    def __post_init__(self) -> None:
        self.pending = set(range(self.size))

    def add(self, index: int, result: dict[str, Any]) -> None:
        """Fold member ``index``'s result in."""
        if index not in self.pending:
            return
        self.pending.discard(index)
        layers = result.get("layers") or {}
        if not self.first:
            self.first = next(iter(layers), "")
        for key, vec in layers.items():
            rows = self.layers.get(key)
            if rows is None:
                rows = self.layers[key] = np.empty((self.size, len(vec)), dtype=np.float32)
            rows[index] = vec
        self.prompt_tokens += int((result.get("usage") or {}).get("prompt_tokens", 0))
        for k in TIMING_KEYS:
            self.timings[k] = max(self.timings[k], float((result.get("timings") or {}).get(k, 0)))
        self.model = self.model or result.get("model")
        self.provenance = self.provenance or result.get("provenance")

    @property
    def done(self) -> bool:
        """Every member has its result."""
        return not self.pending

    def result(self) -> dict[str, Any]:
        """The batch's one result map."""
        layers = {k: encode_array(v) for k, v in self.layers.items()}
        return {"request_id": self.request_id, "model": self.model, "count": self.size,
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": 0},
                "timings": dict(self.timings),
                "embeddings": layers.get(self.first), "layers": layers,
                **({"provenance": self.provenance} if self.provenance else {})}


def split_member(request_id: str) -> tuple[str, int] | None:
    """``(batch id, index)`` for a member id made by ``prepare.member_id``, else ``None``."""
    batch_id, sep, index = request_id.rpartition("#")
    return (batch_id, int(index)) if sep and index.isdigit() else None
