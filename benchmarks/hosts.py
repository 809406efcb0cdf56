"""pp=2 across two hosts vs on one (issue 16), on the namespace Slurm cluster.

Builds ``fabric.testing.netns_cluster`` (login + two compute namespaces, a real Slurm; needs
root), then for the SmolLM2-135M pp=2 plan with ``nodes: 2`` (one stage per compute node, gloo
over ``hsn0``) and ``nodes: 1`` (both stages on one node), interleaved, ``--runs`` times:

1. deploy-to-ready: ``DeploymentManager.ensure`` from nothing (sbatch through Parsl's
   ``SlurmProvider``, srun, weights load, rendezvous, head's info file) until ready;
2. tokens/s for ``--prompts`` (32) concurrent greedy requests of ``--max-tokens`` each, on one
   connection from the host namespace (on the compute network, like a login node).

Both compute "nodes" share this machine's cores, so the across-nodes figure measures the
cost of the network hop and of Slurm placing two nodes, not the gain of more hardware.
Prints one JSON object; the cluster is torn down whatever happens.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import common
import serverjob
import yaml
from common import log, median, ratio

from fabric import tickets
from fabric.testing import netns_cluster


class _Served:
    """What ``serverjob.run_batch`` needs of a server: a ticket and a client."""

    def __init__(self, mgr: Any, dep: Any) -> None:
        self.mgr, self.dep = mgr, dep

    def ticket(self, ttl_s: float = 7200.0) -> str:
        return tickets.issue(self.mgr.ticket_key(), model=common.SMOLLM, ttl_s=ttl_s)

    def client(self, timeout_s: float = 120.0) -> Any:
        from fabric.serverclient import ServerClient

        return ServerClient(self.dep.address, self.dep.public_key, timeout_s=timeout_s)


def _site(folder: Path, nodes: int) -> Any:
    from fabric.endpoint.deployments import DeploymentManager
    from fabric.sites import load_site

    folder.mkdir(parents=True)
    data = {"name": f"hosts-bench-{nodes}", "state_dir": str(folder / "state"),
            "max_request_workers": 1,
            "jobs": {"provider": {"type": "SlurmProvider", "partition": "debug",
                                  "exclusive": False, "cmd_timeout": 30},
                     "launcher": {"type": "SrunLauncher"}, "walltime": "00:30:00"},
            "server": {"idle_timeout_s": 3600, "ready_timeout_s": 600,
                       "kv_budget_tokens": 16384, "max_running": 64, "threads_per_rank": 1,
                       "network": {"advertise": netns_cluster.SUBNET}},
            "models": [{"name": common.SMOLLM, "plan": {"pp": 2, "nodes": nodes}}]}
    (folder / "fabric.yaml").write_text(yaml.safe_dump(data))
    site = load_site(folder)
    return DeploymentManager(site, site.resolved_state_dir())


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    if args.quick:
        args.runs, args.max_tokens = 1, 8
    from fabric.catalog import Catalog
    from fabric.protocol import InferenceRequest

    common.weights()  # the converted SmolLM2 checkpoint exists before anything is timed
    entry = Catalog().get(common.SMOLLM)
    texts = [f"Question {i}: what do mitochondria do in a cell?" for i in range(args.prompts)]
    with tempfile.TemporaryDirectory(prefix="fabric-hosts-") as tmp:
        cluster = netns_cluster.start(Path(tmp) / "cluster")
        try:
            import os

            os.environ["SLURM_CONF"] = str(cluster.conf)
            deploy: dict[str, list[float]] = {"across": [], "one_node": []}
            tps: dict[str, list[float]] = {"across": [], "one_node": []}
            answers: dict[str, list[list[int]]] = {}
            for r in range(args.runs):
                for name, nodes in (("across", 2), ("one_node", 1)):
                    mgr = _site(Path(tmp) / f"site-{name}-{r}", nodes)
                    t0 = time.monotonic()
                    dep = mgr.ensure(entry, wait_s=600)
                    deploy[name].append(time.monotonic() - t0)
                    placed = cluster.slurm("squeue", "-h", "-j", str(dep.job_id),
                                           "-o", "%N").stdout.strip()
                    served = _Served(mgr, dep)
                    serverjob.run_batch(served, [InferenceRequest(
                        model=common.SMOLLM, prompt=t, sampling={"max_tokens": 4})
                        for t in texts[:4]])  # warm-up
                    reqs = [InferenceRequest(model=common.SMOLLM, prompt=t,
                                             sampling={"max_tokens": args.max_tokens})
                            for t in texts]
                    run = serverjob.run_batch(served, reqs)
                    tps[name].append(run["tokens_per_s"])
                    answers[name] = [run["results"][q.request_id]["token_ids"] for q in reqs]
                    log(f"run {r + 1} {name} on {placed}: ready in {deploy[name][-1]:.1f} s, "
                        f"{run['tokens_per_s']:.1f} tok/s")
                    mgr.undeploy(dep.id)
                    cluster.slurm("scancel", str(dep.job_id))
            common.emit({
                "benchmark": "hosts",
                "environment": common.environment(),
                "plan": {"model": common.SMOLLM, "pp": 2, "tp": 1},
                "runs": args.runs, "prompts": args.prompts, "max_tokens": args.max_tokens,
                "deploy_to_ready_s": {k: {"median": round(median(v), 2), "runs": v}
                                      for k, v in deploy.items()},
                "tokens_per_s": {k: {"median": round(median(v), 2), "runs": v}
                                 for k, v in tps.items()},
                "across_over_one_node": {
                    "deploy_to_ready": ratio(median(deploy["across"]),
                                             median(deploy["one_node"])),
                    "tokens_per_s": ratio(median(tps["across"]), median(tps["one_node"]))},
                "same_tokens": answers.get("across") == answers.get("one_node"),
            })
        finally:
            netns_cluster.stop(cluster)


if __name__ == "__main__":
    main()
