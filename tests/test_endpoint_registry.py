"""The one registry of endpoint functions: every function is in it with how it is authorized,
and the policy's allow-list and the operator's registration are exactly the registry."""

from __future__ import annotations

import inspect
import pickle

import pytest

from fabric.endpoint import campaign_shard, functions, policy, registry
from fabric.errors import FunctionNotAllowed
from fabric.sites import SiteConfig
from tests.plugins.globus_offline import OfflineGlobus


def _endpoint_callables() -> dict[str, object]:
    """Every module-level function of the endpoint modules that the decorator wrapped."""
    out = {}
    for module in (functions, campaign_shard):
        for name, value in vars(module).items():
            if callable(value) and getattr(value, "__wrapped__", None) is not None \
                    and getattr(value, "__module__", "") == module.__name__:
                out[name] = value
    return out


def test_every_endpoint_function_is_registered_with_an_authorization_kind() -> None:
    found = registry.functions()
    assert set(found) == set(_endpoint_callables())
    assert {"run_request", "run_requests", "open_stream", "open_streams", "poll_requests",
            "cancel_request",
            "run_user_function", "deployment_status", "deploy", "undeploy",
            "list_deployments", "list_models", "run_shard"} == set(found)
    for name, entry in found.items():
        assert entry.auth in registry.AUTH_KINDS, name
        assert entry.module in registry.MODULES
        assert entry.fn is getattr(__import__(entry.module, fromlist=[name]), name)
    assert found["run_user_function"].auth == "user_function"
    assert {n for n, e in found.items() if e.auth == "listing"} == {"list_models",
                                                                   "list_deployments"}
    assert {n for n, e in found.items() if e.auth == "admin"} == {"deploy", "undeploy"}


def test_the_allow_list_is_the_registry() -> None:
    remote = SiteConfig.model_validate({"name": "r", "allow_user_functions": False})
    for name in registry.names():
        policy.check_function(remote, name)
    for name in ("os_system", "endpoint_function", "current", "jsonable", "_token_estimate"):
        with pytest.raises(FunctionNotAllowed):
            policy.check_function(remote, name)


def test_declaring_outside_the_endpoint_modules_is_refused() -> None:
    def stray() -> None: ...

    with pytest.raises(ValueError, match="wire contract"):
        registry.endpoint_function("model")(stray)
    with pytest.raises(ValueError, match="authorization kind"):
        registry.endpoint_function("anyone")  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.globus
def test_registration_registers_exactly_the_registry(globus_offline: OfflineGlobus) -> None:
    """The operator's ``register_functions`` (run by the offline pair's set-up through the real
    Executor, as ``fabric site register-functions`` runs it) registers every endpoint function
    and nothing else, each as a function the service now knows."""
    ids = globus_offline.function_ids
    assert set(ids) == set(registry.names())
    assert len(set(ids.values())) == len(ids)
    assert set(ids.values()) <= set(globus_offline.service.functions)


def test_the_wire_references_are_the_registry() -> None:
    """What a client ships (``fabric.wire.functions``) names exactly the registered functions,
    at the modules they live in, with their parameters, and each arrives at a worker as the real
    function (the campaign ships ``run_shard`` this way without importing the endpoint)."""
    from fabric.wire import functions as wire
    from fabric.wire.gcwire import default_serializer

    found = registry.functions()
    assert set(wire.NAMES) == set(found)
    serde = default_serializer()
    for ref in wire.FABRIC_FUNCTIONS:
        real = found[ref.name].fn
        assert (ref.module, ref.name) == (real.__module__, real.__name__)
        assert list(inspect.signature(ref).parameters) == \
            list(inspect.signature(real).parameters), ref.name
        assert serde.deserialize(serde.serialize(ref)) is real
        assert pickle.loads(pickle.dumps(ref)) is real
