"""Offline Globus Compute with both real ends: the real ``globus_compute_sdk.Executor`` (inside
``GlobusTransport``) and the real ``globus-compute-endpoint start`` daemon, joined by a real
RabbitMQ broker and ``fabric.testing.compute_fake`` (the web service and Globus Auth). The set-up
and tear-down are ``fabric.testing.globus_offline.offline_globus`` (the benchmark uses it too).

Session fixtures, each started only when a test asks for it:

- ``globus_offline`` (~15-25 s): the broker, the fake and an endpoint for a site that serves
  the tiny random Llama with a policy (the fake's identity may use it; everyone else, and every
  other model, is denied) and user functions on;
- ``globus_closed`` (a second daemon on the same broker and fake, ~1.5 s more, its first task
  ~5 s: a cold user endpoint): a site with user functions off, the same policy; like every
  site, its endpoint refuses pickled data (``allowed_serializers``);
- ``globus_asserted``: a multi-user endpoint (root, identity mapping) whose site trusts the
  identity Globus Compute asserts.

Marked tests need RabbitMQ; under ``CI=true`` a missing broker fails them instead of skipping
(as the Slurm tests do). Every test that uses one of these fixtures is slow (``SLOW_FIXTURES``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabric.sites import ENDPOINTS_DIR
from fabric.testing import compute_fake, rabbitmq
from fabric.testing.globus_offline import OfflineGlobus, offline_globus
from tests.plugins.site import TINY_MODEL, repo_on_pythonpath, write_site

__all__ = ["OfflineGlobus"]  # the tests' type for the fixtures' value

POLICY_CLIENT = "0b6e5c4a-0f5c-4e5b-9f0d-00000000c11e"
SITE_NAME = "gc-offline"
CLOSED_SITE = "gc-closed"


def _require_broker() -> None:
    if rabbitmq.installed():
        return
    message = ("RabbitMQ is not installed (tests/globus_offline/install.sh, as root: "
               "apt-get install rabbitmq-server)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; under CI=true the offline Globus tests must run")
    pytest.skip(message)


def write_globus_site(folder: Path, model_dir: Path, function_ids: dict[str, str], *,
                name: str = SITE_NAME, identity: str = "token",
                allow_user_functions: bool = True) -> Path:
    write_site(folder, name=name, model_dir=model_dir,
               allow_user_functions=allow_user_functions, function_ids=function_ids,
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


@pytest.fixture(scope="session")
def globus_offline(tmp_path_factory: pytest.TempPathFactory,
                   tiny_llama_dir: Path) -> Iterator[OfflineGlobus]:
    """Broker + fake service + the real endpoint daemon for a rendered site (see module)."""
    _require_broker()
    root = tmp_path_factory.mktemp("globus-offline")
    # For the session: this pair's daemon and the ones started on it later (closed, asserted)
    # run functions defined in test modules.
    with repo_on_pythonpath(), offline_globus(
            root, lambda ids: write_globus_site(root / "site", tiny_llama_dir, ids),
            name=SITE_NAME) as pair:
        yield pair


@pytest.fixture(scope="session")
def globus_closed(globus_offline: OfflineGlobus, tmp_path_factory: pytest.TempPathFactory,
                  tiny_llama_dir: Path) -> Iterator[OfflineGlobus]:
    """A second endpoint daemon on ``globus_offline``'s broker and fake, for a site with user
    functions off (``allow_user_functions: false``) and the same policy and model; its
    endpoint, as every site's, unpickles no caller data. Started by the first test that asks."""
    root = tmp_path_factory.mktemp("globus-closed")
    site = write_globus_site(root / "site", tiny_llama_dir, globus_offline.function_ids,
                       name=CLOSED_SITE, allow_user_functions=False)
    with globus_offline.endpoint(site, root / "gc", CLOSED_SITE) as closed:
        yield closed


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
    try:
        shutil.copytree(tiny_llama_dir, root / "model")
        site = write_globus_site(root / "site", root / "model", globus_offline.function_ids,
                           name=ASSERTED_SITE, identity="asserted")
        home = root / "uep-home"
        for folder in (home, site / "state"):
            folder.mkdir(parents=True, exist_ok=True)
        gc_dir = root / "gc"

        def map_identities(ep_dir: Path) -> None:
            mapping = gc_dir / "identity_mapping.json"
            mapping.write_text(json.dumps(identity_mapping(
                compute_fake.IDENTITY, compute_fake.OTHER_IDENTITY)))
            config = yaml.safe_load((ep_dir / "config.yaml").read_text())
            config["identity_mapping_config_path"] = str(mapping)
            (ep_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
            _give(home, user.pw_uid, user.pw_gid)
            for owned in (site / "state", root / "model"):  # the model keeps a manifest
                _give(owned, user.pw_uid, user.pw_gid)

        with globus_offline.endpoint(site, gc_dir, ASSERTED_SITE, edit=map_identities, extra_env={
                "HOME": str(home),
                "CWD": str(home),  # the user endpoint's working directory (the account's own)
                "GLOBUS_COMPUTE_USER_DIR": str(home / ".globus_compute")}) as asserted:
            yield asserted
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "globus: runs through the real Globus Compute Executor and endpoint daemon "
        "(RabbitMQ + the local fake service); under CI=true a missing broker fails them")
