"""A site that names a `fabric shard` folder for a model's plan serves from those per-rank files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fabric import tickets
from fabric.endpoint.deployments import DeploymentManager
from fabric.engine.presplit import write_shards
from fabric.protocol import InferenceRequest
from fabric.serverclient import ServerClient
from fabric.sites import load_site
from tests.plugins.servers import hf_greedy
from tests.plugins.site import TINY_MODEL, write_site

pytestmark = pytest.mark.slow


def test_deployment_reads_the_presharded_folder(tmp_path: Path, tiny_llama_dir: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(tiny_llama_dir, shards, pp=2, tp=1)
    plan = {"pp": 2, "tp": 1}
    write_site(tmp_path / "site", model_dir=tiny_llama_dir,
               models=[{"name": TINY_MODEL, "plan": plan, "shard_dir": str(shards)}])
    site = load_site(tmp_path / "site")
    mgr = DeploymentManager(site, site.resolved_state_dir())
    dep = mgr.ensure(site.extra_models[0], wait_s=300)
    try:
        launch = json.loads((Path(dep.info_path).parent / "launch.json").read_text())
        assert launch["shard_dir"] == str(shards)
        assert dep.address and dep.public_key
        with ServerClient(dep.address, dep.public_key) as client:
            req = InferenceRequest(model=TINY_MODEL, prompt="The mitochondria is",
                                   sampling={"max_tokens": 8})
            client.submit(req, tickets.issue(mgr.ticket_key(), model=TINY_MODEL))
            got = client.result(req.request_id, 120)["token_ids"]
        assert got == hf_greedy(tiny_llama_dir, "The mitochondria is", 8)
    finally:
        mgr.undeploy(dep.id)
