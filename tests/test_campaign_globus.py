"""A campaign whose site is reached through Globus Compute: the real ``globus_compute_sdk.Executor``
(inside ``GlobusTransport``), the local fake of the web service, a real RabbitMQ broker and the
real ``globus-compute-endpoint`` daemon (``tests/plugins/globus_offline.py``).

The site names an ``endpoint_id``, so the runner picks ``GlobusTransport`` for it. Its endpoint
sets ``allowed_functions`` to the fabric's registered functions, so the campaign's ``run_shard``
tasks prove that list complete; the user endpoint's workers run ``run_shard``, which launches the
tiny model server as a site's request worker would. Only the cloud is fake.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from fabric.campaign import store
from fabric.campaign.dispatch import CampaignRunner
from fabric.campaign.manifest import load_manifest
from fabric.globus.transport import GlobusTransport
from fabric.wire.functions import list_deployments, undeploy
from tests.plugins.globus_offline import SITE_NAME, OfflineGlobus
from tests.plugins.site import TINY_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.globus]

N, MAX_TOKENS, SHARD = 20, 3, 6


def test_campaign_through_globus_transport(globus_offline: OfflineGlobus, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIC_HOME", str(tmp_path / "home"))  # function and task-group caches
    site_dir = globus_offline.site_dir
    site = SITE_NAME
    shard_fn = globus_offline.function_ids["run_shard"]
    service = globus_offline.service

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

    # Left to itself the runner opens a GlobusTransport for this site (endpoint_id set), with
    # a Globus login; the test hands it the same transport on a client of the fake service.
    opened = CampaignRunner(folder)._transport(spec)
    assert isinstance(opened, GlobusTransport)
    assert opened.config.endpoint_id == globus_offline.endpoint_id
    opened.close()

    transport = globus_offline.transport(tmp_path / "home")
    since = len(service.submissions)
    try:
        final = CampaignRunner(folder, transports={spec.name: transport}, poll_s=0.1).run()
        deployments = transport.submit(list_deployments, None, None).result(timeout=120)
    finally:
        for dep in transport.submit(list_deployments, None, None).result(timeout=120):
            transport.submit(undeploy, dep["id"], None).result(timeout=120)
        transport.close()

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
        assert r["site"] == site and r["attempt"] == 1 and r["nonce"]
    assert len({r["nonce"] for r in out}) == N  # one execution each
    # Every shard went through the service as one run_shard task (the endpoint's
    # allowed_functions let it in), and the ledger agrees with the files.
    shards = -(-N // SHARD)
    assert sum(len(s["tasks"].get(shard_fn, [])) for s in service.submissions[since:]) == shards
    status = store.status(folder)
    assert status["done"] == N and status["sites"][site]["inputs_done"] == N
    assert status["sites"][site]["shards"] == {"ok": shards}
