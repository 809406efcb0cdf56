"""Offline Globus Compute with both real ends: the real ``globus_compute_sdk.Executor`` (inside
``GlobusTransport``) and the real ``globus-compute-endpoint start`` daemon, joined by a real
RabbitMQ broker and ``fabric.testing.compute_fake`` (the web service and Globus Auth).

``globus_offline`` (session scope) starts them once (~15-25 s):

1. the broker (``fabric.testing.rabbitmq``), then the fake on 127.0.0.1:5000;
2. the operator's steps, as the docs give them: ``fabric site register-functions``'s
   ``register_functions`` (the fabric's endpoint functions, through a real Executor), the ids
   pasted into the site's ``function_ids``, then ``fabric site check SITE --write DIR``, run as
   the CLI, renders ``config.yaml`` (allowed_functions = those ids),
   ``user_config_template.yaml.j2`` and ``user_config_schema.json`` from the local site's
   template; ``globus-compute-endpoint start`` runs from that directory;
3. the endpoint id it registered goes into the site's ``endpoint_id``, as its operator publishes.

The site serves the tiny random Llama with a policy: the fake's identity may use it; everyone
else, and every other model, is denied. Marked tests need RabbitMQ; under ``CI=true`` a missing
broker fails them instead of skipping (as the Slurm tests do).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabric.sites import ENDPOINTS_DIR
from fabric.testing import compute_fake, gc_endpoint, rabbitmq
from tests.plugins.site import REPO_ROOT, TINY_MODEL, write_site

POLICY_CLIENT = "0b6e5c4a-0f5c-4e5b-9f0d-00000000c11e"
SITE_NAME = "gc-offline"
EMAIL = "ops@example.org"


@dataclass
class OfflineGlobus:
    """What the session fixture started, and what it measured (seconds)."""

    service: compute_fake.FakeComputeService
    site_dir: Path
    endpoint_id: str
    function_ids: dict[str, str]
    gc_dir: Path
    timings: dict[str, float] = field(default_factory=dict)

    def client(self) -> Any:
        """A ``globus_compute_sdk.Client`` for the fake (no login: a null authorizer)."""
        import globus_sdk
        from globus_compute_sdk import Client

        return Client(local_compute_services=True, authorizer=globus_sdk.NullAuthorizer(),
                      do_version_check=False)

    def transport(self, home: Path, *, proof: Any = "default", **kw: Any) -> Any:
        """A ``GlobusTransport`` for the site with a real Executor built by the transport.
        ``proof``: the ``auth`` each call carries (default: a token the fake issued)."""
        from fabric.globus.transport import GlobusTransport
        from fabric.sites import load_site

        auth = {"scheme": "globus", "token": "fake-caller-token"} if proof == "default" \
            else proof
        return GlobusTransport(load_site(self.site_dir), client=self.client(),
                               proof=lambda: auth, home=home, **kw)


def _require_broker() -> None:
    if rabbitmq.installed():
        return
    message = ("RabbitMQ is not installed (tests/globus_offline/install.sh, as root: "
               "apt-get install rabbitmq-server)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; under CI=true the offline Globus tests must run")
    pytest.skip(message)


def _register(client: Any) -> dict[str, str]:
    """The operator's ``fabric site register-functions``: the fabric's functions' ids."""
    from globus_compute_sdk import Executor

    from fabric.globus.transport import register_functions
    from fabric.sites import load_site

    executor = Executor(client=client)
    try:
        return register_functions(load_site("local"), executor)
    finally:
        executor.shutdown(wait=False)


def _write_site(folder: Path, model_dir: Path, function_ids: dict[str, str]) -> Path:
    write_site(folder, name=SITE_NAME, model_dir=model_dir, allow_user_functions=True,
               function_ids=function_ids,
               template=yaml.safe_load((ENDPOINTS_DIR / "local" / "fabric.yaml").read_text())
               ["template"],
               policy={"client_id": POLICY_CLIENT, "default": {"anyone": False},
                       "models": {TINY_MODEL: {"identities": [compute_fake.USERNAME]}},
                       # The operator: its tests deploy and undeploy (admin operations).
                       "admins": {"identities": [compute_fake.USERNAME]}})
    for name in ("config.yaml", "user_config_template.yaml.j2"):
        shutil.copy(ENDPOINTS_DIR / "local" / name, folder / name)
    return folder


def _set_endpoint_id(site_dir: Path, endpoint_id: str) -> None:
    data = yaml.safe_load((site_dir / "fabric.yaml").read_text())
    data["endpoint_id"] = endpoint_id
    (site_dir / "fabric.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="session")
def globus_offline(tmp_path_factory: pytest.TempPathFactory,
                   tiny_llama_dir: Path) -> Iterator[OfflineGlobus]:
    """Broker + fake service + the real endpoint daemon for a rendered site (see module)."""
    _require_broker()
    root = tmp_path_factory.mktemp("globus-offline")
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    broker = rabbitmq.RabbitBroker(root / "broker").start()
    timings["broker_start_s"] = broker.started_s
    service = compute_fake.FakeComputeService(broker.url)
    daemon: gc_endpoint.EndpointDaemon | None = None
    try:
        service.start()
        probe = OfflineGlobus(service, root, "", {}, root)
        ids = _register(probe.client())
        site = _write_site(root / "site", tiny_llama_dir, ids)
        gc_dir = root / "gc"
        ep_dir = gc_dir / SITE_NAME
        run = subprocess.run(
            [sys.executable, "-m", "fabric.cli.main", "site", "check", str(site),
             "--set", f"contact_email={EMAIL}", "--write", str(ep_dir)],
            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
        assert run.returncode == 0, run.stdout + run.stderr
        marker = gc_endpoint.prepare_endpoint_dir(
            ep_dir, {"FABRIC_ENDPOINT_CLIENT_SECRET": "fake-endpoint-secret"})
        daemon = gc_endpoint.EndpointDaemon(gc_dir, SITE_NAME, marker)
        t1 = time.monotonic()
        endpoint_id = daemon.start(lambda: next(iter(service.endpoints), None))
        timings["endpoint_register_s"] = time.monotonic() - t1
        _set_endpoint_id(site, endpoint_id)
        timings["setup_total_s"] = time.monotonic() - t0
        yield OfflineGlobus(service, site, endpoint_id, ids, gc_dir, timings)
    finally:
        try:  # each stop runs even if one before it fails: nothing may outlive the session
            if daemon is not None:
                daemon.stop()
        finally:
            try:
                service.stop()
            finally:
                broker.stop()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "globus: runs through the real Globus Compute Executor and endpoint daemon "
        "(RabbitMQ + the local fake service); under CI=true a missing broker fails them")
