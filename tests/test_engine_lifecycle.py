"""The serving loop in process, over a real pp=1 stage: what a finished sequence leaves behind,
EOS, step sizes, decode batching, stop strings, the KV budget's boundary, the slot cache's.

``Engine.run`` is driven as the head drives it (``draining`` true: it serves what was posted and
returns once idle), over a pp=1 executor that runs each step with ``StageRunner.run_local`` as
``Pipeline`` does at pp=1, and records every plan it is handed.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from fabric.engine.engine import Engine
from fabric.engine.graphs import GraphOptions
from fabric.engine.loader import build_stage
from fabric.engine.prepare import ModelLimits, Preparer
from fabric.engine.runner import StageRunner
from fabric.engine.scheduler import Limits, Scheduler
from fabric.engine.sequence import Sequence
from fabric.engine.steps import SeqOutput, StepPlan
from fabric.protocol import InferenceRequest
from tests.plugins.servers import CANDIDATE_PROMPTS, hf_greedy, hf_tokenizer

TEXT = ("The mitochondria is the powerhouse of the cell. Tensor parallel splits each layer; "
        "pipeline parallel splits the stack of layers. Scientists call models through a "
        "federated fabric of supercomputer sites.")
WORDS = TEXT.split(" ")


class LocalSteps:
    """A pp=1 executor (as ``Pipeline`` runs one) that records the plans it runs."""

    def __init__(self, stage: StageRunner) -> None:
        self.stage, self.inflight = stage, 0
        self.plans: list[StepPlan] = []
        self.slot_of: dict[str, int | None] = {}
        """Each sequence's slot (``None``: a cache of its own) as its steps saw it."""
        self._outputs: deque[list[SeqOutput]] = deque()

    @property
    def depth(self) -> int:
        return 1

    def launch(self, plan: StepPlan) -> None:
        self.plans.append(plan)
        self._outputs.append(self.stage.run_local(plan))
        self.slot_of.update((w.seq_id, self.stage.kv.slot_of(w.seq_id)) for w in plan.seqs)
        self.inflight += 1

    def collect(self) -> list[SeqOutput]:
        self.inflight -= 1
        return self._outputs.popleft()

    def shutdown(self) -> None:
        pass


class Served:
    """An in-process engine over one tiny checkpoint, with the server's request preparation."""

    def __init__(self, weights: Path, limits: Limits, fast: GraphOptions | None = None,
                 eos_ids: set[int] | None = None) -> None:
        model, _ = build_stage(weights, 0, 1, 1, "float32", None)
        cfg = model.config
        self.stage = StageRunner(model, fast)
        self.steps = LocalSteps(self.stage)
        self.tok = hf_tokenizer(weights)
        eos = {int(cfg.eos_token_id)} if eos_ids is None else eos_ids  # as the server does
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.engine = Engine(self.steps, self.tok, limits, {"name": "tiny"}, eos,
                             cfg.num_hidden_layers, self._emit)
        self.prep = Preparer(self.tok, ModelLimits(
            n_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
            heads=cfg.num_attention_heads, intermediate=cfg.intermediate_size, context=512,
            kv_budget=limits.kv_budget_tokens))

    def _emit(self, request_id: str, msg: dict[str, Any]) -> None:
        self.messages.setdefault(request_id, []).append(msg)

    def serve(self, *requests: dict[str, Any], stream: bool = False) -> list[dict[str, Any]]:
        """Post every request at once, serve until idle; their results, in order."""
        seqs = [self.prep.prepare(InferenceRequest(model="tiny", **r), stream=stream)
                for r in requests]
        self.engine.post_all("add", seqs)
        assert self.engine.run(60.0, lambda: True) == "drained"
        results = []
        for seq in seqs:
            last = self.messages[seq.request_id][-1]
            assert last["op"] == "done", last
            results.append(last["result"])
        return results

    def events(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        """The stream events a request was sent before its result."""
        return [m for m in self.messages[result["request_id"]] if m["op"] == "event"]


def _prompts(n: int) -> list[str]:
    return [" ".join(WORDS[: 1 + (i * 7) % len(WORDS)]) for i in range(n)]


# --- 1. a finished sequence's KV cache and slot --------------------------------------------


def test_finished_sequences_leave_the_kv_store_and_their_slots_return(
        tiny_llama_dir: Path) -> None:
    """Sequences finishing at different steps, more of them than slots: once they are all
    done, the next step drops every cache (the runner holds only the sequence that step ran)
    and every slot but that one's is free again."""
    opts = GraphOptions(slots=4, slot_tokens=64, capture=False, compile=False)
    served = Served(tiny_llama_dir, Limits(10_000, 512, 4), fast=opts)
    prompts = _prompts(7)
    results = served.serve(*[{"prompt": p, "sampling": {"max_tokens": 2 + 3 * (i % 4)}}
                             for i, p in enumerate(prompts)])
    for i, (p, res) in enumerate(zip(prompts, results, strict=True)):
        assert res["token_ids"] == hf_greedy(tiny_llama_dir, p, 2 + 3 * (i % 4)), p
    assert any(served.stage.takes_fast_path(plan) for plan in served.steps.plans)
    # The last ones to finish are dropped by the next step: one more request.
    last = served.serve({"prompt": "The", "sampling": {"max_tokens": 1}})[0]
    kv, slots = served.stage.kv, served.stage.kv.slots
    assert slots is not None
    assert kv.ids() == {last["request_id"]}
    assert set(slots.owner) == {last["request_id"]}
    assert sorted(slots._free) == sorted(set(range(opts.slots)) - set(slots.owner.values()))
    assert served.engine.scheduler.kv_used == 0


# --- 2. EOS ----------------------------------------------------------------------------------


def _eos_prompt(weights: Path, n: int) -> tuple[str, list[int]]:
    """A prompt whose transformers greedy continuation reaches EOS within ``n`` tokens."""
    eos = hf_tokenizer(weights).eos_token_id
    for p in CANDIDATE_PROMPTS:
        want = hf_greedy(weights, p, n)
        if eos in want and len(want) < n:
            return p, want
    pytest.fail(f"no candidate prompt reaches EOS within {n} tokens")


@pytest.mark.parametrize("stream", [False, True])
def test_generation_stops_at_eos_as_transformers_does(tiny_llama_dir: Path,
                                                      stream: bool) -> None:
    prompt, want = _eos_prompt(tiny_llama_dir, 24)
    tok = hf_tokenizer(tiny_llama_dir)
    served = Served(tiny_llama_dir, Limits(10_000, 512, 8))
    res, other = served.serve({"prompt": prompt, "sampling": {"max_tokens": 24}},
                              {"prompt": "The", "sampling": {"max_tokens": 6}}, stream=stream)
    assert want[-1] == tok.eos_token_id
    assert res["token_ids"] == want
    assert res["finish_reason"] == "eos"
    assert res["usage"]["completion_tokens"] == len(want)
    assert res["text"] == tok.decode(want, skip_special_tokens=True)
    assert not any(s in res["text"] for s in tok.all_special_tokens)
    assert other["finish_reason"] == "length"  # sharing its steps, the other one went on
    if stream:
        events = served.events(res)
        assert [t for e in events for t in e["token_ids"]] == want
        assert "".join(e["text"] for e in events) == res["text"]


# --- 3. step sizes and decode batching -------------------------------------------------------


def test_no_step_computes_more_than_max_batch_tokens(tiny_llama_dir: Path) -> None:
    served = Served(tiny_llama_dir, Limits(10_000, 5, 8))
    prompts = [" ".join(WORDS[:n]) for n in (2, 9, 17)]
    results = served.serve(*[{"prompt": p, "sampling": {"max_tokens": 6}} for p in prompts])
    for p, res in zip(prompts, results, strict=True):
        assert res["token_ids"] == hf_greedy(tiny_llama_dir, p, 6), p
    sizes = [sum(w.n for w in plan.seqs) for plan in served.steps.plans]
    assert max(sizes) <= 5, sizes
    longest = max(len(served.tok(p).input_ids) for p in prompts)
    assert longest > 5 * 2  # so it was spread over several steps


def test_concurrent_requests_decode_in_the_same_steps(tiny_llama_dir: Path) -> None:
    """n greedy requests sent together take about max_tokens steps, not n x max_tokens: every
    step decodes every running sequence."""
    n, new = 5, 8
    served = Served(tiny_llama_dir, Limits(10_000, 512, 8), eos_ids=set())
    results = served.serve(*[{"prompt": p, "sampling": {"max_tokens": new}}
                             for p in _prompts(n)])
    assert all(len(r["token_ids"]) == new for r in results)
    plans = served.steps.plans
    assert len(plans) <= new + 1, len(plans)
    assert all(len(plan.seqs) == n for plan in plans if plan.seqs)


# --- 4. stop strings, the KV budget, the slot's scratch column -------------------------------


def test_of_two_stop_strings_ending_in_one_step_the_earlier_cuts(tiny_llama_dir: Path) -> None:
    """Stops A and B where B is A's last character (as "User:" and ":"): both complete with
    the same token, and the text ends before A, where the earlier one starts."""
    served = Served(tiny_llama_dir, Limits(10_000, 512, 8), eos_ids=set())
    checked = 0
    for prompt in CANDIDATE_PROMPTS[:8]:
        free = served.serve({"prompt": prompt, "sampling": {"max_tokens": 24}})[0]
        text = free["text"]
        # the first printable ASCII character that appears for the first time at >= 3,
        # after three printable ASCII characters
        at = next((j for j in range(3, len(text))
                   if all(c.isascii() and c.isprintable() for c in text[j - 3:j + 1])
                   and not text[j].isspace() and text[j] not in text[:j]), None)
        if at is None:
            continue
        long, short = text[at - 2:at + 1], text[at]
        for stops in ([long, short], [short, long]):
            res = served.serve({"prompt": prompt,
                                "sampling": {"max_tokens": 24, "stop": stops}})[0]
            assert res["finish_reason"] == "stop"
            assert res["text"] == text[:at - 2], (stops, text)
            assert res["token_ids"] == free["token_ids"][:len(res["token_ids"])]
        checked += 1
        if checked == 2:
            break
    assert checked >= 1


def _seq(reserve: int) -> Sequence:
    return Sequence(request=InferenceRequest(model="m", prompt="x"), prompt_ids=[1] * 4,
                    reserve=reserve)


def test_a_sequence_that_exactly_fills_the_kv_budget_is_admitted() -> None:
    sched = Scheduler(Limits(20, 64, 8), lambda seq, out: None, lambda *a: None,
                      threading.Lock())
    first, exact = _seq(12), _seq(8)
    sched.add(first)
    sched.add(exact)
    plan = sched.schedule()
    assert plan is not None
    assert {w.seq_id for w in plan.seqs} == {first.request_id, exact.request_id}
    assert sched.kv_used == 20
    # One token over waits for room.
    sched2 = Scheduler(Limits(20, 64, 8), lambda seq, out: None, lambda *a: None,
                       threading.Lock())
    over = _seq(9)
    sched2.add(_seq(12))
    sched2.add(over)
    plan = sched2.schedule()
    assert plan is not None and len(plan.seqs) == 1
    assert list(sched2.waiting) == [over]


def test_a_sequence_reserving_the_scratch_column_gets_no_slot(tiny_llama_dir: Path) -> None:
    """Sequences next to padding rows of the fast path, one reserving one position less than a
    slot holds, one reserving the whole slot (the padding rows' scratch column included): both
    decode transformers' greedy tokens, and only the first lives in a slot."""
    slot_tokens = 24
    opts = GraphOptions(slots=4, slot_tokens=slot_tokens, capture=False, compile=False)
    served = Served(tiny_llama_dir, Limits(10_000, 512, 4), fast=opts, eos_ids=set())
    tok = served.tok
    prompts = ["The mitochondria", "Scientists call models through a"]  # the first decodes last
    new = [slot_tokens - 1 - len(tok(prompts[0]).input_ids),
           slot_tokens - len(tok(prompts[1]).input_ids)]
    short = {"prompt": "The", "sampling": {"max_tokens": 2}}  # leaves slot 0 to padding
    results = served.serve(short, *[{"prompt": p, "sampling": {"max_tokens": n}}
                                    for p, n in zip(prompts, new, strict=True)])
    for p, n, res in zip(prompts, new, results[1:], strict=True):
        assert res["token_ids"] == hf_greedy(tiny_llama_dir, p, n), p
    fits, whole = (r["request_id"] for r in results[1:])
    assert served.steps.slot_of[fits] is not None
    assert served.steps.slot_of[whole] is None
    assert any(served.stage.takes_fast_path(plan) and len(plan.seqs) == 1
               for plan in served.steps.plans)
