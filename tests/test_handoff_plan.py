"""Pipeline hand-offs follow the plan: CPU plans send float32 CPU tensors over gloo; CUDA plans
(nccl) keep the rank's device and the model's dtype and use the default (nccl) group.

The selection is checked directly, and the on-device path is run for real between two gloo
processes with the CPU standing in for the GPU (a bfloat16 hand-off arrives as bfloat16, the
plan travelling over the wire group as before). That nccl itself moves the tensors on a GPU is
not shown here: no test machine has had a GPU.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fabric.engine.dist import Groups, RankInfo
from fabric.engine.pipeline import STEP, HandOff, _Wire, hand_off


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cuda_plan_hands_off_on_its_device_in_its_dtype(dtype: str) -> None:
    h = hand_off("cuda", dtype, "nccl", "cuda:1")
    assert h.on_device and h.device == torch.device("cuda:1")
    assert h.dtype == getattr(torch, dtype)


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), ("cuda", "gloo"),
                                                 ("xpu", "gloo")])
def test_other_plans_hand_off_float32_on_the_cpu(device: str, backend: str) -> None:
    h = hand_off(device, "bfloat16", backend, "cpu")
    assert h == HandOff() and h.dtype == torch.float32 and not h.on_device


def _rank(rank: int, init: str, handoff: HandOff, sent: torch.Tensor, out: Any) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        wire = _Wire(RankInfo(rank=rank, world=2, pp=2, tp=1), Groups(tp_group=None),
                     sent.shape[1], handoff)
        if rank == 0:
            wire.isend(1, STEP, {"step": 7}, sent)
            wire.flush()
        else:
            kind, obj, tensor = wire.recv(0)
            assert tensor is not None
            out.put((kind, obj, str(tensor.dtype), str(tensor.device), tensor.float().tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~10 s
@pytest.mark.parametrize("handoff", [HandOff(), HandOff(torch.device("cpu"), torch.bfloat16,
                                                         True)], ids=["cpu-plan", "on-device"])
def test_hand_off_between_two_ranks(handoff: HandOff) -> None:
    sent = torch.tensor([[1.5, -2.25, 3.0], [0.125, 4.0, -8.5]], dtype=torch.bfloat16)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rdv')}"
        procs = [ctx.Process(target=_rank, args=(r, init, handoff, sent, out)) for r in (0, 1)]
        for p in procs:
            p.start()
        try:
            kind, obj, dtype, device, values = out.get(timeout=60)
        finally:
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
    assert (kind, obj, device) == (STEP, {"step": 7}, "cpu")
    assert dtype == str(handoff.dtype)  # bfloat16 stays bfloat16 only when handed off as such
    assert values == sent.float().tolist()
    assert all(p.exitcode == 0 for p in procs)
