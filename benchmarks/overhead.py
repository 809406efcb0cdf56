"""Fabric overhead of a user function (issue 2).

A no-op ``fab.submit(noop, model=None)`` round trip through the local site (SDK -> CURVE ZMQ ->
site process -> GlobusComputeEngine request worker running the fabric's ``run_user_function``
wrapper -> back) vs the same no-op submitted straight to a standalone ``GlobusComputeEngine``
from this process, packed with Globus Compute's serializer and message format
(``fabric.wire.gcwire``). Both engines have the same number of workers and run side by side;
calls are sequential, alternating blocks of ``--block`` calls between the two. ``--rounds``
rounds of ``--calls`` calls per path each (one warm site and engine throughout): the headline
is the median of the rounds' median ratios (the 2-core machine's load moves one round's
absolute times by ~0.5 ms). Goal: ratio <= 1.2.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import common
from common import log, median, ratio


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
    p.add_argument("--calls", type=int, default=300, help="timed calls per path and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--block", type=int, default=25)
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args()
    if args.quick:
        args.calls, args.block, args.rounds = 20, 5, 1
    rounds: list[dict[str, list[float]]] = []
    with common.TempSite(workers=args.workers) as site, \
            common.compute_engine(args.workers) as engine:
        fab = site.fabric()

        def via_fabric() -> None:
            assert fab.submit(common.noop, model=None).result(timeout=300) is None

        def via_engine() -> None:
            assert common.engine_call(engine, common.noop, None) is None

        paths = {"fabric": via_fabric, "engine": via_engine}
        t0 = time.monotonic()
        for fn in paths.values():  # warm-up: workers started, imports done
            for _ in range(max(10, args.block)):
                fn()
        log(f"warm-up done in {time.monotonic() - t0:.1f} s")
        for _ in range(args.rounds):
            rounds.append(timed_round(paths, args.calls, args.block))
            med = {k: median(v) for k, v in rounds[-1].items()}
            log(f"round {len(rounds)}: median fabric {med['fabric'] * 1e3:.2f} ms, engine "
                f"{med['engine'] * 1e3:.2f} ms, ratio {ratio(med['fabric'], med['engine'])}")
        fab.close()
    admission = authorize_cost()
    pooled = {k: [t for r in rounds for t in r[k]] for k in ("fabric", "engine")}
    med = {k: median(v) for k, v in pooled.items()}
    per_round = [ratio(median(r["fabric"]), median(r["engine"])) for r in rounds]
    r = round(median([x for x in per_round if x is not None]), 3)
    log(f"median of round ratios {r} {per_round}; pooled medians fabric "
        f"{med['fabric'] * 1e3:.2f} ms, engine {med['engine'] * 1e3:.2f} ms")
    common.emit({
        "benchmark": "overhead", "calls_per_path_and_round": args.calls,
        "rounds": args.rounds, "block": args.block, "workers": args.workers,
        "fabric_submit_ms": common.summary(pooled["fabric"], 1e3, 3),
        "engine_direct_ms": common.summary(pooled["engine"], 1e3, 3),
        "round_ratios": per_round, "ratio_median": r,
        "ratio_pooled_median": ratio(med["fabric"], med["engine"]),
        "extra_ms_median": round((med["fabric"] - med["engine"]) * 1e3, 3),
        "goal": "<= 1.2", "met": r <= 1.2,
        "local_admission_ms": admission,
    })


def timed_round(paths: dict[str, Callable[[], None]], calls: int,
                block: int) -> dict[str, list[float]]:
    """``calls`` timed calls of each path, alternating blocks of ``block`` calls."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    done = 0
    while done < calls:
        n = min(block, calls - done)
        for name, fn in paths.items():
            for _ in range(n):
                s = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - s)
        done += n
    return times


if __name__ == "__main__":
    main()
