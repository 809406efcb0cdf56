"""The model server's request statistics, for the site's ``/metrics`` (the ``stats`` op).

Cumulative since the server started, like a Prometheus client's counters: time to first token,
inter-token latency and end-to-end latency histograms (vLLM's buckets), prompt and generation
token counters, and requests by how they ended. The engine thread records; the front-door
thread reads a snapshot; one lock between them (a few dict updates per token).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fabric.engine.sequence import Sequence
from fabric.metrics import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, Histogram


class EngineStats:
    """What the engine has served so far."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        """Requests ended, by finish reason (``stop``, ``eos``, ``length``) or error class
        (those refused as they arrived included)."""

    def token(self, seq: Sequence, now: float) -> None:
        """A generated token of ``seq`` (call before updating ``seq.last_token``)."""
        with self._lock:
            if seq.first_token is None:
                self.ttft.observe(now - seq.arrived)
            elif seq.last_token is not None:
                self.itl.observe(now - seq.last_token)

    def finish(self, seq: Sequence, outcome: str, now: float | None = None) -> None:
        """``seq`` ended (``outcome``: finish reason or error class): its latency and the
        tokens it consumed (prompt tokens prefilled, tokens generated, cancelled ones too)."""
        end = time.monotonic() if now is None else now
        with self._lock:
            self.e2e.observe(end - seq.arrived)
            self.prompt_tokens += min(seq.computed, len(seq.prompt_ids))
            self.generation_tokens += len(seq.generated)
            self.finished[outcome] = self.finished.get(outcome, 0) + 1

    def refused(self, error: str) -> None:
        """A request refused as it arrived (``error``: its error class, ``ContextLengthExceeded``,
        ``InvalidHook``...): it ends there, with no latency and no tokens."""
        with self._lock:
            self.finished[error] = self.finished.get(error, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """Wire form of everything counted so far."""
        with self._lock:
            return {"time_to_first_token_seconds": self.ttft.to_dict(),
                    "inter_token_latency_seconds": self.itl.to_dict(),
                    "e2e_request_latency_seconds": self.e2e.to_dict(),
                    "prompt_tokens": self.prompt_tokens,
                    "generation_tokens": self.generation_tokens,
                    "finished": dict(self.finished)}
