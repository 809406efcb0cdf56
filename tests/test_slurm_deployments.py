"""A pp=2 model server as a real Slurm job on a namespace compute node: serve, scancel,
relaunch (a walltime expiry on Slurm: ``tests/test_hosts_cluster.py``). The server advertises
its compute-node address (``server.network`` set to the cluster's subnet); this process
reaches it over the cluster's bridge."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fabric import tickets
from fabric.endpoint.deployments import DeploymentManager
from fabric.endpoint.state import Deployment
from fabric.protocol import InferenceRequest
from fabric.serverclient import ServerClient
from fabric.sites import load_site
from fabric.testing.netns_cluster import COMPUTE_ADDRS, SUBNET
from tests.plugins.site import TINY_MODEL, write_site
from tests.plugins.slurm import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROMPTS = ["The mitochondria is", "Proteins fold into"]


def manager(folder: Path, tiny: Path, walltime: str) -> DeploymentManager:
    write_site(folder, name="slurm-test", model_dir=tiny,
               jobs={"provider": {"type": "SlurmProvider", "partition": "debug",
                                  "exclusive": False, "cmd_timeout": 30},
                     "launcher": {"type": "SrunLauncher"}, "walltime": walltime},
               models=[{"name": TINY_MODEL, "plan": {"pp": 2, "tp": 1}}],
               server={"idle_timeout_s": 600, "ready_timeout_s": 300, "kv_budget_tokens": 4096,
                       "threads_per_rank": 1, "network": {"advertise": SUBNET}})
    site = load_site(folder)
    return DeploymentManager(site, site.resolved_state_dir())


def hf_greedy(folder: Path, prompt: str, n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0, ids.shape[1]:]]


def generate(mgr: DeploymentManager, dep: Deployment, prompt: str, n: int) -> list[int]:
    assert dep.address and dep.public_key
    ticket = tickets.issue(mgr.ticket_key(), model=TINY_MODEL)
    with ServerClient(dep.address, dep.public_key) as client:
        req = InferenceRequest(model=TINY_MODEL, prompt=prompt, sampling={"max_tokens": n})
        client.submit(req, ticket)
        return list(client.result(req.request_id, 120)["token_ids"])


def wait_dead(mgr: DeploymentManager, dep: Deployment, timeout: float) -> Deployment:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dep = mgr.refresh(mgr.db.get(dep.id) or dep)
        if dep.state == "dead":
            return dep
        time.sleep(1.0)
    raise AssertionError(f"deployment {dep.id} still {dep.state} after {timeout} s")


def test_pp2_server_as_slurm_job_serves_and_scancel_is_detected(
        slurm: SlurmCluster, tmp_path: Path, tiny_llama_dir: Path) -> None:
    mgr = manager(tmp_path / "site", tiny_llama_dir, "00:10:00")
    entry = mgr.site.extra_models[0]
    dep = mgr.ensure(entry, wait_s=300)
    assert dep.job_id and dep.job_id.isdigit(), dep
    assert dep.job_id in slurm.squeue("-h", "-t", "R", "-o", "%i").split()
    assert dep.plan["pp"] == 2
    assert dep.address and dep.address.removeprefix("tcp://").rpartition(":")[0] \
        in COMPUTE_ADDRS.values(), dep.address
    for prompt in PROMPTS:
        assert generate(mgr, dep, prompt, 8) == hf_greedy(tiny_llama_dir, prompt, 8)

    import subprocess

    subprocess.run(["scancel", dep.job_id], check=True)
    dead = wait_dead(mgr, dep, 90)
    assert dead.reason, dead
    again = mgr.ensure(entry, wait_s=300)
    assert again.id != dep.id and again.job_id != dep.job_id
    assert generate(mgr, again, PROMPTS[0], 8) == hf_greedy(tiny_llama_dir, PROMPTS[0], 8)
    mgr.undeploy(again.id)
