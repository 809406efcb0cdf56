"""The serving loop contains a failing sequence: it gets a typed error, the others go on and
get exactly the tokens they get alone.

In-process, on the real tiny Llama stage (pp=1, the eager path), driven by the real ``Engine``
and ``Preparer``. The failures are injected below the request schema (which refuses them) to
stand for what validation cannot foresee: a hook whose values turn the residual stream into
NaN, and a hook that makes the step itself raise.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import torch

from fabric.engine.engine import Engine
from fabric.engine.loader import build_stage
from fabric.engine.model import StageModel
from fabric.engine.prepare import ModelLimits, Preparer
from fabric.engine.runner import StageRunner
from fabric.engine.scheduler import Limits
from fabric.engine.sequence import Sequence
from fabric.engine.steps import HookSpec, SeqOutput, StepPlan
from fabric.protocol import InferenceRequest
from tests.plugins.servers import hf_tokenizer

GOOD = [("The mitochondria is", {"max_tokens": 6}),
        ("Scientists call models", {"max_tokens": 6, "temperature": 0.7, "seed": 3}),
        ("Proteins fold", {"max_tokens": 5, "temperature": 0.9, "top_k": 20, "seed": 9})]


class LocalRunner:
    """The pp=1 ``Pipeline`` in miniature: a whole step per launch, collected in order."""

    def __init__(self, stage: StageRunner) -> None:
        self.stage, self.inflight, self.depth = stage, 0, 1
        self._done: deque[list[SeqOutput]] = deque()
        self.steps = 0

    def launch(self, plan: StepPlan) -> None:
        self.steps += 1
        self._done.append(self.stage.run_local(plan))
        self.inflight += 1

    def collect(self) -> list[SeqOutput]:
        self.inflight -= 1
        return self._done.popleft()

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def stage(tiny_llama_dir: Path) -> tuple[StageModel, Any]:
    model, _ = build_stage(tiny_llama_dir, 0, 1, 1, "float32", None)
    return model, hf_tokenizer(tiny_llama_dir)


def _serve(stage: tuple[StageModel, Any], seqs: list[Sequence]) -> dict[str, dict[str, Any]]:
    """Run ``seqs`` through a fresh engine until each has a final message; returns them."""
    model, tok = stage
    finals: dict[str, dict[str, Any]] = {}
    done = threading.Event()

    def emit(rid: str, msg: dict[str, Any]) -> None:
        if msg["op"] in ("done", "error"):
            finals[rid] = msg
            if len(finals) == len(seqs):
                done.set()

    stage_runner = StageRunner(model)
    engine = Engine(LocalRunner(stage_runner), tok, Limits(4096, 512, 8), {"name": "t"}, set(),
                    model.config.num_hidden_layers, emit)
    engine.post_all("add", seqs)
    thread = threading.Thread(target=engine.run, args=(60.0, lambda: False), daemon=True)
    thread.start()
    assert done.wait(60), f"the engine loop stopped: finals {finals}"
    engine.stop_requested = True
    engine.wake.set()
    thread.join(10)
    assert engine.scheduler.kv_used == 0 and not engine.scheduler.running
    # Every cache is dropped or queued to be dropped by the next step (the failed one's too).
    assert stage_runner.kv.ids() <= set(engine.scheduler._free)
    return finals


def _seqs(stage: tuple[StageModel, Any], tag: str) -> list[Sequence]:
    model, tok = stage
    c = model.config
    prep = Preparer(tok, ModelLimits(c.num_hidden_layers, c.hidden_size,
                                     c.num_attention_heads, c.intermediate_size, 512, 4096))
    return [prep.prepare(InferenceRequest(request_id=f"{tag}{i}", model="t", prompt=p,
                                          sampling=s))
            for i, (p, s) in enumerate(GOOD)]


def _tokens(finals: dict[str, dict[str, Any]], ids: list[str]) -> list[list[int]]:
    return [finals[i]["result"]["token_ids"] for i in ids]


@pytest.mark.parametrize(("vector", "kind"), [
    (torch.full((64,), float("nan")), "NonFiniteOutput"),
    (torch.full((65,), 1.0), "ServerInternalError"),
], ids=["nan-residual", "step-raises"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_failing_sequence_is_isolated(stage: tuple[StageModel, Any], vector: torch.Tensor,
                                      kind: str, temperature: float) -> None:
    alone = _serve(stage, _seqs(stage, "a"))
    mixed = _seqs(stage, "m")
    culprit = _seqs(stage, "x")[0]
    culprit.request.sampling.temperature = temperature
    culprit.hooks = [HookSpec("steer", 1, vector, 1.0)]
    finals = _serve(stage, [mixed[0], culprit, *mixed[1:]])
    assert finals["x0"]["op"] == "error" and finals["x0"]["error"]["kind"] == kind, finals["x0"]
    ids = [f"a{i}" for i in range(len(GOOD))]
    assert _tokens(finals, [f"m{i}" for i in range(len(GOOD))]) == _tokens(alone, ids)
