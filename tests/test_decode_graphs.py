"""The decode fast path (static slot cache, batched decode step) gives the eager path's tokens.

Run in-process on the CPU (the same code a GPU captures as CUDA graphs, without capture or
compile), driven step by step the way the serving loop drives a pp=1 stage: sequences join
and leave between steps, some do not fit a slot and keep their own caches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fabric.engine.graphs import GraphOptions
from fabric.engine.loader import build_stage
from fabric.engine.runner import StageRunner
from fabric.engine.steps import HookSpec, SampleSpec, SeqWork, StepPlan
from tests.plugins.servers import ServerHandle, hf_greedy, hf_tokenizer

PROMPTS = ["The", "The mitochondria is the powerhouse", "Scientists call models",
           "Tensor parallel splits each layer; pipeline parallel splits the stack of layers.",
           "Proteins fold", "A federated fabric of supercomputer sites serves models"]
NEW = 10


class Driver:
    """Continuous batching in miniature: admit, prefill, decode, free."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner, self.step_id = runner, 0
        self.fast_steps = self.eager_steps = 0

    def run(self, prompts: list[list[int]], new: int, specs: list[SampleSpec | None],
            joins: list[int], capacity: list[int],
            hooks: dict[int, list[HookSpec]] | None = None) -> list[list[int]]:
        """Sequence i joins at step ``joins[i]`` and generates ``new`` tokens."""
        out: list[list[int]] = [[] for _ in prompts]
        free: list[str] = []
        while any(len(o) < new for o in out):
            work, index = [], []
            for i, (p, o) in enumerate(zip(prompts, out, strict=True)):
                if joins[i] > self.step_id or len(o) >= new:
                    continue
                spec = specs[i] or SampleSpec()
                sample = SampleSpec(spec.temperature, spec.top_p, spec.top_k, spec.seed,
                                    len(o), spec.logprobs)
                start, toks = (0, p) if not o else (len(p) + len(o) - 1, [o[-1]])
                work.append(SeqWork(f"s{i}", start, toks, capacity[i], sample=sample,
                                    hooks=(hooks or {}).get(i, [])))
                index.append(i)
            plan = StepPlan(self.step_id, work, free=free)
            if self.runner.takes_fast_path(plan):
                self.fast_steps += 1
            else:
                self.eager_steps += 1
            outs = self.runner.run_local(plan)
            free = []
            for i, res in zip(index, outs, strict=True):
                assert res.token is not None
                out[i].append(res.token)
                if len(out[i]) == new:
                    free.append(f"s{i}")
            self.step_id += 1
        self.runner.run_local(StepPlan(self.step_id, [], free=free))
        return out


def _stage(weights: Path, opts: GraphOptions | None) -> StageRunner:
    model, _ = build_stage(weights, 0, 1, 1, "float32", None)
    return StageRunner(model, opts)


def _ids(weights: Path) -> list[list[int]]:
    tok = hf_tokenizer(weights)
    return [tok(p).input_ids for p in PROMPTS]


OPTS = GraphOptions(slots=4, slot_tokens=48, capture=False, compile=False)


@pytest.mark.parametrize("weights_fixture", ["tiny_llama_dir", "tiny_llama_odd_dir",
                                             "tiny_qwen2_dir", "tiny_qwen3_dir",
                                             "tiny_mistral_dir"])
def test_fast_path_gives_transformers_greedy_tokens(weights_fixture: str,
                                                    request: pytest.FixtureRequest) -> None:
    weights: Path = request.getfixturevalue(weights_fixture)
    runner = _stage(weights, OPTS)
    ids = _ids(weights)
    # Six sequences, four slots: the two that find no slot (or would outgrow one) keep their
    # own caches, and while they run, steps go the eager way.
    capacity = [len(p) + NEW for p in ids]
    capacity[3] = 100  # more than a slot holds
    driver = Driver(runner)
    out = driver.run(ids, NEW, [None] * len(ids), joins=[0, 0, 2, 3, 5, 16],
                     capacity=capacity)
    for prompt, got in zip(PROMPTS, out, strict=True):
        assert got == hf_greedy(weights, prompt, NEW), prompt
    assert driver.fast_steps > 0 and driver.eager_steps > 0
    slots = runner.kv.slots
    assert slots is not None
    assert not slots.owner and not len(runner.kv)  # every slot given back
    assert sorted(slots._free) == list(range(OPTS.slots))


def test_sampling_logprobs_and_hooks_match_the_eager_path(tiny_llama_dir: Path) -> None:
    ids = _ids(tiny_llama_dir)[:4]
    specs: list[SampleSpec | None] = [
        SampleSpec(temperature=0.8, top_p=0.9, seed=7), SampleSpec(logprobs=True),
        SampleSpec(temperature=1.2, top_k=20, seed=3, logprobs=True), None]
    steer = {1: [HookSpec("steer", 1, vector=torch.full((64,), 0.5), scale=2.0)]}
    runs = []
    for opts in (None, OPTS):
        driver = Driver(_stage(tiny_llama_dir, opts))
        runs.append(driver.run(ids, NEW, specs, joins=[0, 1, 1, 4],
                               capacity=[len(p) + NEW for p in ids], hooks=steer))
    eager, fast = runs
    assert fast == eager
    assert driver.fast_steps > 0  # steps without the steered request went the fast way


def test_fast_path_refuses_steps_it_cannot_run(tiny_llama_dir: Path) -> None:
    runner = _stage(tiny_llama_dir, OPTS)
    takes = runner.takes_fast_path
    prompt = _ids(tiny_llama_dir)[1]
    runner.run_local(StepPlan(0, [SeqWork("a", 0, prompt, 20, sample=SampleSpec())]))
    decode = SeqWork("a", len(prompt), [5], 0, sample=SampleSpec())
    assert takes(StepPlan(1, [decode]))
    assert not takes(StepPlan(1, []))
    assert not takes(StepPlan(1, [SeqWork("b", 0, prompt, 20, sample=SampleSpec())]))
    hooked = SeqWork("a", len(prompt), [5], 0, sample=SampleSpec(),
                     hooks=[HookSpec("ablate_heads", 0, heads=[1])])
    assert not takes(StepPlan(1, [hooked]))
    assert not takes(StepPlan(1, [SeqWork("a", len(prompt), [5], 0)]))
    with pytest.raises(ValueError, match="pp=1, tp=1"):
        StageRunner(build_stage(tiny_llama_dir, 0, 2, 1, "float32", None)[0], OPTS)


@pytest.fixture(scope="module")
def fast_server(model_server: Any, tiny_llama_dir: Path) -> ServerHandle:
    return model_server(tiny_llama_dir, name="tiny_llama", decode_graphs="on", graph_slots=6,
                        graph_slot_tokens=96)


def test_server_with_fast_path_serves_concurrent_requests_exactly(
        fast_server: ServerHandle, tiny_llama_dir: Path) -> None:
    prompts = [" ".join(PROMPTS[: 1 + i % len(PROMPTS)])[: 20 + 9 * i] for i in range(12)]
    client = fast_server.client()
    reqs = [fast_server.request(prompt=p, sampling={"max_tokens": 6 + i % 9})
            for i, p in enumerate(prompts)]
    for r in reqs:
        client.submit(r, fast_server.ticket)
    for i, (p, r) in enumerate(zip(prompts, reqs, strict=True)):
        res = client.result(r.request_id, 120)
        assert res["token_ids"] == hf_greedy(tiny_llama_dir, p, 6 + i % 9), p
    assert fast_server.wait_idle()["kv_used_tokens"] == 0


def test_blocked_lm_head_is_bit_identical(tiny_llama_odd_dir: Path) -> None:
    """The CPU LM head runs in vocabulary blocks; every logit equals the one-matmul result."""
    import torch.nn.functional as F

    from fabric.engine import model as model_mod

    stage = _stage(tiny_llama_odd_dir, None).model
    assert stage.lm_head is not None
    weight = stage.lm_head.weight
    old = model_mod.HEAD_BLOCK
    model_mod.HEAD_BLOCK = 100  # several uneven blocks of the tiny vocabulary
    try:
        for rows in (1, 7, 33):
            h = torch.randn(rows, weight.shape[1])
            assert weight.shape[0] % model_mod.HEAD_BLOCK != 0
            assert torch.equal(stage.logits(h), F.linear(h, weight).float())
    finally:
        model_mod.HEAD_BLOCK = old
