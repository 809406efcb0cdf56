"""How a model server is launched: one helper assembles it; its accelerator follows the plan."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fabric import env
from fabric.catalog import CatalogEntry, WeightSource
from fabric.engine.launch import (
    ServerLaunchConfig,
    accelerator_setting,
    prepare_server_launch,
    select_accelerator,
    server_command,
    threads_per_rank,
)
from fabric.errors import AcceleratorUnavailable, DeploymentError, FabricError
from fabric.sites import Plan, ServerConfig
from fabric.weights import PreparedWeights


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
    assert cmd.startswith("OMP_NUM_THREADS=3 exec py -m fabric.engine.server /tmp/x/launch.json")
    assert "DS_ACCELERATOR" not in cmd


def test_one_helper_assembles_a_launch(tmp_path: Path) -> None:
    entry = CatalogEntry(name="tiny", version="test", family="causal-lm",
                         source=WeightSource(kind="path", path=str(tmp_path)))
    weights = PreparedWeights(path=tmp_path / "w", sha256="abc", size_bytes=1)
    state, folder = tmp_path / "state", tmp_path / "servers" / "d1"
    folder.mkdir(parents=True)
    one = prepare_server_launch("d1", entry, weights, Plan(pp=2), ServerConfig(threads_per_rank=3),
                                state, folder)
    assert ServerLaunchConfig.read(one.config_path) == one.config
    assert one.config_path == folder / "launch.json"
    assert (one.config.ticket_key_path, one.config.curve_dir, one.config.info_path) == (
        str(state / "ticket.key"), str(state / "curve"), str(folder / "info.json"))
    assert one.config.master_addr == "127.0.0.1" and one.config.weights_path == str(weights.path)
    # The port is left to rank 0 (0), published next to the info file under a per-launch token.
    assert one.config.master_port == 0 and one.config.rendezvous_path == folder / "rendezvous.json"
    assert one.command.startswith("OMP_NUM_THREADS=3 ") and str(one.config_path) in one.command
    # Two nodes: the rendezvous is the job's first node, and the cores are split per node.
    (folder / "rendezvous.json").write_text("{}")  # left by an earlier launch: removed
    two = prepare_server_launch("d2", entry, weights, Plan(pp=4, nodes=2), ServerConfig(),
                                state, folder, shard_dir="/shards")
    assert not (folder / "rendezvous.json").exists()
    assert two.config.master_addr == "auto" and two.config.shard_dir == "/shards"
    assert two.config.rendezvous_token != one.config.rendezvous_token
    assert two.command.startswith(f"OMP_NUM_THREADS={threads_per_rank(0, 2)} ")
