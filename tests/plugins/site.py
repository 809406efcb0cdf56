"""A real local site for tests: its definition in a temp dir, and the site process itself.

``site_dir`` writes a site definition (``fabric.yaml``) serving the tiny random Llama as
``tiny-llama`` (a ``path`` catalog entry), with a short idle timeout and its state dir inside the
temp folder. ``local_site`` (session scope) starts the site process once, exactly as
``fabric endpoint start`` does, and stops it (and every model server it launched) at the end.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = "tiny-llama"
LONG_TOKENS = 480
"""As many tokens as the tiny model's context (512) allows after a short prompt."""


def wait_until(cond: Callable[[], Any], timeout_s: float, what: str,
               interval_s: float = 0.1) -> Any:
    """Poll ``cond`` until it returns something truthy (returned) or fail after ``timeout_s``
    saying what was awaited: a bounded wait on a condition instead of a fixed sleep."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}", pytrace=False)
        time.sleep(interval_s)


def server_pid(fab: Any, model: str = TINY_MODEL) -> int:
    """The pid of ``model``'s server (deployed first if it is not yet)."""
    fab.generate("Hello", model=model, max_tokens=1)
    found = [d for d in fab.deployments() if d["model"] == model and d.get("health")]
    assert found, f"no live {model} server"
    return int(found[0]["health"]["pid"])


def server_idle(fab: Any, timeout_s: float = 5.0) -> dict[str, Any]:
    """The tiny model's server health once nothing runs there (or the last seen)."""
    deadline = time.monotonic() + timeout_s
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        ready = [d for d in fab.deployments() if d["model"] == TINY_MODEL and d.get("health")]
        health = ready[0]["health"] if ready else {}
        if health and health["running"] == 0 and health["queue_depth"] == 0:
            break
        time.sleep(0.1)
    return health


def assert_stopped_early(fab: Any, tokens_before: int) -> None:
    """The server is idle, holds no KV memory, and made fewer than ``LONG_TOKENS`` tokens
    since ``tokens_before``: the cancelled request did not run to its end."""
    health = server_idle(fab)
    assert health["running"] == 0 and health["kv_used_tokens"] == 0
    assert health["tokens_total"] - tokens_before < LONG_TOKENS


def write_site(folder: Path, *, name: str = "test-local", model_dir: Path | None = None,
               idle_timeout_s: float = 120.0, workers: int = 2,
               allow_user_functions: bool = True, **extra: Any) -> Path:
    """Write ``folder/fabric.yaml`` (state dir ``folder/state``); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "name": name,
        "description": "temporary site for tests",
        "state_dir": str(folder / "state"),
        "max_request_workers": workers,
        "allow_user_functions": allow_user_functions,
        "jobs": {"provider": {"type": "LocalProvider", "init_blocks": 0, "min_blocks": 0,
                              "max_blocks": 1},
                 "launcher": {"type": "SingleNodeLauncher"}, "walltime": "01:00:00"},
        "server": {"idle_timeout_s": idle_timeout_s, "ready_timeout_s": 300,
                   "kv_budget_tokens": 4096, "threads_per_rank": 1},
        "models": [],
        "extra_models": [],
    }
    if model_dir is not None:
        data["models"] = [{"name": TINY_MODEL, "plan": {"pp": 1, "tp": 1}}]
        data["extra_models"] = [{
            "name": TINY_MODEL, "version": "test", "family": "causal-lm",
            "source": {"kind": "path", "path": str(model_dir)},
            "description": "tiny random Llama for tests", "params": 100_000,
        }]
    data.update(extra)
    (folder / "fabric.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


@pytest.fixture(scope="session")
def site_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A temp site definition serving ``tiny-llama``; its state dir is ``site_dir / "state"``."""
    return write_site(tmp_path_factory.mktemp("site"), model_dir=tiny_llama_dir)


@dataclass
class LocalSite:
    """A running site process started for the tests."""

    site_dir: Path
    state_dir: Path
    info: dict[str, Any]

    def transport(self) -> Any:
        """A new ``LocalTransport`` to this site (close it when done)."""
        from fabric.client.local import LocalTransport

        return LocalTransport(site=str(self.site_dir), state_dir=self.state_dir,
                              autostart=False)


@contextlib.contextmanager
def site_manager(folder: Path, model_dir: Path) -> Iterator[Any]:
    """A ``DeploymentManager`` for a site written at ``folder`` serving ``model_dir`` as the
    tiny model; every server it still runs is undeployed on the way out."""
    from fabric.endpoint.deployments import DeploymentManager
    from fabric.sites import load_site

    write_site(folder, model_dir=model_dir)
    mgr = DeploymentManager(load_site(folder), folder / "state")
    try:
        yield mgr
    finally:
        for dep in mgr.db.query(states=("queued", "loading", "ready", "draining")):
            mgr.undeploy(dep.id, drain_wait_s=5.0)


@contextlib.contextmanager
def repo_on_pythonpath() -> Iterator[None]:
    """The repository root on ``PYTHONPATH`` for processes started inside (a site, an
    endpoint daemon): functions defined in test modules travel by reference, so the workers
    and user-function processes they start must import ``tests.*`` whatever order the
    session's fixtures started in."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), old) if p)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="session")
def local_site(site_dir: Path) -> Iterator[LocalSite]:
    """The site process (started once per session, stopped with its model servers at the end).

    Functions defined in test modules are shipped by reference (Globus Compute's default code
    serializer), so the site's workers get the repository root on ``PYTHONPATH``.
    """
    from fabric.client.local import start_site, stop_site

    state_dir = site_dir / "state"
    with repo_on_pythonpath():
        info = start_site(str(site_dir), state_dir, timeout_s=300)
    try:
        yield LocalSite(site_dir, state_dir, info)
    finally:
        stop_site(str(site_dir), state_dir, all=True, timeout_s=60)


@pytest.fixture
def site_transport(local_site: LocalSite) -> Iterator[Any]:
    """A ``LocalTransport`` to the session's site, closed after the test."""
    transport = local_site.transport()
    try:
        yield transport
    finally:
        transport.close()


@pytest.fixture(scope="session")
def long_prompt(tiny_llama_dir: Path) -> str:
    """A prompt the tiny model (greedy) does not end early: its stream runs all of
    ``LONG_TOKENS``, so a test that cancels after the first token cancels a request that has
    hundreds of tokens to go. A prompt the model ends at EOS makes such a test prove nothing
    (the mitochondria prompt ends after 76 tokens: the cancel tests' "fewer than 480
    tokens" held without any cancel)."""
    from tests.plugins.servers import no_eos_prompts

    return no_eos_prompts(tiny_llama_dir, LONG_TOKENS)[0]
