"""Offline Globus Compute with both real ends, set up and torn down by one context manager.

``offline_globus(root, write_site)`` starts, in order, and stops in reverse even on failure:

1. a real RabbitMQ broker (``fabric.testing.rabbitmq``), then the fake web service and Globus
   Auth on 127.0.0.1:5000 (``fabric.testing.compute_fake``);
2. the operator's steps, as the docs give them: ``register_functions`` (what ``fabric site
   register-functions`` runs) through a real ``globus_compute_sdk.Executor``; ``write_site(ids)``
   writes the site definition with those ids as its ``function_ids``; ``fabric site check SITE
   --write DIR``, run as the CLI, renders ``config.yaml`` (``allowed_functions`` = those ids),
   ``user_config_template.yaml.j2`` and ``user_config_schema.json``;
3. the real ``globus-compute-endpoint start`` daemon from that directory
   (``fabric.testing.gc_endpoint``); the endpoint id it registered goes into the site's
   ``endpoint_id``, as its operator publishes it.

``OfflineGlobus.endpoint(...)`` starts one more daemon for another site on the same broker and
fake (a second daemon registers in ~1.5 s; the broker, the fake and the first daemon take
~10 s). The fake must own port 5000 (fixed by the SDK for ``local_compute_services``): one
set-up per machine at a time.
The pytest fixtures (``tests/plugins/globus_offline.py``) and ``benchmarks/globus_path.py`` use
this module.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fabric.testing import compute_fake, gc_endpoint, rabbitmq

REPO_ROOT = Path(__file__).resolve().parents[2]
EMAIL = "ops@example.org"
"""The contact email every rendered test endpoint gets (mandatory for a root endpoint)."""
ENDPOINT_SECRET = {"FABRIC_ENDPOINT_CLIENT_SECRET": "fake-endpoint-secret"}
"""The endpoint's confidential client secret (the site policy introspects tokens with it)."""


class SiteCheckFailed(gc_endpoint.EndpointFailed):
    """``fabric site check --write`` refused the site (its output says why)."""


def client(as_identity: str | None = None) -> Any:
    """A ``globus_compute_sdk.Client`` for the fake (no login: a null authorizer, which the
    fake takes as ``compute_fake.IDENTITY``; ``as_identity``: submit as that identity)."""
    import globus_sdk
    from globus_compute_sdk import Client

    authorizer = globus_sdk.NullAuthorizer() if as_identity is None else \
        globus_sdk.AccessTokenAuthorizer(compute_fake.bearer_for(as_identity))
    return Client(local_compute_services=True, authorizer=authorizer, do_version_check=False)


def register(site: str = "local") -> dict[str, str]:
    """The operator's ``fabric site register-functions``: the fabric's functions' ids."""
    from globus_compute_sdk import Executor

    from fabric.globus.transport import register_functions
    from fabric.sites import load_site

    executor = Executor(client=client())
    try:
        return register_functions(load_site(site), executor)
    finally:
        executor.shutdown(wait=False)


def set_endpoint_id(site_dir: Path, endpoint_id: str) -> None:
    """Publish ``endpoint_id`` in the site definition (``fabric.yaml``)."""
    data = yaml.safe_load((site_dir / "fabric.yaml").read_text())
    data["endpoint_id"] = endpoint_id
    (site_dir / "fabric.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def render(site_dir: Path, ep_dir: Path) -> None:
    """``fabric site check SITE --write EP_DIR``, run as the operator runs it (the CLI)."""
    run = subprocess.run(
        [sys.executable, "-m", "fabric.cli.main", "site", "check", str(site_dir),
         "--set", f"contact_email={EMAIL}", "--write", str(ep_dir)],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    if run.returncode:
        raise SiteCheckFailed(f"fabric site check {site_dir} failed:\n{run.stdout}{run.stderr}")


@dataclass
class OfflineGlobus:
    """A running broker + fake, and the first endpoint's site (what ``offline_globus`` yields).

    ``site_dir``/``endpoint_id``/``gc_dir`` name one endpoint; ``with_site`` gives the same
    cloud with another's. ``timings``: seconds each set-up step took."""

    service: compute_fake.FakeComputeService
    site_dir: Path
    endpoint_id: str
    function_ids: dict[str, str]
    gc_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    daemon: gc_endpoint.EndpointDaemon | None = None
    """The endpoint daemon serving ``site_dir`` (None: not started by this object)."""

    def client(self, as_identity: str | None = None) -> Any:
        """See the module-level ``client``."""
        return client(as_identity)

    def transport(self, home: Path, *, proof: Any = "default", as_identity: str | None = None,
                  **kw: Any) -> Any:
        """A ``GlobusTransport`` for the site with a real Executor built by the transport.
        ``proof``: the ``auth`` each call carries (default: a token the fake issued; ``None``:
        no proof; ``"site"``: what the transport itself sends for the site's policy)."""
        from fabric.globus.transport import GlobusTransport
        from fabric.sites import load_site

        auth = {"scheme": "globus", "token": "fake-caller-token"} if proof == "default" \
            else proof
        return GlobusTransport(load_site(self.site_dir), client=self.client(as_identity),
                               proof=None if proof == "site" else (lambda: auth), home=home,
                               **kw)

    def with_site(self, site_dir: Path, endpoint_id: str, gc_dir: Path,
                  daemon: gc_endpoint.EndpointDaemon | None = None) -> OfflineGlobus:
        """The same cloud, naming another endpoint's site (``daemon``: the one serving it)."""
        return OfflineGlobus(self.service, site_dir, endpoint_id, self.function_ids, gc_dir,
                             self.timings, daemon)

    @contextlib.contextmanager
    def endpoint(self, site_dir: Path, gc_dir: Path, name: str, *,
                 extra_env: dict[str, str] | None = None,
                 edit: Callable[[Path], None] | None = None) -> Iterator[OfflineGlobus]:
        """Render ``site_dir`` into ``gc_dir/name``, start ``globus-compute-endpoint start
        name`` on this broker and fake, publish its id in the site; yields this cloud with that
        site, stops the daemon (and every process it started) at exit. ``extra_env``: more of
        the user endpoints' environment; ``edit(ep_dir)``: change the rendered files (or anything
        else) before the daemon starts."""
        ep_dir = gc_dir / name
        render(site_dir, ep_dir)
        marker = gc_endpoint.prepare_endpoint_dir(ep_dir, {**ENDPOINT_SECRET,
                                                           **(extra_env or {})})
        if edit is not None:
            edit(ep_dir)
        before = set(self.service.endpoints)
        daemon = gc_endpoint.EndpointDaemon(gc_dir, name, marker)
        try:
            t0 = time.monotonic()
            endpoint_id = daemon.start(lambda: next(
                (e for e in list(self.service.endpoints) if e not in before), None))
            self.timings[f"endpoint_register_s.{name}"] = round(time.monotonic() - t0, 3)
            set_endpoint_id(site_dir, endpoint_id)
            yield self.with_site(site_dir, endpoint_id, gc_dir, daemon)
        finally:
            daemon.stop()


@contextlib.contextmanager
def offline_globus(root: Path, write_site: Callable[[dict[str, str]], Path], *,
                   name: str = "gc-offline") -> Iterator[OfflineGlobus]:
    """Broker, fake service and the real endpoint daemon for the site ``write_site(ids)``
    writes (``ids``: the registered function ids); yields the running set, stops everything
    at exit, each stop even if one before it failed. ``root``: a folder for the broker's and
    the endpoint's files; ``name``: the endpoint's name (``root/gc/name``)."""
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    broker = rabbitmq.RabbitBroker(root / "broker").start()
    timings["broker_start_s"] = round(broker.started_s, 3)
    service = compute_fake.FakeComputeService(broker.url)
    try:
        service.start()
        ids = register()
        site_dir = write_site(ids)
        cloud = OfflineGlobus(service, site_dir, "", ids, root / "gc", timings)
        with cloud.endpoint(site_dir, root / "gc", name) as pair:
            timings["setup_total_s"] = round(time.monotonic() - t0, 3)
            yield pair
    finally:
        try:
            service.stop()
        finally:
            broker.stop()
