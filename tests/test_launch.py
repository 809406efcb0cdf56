"""How a model server is launched: its accelerator follows the plan's device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fabric import env
from fabric.engine.launch import accelerator_setting, select_accelerator, server_command
from fabric.errors import AcceleratorUnavailable, DeploymentError, FabricError


def test_the_plan_device_chooses_deepspeeds_accelerator() -> None:
    assert accelerator_setting("cpu") == "cpu"
    assert accelerator_setting("cuda") is None  # DeepSpeed detects the GPU itself
    with pytest.raises(AcceleratorUnavailable, match="xpu"):
        accelerator_setting("xpu")


def test_cpu_plan_sets_the_cpu_accelerator_over_an_inherited_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert select_accelerator("cpu") == "cpu"
    assert env.DS_ACCELERATOR.get() == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a node without GPU")
def test_cuda_plan_without_a_gpu_refuses_instead_of_falling_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # inherited from a parent: must not decide
    with pytest.raises(AcceleratorUnavailable, match="no usable GPU") as caught:
        select_accelerator("cuda")
    assert not env.DS_ACCELERATOR.is_set()
    err = caught.value
    assert isinstance(err, DeploymentError) and not err.retryable
    assert FabricError.from_dict(err.to_dict()).__class__ is AcceleratorUnavailable


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_plan_on_a_gpu_gets_deepspeeds_cuda_accelerator() -> None:
    # A fresh interpreter: DeepSpeed caches its accelerator per process.
    code = ("from fabric.engine.launch import select_accelerator; "
            "print(select_accelerator('cuda'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "cuda"


def test_the_rank_command_sets_threads_and_no_accelerator() -> None:
    cmd = server_command(Path("/tmp/x/launch.json"), 3, python="py")
    assert cmd.startswith("OMP_NUM_THREADS=3 py -m fabric.engine.server /tmp/x/launch.json")
    assert "DS_ACCELERATOR" not in cmd
