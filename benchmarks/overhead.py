"""Fabric overhead of a user function (issue 2).

Two comparisons, side by side on one warm local site:

* ``model_call``: ``fab.submit(generate_once, prompt, max_tokens, model=SmolLM2)`` (a user
  function that calls the model once through its handle) vs the same ``fab.generate``.
* ``noop``: ``fab.submit(noop, model=None)`` round trip (SDK -> the site's Unix socket -> site
  process -> GlobusComputeEngine request worker running ``run_user_function`` -> the worker's
  spare user-function process -> back) vs the same no-op submitted straight to a standalone
  ``GlobusComputeEngine`` from this process, packed with Globus Compute's serializer and
  message format (``fabric.wire.gcwire``), same number of workers.

Since issue 14 every user function runs in a fresh process of its own; each request worker
keeps one started ahead, imports done (``fabric.endpoint.userchild``), and starts the next one
when a call is over (~0.4 s of CPU). So each comparison is timed twice: calls spaced by
``--gap`` seconds (not timed; the used spare is replaced meanwhile, as between a user's calls),
``--rounds`` rounds alternating blocks of ``--block`` calls between the two paths, the headline
being the median of the rounds' median ratios; and back to back (``--b2b-calls`` calls per path,
one round), where the replacements compete with the next calls for this 2-core machine's CPU.
Goal (noop): ratio <= 1.2.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import common
from common import log, median, ratio

PROMPT = "The three most important ideas in cell biology are"


def authorize_cost(calls: int = 50) -> dict[str, Any]:
    """What the site's per-request admission costs the request by itself: ``policy.authorize``
    for the local site (no policy section, so no quota) queues the request's usage row, which a
    background thread commits to the state dir's SQLite usage table in batches; the time here
    excludes that commit, which the request no longer waits for."""
    import tempfile
    from pathlib import Path

    from fabric.endpoint.policy import authorize
    from fabric.sites import SiteConfig

    site = SiteConfig(name="bench")
    state = Path(tempfile.mkdtemp(prefix="fabric-bench-policy-"))
    times = []
    for _ in range(calls):
        s = time.perf_counter()
        authorize(site, None, "", state)
        times.append(time.perf_counter() - s)
    return common.summary(times, 1e3, 3)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--calls", type=int, default=15, help="timed model calls per path and round")
    p.add_argument("--noop-calls", type=int, default=30,
                   help="timed no-op calls per path and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--gap", type=float, default=1.0,
                   help="seconds between spaced calls (not timed)")
    p.add_argument("--b2b-calls", type=int, default=20,
                   help="back-to-back calls per path (one round, each comparison)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args()
    if args.quick:
        args.calls, args.noop_calls, args.block, args.rounds, args.b2b_calls = 4, 4, 2, 1, 4
    out: dict[str, Any] = {"benchmark": "overhead", "rounds": args.rounds, "block": args.block,
                           "gap_s": args.gap, "workers": args.workers,
                           "max_tokens": args.max_tokens, "model": common.SMOLLM}
    with common.TempSite(workers=args.workers) as site, \
            common.compute_engine(args.workers) as engine:
        fab = site.fabric()

        def submit_model() -> None:
            fab.submit(common.generate_once, PROMPT, args.max_tokens,
                       model=common.SMOLLM).result(timeout=300)

        def generate() -> None:
            fab.generate(PROMPT, model=common.SMOLLM, max_tokens=args.max_tokens)

        def submit_noop() -> None:
            assert fab.submit(common.noop, model=None).result(timeout=300) is None

        def via_engine() -> None:
            assert common.engine_call(engine, common.noop, None) is None

        t0 = time.monotonic()
        # Every worker busy at once: each builds its site context, which starts its spare.
        for f in [fab.submit(common.hold, 1.0, model=None) for _ in range(args.workers)]:
            f.result(timeout=300)
        model_paths = {"submit": submit_model, "generate": generate}
        noop_paths = {"fabric": submit_noop, "engine": via_engine}
        for fn in (*model_paths.values(), *noop_paths.values()):  # model deployed, imports done
            for _ in range(3):
                fn()
        log(f"warm-up done in {time.monotonic() - t0:.1f} s")
        out["model_call"] = compare(model_paths, args.rounds, args.calls, args.block, args.gap)
        out["noop"] = compare(noop_paths, args.rounds, args.noop_calls, args.block, args.gap)
        out["noop"]["goal"] = "<= 1.2"
        out["noop"]["met"] = out["noop"]["ratio_median"] <= 1.2
        out["model_call_back_to_back"] = compare(model_paths, 1, args.b2b_calls, args.block, 0.0)
        out["noop_back_to_back"] = compare(noop_paths, 1, args.b2b_calls, args.block, 0.0)
        fab.close()
    out["local_admission_ms"] = authorize_cost()
    common.emit(out)


def compare(paths: dict[str, Callable[[], None]], rounds: int, calls: int, block: int,
            gap: float) -> dict[str, Any]:
    """``rounds`` timed rounds of the two ``paths``; their summaries and ratios (first path
    over second)."""
    a, b = paths
    timed: list[dict[str, list[float]]] = []
    for _ in range(rounds):
        timed.append(timed_round(paths, calls, block, gap))
        med = {k: median(v) for k, v in timed[-1].items()}
        log(f"gap {gap} s round {len(timed)}: median {a} {med[a] * 1e3:.2f} ms, {b} "
            f"{med[b] * 1e3:.2f} ms, ratio {ratio(med[a], med[b])}")
    pooled = {k: [t for r in timed for t in r[k]] for k in paths}
    med = {k: median(v) for k, v in pooled.items()}
    per_round = [ratio(median(r[a]), median(r[b])) for r in timed]
    return {"gap_s": gap, "calls_per_path_and_round": calls, "rounds": rounds,
            f"{a}_ms": common.summary(pooled[a], 1e3, 3),
            f"{b}_ms": common.summary(pooled[b], 1e3, 3),
            "round_ratios": per_round,
            "ratio_median": round(median([x for x in per_round if x is not None]), 3),
            "ratio_pooled_median": ratio(med[a], med[b]),
            "extra_ms_median": round((med[a] - med[b]) * 1e3, 3)}


def timed_round(paths: dict[str, Callable[[], None]], calls: int, block: int,
                gap: float) -> dict[str, list[float]]:
    """``calls`` timed calls of each path, alternating blocks of ``block`` calls, each after
    ``gap`` seconds of rest."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    done = 0
    while done < calls:
        n = min(block, calls - done)
        for name, fn in paths.items():
            for _ in range(n):
                if gap:
                    time.sleep(gap)
                s = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - s)
        done += n
    return times


if __name__ == "__main__":
    main()
