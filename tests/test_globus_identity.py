"""Identity without a stored token, through both real ends of Globus Compute.

A multi-user ``globus-compute-endpoint`` (root, with an identity mapping; the
``globus_asserted`` fixture) is told by the service's start command who submitted; it maps that
identity to a local account and renders the site's template with
``_GC.mapped_identity.globus.id``, which the template exports to the request workers; the
site's policy (``identity: asserted``) trusts it. No token is a task argument, so none is in
what the (fake) cloud stores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fabric.errors import AccessDenied
from fabric.testing import compute_fake
from fabric.wire import functions
from tests.plugins.globus_offline import OfflineGlobus
from tests.plugins.site import TINY_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.globus]


def _stored_payloads(service: compute_fake.FakeComputeService, since: int) -> list[str]:
    return [payload for body in service.submissions[since:]
            for payloads in body.get("tasks", {}).values() for payload in payloads]


def _usage(state_dir: Path, scratch: Path, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The site's usage report (the worker writes rows in the background). Read from a copy:
    the database belongs to the mapped account, and a reader as root could leave it files
    (the WAL index) that account cannot open."""
    import shutil

    from fabric.endpoint import usage

    deadline = time.monotonic() + timeout_s
    while True:
        rows: list[dict[str, Any]] = []
        if (state_dir / "usage.sqlite").exists():
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            for file in state_dir.glob("usage.sqlite*"):
                if not file.name.endswith("-shm"):
                    shutil.copy(file, scratch / file.name)
            rows = usage.report(scratch, 3600.0)
        if (rows and all(r["tokens"] for r in rows)) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_a_call_without_a_token_is_the_asserted_identitys(globus_asserted: OfflineGlobus,
                                                          tmp_path: Path) -> None:
    from globus_compute_sdk.serialize import ComputeSerializer

    from fabric import Fabric

    service = globus_asserted.service
    since = len(service.submissions)
    t = globus_asserted.transport(tmp_path, proof="site")  # the transport decides: no token
    assert t.identity_proof() is None
    with Fabric(site=str(globus_asserted.site_dir), transport=t, on_status=None) as fab:
        try:
            done = fab.generate("The mitochondria is", model=TINY_MODEL, max_tokens=4)
            assert len(done.token_ids) == 4
        finally:
            for dep in t.submit(functions.list_deployments, None, None).result(timeout=120):
                t.submit(functions.undeploy, dep["id"], None).result(timeout=120)
    # The service named the submitter; the endpoint mapped it and rendered the template.
    starts = [c for c in service.start_commands
              if c["kwargs"]["amqp_creds"]["endpoint_id"] in
              {u for (e, _, _), u in service.user_endpoints.items()
               if e == globus_asserted.endpoint_id}]
    assert {c["globus_effective_identity"] for c in starts} >= {compute_fake.IDENTITY}
    # Attributed to that identity's username (Auth's record of the asserted id).
    rows = _usage(globus_asserted.site_dir / "state", tmp_path / "usage-copy")
    assert [(r["identity"], r["model"]) for r in rows] == [(compute_fake.USERNAME, TINY_MODEL)]
    assert rows[0]["requests"] >= 1 and rows[0]["tokens"] > 0
    # What the cloud stored: the tasks' arguments carry no token at all.
    payloads = _stored_payloads(service, since)
    assert payloads
    for payload in payloads:
        # The fake's bearer tokens all start "fake-"; "max_tokens" is a sampling field.
        assert "fake-" not in payload and "access_token" not in payload
        ser = ComputeSerializer()  # a submitted task is its packed (args, kwargs)
        args, kwargs = (ser.deserialize(b) for b in ser.unpack_buffers(payload))
        assert kwargs.get("auth") is None and all(not isinstance(a, dict) or "token" not in a
                                                  for a in args)


def test_another_asserted_identity_is_denied(globus_asserted: OfflineGlobus,
                                             tmp_path: Path) -> None:
    """Another submitter gets a user endpoint of its own, started for its identity; the
    policy denies it by that identity, with no token from either caller."""
    t = globus_asserted.transport(tmp_path, proof="site",
                                  as_identity=compute_fake.OTHER_IDENTITY)
    try:
        with pytest.raises(AccessDenied) as err:
            t.submit(functions.deployment_status, TINY_MODEL, None, None,
                     None).result(timeout=300)
    finally:
        t.close()
    assert err.value.details["identity"] == compute_fake.OTHER_USERNAME
    assert err.value.details["rule"] == f"policy.models.{TINY_MODEL}"
    others = [key for key in globus_asserted.service.user_endpoints
              if key[0] == globus_asserted.endpoint_id and key[1] == compute_fake.OTHER_IDENTITY]
    assert others, "the service started a user endpoint for the other identity"
