"""Iteration-level (continuous) batching.

Every step the scheduler builds a micro-batch from the running sequences that are not already
in flight: one decode token for each, then prefill chunks of newly admitted prompts up to the
step's token budget, so a long prompt is spread over several steps instead of stalling
everyone. Sequences leave as soon as they finish (length, stop, EOS, cancel, deadline); their
KV reservation is returned and their caches are dropped on every stage by the next step.
Admission to the running set is FIFO and bounded by the KV token budget: requests wait rather
than fail when it is full. With pp stages, up to pp micro-batches are in flight at once.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fabric.engine.sequence import Sequence
from fabric.engine.steps import SeqOutput, SeqWork, StepPlan
from fabric.errors import (
    Cancelled,
    DeadlineExceeded,
    FabricError,
    NonFiniteOutput,
    ServerInternalError,
)


@dataclass
class Limits:
    """Scheduler bounds (from the site's ``ServerConfig``)."""

    kv_budget_tokens: int
    max_batch_tokens: int
    max_running: int
    chunked_prefill: bool = True
    """False for encoders: a prompt must go through in one step."""
    kv_window: int | None = None
    """Set when every layer of the model slides over this many positions: a sequence then
    holds at most this many KV tokens (a ring, ``fabric.engine.attention``) and is budgeted
    so (``kv_cost``)."""

    def kv_cost(self, reserve: int) -> int:
        """KV-cache tokens a sequence reserving ``reserve`` positions holds at most."""
        return reserve if self.kv_window is None else min(reserve, self.kv_window)


Finish = Callable[[Sequence, str | None, FabricError | None], None]
"""Called once per sequence when it ends: (seq, finish_reason, error)."""
Advance = Callable[[Sequence, SeqOutput], str | None]
"""Called with each step output; returns a finish reason when the sequence is done."""


class Scheduler:
    """Decides what each step computes; owns the waiting and running sets."""

    def __init__(self, limits: Limits, advance: Advance, finish: Finish,
                 lock: threading.Lock | None = None) -> None:
        self.limits = limits
        self.lock = lock or threading.Lock()
        """Held while a sequence moves from waiting to running, so the front door's admission
        check never sees it in neither set."""
        self._advance, self._finish = advance, finish
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        self.kv_used = 0
        self._free: list[str] = []
        self._step = 0

    # --- arrivals and departures -------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (admission control already happened at the front door)."""
        self.waiting.append(seq)

    def cancel(self, request_id: str) -> str:
        """Mark a request cancelled; it leaves at the next step boundary."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                seq.cancelled = True
                return "queued"
        seq_ = self.running.get(request_id)
        if seq_ is not None:
            seq_.cancelled = True
            return "running"
        return "unknown"

    @property
    def active(self) -> int:
        """Sequences waiting or running."""
        return len(self.waiting) + len(self.running)

    # --- building steps ----------------------------------------------------------------------

    def schedule(self, groups: int = 1) -> StepPlan | None:
        """The next micro-batch, or ``None`` when nothing can run now."""
        self._reap(time.monotonic())
        self._admit()
        ready = [s for s in self.running.values() if not s.busy]
        decode = [s for s in ready if not s.in_prefill]
        prefill = [s for s in ready if s.in_prefill]
        cap = max(1, math.ceil(len(self.running) / max(1, groups)))
        budget = self.limits.max_batch_tokens
        work: list[SeqWork] = []
        for seq in decode[:cap]:
            work.append(self._work(seq, [seq.generated[-1]]))
            budget -= 1
        for seq in prefill:
            if budget <= 0:
                break
            remaining = len(seq.prompt_ids) - seq.computed
            n = min(remaining, budget) if self.limits.chunked_prefill else remaining
            if n > budget and work:
                break
            work.append(self._work(seq, seq.prompt_ids[seq.computed:seq.computed + n]))
            budget -= n
        if not work and not self._free:
            return None
        self._step += 1
        plan = StepPlan(self._step, work, free=self._free)
        self._free = []
        for w in work:
            self.running[w.seq_id].busy = True
        return plan

    def _work(self, seq: Sequence, tokens: list[int]) -> SeqWork:
        start = seq.computed
        completes_prompt = start + len(tokens) >= len(seq.prompt_ids)
        targets = None
        if seq.score_targets is not None:
            targets = seq.score_targets[start:start + len(tokens)]
        return SeqWork(
            seq_id=seq.request_id, start=start, token_ids=list(tokens), capacity=seq.reserve,
            sample=seq.sample_spec() if seq.generates and completes_prompt else None,
            score_targets=targets, capture=seq.capture, hooks=seq.hooks,
            score_top=seq.request.sampling.top_logprobs if targets is not None else 0)

    def _admit(self) -> None:
        now = time.monotonic()
        with self.lock:
            while self.waiting and len(self.running) < self.limits.max_running:
                seq = self.waiting[0]
                cost = self.limits.kv_cost(seq.reserve)
                if self.kv_used + cost > self.limits.kv_budget_tokens and self.running:
                    return
                self.waiting.popleft()
                seq.admitted = now
                self.kv_used += cost
                self.running[seq.request_id] = seq

    def _reap(self, now: float) -> None:
        """Drop cancelled and expired sequences that are not in flight. The waiting ones all
        leave the queue (under the lock its readers take) before any is reported: a client
        told that its request (or its batch) ended never finds it still queued."""
        with self.lock:
            gone = [s for s in self.waiting if s.cancelled or _expired(s, now)]
            for seq in gone:
                self.waiting.remove(seq)
        for seq in gone:
            self._end(seq, None, _why(seq))
        for seq in [s for s in self.running.values()
                    if not s.busy and (s.cancelled or _expired(s, now))]:
            self._end(seq, None, _why(seq))

    # --- step results ------------------------------------------------------------------------

    def update(self, plan: StepPlan, outputs: list[SeqOutput]) -> tuple[int, int]:
        """Apply a finished step's outputs; returns how many tokens it generated and how
        many prompt tokens it prefilled."""
        produced = prefilled = 0
        for work, out in zip(plan.seqs, outputs, strict=True):
            seq = self.running.get(work.seq_id)
            if seq is None:
                continue
            seq.busy = False
            prompt = len(seq.prompt_ids)
            prefilled += max(0, min(seq.computed + work.n, prompt) - min(seq.computed, prompt))
            seq.computed += work.n
            if seq.cancelled or _expired(seq, time.monotonic()):
                self._end(seq, None, _why(seq))
                continue
            if out.error is not None:
                self._end(seq, None, NonFiniteOutput(
                    f"request {seq.request_id} failed: {out.error}; check its hooks and "
                    "sampling settings", request_id=seq.request_id))
                continue
            produced += out.token is not None
            try:
                reason = self._advance(seq, out)
            except Exception as exc:  # one sequence's bookkeeping must not stop the loop
                self._end(seq, None, internal_error(seq.request_id, exc))
                continue
            if reason is not None:
                self._end(seq, reason, None)
        return produced, prefilled

    def _end(self, seq: Sequence, reason: str | None, error: FabricError | None) -> None:
        if seq.finished:
            return
        seq.finished = True
        if self.running.pop(seq.request_id, None) is not None:
            self.kv_used -= self.limits.kv_cost(seq.reserve)
            self._free.append(seq.request_id)
        try:
            self._finish(seq, reason, error)
        except Exception as exc:  # e.g. its result could not be built: say so instead
            if error is not None:
                raise
            self._finish(seq, None, internal_error(seq.request_id, exc))

    def fail(self, seq_id: str, error: FabricError) -> None:
        """End one running sequence with ``error`` (its step could not be computed); its KV
        cache is dropped by the next step."""
        seq = self.running.get(seq_id)
        if seq is not None:
            seq.busy = False
            self._end(seq, None, error)

    def drop_all(self, error: FabricError) -> None:
        """End every sequence with ``error`` (shutdown)."""
        for seq in [*self.waiting, *self.running.values()]:
            self._end(seq, None, error)
        self.waiting.clear()


def internal_error(request_id: str, exc: BaseException) -> ServerInternalError:
    """The typed error of a request that failed on an unforeseen exception at the server."""
    return ServerInternalError(
        f"request {request_id} failed at the model server ({type(exc).__name__}: {exc}); "
        "the server goes on serving other requests", request_id=request_id,
        error=type(exc).__name__)


def _expired(seq: Sequence, now: float) -> bool:
    return seq.deadline is not None and now > seq.deadline


def _why(seq: Sequence) -> FabricError:
    if seq.cancelled:
        return Cancelled(f"request {seq.request_id} was cancelled", request_id=seq.request_id)
    return DeadlineExceeded(
        f"request {seq.request_id} passed its {seq.request.timeout} s timeout",
        request_id=seq.request_id, timeout=seq.request.timeout)
