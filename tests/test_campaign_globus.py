"""A campaign whose site is reached through the Globus transport (stand-in web service).

The site names an ``endpoint_id``, so the runner picks ``GlobusTransport`` for it. The
transport's executor is the stand-in (``StandinExecutor`` -> ``StandinService`` -> a real
``GlobusComputeEngine`` whose Parsl workers run ``run_shard`` from the real serializer's
buffers); ``run_shard`` launches the tiny model server as a site's request worker would. Only
the cloud hop is replaced, so this is the remote path a campaign takes, end to end.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from pathlib import Path

import pytest

from fabric.campaign import store
from fabric.campaign.dispatch import CampaignRunner
from fabric.campaign.manifest import load_manifest
from fabric.endpoint.functions import list_deployments, undeploy
from fabric.globus.standin import StandinExecutor, StandinService
from fabric.globus.transport import GlobusTransport
from fabric.sites import load_site
from tests.plugins.site import TINY_MODEL, write_site

pytestmark = pytest.mark.slow  # a Parsl engine, its workers and a model server job

N, MAX_TOKENS, SHARD = 20, 3, 6


def test_campaign_through_globus_transport(tmp_path: Path, tiny_llama_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIC_HOME", str(tmp_path / "home"))  # function and task-group caches
    endpoint_id = str(uuid.uuid4())
    site_dir = write_site(tmp_path / "site", name="tiny-globus", model_dir=tiny_llama_dir,
                          endpoint_id=endpoint_id)
    # The endpoint's workers find their site as an operator's worker_init would set it.
    svc = StandinService(tmp_path / "engine", endpoint_id=endpoint_id, workers=2, env={
        "FABRIC_SITE": str(site_dir), "FABRIC_STATE_DIR": str(site_dir / "state")})

    prompts = {f"g-{i:02d}": f"Sample {i}: the enzyme" for i in range(N)}
    (tmp_path / "in.jsonl").write_text("".join(
        json.dumps({"custom_id": cid, "prompt": p}) + "\n" for cid, p in prompts.items()))
    m = load_manifest({
        "name": "remote", "model": TINY_MODEL, "kind": "generate",
        "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0.0},
        "input": {"path": "in.jsonl"}, "output": "out", "shard_size": SHARD,
        "sites": [{"name": str(site_dir), "max_in_flight": 2}]}, base=tmp_path)
    folder = store.create(m, tmp_path / "campaigns")
    spec = m.sites[0]

    # Left to itself the runner would open a GlobusTransport for this site (endpoint_id set);
    # the test hands it the same transport with the stand-in executor instead of the cloud.
    opened = CampaignRunner(folder)._transport(spec)
    assert isinstance(opened, GlobusTransport) and opened.config.endpoint_id == endpoint_id
    opened.close()

    svc.start()
    transport = GlobusTransport(load_site(str(site_dir)), StandinExecutor(svc),
                                proof=lambda: None)
    try:
        try:
            final = CampaignRunner(folder, transports={spec.name: transport}, poll_s=0.1).run()
            deployments = transport.submit(list_deployments, None).result(timeout=60)
        finally:
            for dep in transport.submit(list_deployments, None).result(timeout=60):
                transport.submit(undeploy, dep["id"], None).result(timeout=120)
            transport.close()
    finally:
        svc.shutdown()

    assert final == "done"
    out = list(store.read_records(folder))
    err = list(store.read_records(folder, errors=True))
    assert err == []  # nothing should fail here; if it does, the records say why
    ids = Counter(r["custom_id"] for r in out + err)
    assert sorted(ids) == sorted(prompts) and max(ids.values()) == 1  # every input once
    files = Path(m.output)
    assert len((files / store.RESULTS).read_text().splitlines()) == len(out)  # nothing extra
    sha = {d["sha256"] for d in deployments}
    assert len(sha) == 1 and re.fullmatch(r"[0-9a-f]{64}", next(iter(sha)))
    for r in out:
        assert r["model"] == {"name": TINY_MODEL, "version": "test", "sha256": next(iter(sha))}
        assert r["usage"]["prompt_tokens"] > 0
        assert 1 <= r["usage"]["completion_tokens"] <= MAX_TOKENS
        assert r["usage"]["completion_tokens"] == len(r["response"]["token_ids"])
        assert r["site"] == "tiny-globus" and r["attempt"] == 1 and r["nonce"]
    assert len({r["nonce"] for r in out}) == N  # one execution each
    # Every shard went through the stand-in service (run_shard tasks plus the two listings
    # and the undeploys), and the ledger agrees with the files.
    shards = -(-N // SHARD)
    assert sum(svc.batches) >= shards + 2
    status = store.status(folder)
    assert status["done"] == N and status["sites"]["tiny-globus"]["inputs_done"] == N
    assert status["sites"]["tiny-globus"]["shards"] == {"ok": shards}
