"""What a site does per admission to check its warm server, on a real Slurm and on the local
provider: the admission's fast path (``refresh(quick=True)``: the server's files and one health
ping) vs the full check every admission made before (``refresh``: also the batch scheduler,
through Parsl's provider and ``fabric.endpoint.schedulers``).

    python benchmarks/admission.py            # needs root (the namespace Slurm cluster)
    python benchmarks/admission.py --quick    # fewer checks

The tiny random Llama is deployed as a site deploys it (``DeploymentManager.ensure``): a Slurm
job on the namespace cluster (``fabric.testing.netns_cluster``), and a local job through
``LocalProvider``. Then the two checks alternate ``--checks`` times each; per check: its time
and the scheduler commands it ran (``squeue``/``sacct``/``ps``, counted at ``subprocess``).
Prints one JSON object; the cluster is torn down whatever happens. This measures the component,
not a user's call: a request's admission makes one such check per model per task.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
from campaign_throughput import LOCAL_JOBS, write_site
from common import log, median, ratio

from fabric.testing import netns_cluster

SCHEDULER_COMMANDS = ("squeue", "sacct", "qstat", "ps")


def _manager(folder: Path, tiny: Path, jobs: dict[str, Any], server: dict[str, Any]) -> Any:
    """A deployment manager for a site serving the tiny model, its servers launched by
    ``jobs``."""
    from fabric.endpoint.deployments import DeploymentManager
    from fabric.sites import load_site

    write_site(folder, "tiny-llama", tiny, workers=1, threads=1, server=server, jobs=jobs)
    site = load_site(str(folder))
    return DeploymentManager(site, site.resolved_state_dir())


class Counted:
    """Counts the scheduler commands run through ``subprocess`` (Parsl's providers run theirs
    through ``subprocess.Popen``, ``fabric.endpoint.schedulers`` through ``subprocess.run``)."""

    def __init__(self) -> None:
        self.commands = 0
        self._popen_init = subprocess.Popen.__init__

    def __enter__(self) -> Counted:
        counted, real = self, self._popen_init

        def init(popen: Any, args: Any, *rest: Any, **kw: Any) -> None:
            text = args if isinstance(args, str) else " ".join(map(str, args))
            if any(name in text.split()[:3] or f"/{name}" in text for name in SCHEDULER_COMMANDS):
                counted.commands += 1
            real(popen, args, *rest, **kw)

        subprocess.Popen.__init__ = init  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.Popen.__init__ = self._popen_init  # type: ignore[method-assign]


def compare(mgr: Any, dep: Any, checks: int) -> dict[str, Any]:
    """The two checks of ``dep`` alternating: times (ms) and scheduler commands per check."""
    ways: dict[str, Callable[[], Any]] = {"fast_path": lambda: mgr.refresh(dep, quick=True),
                                          "full": lambda: mgr.refresh(dep)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    commands: dict[str, int] = dict.fromkeys(ways, 0)
    for _ in range(checks):
        for name, check in ways.items():
            with Counted() as counted:
                t0 = time.perf_counter()
                state = check().state
                times[name].append((time.perf_counter() - t0) * 1000)
            commands[name] += counted.commands
            assert state == "ready", f"{name}: the server is {state}"
    return {name: {"ms": common.summary(v, digits=2),
                   "scheduler_commands_per_check": round(commands[name] / checks, 2)}
            for name, v in times.items()} | {
        "fast_over_full": ratio(median(times["fast_path"]), median(times["full"]))}


def main() -> None:
    """Deploy on each provider, compare the checks, print the JSON."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--checks", type=int, default=40, help="checks of each kind per provider")
    args = p.parse_args()
    if args.quick:
        args.checks = 5
    from fabric.catalog import Catalog
    from fabric.testing.tiny import build_tiny_llama

    out: dict[str, Any] = {"benchmark": "admission", "environment": common.environment(),
                           "checks": args.checks}
    with tempfile.TemporaryDirectory(prefix="fabric-admission-") as tmp:
        tiny = build_tiny_llama(Path(tmp) / "tiny")
        cluster = netns_cluster.start(Path(tmp) / "cluster")
        os.environ["SLURM_CONF"] = str(cluster.conf)
        sites = {
            "slurm": ({"provider": {"type": "SlurmProvider", "partition": "debug",
                                    "exclusive": False, "cmd_timeout": 30},
                       "launcher": {"type": "SrunLauncher"}, "walltime": "00:30:00"},
                      {"network": {"advertise": netns_cluster.SUBNET}}),
            "local": (LOCAL_JOBS, {}),
        }
        try:
            for name, (jobs, server) in sites.items():
                mgr = _manager(Path(tmp) / name, tiny, jobs, server)
                entry = Catalog().with_entries(mgr.site.extra_models).get("tiny-llama")
                dep = mgr.ensure(entry, wait_s=600)
                log(f"{name}: {dep.id} ready at {dep.address}")
                try:
                    out[name] = compare(mgr, dep, args.checks)
                finally:
                    mgr.undeploy(dep.id)
        finally:
            netns_cluster.stop(cluster)
    common.emit(out)


if __name__ == "__main__":
    main()
