"""Globus Flows and Timers for a site: a fabric request or a campaign shard as a flow action.

``fabric flow`` writes, for one site and model, what a scientist registers with Globus Flows and
Globus Timers:

- ``request.flow.json`` / ``request.schema.json``: one state that runs the fabric's
  ``run_request`` at the site's endpoint through the Globus Compute action provider (V3,
  ``ACTION_URL``). The flow input is the prompt, the sampling parameters and the user endpoint
  config (validated by the site's own ``user_config_schema``); the model, the endpoint id and
  the registered function id are fixed in the definition.
- ``shard.flow.json`` / ``shard.schema.json``: the same for ``run_shard`` (a campaign shard:
  ``items`` of ``{custom_id, request}``).
- ``campaign.timer.json``: a Globus Timers flow timer (``globus_sdk.FlowTimer``) that starts the
  shard flow on a schedule, for a campaign that recurs.

The action provider turns the action's JSON ``Parameters`` into one Compute submission (the V3
submit route's body: ``endpoint_id``, ``tasks: [{function_id, args, kwargs}]``,
``user_endpoint_config``), serialising ``args``/``kwargs`` itself; its documentation does not
say with which strategy (docs/users.md, "Globus Flows and Timers", says what follows for a site).

No token is part of a flow's input: the site must trust the identity Globus Compute asserts
(``policy.identity: asserted``, the flow's runner), or have no policy. A site whose policy wants
tokens cannot be driven from a flow without storing a token in the run's input, which the
fabric refuses to write.
"""

from __future__ import annotations

import copy
from typing import Any

from fabric.errors import InvalidRequest, InvalidSiteConfig
from fabric.sites import SiteConfig

ACTION_URL = "https://compute.actions.globus.org/v3"
"""The Globus Compute action provider, V3 (JSON ``args``/``kwargs``, ``endpoint_id`` in body)."""
WAIT_TIME_S = 3600
"""How long Flows waits on the action (a cold model start is minutes at most)."""

_SAMPLING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "sampling parameters (fabric.protocol.SamplingParams); {} for the defaults",
    "properties": {
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "seed": {"type": "integer"},
    },
}


def _check_site(site: SiteConfig, function: str) -> tuple[str, str]:
    """The site's endpoint id and the registered id of ``function``, or why a flow cannot use
    this site."""
    if not site.endpoint_id:
        raise InvalidSiteConfig(f"site {site.name!r} has no endpoint_id: a flow needs the "
                                "endpoint its operator published")
    function_id = site.function_ids.get(function)
    if not function_id:
        raise InvalidSiteConfig(f"site {site.name!r} has no registered id for {function} "
                                "(function_ids): its operator runs `fabric site "
                                "register-functions`")
    if site.policy is not None and site.policy.identity != "asserted":
        raise InvalidSiteConfig(
            f"site {site.name!r} wants a token with every call (policy.identity: token); a "
            "flow would have to carry it in its stored input. Flows need a site that trusts "
            "the identity Globus Compute asserts (policy.identity: asserted)")
    if site.policy is not None and site.policy.has_group_rules:
        raise InvalidSiteConfig(
            f"site {site.name!r} has group rules, which need a token with the call; a flow "
            "carries none (use identity or domain rules for flow users)")
    return str(site.endpoint_id), function_id


def _user_config_schema(site: SiteConfig) -> dict[str, Any]:
    from fabric.endpoint_files import user_config_schema

    schema = user_config_schema(site)
    schema.pop("$schema", None)
    return schema


def _action(endpoint_id: str, function_id: str, kwargs: dict[str, Any], result: str
            ) -> dict[str, Any]:
    return {
        "Type": "Action",
        "ActionUrl": ACTION_URL,
        "Parameters": {
            "endpoint_id": endpoint_id,
            "user_endpoint_config.$": "$.user_endpoint_config",
            "tasks": [{"function_id": function_id, "kwargs": kwargs}],
        },
        "ResultPath": f"$.{result}",
        "WaitTime": WAIT_TIME_S,
        "ExceptionOnActionFailure": True,
        "End": True,
    }


def request_flow(site: SiteConfig, model: str, kind: str = "generate"
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(definition, input schema)`` of a flow that runs one ``kind`` request for ``model``
    at ``site``; its result is at ``$.RunRequest.details.result[0]``."""
    if kind not in ("generate", "embed"):
        raise InvalidRequest(f"a request flow runs generate or embed, not {kind!r}")
    endpoint_id, function_id = _check_site(site, "run_request")
    request = {"model": model, "kind": kind, "prompt.$": "$.prompt",
               "sampling.$": "$.sampling"}
    definition = {
        "Comment": f"One fabric {kind} request for {model} at site {site.name} (tpm-fabric)",
        "StartAt": "RunRequest",
        "States": {"RunRequest": _action(endpoint_id, function_id, {"request": request},
                                         "RunRequest")},
    }
    schema = {
        "type": "object",
        "required": ["prompt", "sampling", "user_endpoint_config"],
        "additionalProperties": False,
        "properties": {
            "prompt": {"type": "string", "minLength": 1},
            "sampling": copy.deepcopy(_SAMPLING_SCHEMA),
            "user_endpoint_config": _user_config_schema(site),
        },
    }
    return definition, schema


def shard_flow(site: SiteConfig, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(definition, input schema)`` of a flow that runs one campaign shard for ``model`` at
    ``site`` (``run_shard``: one output or error per item, audited per campaign)."""
    endpoint_id, function_id = _check_site(site, "run_shard")
    shard = {"model": model, "shard_id.$": "$.shard_id", "campaign.$": "$.campaign",
             "items.$": "$.items", "audit": True}
    definition = {
        "Comment": f"One fabric campaign shard for {model} at site {site.name} (tpm-fabric)",
        "StartAt": "RunShard",
        "States": {"RunShard": _action(endpoint_id, function_id, {"shard": shard},
                                       "RunShard")},
    }
    item = {"type": "object", "required": ["custom_id", "request"],
            "additionalProperties": False,
            "properties": {"custom_id": {"type": "string", "minLength": 1},
                           "request": {"type": "object", "description": "an InferenceRequest "
                                       "without model (fabric.protocol)"}}}
    schema = {
        "type": "object",
        "required": ["shard_id", "campaign", "items", "user_endpoint_config"],
        "additionalProperties": False,
        "properties": {
            "shard_id": {"type": "string", "minLength": 1},
            "campaign": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"},
            "items": {"type": "array", "minItems": 1, "items": item},
            "user_endpoint_config": _user_config_schema(site),
        },
    }
    return definition, schema


def check_input(schema: dict[str, Any], flow_input: dict[str, Any], what: str) -> None:
    """Refuse ``flow_input`` unless it matches the flow's input ``schema``, as Flows would
    when the run starts (``InvalidRequest`` naming the first field that does not, and why)."""
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(flow_input),
                    key=lambda e: [str(part) for part in e.absolute_path])
    if errors:
        where = "/".join(str(part) for part in errors[0].absolute_path) or "(the input)"
        raise InvalidRequest(f"{what}: {where}: {errors[0].message} (the flow's input schema "
                             f"refuses it; {len(errors)} problem(s) in all)", field=where)


def campaign_timer(flow_id: str, flow_input: dict[str, Any], *, name: str,
                   interval_s: int, start: str | None = None, stop_after_runs: int | None = None
                   ) -> dict[str, Any]:
    """The Globus Timers body that starts the shard flow ``flow_id`` with ``flow_input`` every
    ``interval_s`` seconds (``globus_sdk.FlowTimer``, as ``globus timer create flow`` sends)."""
    import globus_sdk

    if interval_s < 60:
        raise InvalidRequest("a campaign timer runs at most once a minute (interval >= 60 s)")
    extra: dict[str, Any] = {}
    if start is not None:
        extra["start"] = start
    if stop_after_runs:
        extra["end"] = {"condition": "iterations", "iterations": stop_after_runs}
    schedule = globus_sdk.RecurringTimerSchedule(interval_seconds=interval_s, **extra)
    timer = globus_sdk.FlowTimer(flow_id=flow_id, name=name, schedule=schedule,
                                 body={"body": flow_input})
    return {"timer": _plain(dict(timer))}


def _plain(value: Any) -> Any:
    """A payload object as plain JSON data (the SDK's payload classes are dict subclasses,
    with a MISSING sentinel for fields left out)."""
    import globus_sdk

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not globus_sdk.MISSING}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def resolve(parameters: Any, document: dict[str, Any]) -> Any:
    """``parameters`` as Flows evaluates them against ``document`` (the run's state): a key
    ending in ``.$`` takes the value at its simple JSONPath (``$.a.b``), at any depth. A path
    that is not there is ``InvalidRequest`` (Flows fails the run the same way)."""
    if isinstance(parameters, list):
        return [resolve(p, document) for p in parameters]
    if not isinstance(parameters, dict):
        return parameters
    out = {}
    for key, value in parameters.items():
        if key.endswith(".$"):
            out[key[:-2]] = _path(document, value)
        else:
            out[key] = resolve(value, document)
    return out


def _path(document: dict[str, Any], path: str) -> Any:
    if not path.startswith("$"):
        raise InvalidRequest(f"{path!r} is not a JSONPath")
    value: Any = document
    for part in [p for p in path[1:].split(".") if p]:
        if not isinstance(value, dict) or part not in value:
            raise InvalidRequest(f"the flow input has no {path}")
        value = value[part]
    return value


def action_body(definition: dict[str, Any], flow_input: dict[str, Any]) -> dict[str, Any]:
    """The body the first action state sends its action provider for ``flow_input``."""
    state = definition["States"][definition["StartAt"]]
    return dict(resolve(state["Parameters"], flow_input))
