"""The head rank's serving loop: schedule -> launch through the pipeline -> update.

The front door (``frontend.py``) runs in its own thread and talks to this loop through a
locked inbox (new sequences, cancels) and an outbox callback (events, results). Up to
``pipeline.depth`` micro-batches are in flight, so with pp stages every stage has work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from fabric.engine.result_maps import accumulate, build, keep_returned
from fabric.engine.scheduler import Limits, Scheduler, internal_error
from fabric.engine.sequence import Sequence
from fabric.engine.stats import EngineStats
from fabric.engine.steps import SeqOutput, SeqWork, StepPlan
from fabric.errors import FabricError, ModelServerUnavailable

log = logging.getLogger("fabric.engine")

RATE_WINDOW_S = 5.0
"""Window of the tokens/s figure that health reports."""

Emit = Callable[[str, dict[str, Any]], None]
"""Send one wire message about a request (request_id, message)."""


class StepExecutor(Protocol):
    """What the loop drives to execute its steps: the pipeline of a causal LM
    (``pipeline.Pipeline``, over each rank's ``runner.StageRunner``), or an encoder."""

    inflight: int

    @property
    def depth(self) -> int: ...

    def launch(self, plan: StepPlan) -> None: ...

    def collect(self) -> list[SeqOutput]: ...

    def shutdown(self) -> None: ...


class QueueState(NamedTuple):
    """The load the front door admits against (``Engine.queued``)."""

    waiting: int
    """Requests not yet in the running batch."""
    waiting_tokens: int
    """Their prompt tokens."""
    free: int
    """Places free in the running batch."""
    prefill_tokens: int
    """Prompt tokens not yet prefilled: the waiting ones and the running ones' remainders."""


class Engine:
    """Owns the scheduler and the runner; turns step outputs into stream events."""

    def __init__(self, runner: StepExecutor, tokenizer: Any, limits: Limits,
                 identity: dict[str, Any], eos_ids: set[int], n_layers: int, emit: Emit) -> None:
        self.runner, self.tok, self.identity = runner, tokenizer, identity
        self.eos_ids, self.n_layers, self.emit = eos_ids, n_layers, emit
        self.lock = threading.Lock()
        self.scheduler = Scheduler(limits, self._advance, self._finish, self.lock)
        self.inbox: deque[tuple[str, Any]] = deque()
        self.wake = threading.Event()
        self.stop_requested = False
        self.tokens_total = 0
        self.stats = EngineStats()
        """Latency histograms and token counters since start (the ``stats`` op)."""
        self.last_active = time.monotonic()
        self._launched: deque[StepPlan] = deque()
        self._recent: deque[tuple[float, int, int]] = deque()

    # --- called from the front-door thread ---------------------------------------------------

    def post(self, kind: str, payload: Any) -> None:
        """Queue an ("add", Sequence) or ("cancel", request_id) for the loop."""
        self.post_all(kind, [payload])

    def post_all(self, kind: str, payloads: list[Any]) -> None:
        """Queue several of one kind at once: the loop never takes only part of them."""
        with self.lock:
            self.inbox.extend((kind, p) for p in payloads)
        self.wake.set()

    def queued(self) -> QueueState:
        """What waits (inbox included), the running batch's free places, and the prefill
        backlog, read together."""
        with self.lock:
            seqs = [p for k, p in self.inbox if k == "add"] + list(self.scheduler.waiting)
            running = list(self.scheduler.running.values())
            free = self.scheduler.limits.max_running - len(running)
        tokens = sum(len(s.prompt_ids) for s in seqs)
        started = sum(len(s.prompt_ids) - s.computed for s in running if s.in_prefill)
        return QueueState(len(seqs), tokens, max(0, free), tokens + started)

    # --- the loop ----------------------------------------------------------------------------

    def run(self, idle_timeout_s: float, draining: Callable[[], bool]) -> str:
        """Serve until idle for ``idle_timeout_s``, drained, or stopped; returns why."""
        try:
            while True:
                self._take_inbox()
                busy = self.scheduler.active or self.runner.inflight
                if not busy:
                    if self.stop_requested:
                        return "stopped"
                    if draining():
                        return "drained"
                    if time.monotonic() - self.last_active > idle_timeout_s:
                        return "idle"
                    self.wake.wait(0.2)
                    self.wake.clear()
                    continue
                self.last_active = time.monotonic()
                self._fill()
                if self.runner.inflight:
                    self._collect_one()
                else:
                    self.wake.wait(0.01)
                    self.wake.clear()
        finally:
            self.scheduler.drop_all(ModelServerUnavailable("model server is shutting down"))
            self.runner.shutdown()

    def _take_inbox(self) -> None:
        with self.lock:  # new sequences reach the waiting set before they leave the inbox
            items = list(self.inbox)
            self.inbox.clear()
            for kind, payload in items:
                if kind == "add":
                    self.scheduler.add(payload)
        for kind, payload in items:
            if kind != "add":
                self.scheduler.cancel(payload)

    def _fill(self) -> None:
        while self.runner.inflight < self.runner.depth:
            plan = self.scheduler.schedule(groups=self.runner.depth)
            if plan is None:
                return
            inflight = self.runner.inflight
            try:
                self.runner.launch(plan)
            except Exception as exc:
                self.runner.inflight = inflight  # a launch that raised left nothing in flight
                self._isolate(plan, exc)
                continue
            self._launched.append(plan)

    def _collect_one(self) -> None:
        plan = self._launched.popleft()
        try:
            outputs = self.runner.collect()
        except Exception as exc:
            self._isolate(plan, exc)
            return
        self._apply(plan, outputs)

    # --- a step that raised ------------------------------------------------------------------

    def _isolate(self, plan: StepPlan, exc: Exception) -> None:
        """Contain a step that raised: fail only the sequences that make it fail.

        The step changed no scheduler state (progress moves only in ``update``) and every KV
        write is positional, so any part of the step can simply run again. Once the steps still
        in flight are settled (recovery steps must run alone, to be collected in order), the
        step's sequences are re-run in halves: a half that succeeds is applied as a normal
        step; a half that fails is split again, down to the one sequence that fails alone and
        gets ``ServerInternalError``. A step with one culprit among n sequences costs about
        2 log2(n) extra steps; the others' outputs are exactly what they would have been."""
        log.warning("step %d raised %s: %s; isolating the failing sequence", plan.step_id,
                    type(exc).__name__, exc)
        while self._launched:
            self._collect_one()
        self._bisect(plan, plan.seqs, plan.free, exc)

    def _bisect(self, plan: StepPlan, seqs: list[SeqWork], free: list[str],
                exc: Exception) -> None:
        if len(seqs) <= 1:
            if free:
                self._run_alone(StepPlan(plan.step_id, [], free=free))
            for work in seqs:
                log.error("request %s fails alone: %s: %s", work.seq_id, type(exc).__name__, exc)
                self.scheduler.fail(work.seq_id, internal_error(work.seq_id, exc))
            return
        half = len(seqs) // 2
        for part in (seqs[:half], seqs[half:]):
            sub = StepPlan(plan.step_id, part, free=free)
            free = []
            again = self._run_alone(sub)
            if again is not None:
                self._bisect(plan, part, [], again)

    def _run_alone(self, plan: StepPlan) -> Exception | None:
        """Launch and collect one step with nothing else in flight; apply its outputs.
        Returns the exception instead if it raised."""
        inflight = self.runner.inflight
        try:
            self.runner.launch(plan)
            outputs = self.runner.collect()
        except Exception as exc:
            self.runner.inflight = inflight
            return exc
        self._apply(plan, outputs)
        return None

    def _apply(self, plan: StepPlan, outputs: list[SeqOutput]) -> None:
        produced, prefilled = self.scheduler.update(plan, outputs)
        self.tokens_total += produced
        now = time.monotonic()
        # Tokens over the last RATE_WINDOW_S of wall time, idle gaps included.
        self._recent.append((now, produced, prefilled))
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over the last ``RATE_WINDOW_S``."""
        return self._rate(1)

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens prefilled (or embedded) per second over the last ``RATE_WINDOW_S``:
        the rate at which a prefill backlog drains."""
        return self._rate(2)

    def _rate(self, column: int) -> float:
        now = time.monotonic()
        return sum(r[column] for r in list(self._recent)
                   if now - r[0] <= RATE_WINDOW_S) / RATE_WINDOW_S

    # --- scheduler callbacks -----------------------------------------------------------------

    def _advance(self, seq: Sequence, out: SeqOutput) -> str | None:
        now = time.monotonic()
        accumulate(seq, out.captures)
        if out.scores:
            seq.scores.extend(out.scores)
        if out.score_tops:
            seq.tops.extend(out.score_tops)
        if seq.in_prefill:
            return None
        if seq.prefill_done is None:
            seq.prefill_done = now
        if not seq.generates:
            return "length"
        assert out.token is not None
        seq.generated.append(out.token)
        if out.logprob is not None:
            seq.logprobs.append(out.logprob)
        if out.top is not None:
            seq.tops.append(out.top)
        self.stats.token(seq, now)
        if seq.first_token is None:
            seq.first_token = now
        seq.last_token = now
        # Decoding every step is only needed to stream text or to look for stop strings; the
        # final text is decoded once in _finish.
        text, stopped = ("", False)
        if seq.stream or seq.request.sampling.stop:
            text, stopped = self._text(seq)
        reason = None
        if stopped:
            reason = "stop"
        elif out.token in self.eos_ids:
            reason = "eos"
        elif len(seq.generated) >= seq.request.sampling.max_tokens:
            reason = "length"
        if seq.stream:
            safe = text if reason else self._safe_prefix(seq, text)
            self.emit(seq.request_id, {"op": "event", "index": len(seq.generated) - 1,
                                       "token_ids": [out.token], "text": safe[len(seq.text_sent):],
                                       "logprobs": [out.logprob] if out.logprob is not None
                                       else None,
                                       **({"top_logprobs": [out.top]} if out.top is not None
                                          else {})})
            seq.text_sent = safe
        return reason

    def _text(self, seq: Sequence) -> tuple[str, bool]:
        text = self.tok.decode(seq.generated, skip_special_tokens=True)
        cut = [text.find(s) for s in seq.request.sampling.stop if s and s in text]
        if cut:
            return text[:min(cut)], True
        return text, False

    def _tokens_of(self, seq: Sequence, text: str) -> int:
        """How many generated tokens ``text`` (the output cut at a stop string) is made of:
        the fewest whose decoding covers it. The stop string's own tokens come after."""
        keep = len(seq.generated)
        while keep > 0 and len(self.tok.decode(seq.generated[:keep - 1],
                                               skip_special_tokens=True)) >= len(text):
            keep -= 1
        return keep

    def _safe_prefix(self, seq: Sequence, text: str) -> str:
        """Text that can no longer change: hold back a partial character or stop string."""
        hold = max((len(s) - 1 for s in seq.request.sampling.stop), default=0)
        end = len(text) - hold
        while end > 0 and text[end - 1] == "\ufffd":
            end -= 1
        return text[:max(end, len(seq.text_sent))] if end > 0 else seq.text_sent

    def _finish(self, seq: Sequence, reason: str | None, error: FabricError | None) -> None:
        if error is not None:
            self.stats.finish(seq, type(error).__name__)
            self.emit(seq.request_id, {"op": "error", "error": error.to_dict()})
            return
        text, _ = self._text(seq) if seq.generates else ("", False)
        result = build(seq, reason or "length", self.identity, text, self.n_layers)
        if reason == "stop":
            keep_returned(result, self._tokens_of(seq, text))
        if seq.request.kind == "logprobs":  # the client may not have the tokenizer
            result["tokens"] = [self.tok.decode([t]) for t in result["token_ids"]]
        if seq.stream and seq.generates and text[len(seq.text_sent):]:
            self.emit(seq.request_id, {"op": "event", "index": len(seq.generated),
                                       "token_ids": [], "text": text[len(seq.text_sent):],
                                       "logprobs": None})
        # Counted once the result exists: if building it fails, the scheduler ends the
        # sequence again with an error, and that is what is counted.
        self.stats.finish(seq, reason or "length")
        self.emit(seq.request_id, {"op": "done", "result": result})
