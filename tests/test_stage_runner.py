"""The stage runner owns a rank's KV storage and decode fast path; the model only computes.

In-process on the CPU with the tiny Llama: where caches live (slots, lowest free first, own
tensors when no slot fits), that freed sequences give their storage back on either path, that
the fused weight layout leaves the eager path's outputs unchanged, and that the model module
does not know the runner exists.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fabric.engine.graphs import GraphOptions
from fabric.engine.loader import build_stage
from fabric.engine.runner import StageRunner
from fabric.engine.steps import SampleSpec, SeqWork, StepPlan

OPTS = GraphOptions(slots=2, slot_tokens=32, capture=False, compile=False)
PROMPT = [5, 17, 300, 42, 7]


def _prefill(seq_id: str, capacity: int) -> SeqWork:
    return SeqWork(seq_id, 0, PROMPT, capacity, sample=SampleSpec())


def test_caches_take_the_lowest_free_slot_else_their_own_tensors(tiny_llama_dir: Path) -> None:
    runner = StageRunner(build_stage(tiny_llama_dir, 0, 1, 1, "float32", None)[0], OPTS)
    slots = runner.kv.slots
    assert slots is not None
    runner.run_local(StepPlan(0, [_prefill("a", 16), _prefill("b", 64), _prefill("c", 16)]))
    # "b" may grow past a slot (31 usable columns): it keeps its own cache; "c" gets slot 1.
    assert slots.owner == {"a": 0, "c": 1}
    assert len(runner.kv) == 3
    own = runner.kv.caches([_prefill("b", 64)])[0]
    assert own[0][0].shape == (runner.model.shard.kv_heads, 64, runner.model.head_dim)
    runner.run_local(StepPlan(1, [_prefill("d", 16)], free=["a"]))
    assert slots.owner == {"c": 1, "d": 0}  # "a"'s slot, given back at the step's start
    decode = [SeqWork(s, len(PROMPT), [9], 0, sample=SampleSpec()) for s in ("c", "d")]
    plan = StepPlan(2, decode, free=["b"])
    assert runner.takes_fast_path(plan)
    runner.run_local(plan)  # the fast path frees too
    assert len(runner.kv) == 2 and runner.kv.slot_of("b") is None
    runner.run_local(StepPlan(3, [], free=["c", "d", "unknown"]))
    assert not slots.owner and not len(runner.kv)


def test_without_fast_path_every_sequence_owns_its_cache(tiny_llama_dir: Path) -> None:
    runner = StageRunner(build_stage(tiny_llama_dir, 0, 1, 1, "float32", None)[0])
    assert runner.fast is None and runner.kv.slots is None
    plan = StepPlan(0, [_prefill("a", 16)])
    runner.run_local(plan)
    decode = StepPlan(1, [SeqWork("a", len(PROMPT), [9], 0, sample=SampleSpec())])
    assert not runner.takes_fast_path(decode)
    assert runner.kv.caches(decode.seqs)[0][0][0].shape[1] == 16


def test_fused_weights_leave_the_eager_step_unchanged(tiny_llama_odd_dir: Path) -> None:
    """The fast path re-lays Q/K/V and gate/up through the model's own method; the eager path
    then reads views of the fused matrices and must compute exactly what it did."""
    logits = []
    for fuse in (False, True):
        model = build_stage(tiny_llama_odd_dir, 0, 1, 1, "float32", None)[0]
        if fuse:
            fused = model.fused_weights()
            assert model.fused_weights() is fused  # once only
            q = model.layers["0"].self_attn.q_proj.weight  # type: ignore[union-attr]
            assert q.data_ptr() == fused.layers[0].qkv.data_ptr()  # a view, not a copy
        runner = StageRunner(model)
        plan = StepPlan(0, [_prefill("a", 8)])
        logits.append(runner.logits(runner.head_rows(plan, runner.forward(plan, None))))
    assert torch.equal(logits[0], logits[1])


def test_model_is_handed_one_cache_per_sequence(tiny_llama_dir: Path) -> None:
    model = build_stage(tiny_llama_dir, 0, 1, 1, "float32", None)[0]
    with pytest.raises(ValueError, match="1 caches for 2 sequences"):
        model.forward_step(StepPlan(0, [_prefill("a", 8), _prefill("b", 8)]), None,
                           StageRunner(model).kv.caches([_prefill("a", 8)]))
    with pytest.raises(ValueError, match="pp=1, tp=1"):
        build_stage(tiny_llama_dir, 0, 2, 1, "float32", None)[0].fused_weights()
