"""GlobusTransport over both real ends of Globus Compute (``tests/plugins/globus_offline.py``):
its own ``globus_compute_sdk.Executor`` -> the local fake of the web service -> a real RabbitMQ
broker -> the real ``globus-compute-endpoint`` daemon and its user endpoint's engine.

What the transport itself does: registration by code hash and its cache across client
processes, what the service stores for a fabric function, the caller's identity proof and a
caller's own ``auth``, batching, typed errors from the site, and the refusals of a site with user
functions off (``globus_closed``), whose endpoint unpickles no caller data. The caller-level
behaviours (generate, stream, embed, policy and allow-list refusals, HTTP errors, task-group
recovery, campaigns) are in ``tests/test_globus_real.py``. Two tests need no service at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fabric.errors import AccessDenied, FunctionNotAllowed, QuotaExceeded, UserFunctionError
from fabric.globus.transport import GlobusTransport
from fabric.sites import load_site
from fabric.testing import compute_fake
from fabric.wire import functions
from tests.plugins.globus_offline import OfflineGlobus
from tests.plugins.site import TINY_MODEL


def by_hash(globus: OfflineGlobus, home: Path) -> GlobusTransport:
    """A transport to the pair's site that ignores the operator's ``function_ids``: it
    registers what it sends by code hash (cached in ``home``)."""
    site = load_site(globus.site_dir).model_copy(update={"function_ids": {}})
    return GlobusTransport(site, client=globus.client(), proof=lambda: None, home=home)


@pytest.mark.slow
@pytest.mark.globus
def test_registration_cache_and_what_the_service_stores(globus_offline: OfflineGlobus,
                                                        tmp_path: Path) -> None:
    """A fabric function sent by reference (``fabric.wire.functions``) registers as the real
    endpoint function: the service stores code that deserialises to it, the real function's
    bytes give the same (cached) id, and a new client process with the same home registers
    nothing again."""
    from fabric.endpoint.functions import deployment_status

    service = globus_offline.service
    t = by_hash(globus_offline, tmp_path)
    function_id = t.function_id(functions.deployment_status)
    assert function_id in service.functions
    assert function_id not in globus_offline.function_ids.values()  # registered just now
    serde = t.executor.serializer
    (code,) = serde.unpack_buffers(service.functions[function_id])
    assert serde.deserialize(code) is deployment_status
    registered = len(service.functions)
    assert t.function_id(deployment_status) == function_id  # same bytes, same cached id
    t.close()
    again = by_hash(globus_offline, tmp_path)  # a new client process, same FABRIC_HOME
    assert again.function_id(functions.deployment_status) == function_id
    assert len(service.functions) == registered
    again.close()


@pytest.mark.slow
@pytest.mark.globus
def test_the_rendered_allow_list_is_the_registered_functions(globus_offline: OfflineGlobus
                                                             ) -> None:
    """What the operator registered (``register_functions``) is every fabric function, and
    exactly those ids are the endpoint's ``allowed_functions`` as it registered with the
    service (rendered by ``fabric site check`` from the site's ``function_ids``)."""
    ids = globus_offline.function_ids
    assert set(ids) == functions.NAMES  # run_shard included
    assert set(ids.values()) <= set(globus_offline.service.functions)
    registered = globus_offline.service.endpoints[globus_offline.endpoint_id]
    assert set(registered["allowed_functions"]) == set(ids.values())


@pytest.mark.slow
@pytest.mark.globus
def test_identity_proof_is_attached_and_a_callers_own_auth_wins(globus_offline: OfflineGlobus,
                                                                tmp_path: Path) -> None:
    """The site's policy sees the proof the transport attaches; an ``auth`` the caller passes
    is sent instead (here: a token of an identity the policy does not list)."""
    t = globus_offline.transport(tmp_path)  # attaches a token of the fake's listed identity
    status = t.submit(functions.deployment_status, TINY_MODEL, None, None,
                      None).result(timeout=300)
    assert status["state"] in {"absent", "queued", "loading", "ready"}
    stranger = {"scheme": "globus",
                "token": compute_fake.bearer_for(compute_fake.OTHER_IDENTITY)}
    with pytest.raises(AccessDenied) as err:
        t.submit(functions.deployment_status, TINY_MODEL, None, None,
                 stranger).result(timeout=120)
    assert err.value.details["rule"].startswith("policy.")
    t.close()
    bare = globus_offline.transport(tmp_path / "bare", proof=None)  # attaches nothing
    mine = {"scheme": "globus", "token": "fake-caller-token"}
    assert "state" in bare.submit(functions.deployment_status, TINY_MODEL, None, None,
                                  mine).result(timeout=120)
    bare.close()


@pytest.mark.slow
@pytest.mark.globus
def test_batching_within_batch_size(globus_offline: OfflineGlobus, tmp_path: Path) -> None:
    """20 calls at once go out in fewer submissions than calls, none over ``batch_size``."""
    t = globus_offline.transport(tmp_path, batch_size=8)
    t.submit(functions.list_models, None).result(timeout=300)  # a warm user endpoint
    list_id = globus_offline.function_ids["list_models"]
    before = len(globus_offline.service.submissions)
    futures = [t.submit(functions.list_models, None) for _ in range(20)]
    assert all(TINY_MODEL in {m["name"] for m in f.result(timeout=120)} for f in futures)
    sizes = [len(s["tasks"].get(list_id, []))
             for s in globus_offline.service.submissions[before:]]
    sizes = [n for n in sizes if n]
    assert sum(sizes) == 20 and max(sizes) <= 8 and len(sizes) < 20, sizes
    t.close()


def quota(handle: Any, model: str) -> None:
    """A user function that raises a typed fabric error with details."""
    from fabric.errors import QuotaExceeded

    raise QuotaExceeded(f"no more {model}", rule="policy.models.m.requests_per_minute",
                        retry_after=12.5)


def fails(handle: Any, msg: str) -> None:
    raise ValueError(msg)


@pytest.mark.slow
@pytest.mark.globus
def test_typed_errors_round_trip(globus_offline: OfflineGlobus, tmp_path: Path) -> None:
    """A typed error raised at the site arrives as the same type with its details; any other
    exception as a ``UserFunctionError`` carrying the remote traceback."""
    from fabric import Fabric

    t = globus_offline.transport(tmp_path)
    with Fabric(site=str(globus_offline.site_dir), transport=t, on_status=None) as fab:
        with pytest.raises(AccessDenied) as err:  # QuotaExceeded is an AccessDenied
            fab.submit(quota, TINY_MODEL, model=TINY_MODEL).result(timeout=300)
        assert type(err.value) is QuotaExceeded
        assert err.value.details == {"rule": "policy.models.m.requests_per_minute",
                                     "retry_after": 12.5}
        with pytest.raises(UserFunctionError, match="ValueError: boom") as e:
            fab.submit(fails, "boom", model=TINY_MODEL).result(timeout=300)
        assert "Traceback" in e.value.details["traceback"]


class CreatesFile:
    """Unpickling this creates a file: what a hostile pickled argument could do, harmlessly."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.slow
@pytest.mark.globus
def test_an_endpoint_that_unpickles_no_data(globus_closed: OfflineGlobus, tmp_path: Path
                                            ) -> None:
    """The endpoint's ``allowed_serializers`` (DillCode for the registered functions, JSONData
    for arguments) runs the fabric's functions as the SDK sends them, and refuses a pickled
    argument before unpickling it."""
    t = globus_closed.transport(tmp_path, proof=None)
    try:
        with pytest.raises(AccessDenied) as err:  # the real function ran, and its policy
            t.submit(functions.deployment_status, TINY_MODEL, None, None,
                     None).result(timeout=300)
        assert err.value.details == {"rule": "identity-proof.missing"}
        marker = tmp_path / "unpickled"
        with pytest.raises(AccessDenied) as err:
            t.submit(functions.run_user_function, CreatesFile(str(marker)), None,
                     None).result(timeout=120)
        assert err.value.details == {"rule": "allowed_serializers"}
        assert not marker.exists()
    finally:
        t.close()


@pytest.mark.slow
@pytest.mark.globus
def test_user_functions_refused_when_not_opted_in(globus_closed: OfflineGlobus,
                                                  tmp_path: Path) -> None:
    from fabric.wire.usercode import pack_call

    ns: dict[str, Any] = {"__name__": "__main__"}  # pickled by value, as from a notebook
    exec("def double(handle, x):\n    return 2 * x\n", ns)
    t = globus_closed.transport(tmp_path)
    with pytest.raises(FunctionNotAllowed) as err:
        t.submit(functions.run_user_function, pack_call(ns["double"], (2,), {}), None,
                 None).result(timeout=300)
    assert err.value.details["rule"] == "allow_user_functions"
    t.close()


def test_operator_function_ids_are_used(tmp_path: Path) -> None:
    """An id the operator published is used as is: nothing is registered (no executor is
    even built, so no service is needed)."""
    from fabric.endpoint.functions import deployment_status

    cfg = load_site("local").model_copy(update={"function_ids": {"deployment_status": "X"}})
    t = GlobusTransport(cfg, proof=lambda: None, home=tmp_path)
    assert t.function_id(deployment_status) == "X"
    assert t.function_id(functions.deployment_status) == "X"
    assert t._executor is None
    t.close()


def test_real_executor_is_wired_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The transport builds globus_compute_sdk's own Executor (no network until something is
    submitted): endpoint id from the site, task group from disk."""
    from globus_compute_sdk import Executor

    from fabric.errors import EndpointError
    from fabric.globus import auth

    monkeypatch.setenv("FABRIC_HOME", str(tmp_path))
    monkeypatch.delenv("FABRIC_CLIENT_ID", raising=False)
    monkeypatch.delenv("FABRIC_CLIENT_SECRET", raising=False)
    group = "0b6e5c4a-0f5c-4e5b-9f0d-0000000000aa"
    (tmp_path / "task_groups.json").write_text(f'{{"remote": "{group}"}}')
    endpoint = "0b6e5c4a-0f5c-4e5b-9f0d-0000000000bb"
    site = load_site("local").model_copy(update={"name": "remote", "endpoint_id": endpoint})
    t = GlobusTransport(site, app=auth.make_app([site]), home=tmp_path)
    ex = t.executor
    try:
        assert isinstance(ex, Executor)
        assert str(ex.endpoint_id) == endpoint and str(ex.task_group_id) == group
        from fabric.wire import gcwire

        assert ex.serializer is gcwire.data_serializer()  # plain arguments travel as JSON
    finally:
        t.close()
    no_id = GlobusTransport(site.model_copy(update={"endpoint_id": None}), home=tmp_path)
    with pytest.raises(EndpointError, match="has no endpoint_id"):
        no_id.submit(functions.deployment_status, "m").result()
