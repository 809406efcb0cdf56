"""Moving steps through the stages: the head's ``Pipeline`` and every other rank's loop.

The head runs stage 0 of a step and sends the step on (``isend``: it does not wait), so while
stage 1 works on micro-batch A the head already computes micro-batch B. The last stage applies
the final norm and picks the rows that need logits. If the LM head is on the last stage, its tp
ranks compute the logits, its leader samples and sends the outputs to the head; if the head is
tied to the embedding (on stage 0), the last stage sends those rows back and the head's stage
computes logits and samples when it collects the step. Steps are collected in launch order.
Within a stage, the leader broadcasts each step to its tensor-parallel peers. The step plan
travels pickled in a uint8 tensor ahead of the hidden states, always over gloo; the hidden
states follow the ``HandOff``: float32 CPU tensors over gloo for CPU plans, and for CUDA plans
(nccl) tensors on the rank's GPU in the model's dtype over the nccl group, so a stage boundary
costs no device copy and no upcast (unproven on a GPU so far: no test machine had one).

Every rank drives its stage through a ``fabric.engine.runner.StageRunner``, which owns the
rank's KV caches and (pp=1) the decode fast path; this module only moves steps and rows.
"""

from __future__ import annotations

import logging
import pickle
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from fabric import env
from fabric.engine.dist import Groups, RankInfo
from fabric.engine.loader import DTYPES
from fabric.engine.runner import StageRunner
from fabric.engine.sampling import outputs_from
from fabric.engine.steps import SeqOutput, StepPlan

log = logging.getLogger("fabric.engine")

STEP, STOP, HEAD, FAIL = 1, 2, 3, 4
"""Message kinds: a step for the next stage (or outputs for the head), stop, rows for the LM
head on stage 0, and a step a later stage failed on (what it raised, passed on to the head in
place of the step's outputs)."""


class StageFailed(RuntimeError):
    """A stage after the head's raised on a step. The head's ``collect`` raises it in place
    of the step's outputs, so the serving loop contains it as it does its own stage's
    failures: the step's sequences are re-run in halves down to the one that fails
    (``Engine._isolate``), which alone gets ``ServerInternalError``. The rank lives on."""


@dataclass(frozen=True)
class HandOff:
    """How hidden states cross ranks: device, dtype and whether they go over the default
    (device, nccl) group instead of the gloo wire."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    on_device: bool = False


def hand_off(plan_device: str, plan_dtype: str, backend: str,
             device: str | torch.device = "cpu") -> HandOff:
    """The hand-off a plan gets: on ``device`` in the plan's dtype over the default group when
    the plan is CUDA and the backend nccl; otherwise float32 on the CPU over gloo (gloo moves
    CPU tensors, and float32 keeps CPU plans' answers identical to a single rank's)."""
    if plan_device == "cuda" and backend == "nccl":
        return HandOff(torch.device(device), DTYPES[plan_dtype], True)
    return HandOff()


class _Wire:
    """Point-to-point and broadcast of (kind, payload object, hidden tensor)."""

    def __init__(self, info: RankInfo, groups: Groups, hidden_size: int,
                 handoff: HandOff | None = None) -> None:
        self.info, self.groups, self.hidden = info, groups, hidden_size
        self.handoff = handoff or HandOff()
        self._inflight: list[tuple[Any, list[torch.Tensor]]] = []

    def _tensor_group(self, group: Any) -> Any:
        # on-device tensors take the default (nccl) group; the rest the group given
        return None if self.handoff.on_device else group

    def _out(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.handoff.device, self.handoff.dtype).contiguous()

    def _empty(self, rows: int) -> torch.Tensor:
        return torch.empty(rows, self.hidden, device=self.handoff.device, dtype=self.handoff.dtype)

    def isend(self, dst: int, kind: int, obj: Any, tensor: torch.Tensor | None) -> None:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        rows = 0 if tensor is None else tensor.shape[0]
        header = torch.tensor([kind, payload.numel(), rows], dtype=torch.int64)
        # The receiver expects a hidden tensor only when rows > 0 (free-only steps have none).
        parts = [header, payload]
        works = [dist.isend(p, dst, group=self.groups.wire) for p in parts]
        if tensor is not None and rows:
            parts.append(self._out(tensor))
            works.append(dist.isend(parts[-1], dst, group=self._tensor_group(self.groups.wire)))
        self._inflight.append((works, parts))
        self._prune()

    def recv(self, src: int) -> tuple[int, Any, torch.Tensor | None]:
        header = torch.empty(3, dtype=torch.int64)
        dist.recv(header, src, group=self.groups.wire)
        kind, size, rows = (int(v) for v in header)
        payload = torch.empty(size, dtype=torch.uint8)
        dist.recv(payload, src, group=self.groups.wire)
        tensor = None
        if rows:
            tensor = self._empty(rows)
            dist.recv(tensor, src, group=self._tensor_group(self.groups.wire))
        return kind, pickle.loads(payload.numpy().tobytes()), tensor

    def bcast(self, kind: int, obj: Any, tensor: torch.Tensor | None
              ) -> tuple[int, Any, torch.Tensor | None]:
        """Leader sends, peers receive, within this stage's tp group."""
        group = self.groups.tp_wire or self.groups.tp_group
        src = self.info.leader_of(self.info.stage)
        leader = self.info.is_stage_leader
        header = torch.zeros(3, dtype=torch.int64)
        if leader:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            header = torch.tensor([kind, payload.numel(),
                                   0 if tensor is None else tensor.shape[0]])
        dist.broadcast(header, src, group=group)
        kind, size, rows = (int(v) for v in header)
        if not leader:
            payload = torch.empty(size, dtype=torch.uint8)
        dist.broadcast(payload, src, group=group)
        if rows:
            tensor = self._empty(rows) if not leader or tensor is None else self._out(tensor)
            on = self.groups.tp_group if self.handoff.on_device else group
            dist.broadcast(tensor, src, group=on)
        return kind, obj if leader else pickle.loads(payload.numpy().tobytes()), tensor

    def _prune(self) -> None:
        self._inflight = [(w, p) for w, p in self._inflight
                          if not all(x.is_completed() for x in w)]

    def flush(self) -> None:
        for works, _ in self._inflight:
            for w in works:
                w.wait()
        self._inflight.clear()


class Pipeline:
    """The head's view of the model: launch steps, collect their outputs in order."""

    def __init__(self, info: RankInfo, groups: Groups, stage: StageRunner,
                 micro_batches: int = 0, handoff: HandOff | None = None) -> None:
        self.info, self.stage = info, stage
        self._depth = micro_batches or info.pp
        self.wire = _Wire(info, groups, stage.hidden_size, handoff)
        self._local: deque[list[SeqOutput]] = deque()
        self.inflight = 0

    @property
    def depth(self) -> int:
        """Steps kept in flight: one per stage keeps every stage busy."""
        return self._depth

    def launch(self, plan: StepPlan) -> None:
        """Run stage 0 of ``plan`` and pass it on (returns without waiting for later stages)."""
        if self.info.tp > 1:
            self.wire.bcast(STEP, plan, None)
        if self.info.pp == 1:
            self._local.append(self.stage.run_local(plan))
        else:
            x = self.stage.forward(plan, None)
            self.wire.isend(self.info.leader_of(1), STEP, plan, x)
        self.inflight += 1

    def collect(self) -> list[SeqOutput]:
        """Outputs of the oldest launched step (blocks until the last stage sends them)."""
        self.inflight -= 1
        if self.info.pp == 1:
            return self._local.popleft()
        kind, obj, rows = self.wire.recv(self.info.leader_of(self.info.pp - 1))
        if kind == FAIL:
            raise StageFailed(str(obj))
        if kind != HEAD:
            return list(obj)
        if self.info.tp > 1:
            self.wire.bcast(HEAD, obj, rows)
        return outputs_from(obj, self.stage.logits(rows))

    def shutdown(self) -> None:
        """Tell every other rank to exit."""
        if self.info.tp > 1:
            self.wire.bcast(STOP, None, None)
        if self.info.pp > 1:
            self.wire.isend(self.info.leader_of(1), STOP, None, None)
        self.wire.flush()


def worker_loop(info: RankInfo, groups: Groups, stage: StageRunner,
                handoff: HandOff | None = None) -> None:
    """Every rank but the head: receive steps, compute this stage, pass them on, until STOP.

    A step this stage raises on does not end the rank: the stage leader sends ``FAIL`` (what
    was raised) on towards the head in the step's place, the stages after it pass that on
    without computing, and the head's serving loop isolates the failing sequence. (A failure
    on only some tp ranks of a stage, inside a collective, is not contained: the stage's
    other ranks wait in that collective.)"""
    wire = _Wire(info, groups, stage.hidden_size, handoff)
    prev = info.leader_of(info.stage - 1) if info.stage > 0 else None
    fault = _test_fault(info)
    while True:
        kind, plan, hidden = (None, None, None)
        if info.is_stage_leader:
            assert prev is not None
            kind, plan, hidden = wire.recv(prev)
            if info.tp > 1:
                wire.bcast(kind, plan, hidden)
        else:
            kind, plan, hidden = wire.bcast(0, None, None)
        if kind == STOP:
            if info.is_stage_leader and not info.is_last_stage:
                wire.isend(info.leader_of(info.stage + 1), STOP, None, None)
            wire.flush()
            return
        if kind == HEAD:  # stage 0's tp peers: their vocabulary slice of the tied LM head
            stage.logits(hidden)
            continue
        if kind == FAIL:  # an earlier stage failed this step: pass the failure on
            if info.is_stage_leader:
                wire.isend(_downstream(info), FAIL, plan, None)
            continue
        try:
            if fault is not None and any(fault in w.seq_id for w in plan.seqs):
                raise RuntimeError(f"injected fault at stage {info.stage} "
                                   f"({env.FABRIC_TEST_STAGE_FAULT.name})")
            x = stage.forward(plan, hidden)
            if not info.is_last_stage:
                if info.is_stage_leader:
                    wire.isend(info.leader_of(info.stage + 1), STEP, plan, x)
                continue
            _finish_last_stage(info, wire, stage, plan, x)
        except Exception as exc:
            log.warning("stage %d (rank %d) raised on step %d: %s: %s; the head isolates it",
                        info.stage, info.rank, plan.step_id, type(exc).__name__, exc)
            if info.is_stage_leader:
                wire.isend(_downstream(info), FAIL,
                           f"stage {info.stage}: {type(exc).__name__}: {exc}", None)


def _downstream(info: RankInfo) -> int:
    """Where this stage's leader sends a step's result: the next stage, or the head."""
    return 0 if info.is_last_stage else info.leader_of(info.stage + 1)


def _test_fault(info: RankInfo) -> str | None:
    """The request-id marker this stage fails on (``FABRIC_TEST_STAGE_FAULT``, tests only)."""
    setting = env.FABRIC_TEST_STAGE_FAULT.get()
    if not setting or ":" not in setting:
        return None
    where, marker = setting.split(":", 1)
    return marker if where.isdigit() and int(where) == info.stage and marker else None


def _finish_last_stage(info: RankInfo, wire: _Wire, stage: StageRunner, plan: StepPlan,
                       x: torch.Tensor) -> None:
    rows = stage.head_rows(plan, x)
    if stage.holds_head:  # every tp rank takes part in the logits' all-gather
        logits = stage.logits(rows)
        if info.is_stage_leader:
            wire.isend(0, STEP, outputs_from(plan, logits), None)
    elif info.is_stage_leader:
        wire.isend(0, HEAD, plan, rows)
