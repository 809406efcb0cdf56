"""One rank's step runner: the model computes, the runner owns the caches and the fast path.

A ``StageRunner`` wraps a rank's ``StageModel`` and is what the pipeline code drives
(``fabric.engine.pipeline``): it owns

* the KV storage (``fabric.engine.kv.KVStore``): a sequence's cache is allocated the first time
  a step names it, in a slot of the slot cache when the fast path is on and it fits, and dropped
  when a step lists it in ``StepPlan.free``;
* the decode fast path (``fabric.engine.graphs.DecodeGraphs``), built only for a whole model on
  one rank (pp=1, tp=1) when the server asks for it (``GraphOptions``);

and decides per step which way a step goes: the fast path when every sequence is a plain decode
that lives in a slot (``takes_fast_path``), else the eager ``StageModel.forward_step`` over the
caches it hands the model. Both read and write the same slot memory, so a sequence moves
between them freely and the tokens are the same either way.

Invariants: every step first drops ``plan.free`` (whichever path runs it, on every rank that
receives it), so the KV storage holds exactly the sequences the scheduler still runs; the
model is handed one cache per sequence of the step, in ``plan.seqs`` order.
"""

from __future__ import annotations

import torch

from fabric.engine.graphs import DecodeGraphs, GraphOptions, plain_decode
from fabric.engine.kv import KVStore, SlotCache
from fabric.engine.model import StageModel
from fabric.engine.sampling import outputs_from
from fabric.engine.steps import SeqOutput, StepPlan


class StageRunner:
    """Runs steps of one rank's stage over the KV storage it owns (see the module)."""

    def __init__(self, model: StageModel, fast_path: GraphOptions | None = None) -> None:
        """``fast_path``: build the decode fast path with these options (whole models only:
        a ``ValueError`` otherwise) and keep the KV caches in its slot cache where they fit;
        ``None``: every step runs eagerly over caches of their own."""
        self.model = model
        self.fast: DecodeGraphs | None = None
        slots = None
        if fast_path is not None:
            slots = SlotCache(model.kv_layout, fast_path.slots, fast_path.slot_tokens)
            self.fast = DecodeGraphs(model, slots, fast_path)
        self.kv = KVStore(model.kv_layout, slots)

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states that travel between stages."""
        return int(self.model.config.hidden_size)

    @property
    def holds_head(self) -> bool:
        """Whether this rank computes (its slice of) the LM head."""
        return bool(self.model.shard.head)

    def drop(self, seq_id: str) -> None:
        """Forget a finished sequence's KV cache (and give back its slot)."""
        self.kv.drop(seq_id)

    def takes_fast_path(self, plan: StepPlan) -> bool:
        """Whether ``run_local`` runs this step on the fast path: it is built, and every
        sequence of the (non-empty) step is a plain decode that has a slot."""
        return self.fast is not None and bool(plan.seqs) and all(
            plain_decode(s) and self.kv.slot_of(s.seq_id) is not None for s in plan.seqs)

    @torch.no_grad()
    def forward(self, plan: StepPlan, hidden: torch.Tensor | None) -> torch.Tensor:
        """Drop the step's freed sequences and run this rank's layers eagerly over the step
        (``hidden``: the previous stage's output; ``None`` on the first stage)."""
        self._free(plan)
        return self.model.forward_step(plan, hidden, self.kv.caches(plan.seqs))

    def head_rows(self, plan: StepPlan, x: torch.Tensor) -> torch.Tensor:
        """The rows of the last stage's output that need logits (``StageModel.head_rows``)."""
        return self.model.head_rows(plan, x)

    def logits(self, rows: torch.Tensor | None) -> torch.Tensor:
        """Float32 logits over the whole vocabulary, on the CPU (``StageModel.logits``)."""
        return self.model.logits(rows)

    def run_local(self, plan: StepPlan) -> list[SeqOutput]:
        """A whole step on a rank that is the whole model (pp=1): the fast path when it takes
        the step, else forward, head and sampling."""
        if self.fast is not None and self.takes_fast_path(plan):
            self._free(plan)
            return self.fast.run(plan)
        x = self.forward(plan, None)
        return outputs_from(plan, self.logits(self.head_rows(plan, x)))

    def _free(self, plan: StepPlan) -> None:
        for seq_id in plan.free:
            self.kv.drop(seq_id)
