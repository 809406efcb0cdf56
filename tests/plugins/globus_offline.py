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

import contextlib
import json
import os
import shutil
import stat
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

    def client(self, as_identity: str | None = None) -> Any:
        """A ``globus_compute_sdk.Client`` for the fake (no login: a null authorizer, which the
        fake takes as ``compute_fake.IDENTITY``; ``as_identity``: submit as that identity)."""
        import globus_sdk
        from globus_compute_sdk import Client

        authorizer = globus_sdk.NullAuthorizer() if as_identity is None else \
            globus_sdk.AccessTokenAuthorizer(compute_fake.bearer_for(as_identity))
        return Client(local_compute_services=True, authorizer=authorizer,
                      do_version_check=False)

    def transport(self, home: Path, *, proof: Any = "default", as_identity: str | None = None,
                  **kw: Any) -> Any:
        """A ``GlobusTransport`` for the site with a real Executor built by the transport.
        ``proof``: the ``auth`` each call carries (default: a token the fake issued; ``"site"``:
        what the transport itself sends for the site's policy)."""
        from fabric.globus.transport import GlobusTransport
        from fabric.sites import load_site

        auth = {"scheme": "globus", "token": "fake-caller-token"} if proof == "default" \
            else proof
        return GlobusTransport(load_site(self.site_dir), client=self.client(as_identity),
                               proof=None if proof == "site" else (lambda: auth), home=home,
                               **kw)


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


def _write_site(folder: Path, model_dir: Path, function_ids: dict[str, str], *,
                name: str = SITE_NAME, identity: str = "token") -> Path:
    write_site(folder, name=name, model_dir=model_dir, allow_user_functions=True,
               function_ids=function_ids,
               template=yaml.safe_load((ENDPOINTS_DIR / "local" / "fabric.yaml").read_text())
               ["template"],
               policy={"client_id": POLICY_CLIENT, "default": {"anyone": False},
                       "identity": identity,
                       "models": {TINY_MODEL: {"identities": [compute_fake.USERNAME]}},
                       # The operator: its tests deploy and undeploy (admin operations).
                       "admins": {"identities": [compute_fake.USERNAME]}})
    for file in ("config.yaml", "user_config_template.yaml.j2"):
        shutil.copy(ENDPOINTS_DIR / "local" / file, folder / file)
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


ASSERTED_SITE = "gc-asserted"
MAPPED_USER = "nobody"
"""The local account the asserted-identity endpoint maps every fake identity to: a
multi-user endpoint refuses to run user endpoints as its own (root) account."""


def identity_mapping(*identities: str, user: str = MAPPED_USER) -> list[dict[str, Any]]:
    """A Globus Compute identity mapping (``identity_mapping_config_path``): each listed
    Globus identity id runs as ``user``."""
    return [{"DATA_TYPE": "expression_identity_mapping#1.0.0",
             "mappings": [{"source": "{id}", "match": i, "output": user} for i in identities]}]


def _give(path: Path, uid: int, gid: int) -> None:
    for sub in [path, *path.rglob("*")]:
        os.chown(sub, uid, gid)


@contextlib.contextmanager
def _traversable(*paths: str) -> Iterator[None]:
    """Let other accounts traverse (x, never read) the folders above ``paths`` while the
    block runs, then put the modes back: a CI image keeps its Python under /root (0700),
    which the mapped account must pass through to exec the interpreter."""
    changed: dict[Path, int] = {}
    try:
        for path in paths:
            for folder in reversed(Path(path).parents):
                mode = folder.stat().st_mode
                if folder not in changed and not mode & stat.S_IXOTH:
                    changed[folder] = stat.S_IMODE(mode)
                    os.chmod(folder, stat.S_IMODE(mode) | stat.S_IXOTH)
        yield
    finally:
        for folder, mode in changed.items():
            os.chmod(folder, mode)


@pytest.fixture(scope="session")
def mapped_account() -> Iterator[Any]:
    """The local account the multi-user endpoint maps identities to, once it is known that a
    user endpoint can start as it: the endpoint drops every capability and execs
    ``globus-compute-endpoint`` as that account, so the account must be able to run this
    environment's interpreter (``_traversable`` opens the folders above it for the session)."""
    import pwd

    if os.geteuid() != 0:
        pytest.skip("a multi-user endpoint with an identity mapping needs root")
    user = pwd.getpwnam(MAPPED_USER)
    exe = Path(sys.executable).parent / "globus-compute-endpoint"
    with _traversable(os.path.realpath(sys.executable), str(exe)):
        try:
            run = subprocess.run([str(exe), "version"], user=user.pw_uid, group=user.pw_gid,
                                 extra_groups=[], capture_output=True, text=True, timeout=120,
                                 cwd="/")
            reason = None if run.returncode == 0 else run.stderr.strip()[-300:]
        except OSError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            pytest.fail(f"account {MAPPED_USER!r} cannot run {exe} (its interpreter is "
                        f"{os.path.realpath(sys.executable)}): {reason}; a multi-user "
                        "endpoint's user endpoints run as the mapped account")
        yield user


@pytest.fixture(scope="session")
def globus_asserted(mapped_account: Any, globus_offline: OfflineGlobus, tiny_llama_dir: Path
                    ) -> Iterator[OfflineGlobus]:
    """A second, multi-user endpoint on the same broker and fake: run as root with an identity
    mapping (both fake identities -> ``nobody``), so each submitter gets a user endpoint of its
    own and the template receives ``_GC.mapped_identity``; its site's policy has ``identity:
    asserted`` (no token travels). Its files live in a world-readable folder, as a
    multi-user endpoint's must: the user endpoints run as the mapped account."""
    import tempfile

    user = mapped_account
    root = Path(tempfile.mkdtemp(prefix="fabric-gc-mu-"))
    service = globus_offline.service
    daemon: gc_endpoint.EndpointDaemon | None = None
    try:
        shutil.copytree(tiny_llama_dir, root / "model")
        site = _write_site(root / "site", root / "model", globus_offline.function_ids,
                           name=ASSERTED_SITE, identity="asserted")
        home = root / "uep-home"
        for folder in (home, site / "state"):
            folder.mkdir(parents=True, exist_ok=True)
        gc_dir = root / "gc"
        ep_dir = gc_dir / ASSERTED_SITE
        run = subprocess.run(
            [sys.executable, "-m", "fabric.cli.main", "site", "check", str(site),
             "--set", f"contact_email={EMAIL}", "--write", str(ep_dir)],
            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
        assert run.returncode == 0, run.stdout + run.stderr
        mapping = gc_dir / "identity_mapping.json"
        mapping.write_text(json.dumps(identity_mapping(
            compute_fake.IDENTITY, compute_fake.OTHER_IDENTITY)))
        config = yaml.safe_load((ep_dir / "config.yaml").read_text())
        config["identity_mapping_config_path"] = str(mapping)
        (ep_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        marker = gc_endpoint.prepare_endpoint_dir(ep_dir, {
            "FABRIC_ENDPOINT_CLIENT_SECRET": "fake-endpoint-secret", "HOME": str(home),
            "CWD": str(home),  # the user endpoint's working directory (the account's own)
            "GLOBUS_COMPUTE_USER_DIR": str(home / ".globus_compute")})
        subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
        _give(home, user.pw_uid, user.pw_gid)
        for owned in (site / "state", root / "model"):  # the model keeps a weights manifest
            _give(owned, user.pw_uid, user.pw_gid)
        before = set(service.endpoints)
        daemon = gc_endpoint.EndpointDaemon(gc_dir, ASSERTED_SITE, marker)
        endpoint_id = daemon.start(
            lambda: next((e for e in list(service.endpoints) if e not in before), None))
        _set_endpoint_id(site, endpoint_id)
        yield OfflineGlobus(service, site, endpoint_id, globus_offline.function_ids, gc_dir,
                            globus_offline.timings)
    finally:
        try:
            if daemon is not None:
                daemon.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "globus: runs through the real Globus Compute Executor and endpoint daemon "
        "(RabbitMQ + the local fake service); under CI=true a missing broker fails them")
