"""GlobusTransport over the stand-in web service: real ComputeSerializer, real Task/Result
messages, a real GlobusComputeEngine (Parsl HTEX workers) on the far side.

Why the stand-in here, not the real pair (``tests/test_globus_real.py``): these tests need what
only an in-process service exposes or varies per test (the exact bytes registered, every batch
size, an engine per ``allowed_serializers`` variant, ``allowed_functions`` changed on the fly,
the ids cached across two client "processes"), and they run on machines without RabbitMQ. The
behaviours a caller sees (generate, stream, embed, user functions, policy and allow-list
refusals, batching, campaigns) run through the real Executor and endpoint daemon there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric.endpoint.functions import deployment_status, run_user_function
from fabric.errors import AccessDenied, FunctionNotAllowed, UserFunctionError
from fabric.globus.standin import StandinExecutor, StandinService
from fabric.globus.transport import GlobusTransport
from fabric.sites import load_site
from tests.plugins.site import write_site

POLICY_CLIENT = "0b6e5c4a-0f5c-4e5b-9f0d-0000000000ec"


# Functions shipped by Globus Compute's code serializer (CombinedCode: by reference or by
# source); they import what they need inside, as functions sent to a remote site must.
def add(a: int, b: int = 0) -> int:
    return a + b


def echo_auth(x: int, auth: Any = None) -> Any:
    return {"x": x, "auth": auth}


def fails(msg: str) -> None:
    raise ValueError(msg)


def typed_denial(model: str) -> Any:
    from fabric.errors import QuotaExceeded
    from fabric.wire.gcwire import error

    return error(QuotaExceeded(f"no more {model}", rule="policy.models.m.requests_per_minute",
                               retry_after=12.5))


@pytest.fixture(scope="module")
def remote_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A remote-style site: policy on, user functions off."""
    return write_site(tmp_path_factory.mktemp("remote"), name="remote-test",
                      allow_user_functions=False,
                      policy={"client_id": POLICY_CLIENT, "models": {"m": {"anyone": True}}})


@pytest.fixture(scope="module")
def service(remote_site: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[StandinService]:
    svc = StandinService(tmp_path_factory.mktemp("engine"), workers=2, env={
        "FABRIC_SITE": str(remote_site), "FABRIC_STATE_DIR": str(remote_site / "state")})
    svc.start()
    yield svc
    svc.shutdown()


def transport(service: StandinService, home: Path, proof: Any = None,
              site: Path | None = None, **kw: Any) -> GlobusTransport:
    cfg = load_site(site) if site else load_site("local")
    return GlobusTransport(cfg, StandinExecutor(service, **kw), proof=lambda: proof, home=home)


@pytest.mark.slow  # ~6 s of round trips
def test_plain_round_trip_and_registration_cache(service: StandinService,
                                                 tmp_path: Path) -> None:
    t = transport(service, tmp_path)
    assert t.can_reach_servers is False
    assert t.submit(add, 2, b=40).result(timeout=60) == 42
    registered = len(service.functions)
    t.close()
    # A new client process (new transport + executor) reuses the id cached by code hash.
    t2 = transport(service, tmp_path)
    assert t2.submit(add, 1, 1).result(timeout=60) == 2
    assert len(service.functions) == registered
    t2.close()


def test_typed_error_round_trip(service: StandinService, tmp_path: Path) -> None:
    t = transport(service, tmp_path)
    with pytest.raises(AccessDenied) as err:  # QuotaExceeded is an AccessDenied
        t.submit(typed_denial, "m").result(timeout=60)
    assert type(err.value).__name__ == "QuotaExceeded"
    assert err.value.details == {"rule": "policy.models.m.requests_per_minute",
                                 "retry_after": 12.5}
    with pytest.raises(UserFunctionError, match="remote function raised: ValueError: boom") as e:
        t.submit(fails, "boom").result(timeout=60)
    assert "Traceback" in e.value.details["traceback"]
    t.close()


def test_identity_proof_is_attached(service: StandinService, tmp_path: Path) -> None:
    proof = {"scheme": "globus", "token": "T", "site": "x"}
    t = transport(service, tmp_path, proof=proof)
    assert t.submit(echo_auth, 1).result(timeout=60) == {"x": 1, "auth": proof}
    mine = {"scheme": "globus", "token": "MINE"}
    assert t.submit(echo_auth, 2, mine).result(timeout=60)["auth"] == mine
    t.close()


def test_batching(service: StandinService, tmp_path: Path) -> None:
    t = transport(service, tmp_path, batch_size=8)
    t.submit(add, 0).result(timeout=60)  # registration out of the way
    before = len(service.batches)
    futures = [t.submit(add, i, 1) for i in range(20)]
    assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(20)]
    sizes = service.batches[before:]
    assert sum(sizes) == 20 and max(sizes) <= 8 and len(sizes) < 20
    t.close()


def test_recover_results_after_restart(service: StandinService, tmp_path: Path) -> None:
    t = transport(service, tmp_path)
    values = [t.submit(add, i, 100).result(timeout=60) for i in range(3)]
    t.close()
    group = (tmp_path / "task_groups.json").read_text()
    assert "local" in group
    again = transport(service, tmp_path)  # a new client: task group read back from disk
    recovered = again.recover()
    assert sorted(f.result(timeout=60) for f in recovered) == sorted(values)
    again.close()


def test_endpoint_function_policy_denial(service: StandinService, remote_site: Path,
                                         tmp_path: Path) -> None:
    """The real endpoint function, in a real worker, runs the site's policy."""
    t = transport(service, tmp_path, proof=None, site=remote_site)
    with pytest.raises(AccessDenied) as err:
        t.submit(deployment_status, "m", None, None, None).result(timeout=120)
    assert err.value.details == {"rule": "identity-proof.missing"}
    t.close()


def test_wire_references_ship_as_the_real_functions(service: StandinService, remote_site: Path,
                                                   tmp_path: Path) -> None:
    """What the SDK sends (``fabric.wire.functions``) registers as the real endpoint function,
    byte for byte, through the executor's own serializer, and the worker runs the real one."""
    from globus_compute_sdk.serialize import ComputeSerializer

    from fabric.wire import functions

    t = transport(service, tmp_path / "fresh", proof=None, site=remote_site)
    function_id = t.function_id(functions.deployment_status)
    serde = ComputeSerializer()
    assert service.functions[function_id] == serde.pack_buffers(
        [serde.serialize(deployment_status)])
    assert t.function_id(deployment_status) == function_id  # same bytes, same cached id
    with pytest.raises(AccessDenied) as err:
        t.submit(functions.deployment_status, "m", None, None, None).result(timeout=120)
    assert err.value.details == {"rule": "identity-proof.missing"}
    t.close()


class CreatesFile:
    """Unpickling this creates a file: what a hostile pickled argument could do, harmlessly."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_an_endpoint_that_unpickles_no_data(remote_site: Path, tmp_path: Path) -> None:
    """An endpoint with the shipped remote sites' ``allowed_serializers`` (DillCode for the
    registered functions, JSONData for arguments) runs the fabric's functions as the SDK sends
    them, and refuses a pickled argument before unpickling it."""
    from fabric.endpoint_files import allowed_serializers
    from fabric.wire import functions, gcwire

    site = load_site(remote_site)
    svc = StandinService(tmp_path / "engine", workers=1, env={
        "FABRIC_SITE": str(remote_site), "FABRIC_STATE_DIR": str(remote_site / "state")},
        allowed_serializers=allowed_serializers(site))
    svc.start()
    t = GlobusTransport(site, StandinExecutor(svc, serializer=gcwire.data_serializer()),
                        proof=lambda: None, home=tmp_path)
    try:
        with pytest.raises(AccessDenied) as err:  # the real function ran, and its policy
            t.submit(functions.deployment_status, "m", None, None, None).result(timeout=120)
        assert err.value.details == {"rule": "identity-proof.missing"}
        marker = tmp_path / "unpickled"
        with pytest.raises(AccessDenied) as err:
            t.submit(functions.run_user_function, CreatesFile(str(marker)), None,
                     None).result(timeout=120)
        assert err.value.details == {"rule": "allowed_serializers"}
        assert not marker.exists()
    finally:
        t.close()
        svc.shutdown()


def test_user_functions_refused_when_not_opted_in(service: StandinService, remote_site: Path,
                                                  tmp_path: Path) -> None:
    from fabric.wire.usercode import pack_call

    ns: dict[str, Any] = {"__name__": "__main__"}  # pickled by value, as from a notebook
    exec("def double(handle, x):\n    return 2 * x\n", ns)
    t = transport(service, tmp_path, site=remote_site)
    with pytest.raises(FunctionNotAllowed) as err:
        t.submit(run_user_function, pack_call(ns["double"], (2,), {}), None,
                 None).result(timeout=120)
    assert err.value.details["rule"] == "allow_user_functions"
    t.close()


def test_allowed_functions_enforced_by_the_service(service: StandinService,
                                                   tmp_path: Path) -> None:
    t = transport(service, tmp_path)
    allowed_id = t.function_id(add)
    service.allowed_functions = {allowed_id}
    try:
        assert t.submit(add, 1, 2).result(timeout=60) == 3
        with pytest.raises(FunctionNotAllowed) as err:
            t.submit(echo_auth, 1).result(timeout=60)
        assert err.value.details["rule"] == "allowed_functions"
    finally:
        service.allowed_functions = None
        t.close()


def test_operator_function_ids_are_used(service: StandinService, remote_site: Path,
                                        tmp_path: Path) -> None:
    cfg = load_site(remote_site).model_copy(update={"function_ids": {"deployment_status": "X"}})
    t = GlobusTransport(cfg, StandinExecutor(service), proof=lambda: None, home=tmp_path)
    assert t.function_id(deployment_status) == "X"
    t.close()


@pytest.mark.slow
def test_stream_by_long_poll_through_the_standin(tmp_path_factory: pytest.TempPathFactory,
                                                 tiny_llama_dir: Path, tmp_path: Path) -> None:
    """fab.generate and fab.stream over the stand-in: the real endpoint functions launch a real
    model server (tiny Llama) and the stream arrives by poll_requests tasks, cursor by cursor."""
    from fabric import Fabric
    from fabric.endpoint.functions import list_deployments, undeploy
    from tests.plugins.site import TINY_MODEL

    folder = write_site(tmp_path_factory.mktemp("tiny-remote"), name="tiny-remote",
                        model_dir=tiny_llama_dir)
    svc = StandinService(tmp_path / "engine", workers=2, env={
        "FABRIC_SITE": str(folder), "FABRIC_STATE_DIR": str(folder / "state")})
    svc.start()
    t = GlobusTransport(load_site(folder), StandinExecutor(svc), proof=lambda: None,
                        home=tmp_path)
    try:
        with Fabric(site="tiny-remote", transport=t, on_status=None) as fab:
            try:
                expected = fab.generate("The mitochondria is", model=TINY_MODEL, max_tokens=12)
                before = len(svc.batches)
                with fab.stream("The mitochondria is", model=TINY_MODEL,
                                max_tokens=12) as stream:
                    chunks = list(stream)
                assert "".join(chunks) == expected.text
                assert stream.token_ids == expected.token_ids
                assert len(svc.batches) - before >= 2  # open_stream, then polls
            finally:
                for dep in t.submit(list_deployments, None).result(timeout=60):
                    t.submit(undeploy, dep["id"], None).result(timeout=120)
    finally:
        svc.shutdown()


def test_register_functions_for_the_allow_list(tmp_path: Path) -> None:
    from fabric.globus.transport import register_functions
    from fabric.wire import functions

    svc = StandinService(tmp_path)  # registration needs no engine
    ex = StandinExecutor(svc)
    ids = register_functions(load_site("local"), ex)
    assert {"run_request", "open_stream", "poll_requests", "cancel_request",
            "run_user_function", "list_models"} <= set(ids)
    assert set(ids) == functions.NAMES  # run_shard included
    assert set(ids.values()) == set(svc.functions)
    ex.shutdown()


def test_real_executor_is_wired_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a stand-in the transport builds globus_compute_sdk's own Executor (no network
    until something is submitted): endpoint id from the site, task group from disk."""
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
        no_id.submit(add, 1).result()
