"""Several independent local sites side by side, for federation tests and the failover benchmark.

``LocalFederation`` writes one site definition per site (its own name, state dir, Unix socket
and model-server launcher, all inside one temp folder), starts each site process exactly as
``fabric endpoint start`` does, can warm a model server at each, and ``kill`` one the way a
site dies (the site process, its Parsl interchange and worker pool, and its model servers: all
SIGKILLed at once). ``close`` stops everything that is left, even after a failure.

The sites serve a tiny random Llama (``fabric.testing.tiny``) as ``tiny-llama``, so a whole
federation starts in seconds on a laptop.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TINY_MODEL", "LocalFederation", "MemberSite", "write_tiny_site"]

TINY_MODEL = "tiny-llama"


def write_tiny_site(folder: Path, name: str, model_dir: Path, *, workers: int = 4,
                    idle_timeout_s: float = 600.0, kv_budget_tokens: int = 4096) -> Path:
    """``folder/fabric.yaml``: a local site ``name`` serving ``model_dir`` as ``tiny-llama``
    (state dir ``folder/state``); returns ``folder``."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "name": name, "description": f"federation member {name}",
        "state_dir": str(folder / "state"), "max_request_workers": workers,
        "allow_user_functions": True,
        "jobs": {"provider": {"type": "LocalProvider", "init_blocks": 0, "min_blocks": 0,
                              "max_blocks": 1},
                 "launcher": {"type": "SingleNodeLauncher"}, "walltime": "01:00:00"},
        "server": {"idle_timeout_s": idle_timeout_s, "ready_timeout_s": 300,
                   "kv_budget_tokens": kv_budget_tokens, "threads_per_rank": 1},
        "models": [{"name": TINY_MODEL, "plan": {"pp": 1, "tp": 1}}],
        "extra_models": [{
            "name": TINY_MODEL, "version": "test", "family": "causal-lm",
            "source": {"kind": "path", "path": str(model_dir)},
            "description": "tiny random Llama", "params": 100_000}],
    }
    (folder / "fabric.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


@dataclass
class MemberSite:
    """One running member site."""

    name: str
    folder: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        """The site's state folder."""
        return self.folder / "state"

    @property
    def ref(self) -> str:
        """What ``Fabric(sites=[...])`` takes for it: the definition folder."""
        return str(self.folder)


class LocalFederation:
    """``n`` local sites named ``<prefix>-0`` ... in ``root`` (see the module docstring)."""

    def __init__(self, root: Path, model_dir: Path, n: int = 3, *, prefix: str = "fed",
                 workers: int = 4) -> None:
        self.root = Path(root)
        self.sites = [MemberSite(f"{prefix}-{i}", write_tiny_site(
            self.root / f"{prefix}-{i}", f"{prefix}-{i}", model_dir, workers=workers))
            for i in range(n)]
        self._orphans: list[Any] = []

    @property
    def refs(self) -> list[str]:
        """Every member's definition folder, in order."""
        return [s.ref for s in self.sites]

    def site(self, name: str) -> MemberSite:
        """The member called ``name``."""
        return next(s for s in self.sites if s.name == name)

    def start(self, timeout_s: float = 300.0) -> LocalFederation:
        """Start every site process (in parallel); returns self."""
        from fabric.client.local import start_site

        def one(site: MemberSite) -> None:
            site.info = start_site(site.ref, site.state_dir, timeout_s=timeout_s)

        with ThreadPoolExecutor(len(self.sites)) as pool:
            list(pool.map(one, self.sites))
        return self

    def warm(self, model: str = TINY_MODEL, timeout_s: float = 300.0) -> None:
        """A ready server of ``model`` at every site (deployed in parallel)."""
        from fabric.sdk import Fabric

        def one(site: MemberSite) -> None:
            with Fabric(site.ref, on_status=None) as fab:
                fab.deploy(model, timeout=timeout_s)

        with ThreadPoolExecutor(len(self.sites)) as pool:
            list(pool.map(one, self.sites))

    def kill(self, name: str) -> list[int]:
        """SIGKILL site ``name`` whole, as a lost node would: the site process, its engine
        (interchange, worker pool and workers) and its model servers. Returns the pids."""
        import psutil

        site = self.site(name)
        procs: list[Any] = []
        # By command line, not by remembered pid (a pid may be reused once its process ended):
        # the site process and its engine name the state dir; model servers are engine servers.
        servers = set(self.server_pids(name))
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if str(site.state_dir) in cmd or (proc.info["pid"] in servers
                                              and "fabric.engine" in cmd):
                with contextlib.suppress(psutil.Error):
                    procs.extend([proc, *proc.children(recursive=True)])
        killed = []
        for proc in {p.pid: p for p in procs}.values():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)
        return killed

    def server_pids(self, name: str) -> list[int]:
        """Pids of the model servers site ``name`` launched (from their info files)."""
        from fabric.endpoint.state import StateDB

        pids = []
        for dep in StateDB(self.site(name).state_dir).query():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                pids.append(int(json.loads(Path(dep.info_path).read_text())["pid"]))
        return pids

    def close(self) -> None:
        """Stop every site still running with its model servers; kill what will not stop."""
        from fabric.client.local import read_info, stop_site

        def one(site: MemberSite) -> None:
            if read_info(site.state_dir) is not None:
                with contextlib.suppress(Exception):
                    stop_site(site.ref, site.state_dir, all=True, timeout_s=60)
            # What a stop (or a kill) left behind: model servers, a detached worker pool.
            if site.info:
                with contextlib.suppress(Exception):
                    self.kill(site.name)

        with ThreadPoolExecutor(len(self.sites)) as pool:
            list(pool.map(one, self.sites))

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until_dead(pids: list[int], timeout_s: float = 10.0) -> bool:
    """True once none of ``pids`` runs (zombies count as dead)."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        if not alive:
            return True
        time.sleep(0.05)
    return not pids or os.name != "posix"
