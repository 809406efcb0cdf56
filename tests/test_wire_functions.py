"""The SDK names the fabric's endpoint functions (``fabric.wire.functions``) without importing
the endpoint; a reference ships as exactly the bytes of the real function."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from globus_compute_common import messagepack
from globus_compute_sdk.serialize import ComputeSerializer

from fabric.wire import functions, gcwire

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("ref", functions.FABRIC_FUNCTIONS, ids=lambda r: r.name)
def test_each_reference_resolves_to_the_real_function(ref: functions.EndpointFunction) -> None:
    real = ref.resolve()
    assert callable(real) and real.__name__ == ref.name and real.__module__ == ref.module
    assert functions.reference(real) is ref
    # Same parameters, so a transport fills in ``auth`` at the same place.
    assert list(inspect.signature(ref).parameters) == list(inspect.signature(real).parameters)


@pytest.mark.parametrize("ref", functions.FABRIC_FUNCTIONS, ids=lambda r: r.name)
def test_a_reference_serialises_as_the_real_function(ref: functions.EndpointFunction) -> None:
    functions.install_reducer()
    serde = ComputeSerializer()
    assert serde.serialize(ref) == serde.serialize(ref.resolve())
    assert serde.deserialize(serde.serialize(ref)) is ref.resolve()
    # A packed task of the reference carries the real function's code buffer.
    _, packed = gcwire.pack_task(ref, ({"x": 1},), {})
    fn, args, _ = serde.unpack_and_deserialize(messagepack.unpack(packed).task_buffer)
    assert fn is ref.resolve() and list(args) == [{"x": 1}]


def test_one_list_of_the_fabric_functions() -> None:
    """The references a client ships name exactly the site's registry (which the policy's
    allow-list reads), once each."""
    from fabric.endpoint import registry

    assert set(registry.names()) == functions.NAMES
    assert len(functions.NAMES) == len(functions.FABRIC_FUNCTIONS)


def test_plain_pickle_of_a_reference_still_reaches_the_real_function() -> None:
    import pickle

    from fabric.endpoint.functions import run_request

    assert pickle.loads(pickle.dumps(functions.run_request)) is run_request


def test_the_client_packs_endpoint_calls_without_importing_the_endpoint() -> None:
    code = (
        "import sys\n"
        "from fabric import Fabric\n"
        "from fabric.client import local, streaming, fabric\n"
        "from fabric.wire import functions, gcwire\n"
        "for ref in functions.FABRIC_FUNCTIONS:\n"
        "    gcwire.pack_task(ref, (), {})\n"
        "Fabric\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('fabric.endpoint', "
        "'fabric.campaign', 'fabric.engine')))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
