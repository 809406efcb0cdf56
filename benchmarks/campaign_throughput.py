"""Campaign throughput vs the same prompts sent straight to the model server. Prints JSON.

    python benchmarks/campaign_throughput.py --n 2000                  # SmolLM2, 32 new tokens
    python benchmarks/campaign_throughput.py --n 200 --model tiny      # tiny random Llama

Both sides use one warm model server at a temporary local site (direct, campaign, direct
again; ``direct_s`` is the mean of the two direct runs). ``direct`` keeps
``max_in_flight x concurrency`` requests in flight on one ServerClient socket (the best a
client on the site itself can do); ``campaign`` runs the same prompts as a campaign (ledger,
shards through the site's request workers, fsynced output). ``ratio`` = campaign throughput /
direct throughput (the issue's target is >= 0.9).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


LOCAL_JOBS: dict[str, Any] = {
    "provider": {"type": "LocalProvider", "init_blocks": 0, "min_blocks": 0, "max_blocks": 1},
    "launcher": {"type": "SingleNodeLauncher"}, "walltime": "01:00:00"}
"""Model servers as local jobs (Parsl's ``LocalProvider``)."""


def write_site(folder: Path, model: str, model_dir: Path | None, workers: int,
               threads: int, server: dict[str, Any] | None = None,
               jobs: dict[str, Any] | None = None) -> Path:
    """A temporary site definition serving ``model`` (a path entry for the tiny model);
    ``server``: more ``ServerConfig`` fields; ``jobs``: how servers are launched (default
    ``LOCAL_JOBS``)."""
    data: dict[str, Any] = {
        "name": "bench-local", "description": "campaign benchmark site",
        "state_dir": str(folder / "state"), "max_request_workers": workers,
        "jobs": jobs or LOCAL_JOBS,
        "server": {"idle_timeout_s": 600, "ready_timeout_s": 600,
                   "threads_per_rank": threads, **(server or {})},
        "models": [{"name": model, "plan": {"pp": 1, "tp": 1}}], "extra_models": [],
    }
    if model_dir is not None:
        data["extra_models"] = [{"name": model, "version": "bench", "family": "causal-lm",
                                 "source": {"kind": "path", "path": str(model_dir)}}]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fabric.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


def prompts(n: int) -> list[str]:
    """Short, distinct prompts."""
    subjects = ["the cell", "a protein", "the ocean", "a star", "the brain", "a virus",
                "the climate", "a catalyst", "the genome", "a galaxy"]
    return [f"Question {i}: describe {subjects[i % len(subjects)]} briefly." for i in range(n)]


def warm_server(site_dir: Path, model: str) -> tuple[Any, str]:
    """The site's warm deployment of ``model`` and a ticket for it (from the site's key), for
    the baselines that send requests straight to the server."""
    from fabric import tickets
    from fabric.endpoint.deployments import DeploymentManager
    from fabric.sites import load_site

    site = load_site(str(site_dir))
    mgr = DeploymentManager(site, site.resolved_state_dir())
    dep = mgr.find(model)
    assert dep is not None and dep.address, "no warm server"
    return dep, tickets.issue(mgr.ticket_key(), model=model, ttl_s=3600)


def run_direct(site_dir: Path, model: str, texts: list[str], max_tokens: int,
               window: int) -> tuple[float, int]:
    """Seconds and tokens for ``texts`` sent straight to the warm server."""
    from fabric.protocol import validate_request
    from fabric.serverclient import ServerClient

    dep, ticket = warm_server(site_dir, model)
    tokens = 0
    start = time.perf_counter()
    with ServerClient(dep.address, str(dep.public_key), timeout_s=60) as client:
        queue = collections.deque(texts)
        flight: collections.deque[str] = collections.deque()
        while queue or flight:
            while queue and len(flight) < window:
                req = validate_request({"model": model, "prompt": queue.popleft(),
                                        "sampling": {"max_tokens": max_tokens}})
                client.submit(req, ticket)
                flight.append(req.request_id)
            result = client.result(flight.popleft(), timeout_s=600)
            tokens += sum(result["usage"].values())
    return time.perf_counter() - start, tokens


def run_campaign(tmp: Path, site_dir: Path, model: str, texts: list[str], max_tokens: int,
                 shard_size: int, concurrency: int, in_flight: int) -> tuple[float, int, str]:
    """Seconds, tokens and final status of the same prompts as a campaign."""
    from fabric.campaign import store
    from fabric.campaign.dispatch import CampaignRunner

    with (tmp / "in.jsonl").open("w") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"custom_id": f"p{i}", "prompt": text}) + "\n")
    manifest = {"name": "bench", "model": model, "kind": "generate",
                "sampling": {"max_tokens": max_tokens}, "input": {"path": str(tmp / "in.jsonl")},
                "output": str(tmp / "out"), "shard_size": shard_size,
                "concurrency": concurrency,
                "sites": [{"name": str(site_dir), "max_in_flight": in_flight}]}
    (tmp / "m.yaml").write_text(yaml.safe_dump(manifest))
    folder = store.create(tmp / "m.yaml", tmp / "home")
    start = time.perf_counter()
    final = CampaignRunner(folder, poll_s=0.05).run()
    seconds = time.perf_counter() - start
    status = store.status(folder)
    assert status["done"] == len(texts), status
    return seconds, int(status["tokens"]), final


def main() -> int:
    """Run both sides and print the JSON figure."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="prompts (default 2000)")
    p.add_argument("--model", default="smollm2-135m", help="catalog model, or 'tiny'")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight per shard")
    p.add_argument("--in-flight", type=int, default=2, help="shards in flight")
    p.add_argument("--workers", type=int, default=2, help="request workers at the site")
    p.add_argument("--directs", type=int, default=2, choices=[1, 2],
                   help="direct runs: 2 brackets the campaign (before and after), 1 saves time")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP threads of the server (1 keeps a busy 2-core box from thrashing)")
    args = p.parse_args()

    from fabric.client.local import LocalTransport, start_site, stop_site
    from fabric.wire.functions import run_request

    tmp = Path(tempfile.mkdtemp(prefix="fabric-campaign-bench-"))
    model, model_dir = args.model, None
    if model == "tiny":
        from fabric.testing.tiny import build_tiny_llama

        model, model_dir = "tiny-llama", build_tiny_llama(tmp / "tiny")
    site_dir = write_site(tmp / "site", model, model_dir, args.workers, args.threads)
    start_site(str(site_dir), timeout_s=600)
    try:
        with LocalTransport(site=str(site_dir)) as transport:  # warm the server once
            transport.submit(run_request, {"model": model, "prompt": "warm up",
                                           "sampling": {"max_tokens": 2}}).result(900)
        texts = prompts(args.n)
        window = args.concurrency * args.in_flight
        # direct, campaign, direct: the mean of the two direct runs brackets the campaign, so
        # a change in the machine's load during the run shows up as a gap between them.
        first_s, direct_tok = run_direct(site_dir, model, texts, args.max_tokens, window)
        camp_s, camp_tok, final = run_campaign(tmp, site_dir, model, texts, args.max_tokens,
                                               args.shard_size, args.concurrency, args.in_flight)
        directs = [first_s]
        if args.directs > 1:
            directs.append(run_direct(site_dir, model, texts, args.max_tokens, window)[0])
        direct_s = sum(directs) / len(directs)
    finally:
        stop_site(str(site_dir), all=True)
    figure = {
        "benchmark": "campaign_throughput", "model": model, "n": args.n,
        "max_tokens": args.max_tokens, "shard_size": args.shard_size,
        "concurrency": args.concurrency, "in_flight": args.in_flight,
        "direct_s": round(direct_s, 2), "direct_runs_s": [round(x, 2) for x in directs],
        "campaign_s": round(camp_s, 2),
        "direct_prompts_per_s": round(args.n / direct_s, 2),
        "campaign_prompts_per_s": round(args.n / camp_s, 2),
        "direct_tokens": direct_tok, "campaign_tokens": camp_tok, "campaign_status": final,
        "ratio": round(direct_s / camp_s, 3),
    }
    print(json.dumps(figure, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
