"""Provenance: every result names its model, version, weights hash, plan, fabric version, seed
and sampling settings, and rerunning with that record gives the same tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fabric
from fabric import Fabric
from fabric.engine.embed_batches import Batch
from fabric.engine.result_maps import build
from fabric.engine.sequence import Sequence
from fabric.protocol import GenerationResult, InferenceRequest, SamplingParams
from fabric.provenance import Provenance, for_request, server_record
from tests.plugins.site import TINY_MODEL, LocalSite

SHA = "ab" * 32
SERVER = server_record("m", "v1", SHA, {"pp": 2, "tp": 1, "dtype": "bfloat16", "device": "cpu",
                                        "balance": "compute"}, "dep-1")
IDENTITY = {"name": "m", "version": "v1", "sha256": SHA, "provenance": SERVER}


def test_server_record_is_the_plan_and_fabric_version() -> None:
    expected = {"model": "m", "version": "v1", "sha256": SHA, "fabric_version":
                fabric.__version__, "deployment_id": "dep-1",
                "plan": {"pp": 2, "tp": 1, "ep": 1, "dtype": "bfloat16", "device": "cpu",
                         "fp8": ""}}
    assert expected == SERVER
    # FP8 weights kept or dequantized change the logits: the server records its resolved mode.
    kept = server_record("m", "v1", SHA, {"fp8": "keep", "device": "cuda"}, "dep-2")
    assert kept["plan"]["fp8"] == "keep"
    assert Provenance.model_validate({**kept, "kind": "generate"}).plan.fp8 == "keep"


def test_generate_result_carries_request_seed_and_sampling() -> None:
    sampling = SamplingParams(max_tokens=5, temperature=0.7, top_k=20, stop=["\n"])
    seq = Sequence(request=InferenceRequest(model="m", prompt="x", sampling=sampling),
                   prompt_ids=[1, 2], reserve=8, seed=1234)
    seq.generated = [5, 6]
    result = build(seq, "length", IDENTITY, "ab", 4)
    assert result["model"] == {"name": "m", "version": "v1", "sha256": SHA}
    prov = GenerationResult.model_validate(result).provenance
    assert prov is not None and prov.seed == 1234 and prov.kind == "generate"
    assert prov.sampling == sampling.model_dump() and prov.plan.pp == 2
    assert prov.rerun() == {"model": "m", "version": f"sha256:{SHA}", "max_tokens": 5,
                            "temperature": 0.7, "top_p": 1.0, "top_k": 20, "stop": ["\n"],
                            "logprobs": False, "seed": 1234}
    # An engine without a record (in-process tests) keeps the old result shape.
    bare = build(seq, "length", {"name": "m", "version": "v1", "sha256": SHA}, "ab", 4)
    assert "provenance" not in bare


def test_other_kinds_record_no_sampling_and_batches_keep_it() -> None:
    req = InferenceRequest(model="m", kind="embed", prompts=["a", "b"])
    record = for_request(SERVER, req, seed=99)
    assert record["kind"] == "embed" and record["seed"] is None and record["sampling"] is None
    batch = Batch("r", 2)
    for i in range(2):
        batch.add(i, {"layers": {"-1": [1.0, 0.0]}, "usage": {"prompt_tokens": 1},
                      "model": IDENTITY, "provenance": record})
    assert batch.result()["provenance"] == record
    assert Provenance.model_validate(record).sha256 == SHA


@pytest.mark.slow
def test_site_results_carry_provenance_and_rerun_reproduces(local_site: LocalSite) -> None:
    with Fabric(transport=local_site.transport(), on_status=None) as fab:
        first = fab.generate("The mitochondria is", model=TINY_MODEL, max_tokens=8,
                             temperature=1.5, top_k=50)  # unseeded: the server draws a seed
        prov = first.provenance
        assert prov is not None and prov.seed is not None
        dep = next(d for d in fab.deployments()
                   if d["model"] == TINY_MODEL and d["state"] == "ready")
        assert (prov.model, prov.version, prov.sha256) == (TINY_MODEL, "test", first.model.sha256)
        assert prov.deployment_id == dep["id"] and prov.fabric_version == fabric.__version__
        plan = prov.plan.model_dump()
        assert {k: plan[k] for k in ("pp", "tp", "dtype")} == {
            k: dep["plan"][k] for k in ("pp", "tp", "dtype")}
        assert prov.sampling is not None and prov.sampling["temperature"] == 1.5
        assert prov.sampling["seed"] is None and prov.sampling["top_k"] == 50
        again = fab.generate("The mitochondria is", **prov.rerun())
        assert again.token_ids == first.token_ids and again.provenance is not None
        assert again.provenance.seed == prov.seed
        other = fab.generate("The mitochondria is", **{**prov.rerun(), "seed": prov.seed + 1})
        assert other.provenance is not None and other.provenance.seed == prov.seed + 1
        vectors, eprov = fab.embed(["a cell", "the nucleus"], model=TINY_MODEL,
                                   return_provenance=True)
        assert isinstance(vectors, np.ndarray) and vectors.shape[0] == 2
        assert eprov is not None and eprov.kind == "embed" and eprov.sha256 == prov.sha256
        hidden: dict[str, Any] = fab.hidden_states("a cell", model=TINY_MODEL, layers=[0])
        assert Provenance.model_validate(hidden["provenance"]).kind == "hidden_states"
        json.dumps(hidden["provenance"])  # plain data: goes into any output file as is


@pytest.mark.slow
def test_campaign_lines_carry_provenance(tmp_path: Path, local_site: LocalSite) -> None:
    from fabric.campaign import store
    from fabric.campaign.api import Campaign
    from tests.test_campaign_site import invariant, make_campaign

    folder = store.create(make_campaign(tmp_path, local_site, 6, name="prov"),
                          tmp_path / "home")
    assert Campaign(folder).start().wait(timeout=300)["status"] == "done"
    out, _ = invariant(folder, 6)
    for line in out:
        prov = Provenance.model_validate(line["provenance"])
        assert (prov.model, prov.version, prov.sha256) == (
            line["model"]["name"], line["model"]["version"], line["model"]["sha256"])
        assert prov.kind == "generate" and prov.sampling is not None
        assert prov.sampling["max_tokens"] == 3 and "provenance" not in line["response"]


@pytest.mark.parametrize("kind", ["generate", "embed"])
@pytest.mark.parametrize("count", [0, 1, 3])
def test_provenance_counts_the_requests_hooks(kind: str, count: int) -> None:
    """The result depends on the hooks it ran with: the record says how many there were."""
    hooks = [{"kind": "capture", "layer": layer} for layer in range(count)]
    text: dict[str, Any] = {"prompt": "x"} if kind == "generate" else {"prompts": ["a"]}
    req = InferenceRequest(model="m", kind=kind, hooks=hooks, **text)
    assert len(req.hooks) == count
    record = for_request(SERVER, req, seed=5)
    assert record["hooks"] == count
    assert Provenance.model_validate(record).hooks == count
