"""Globus Compute's task/result messages, through a real ``GlobusComputeEngine`` (Parsl HTEX)."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Task
from globus_compute_sdk.serialize import ComputeSerializer

from fabric.errors import (
    EndpointError,
    FabricError,
    Overloaded,
    ResultTooLarge,
    UnknownModel,
    UserFunctionError,
)
from fabric.wire import gcwire

REPO_ROOT = Path(__file__).resolve().parents[1]


# Module-level so that the default code serializer ships them by reference (as the SDK ships
# the fabric's endpoint functions).
def add(a: int, b: int = 0) -> int:
    return a + b


def raise_value_error() -> None:
    raise ValueError("the user's own bug")


def typed_error_envelope() -> dict[str, Any]:
    return gcwire.error(Overloaded("queue full", retry_after=2.5))


def huge_result() -> bytes:
    return b"x" * (11 * 1024 * 1024)


def test_task_buffer_is_what_the_sdk_sends() -> None:
    """Three buffers (function, args, kwargs), exactly as the endpoint unpacks them."""
    task_id, packed = gcwire.pack_task(add, (1,), {"b": 2})
    task = messagepack.unpack(packed)
    assert isinstance(task, Task) and task.task_id == task_id
    fn, args, kwargs = ComputeSerializer().unpack_and_deserialize(task.task_buffer)
    assert fn is add and args == (1,) and kwargs == {"b": 2}
    # The function part is the same bytes Client.register_function would upload.
    serde = ComputeSerializer()
    assert task.task_buffer.startswith(serde.pack_buffers([serde.serialize(add)]))


def test_fabric_functions_packed_once_are_the_same_bytes() -> None:
    """The cached function buffer of an endpoint function is what packing it afresh gives."""
    from fabric.endpoint.functions import run_user_function

    serde = ComputeSerializer()
    fresh = serde.pack_buffers([serde.serialize(run_user_function)])
    for _ in range(2):  # the second call comes from the cache
        _, packed = gcwire.pack_task(run_user_function, (add,), {})
        task = messagepack.unpack(packed)
        assert task.task_buffer.startswith(fresh)
        fn, args, _ = serde.unpack_and_deserialize(task.task_buffer)
        assert fn is run_user_function and args == (add,)
    assert not gcwire._by_reference(add)  # a test module's function is packed each time
    assert not gcwire._by_reference(lambda: None)


def test_plain_data_travels_as_json_and_the_rest_pickled() -> None:
    """The fabric's functions' arguments are JSON (nothing to unpickle at the site); values
    JSON would not give back exactly stay pickled, so nobody's arguments change."""
    from fabric.wire import functions

    serde = ComputeSerializer()
    request = {"model": "m", "prompt": "hi", "sampling": {"max_tokens": 4, "stop": ["a"]},
               "temperature": 0.5, "seed": None, "logprobs": True}
    _, packed = gcwire.pack_task(functions.run_request, (request, None), {})
    buffers = serde.unpack_buffers(messagepack.unpack(packed).task_buffer)
    assert [b[:3] for b in buffers] == ["01\n", gcwire.JSON_DATA, gcwire.JSON_DATA]
    assert serde.deserialize(buffers[1]) == [request, None]
    assert gcwire.admission_refusal(packed, user_functions=True) is None
    for not_plain in ({1: "int key"}, [(1, 2)], b"bytes", {"x": {1, 2}}, Overloaded("x")):
        assert not gcwire.is_plain_data(not_plain)
        _, packed = gcwire.pack_task(functions.run_request, (not_plain,), {})
        args = serde.unpack_buffers(messagepack.unpack(packed).task_buffer)[1]
        assert args.startswith("00\n")  # DillDataBase64: the value comes back as it was...
        assert serde.deserialize(args)[0] == not_plain or isinstance(not_plain, Overloaded)
        # ...and a site refuses it
        assert gcwire.admission_refusal(packed, user_functions=True) is not None


def test_admission_refusal_reads_no_pickle() -> None:
    from fabric.errors import AccessDenied, FunctionNotAllowed
    from fabric.wire import functions

    dill_args = ComputeSerializer()  # a hand-made client: the SDK's old default, pickled data
    _, packed = gcwire.pack_task(functions.list_models, (None,), {}, serializer=dill_args)
    refusal = gcwire.admission_refusal(packed, user_functions=True)
    assert isinstance(refusal, AccessDenied) and refusal.details["function"] == "list_models"
    # The refusal travels as a Result the caller reads as the same typed error.
    task_id = uuid.uuid4()
    with pytest.raises(AccessDenied, match="plain JSON data"):
        gcwire.unpack_result(gcwire.pack_refusal(task_id, refusal))
    # User functions take code: run where the site allows them, refused unread where not.
    from fabric.wire.usercode import pack_call

    call = pack_call(add, (1,), {})
    for fn, args in ((functions.run_user_function, (call, None, None)), (add, (1,))):
        _, packed = gcwire.pack_task(fn, args, {})
        assert gcwire.admission_refusal(packed, user_functions=True) is None
        refusal = gcwire.admission_refusal(packed, user_functions=False)
        assert isinstance(refusal, FunctionNotAllowed)
        assert refusal.details["rule"] == "allow_user_functions"
    _, packed = gcwire.pack_task(functions.list_models, (None,), {})
    assert gcwire.admission_refusal(packed, user_functions=False) is None
    # Garbage is the engine's to answer.
    assert gcwire.admission_refusal(b"\x01not json", user_functions=False) is None


def test_unwrap_envelopes() -> None:
    assert gcwire.unwrap(gcwire.ok({"x": 1})) == {"x": 1}
    # Values that look like envelopes come back as themselves, not as what they look like.
    for tricky in ({gcwire.OK: 1}, {gcwire.ERROR: {"type": "Overloaded", "message": "x"}}):
        assert gcwire.unwrap(gcwire.ok(tricky)) == tricky
    assert gcwire.unwrap({"plain": "dict"}) == {"plain": "dict"}
    with pytest.raises(UnknownModel) as info:
        gcwire.unwrap(gcwire.error(UnknownModel("no such model", available=["a", "b"])))
    assert info.value.details["available"] == ["a", "b"]


def test_unpack_rejects_other_messages() -> None:
    _, packed = gcwire.pack_task(add, (1,))
    with pytest.raises(EndpointError):
        gcwire.unpack_result(packed)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A standalone GlobusComputeEngine with local HTEX workers (as the site runs it)."""
    from globus_compute_endpoint.engines import GlobusComputeEngine
    from parsl.providers import LocalProvider

    old_path, old_pp = os.environ["PATH"], os.environ.get("PYTHONPATH")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{old_path}"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), old_pp) if p)
    eng = GlobusComputeEngine(
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
        max_workers_per_node=1, address="127.0.0.1",
        job_status_kwargs={"strategy_period": 0.5, "max_idletime": 600.0},
    )
    eng.start(endpoint_id=uuid.uuid4(), run_dir=str(tmp_path_factory.mktemp("gce")))
    try:
        yield eng
    finally:
        eng.shutdown()
        os.environ["PATH"] = old_path
        if old_pp is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_pp


def run(engine: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
    from globus_compute_endpoint.engines.base import GCFuture

    task_id, packed = gcwire.pack_task(fn, args, kwargs)
    fut = GCFuture(task_id)
    engine.submit(fut, packed, resource_specification={})
    return gcwire.unpack_result(fut.result(timeout=180))


@pytest.mark.slow  # a Parsl GlobusComputeEngine (~6 s)
def test_round_trip_through_engine(engine: Any) -> None:
    assert run(engine, add, 2, b=40) == 42
    assert run(engine, os.getpid) != os.getpid()  # really ran in a worker process


def test_remote_fabric_error_is_reraised_typed(engine: Any) -> None:
    with pytest.raises(Overloaded) as info:
        run(engine, typed_error_envelope)
    assert info.value.details["retry_after"] == 2.5
    assert info.value.retryable


def test_user_exception_comes_back_with_traceback(engine: Any) -> None:
    with pytest.raises(UserFunctionError) as info:
        run(engine, raise_value_error)
    assert "the user's own bug" in info.value.message
    assert "raise_value_error" in info.value.details["traceback"]
    assert isinstance(info.value, FabricError)


def test_oversized_result_is_typed(engine: Any) -> None:
    with pytest.raises(ResultTooLarge):
        run(engine, huge_result)


RETRY_HELPS = {
    "Overloaded": "the server or site is full now; it drains",
    "DeadlineExceeded": "the site or server was slow this time",
    "ModelServerUnavailable": "the server is restarting or moving; the next request relaunches it",
    "DeploymentError": "a launch failed; the next request launches again",
    "RendezvousTimeout": "a multi-node start missed its peers; the next start may not",
    "EndpointError": "the site was unreachable; it may be back, or another site serves",
    "QuotaExceeded": "the quota refills (details['retry_after'])",
}
"""The errors a retry can help, and why: every other kind is the caller's request, identity or
code, or a limit of the site or model that the same call meets again."""


def test_which_errors_a_retry_can_help_survives_the_wire() -> None:
    from fabric.errors import _REGISTRY, FabricError

    for name, cls in _REGISTRY.items():
        err = FabricError.from_dict(cls("x").to_dict())
        assert type(err) is cls
        assert err.retryable == (name in RETRY_HELPS), name
