"""``fabric flow``: Globus Flow definitions, input schemas and a Timer body, checked
structurally (states, the Compute action provider's URL, every JSONPath parameter resolving
against a sample input that the input schema accepts) without any cloud service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from fabric import flows
from fabric.cli.main import main
from fabric.errors import InvalidRequest, InvalidSiteConfig
from fabric.sites import SiteConfig

ENDPOINT = "2f9b0c1e-1111-4222-8333-444455556666"
RUN_REQUEST = "0a0a0a0a-0000-4000-8000-000000000001"
RUN_SHARD = "0a0a0a0a-0000-4000-8000-000000000002"
AP_V3 = "https://compute.actions.globus.org/v3"  # Globus Compute docs, "V3 Action Provider"


def site_data(**policy: Any) -> dict[str, Any]:
    return {"name": "flowsite", "endpoint_id": ENDPOINT, "max_request_workers": 3,
            "function_ids": {"run_request": RUN_REQUEST, "run_shard": RUN_SHARD},
            "policy": {"client_id": "0b6e5c4a-0f5c-4e5b-9f0d-0000000000ec",
                       "identity": "asserted", "models": {"m": {"anyone": True}}, **policy}}


def site(**policy: Any) -> SiteConfig:
    return SiteConfig.model_validate(site_data(**policy))


REQUEST_INPUT = {"prompt": "The mitochondria is", "sampling": {"max_tokens": 5},
                 "user_endpoint_config": {"request_workers": 2}}
SHARD_INPUT = {"shard_id": "s-1", "campaign": "nightly", "user_endpoint_config": {},
               "items": [{"custom_id": "a", "request": {"prompt": "x", "sampling": {}}}]}


def paths(parameters: Any) -> list[str]:
    """Every JSONPath a definition's parameters read."""
    if isinstance(parameters, list):
        return [p for item in parameters for p in paths(item)]
    if not isinstance(parameters, dict):
        return []
    return [v if k.endswith(".$") else p for k, v in parameters.items()
            for p in ([v] if k.endswith(".$") else paths(v))]


def check_structure(definition: dict[str, Any]) -> dict[str, Any]:
    """The checks Flows' own validation makes of a definition: a StartAt that names a state,
    each state a type with a way on (Next to a state, or End), action states with a URL."""
    states = definition["States"]
    assert definition["StartAt"] in states
    for name, state in states.items():
        assert state["Type"] in {"Action", "Pass", "Choice", "Wait", "Fail", "ExpressionEval"}
        assert state.get("End") is True or state.get("Next") in states, name
        if state["Type"] == "Action":
            assert state["ActionUrl"] == AP_V3
            assert state["ResultPath"].startswith("$.")
            assert isinstance(state["WaitTime"], int) and state["WaitTime"] > 0
    return states[definition["StartAt"]]


@pytest.mark.parametrize("which", ["request", "shard"])
def test_definitions_are_well_formed_and_resolve_against_a_valid_input(which: str) -> None:
    definition, schema = (flows.request_flow(site(), "m") if which == "request"
                          else flows.shard_flow(site(), "m"))
    sample = REQUEST_INPUT if which == "request" else SHARD_INPUT
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(sample, schema)
    state = check_structure(definition)
    assert paths(state["Parameters"])
    for path in paths(state["Parameters"]):  # each one is in the input the schema demands
        head = path.split(".")[1]
        assert head in schema["required"], path
    body = flows.action_body(definition, sample)
    assert json.loads(json.dumps(body)) == body  # JSON all the way down (the AP's input)
    assert body["endpoint_id"] == ENDPOINT
    assert body["user_endpoint_config"] == sample["user_endpoint_config"]
    (task,) = body["tasks"]
    if which == "request":
        assert task == {"function_id": RUN_REQUEST, "kwargs": {"request": {
            "model": "m", "kind": "generate", "prompt": "The mitochondria is",
            "sampling": {"max_tokens": 5}}}}
    else:
        assert task["function_id"] == RUN_SHARD
        assert task["kwargs"]["shard"] == {"model": "m", "shard_id": "s-1",
                                           "campaign": "nightly", "items": SHARD_INPUT["items"],
                                           "audit": True}


def test_the_user_endpoint_config_is_validated_by_the_sites_schema() -> None:
    _, schema = flows.request_flow(site(), "m")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**REQUEST_INPUT, "user_endpoint_config": {"request_workers": 4}},
                            schema)  # the site allows 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**REQUEST_INPUT, "user_endpoint_config": {"worker_init": "x"}},
                            schema)


def test_a_missing_input_fails_like_flows() -> None:
    definition, _ = flows.request_flow(site(), "m")
    with pytest.raises(InvalidRequest, match=r"\$.sampling"):
        flows.action_body(definition, {"prompt": "x", "user_endpoint_config": {}})


@pytest.mark.parametrize(("change", "match"), [
    ({"endpoint_id": None}, "no endpoint_id"),
    ({"function_ids": {}}, "no registered id"),
    ({"policy": {"client_id": "0b6e5c4a-0f5c-4e5b-9f0d-0000000000ec"}}, "wants a token"),
    ({"policy": {"client_id": "0b6e5c4a-0f5c-4e5b-9f0d-0000000000ec", "identity": "asserted",
                 "models": {"m": {"groups": ["0b6e5c4a-0f5c-4e5b-9f0d-00000000beef"]}}}},
     "group rules"),
])
def test_sites_a_flow_cannot_use_are_refused(change: dict[str, Any], match: str) -> None:
    bad = SiteConfig.model_validate({**site_data(), **change})
    with pytest.raises(InvalidSiteConfig, match=match):
        flows.request_flow(bad, "m")


def test_a_site_without_policy_is_fine() -> None:
    data = site_data()
    data.pop("policy")
    definition, _ = flows.request_flow(SiteConfig.model_validate(data), "m")
    assert flows.action_body(definition, REQUEST_INPUT)["endpoint_id"] == ENDPOINT


def test_campaign_timer_body() -> None:
    body = flows.campaign_timer("7e57f10w-0000", SHARD_INPUT, name="nightly", interval_s=3600,
                                stop_after_runs=30)
    timer = body["timer"]
    assert timer["timer_type"] == "flow" and timer["flow_id"] == "7e57f10w-0000"
    assert timer["schedule"] == {"type": "recurring", "interval_seconds": 3600,
                                 "end": {"condition": "iterations", "iterations": 30}}
    assert timer["body"] == {"body": SHARD_INPUT}
    json.dumps(body)
    with pytest.raises(InvalidRequest):
        flows.campaign_timer("f", SHARD_INPUT, name="n", interval_s=10)


def test_cli_writes_the_files_and_checks_an_input(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "fabric.yaml").write_text(yaml.safe_dump(site_data()))
    (tmp_path / "shard.json").write_text(json.dumps(SHARD_INPUT))
    assert main(["flow", str(folder), "m", "--out", str(tmp_path / "out"),
                 "--timer-flow-id", "7e57f100-0000-4000-8000-000000000000", "--timer-input",
                 str(tmp_path / "shard.json"), "--every", "3600"]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["campaign.timer.json", "request.flow.json", "request.schema.json",
                       "shard.flow.json", "shard.schema.json"]
    definition = json.loads((tmp_path / "out" / "request.flow.json").read_text())
    check_structure(definition)
    (tmp_path / "in.json").write_text(json.dumps(REQUEST_INPUT))
    capsys.readouterr()
    assert main(["flow", str(folder), "m", "--check", str(tmp_path / "in.json")]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"][0]["function_id"] == RUN_REQUEST


def test_cli_refuses_inputs_its_schemas_refuse(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``--check`` and ``--timer-input`` hold an input to the schema the command writes (Flows
    would refuse it only when the run starts), and ``--timer-flow-id`` must be a flow's UUID."""
    import yaml

    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "fabric.yaml").write_text(yaml.safe_dump(site_data()))
    bad = {**REQUEST_INPUT, "user_endpoint_config": {"request_workers": 99}, "extra": 1}
    (tmp_path / "in.json").write_text(json.dumps(bad))
    assert main(["flow", str(folder), "m", "--check", str(tmp_path / "in.json")]) == 2
    err = capsys.readouterr().err
    assert "(the input): Additional properties are not allowed ('extra'" in err, err
    assert "2 problem(s)" in err
    (tmp_path / "shard.json").write_text(json.dumps({"custom_id": "a"}))
    flow_id = "7e57f100-0000-4000-8000-000000000000"
    out = ["--out", str(tmp_path / "out"), "--timer-input", str(tmp_path / "shard.json")]
    assert main(["flow", str(folder), "m", "--timer-flow-id", flow_id, *out]) == 2
    assert "shard.json: (the input): 'shard_id' is a required property" in \
        capsys.readouterr().err
    (tmp_path / "shard.json").write_text(json.dumps(SHARD_INPUT))
    assert main(["flow", str(folder), "m", "--timer-flow-id", "not-a-uuid", *out]) == 2
    assert "is not a flow id" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written for a refused command
