"""Many users at once: 32 and 256 concurrent requests through the SDK vs straight to the server.

    python benchmarks/many_users.py                         # SmolLM2, 32 and 256 requests
    python benchmarks/many_users.py --model tiny            # tiny random Llama (fast server)
    python benchmarks/many_users.py --quick                 # tiny, 8 and 32, one round

One warm model server at a temporary local site with ``--workers`` request workers (4). Per
concurrency level, rounds alternate the ways (``--ways``) of sending the same number of
distinct greedy requests, all at once:

- ``direct``: straight to the model server over one ZMQ connection (``ServerClient``, a
  ticket from the site's key): the server's own throughput, the baseline;
- ``sdk_threads``: ``Fabric.generate`` from one thread per request;
- ``async``: ``AsyncFabric.generate`` from one coroutine per request (``asyncio.gather``);
- ``async_streams``: ``AsyncFabric.stream`` from one coroutine per request, every chunk read,
  with the default ``max_concurrency`` (64) as a user gets it; also each stream's time to
  first token (TTFT, from the round's start). Open streams must not be held to the pool's
  size: when a stream's reader held a pool thread for the whole stream, the server still
  generated all 256 (throughput held), but streams past the 64th got their first chunk only
  when an earlier stream had ended.

Throughput is completion tokens / wall seconds of a round; reported: each round, the median per
way and ``ratio`` = SDK median / direct median (the issue's goal is >= 0.9 at 32 and 256). With
the non-blocking path a request worker only admits a request (``open_stream``) and the client
submits it to the server itself, so every request reaches the server's batch; before it, at
most ``--workers`` did. ``--no-handoff`` measures the old path (a worker per request).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from campaign_throughput import warm_server, write_site
from common import log, median, ratio


def prompts(n: int, offset: int) -> list[str]:
    """Distinct short prompts (distinct per round: no prefix is reused across rounds)."""
    subjects = ["the cell", "a protein", "the ocean", "a star", "the brain", "a virus"]
    return [f"Question {offset + i}: describe {subjects[i % len(subjects)]} briefly."
            for i in range(n)]


def direct_round(site_dir: Path, model: str, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """Every request straight to the server at once on one connection."""
    from fabric.protocol import validate_request
    from fabric.serverclient import ServerClient

    dep, ticket = warm_server(site_dir, model)
    reqs = [validate_request({"model": model, "prompt": t, "sampling": {"max_tokens": max_tokens}})
            for t in texts]
    with ServerClient(dep.address, str(dep.public_key), timeout_s=600) as client:
        t0 = time.perf_counter()
        refused = client.submit_many([(r, ticket) for r in reqs])
        assert not any(refused), refused
        tokens = sum(client.result(r.request_id, timeout_s=900)["usage"]["completion_tokens"]
                     for r in reqs)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": tokens}


def threads_round(fab: Any, model: str, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """``Fabric.generate`` from one thread per request."""
    with cf.ThreadPoolExecutor(len(texts)) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(
            lambda t: fab.generate(t, model=model, max_tokens=max_tokens), texts))
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": sum(r.usage.completion_tokens for r in results)}


def async_round(fab: Any, model: str, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """``AsyncFabric.generate`` from one coroutine per request."""
    from fabric.aio import AsyncFabric

    async def run() -> dict[str, Any]:
        client = AsyncFabric(fabric=fab, max_concurrency=len(texts))
        try:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(client.generate(t, model=model,
                                                              max_tokens=max_tokens)
                                              for t in texts))
            seconds = time.perf_counter() - t0
        finally:
            client.close()
        return {"seconds": seconds, "tokens": sum(r.usage.completion_tokens for r in results)}

    return asyncio.run(run())


def async_streams_round(fab: Any, model: str, texts: list[str],
                        max_tokens: int) -> dict[str, Any]:
    """``AsyncFabric.stream`` from one coroutine per request, read to the end."""
    from fabric.aio import AsyncFabric

    async def run() -> dict[str, Any]:
        client = AsyncFabric(fabric=fab)  # the default max_concurrency, on purpose

        firsts: list[float] = []

        async def one(text: str) -> int:
            stream = await client.stream(text, model=model, max_tokens=max_tokens)
            first = True
            async for _ in stream:
                if first:
                    firsts.append(time.perf_counter() - t0)
                    first = False
            assert stream.result is not None
            return stream.result.usage.completion_tokens

        try:
            t0 = time.perf_counter()
            tokens = await asyncio.gather(*(one(t) for t in texts))
            seconds = time.perf_counter() - t0
        finally:
            client.close()
        return {"seconds": seconds, "tokens": sum(tokens), "ttft_s": firsts}

    return asyncio.run(run())


def figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["tokens"] / r["seconds"] for r in runs]
    out = {"tokens_per_s": [round(x, 1) for x in rates],
           "median_tokens_per_s": round(median(rates), 1),
           "seconds": [round(r["seconds"], 2) for r in runs]}
    ttfts = [x for r in runs for x in r.get("ttft_s", [])]
    if ttfts:
        out["ttft_s"] = common.summary(ttfts, digits=3)
    return out


WAYS: dict[str, Any] = {"direct": None, "sdk_threads": threads_round, "async": async_round,
                        "async_streams": async_streams_round}
"""The ways a round is sent (``direct`` is ``direct_round``: it needs the site, not the SDK)."""


def main() -> int:
    """Run every level and way, print the JSON figure."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="catalog model, or 'tiny'")
    p.add_argument("--levels", default="32,256", help="concurrent requests per level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="rounds per way and level")
    p.add_argument("--warmup", type=int, default=1,
                   help="rounds per way and level run first and not counted (the server's "
                        "first batches of a new size are slower)")
    p.add_argument("--workers", type=int, default=4, help="request workers at the site")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of the server")
    p.add_argument("--ways", default=",".join(WAYS),
                   help="ways to send each round (direct is the baseline: always sent)")
    p.add_argument("--no-handoff", action="store_true",
                   help="the old path: a request worker serves each request whole")
    args = p.parse_args()
    if args.quick:
        args.model, args.levels, args.max_tokens, args.rounds = "tiny", "8,32", 16, 1
        args.warmup = 0

    from fabric import Fabric
    from fabric.client.local import start_site, stop_site

    tmp = Path(tempfile.mkdtemp(prefix="fabric-many-users-"))
    model, model_dir = args.model, None
    if model == "tiny":
        from fabric.testing.tiny import build_tiny_llama

        model, model_dir = "tiny-llama", build_tiny_llama(tmp / "tiny")
    site_dir = write_site(tmp / "site", model, model_dir, args.workers, args.threads)
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    start_site(str(site_dir), timeout_s=600)
    levels: dict[str, Any] = {}
    try:
        fab = Fabric(site=str(site_dir), on_status=None, handoff=not args.no_handoff)
        fab.generate("warm up", model=model, max_tokens=2)
        offset = 0
        for n in (int(x) for x in args.levels.split(",")):
            runs: dict[str, list[dict[str, Any]]] = {
                w: [] for w in WAYS if w == "direct" or w in args.ways.split(",")}
            for r in range(-args.warmup, args.rounds):
                for way in runs:
                    log(f"{n} requests, round {r + 1}/{args.rounds}: {way}"
                        + (" (warm-up, not counted)" if r < 0 else ""))
                    texts = prompts(n, offset)
                    offset += n
                    if way == "direct":
                        got = direct_round(site_dir, model, texts, args.max_tokens)
                    else:
                        got = WAYS[way](fab, model, texts, args.max_tokens)
                    if r >= 0:
                        runs[way].append(got)
            figs = {way: figures(rs) for way, rs in runs.items()}
            base = figs["direct"]["median_tokens_per_s"]
            levels[str(n)] = {**figs, **{
                f"ratio_{way}": ratio(fig["median_tokens_per_s"], base)
                for way, fig in figs.items() if way != "direct"}}
        fab.close()
    finally:
        stop_site(str(site_dir), all=True)
    common.emit({"benchmark": "many_users", "model": model, "max_tokens": args.max_tokens,
                 "rounds": args.rounds, "warmup": args.warmup, "workers": args.workers,
                 "server_threads": args.threads,
                 "handoff": not args.no_handoff, "levels": levels})
    return 0


if __name__ == "__main__":
    sys.exit(main())
