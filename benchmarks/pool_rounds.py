"""Pool the paired rounds of several ``gateway_users.py`` (or ``gateway.py``) runs: the median
of every round's gateway-minus-SDK TTFT difference and its 95% interval. Prints JSON.

    python benchmarks/pool_rounds.py benchmarks/results/gateway-users-session21-*.json

One run's 16-24 rounds leave an interval of +-30-50 ms on this VM (a round's median moves by
hundreds of ms when a burst's requests miss a prefill step), too wide to tell +10 ms from 0;
the runs' rounds together narrow it. ``--key together`` pools the rounds that sent both
sides in one burst instead of the alternating ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common


def main() -> int:
    """Read the runs' JSON and print the pooled figure."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="JSON printed by gateway_users.py")
    p.add_argument("--key", default="alternating_paired", choices=["alternating_paired",
                                                                   "together"])
    args = p.parse_args()
    diffs: list[float] = []
    for path in args.results:
        figure = json.loads(path.read_text()).get(args.key)
        if figure is None:
            raise SystemExit(f"{path}: no {args.key!r} figure (run with rounds of that kind)")
        diffs += figure["ttft_median_diff_per_round_ms"]
    common.emit({"benchmark": "pool_rounds", "key": args.key, "runs": len(args.results),
                 "rounds": len(diffs),
                 "ttft_median_diff_median_of_rounds_ms": round(common.median(diffs), 1),
                 "ttft_median_diff_median_of_rounds_ms_95": common.bootstrap_median(diffs)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
