"""``fabric usage``: requests and tokens per identity and model at a site (operators).

Reads the site's usage table from its state dir (on the site's host, or wherever the state dir
is mounted): ``--since`` a duration or date, ``--by identity|model`` to group, ``--csv FILE``
to export for accounting.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``usage`` to the ``fabric`` parser."""
    p = subparsers.add_parser(
        "usage", help="requests and tokens per identity and model at a site (operators)",
        description="Requests, prompt tokens and generation tokens per identity and model, "
                    "read from the site's usage table in its state dir.")
    p.add_argument("--site", default="local",
                   help="site name from endpoints/ or a site definition path (default: local)")
    p.add_argument("--state-dir", default=None, help="override the site's state dir")
    p.add_argument("--since", default=None, metavar="DATE|DURATION",
                   help="only usage since then: 24h, 7d (or -7d), 2026-12-01 (default: all "
                        "time)")
    # ``--since -5m``: argparse reads a value starting with "-" as an option unless it looks
    # like a negative number; no option here starts with "-" and a digit, so such a value is
    # --since's (a bad one then gets parse_since's error, not "expected one argument").
    p._negative_number_matcher = re.compile(r"^-\d")
    p.add_argument("--by", default="both", choices=("both", "identity", "model"),
                   help="group by identity and model (default), identity only or model only")
    p.add_argument("--csv", default=None, metavar="FILE", type=Path,
                   help="write the rows to FILE as CSV (the operator's export; - for "
                        "standard output)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_usage)


def cmd_usage(args: argparse.Namespace) -> int:
    """Print (or export) the site's usage."""
    from fabric.endpoint.usage_report import parse_since, table, usage_rows, write_csv
    from fabric.errors import InvalidRequest
    from fabric.sites import resolve_site

    cfg, _, folder = resolve_site(args.site, args.state_dir)
    if not folder.is_dir():  # "no usage recorded" would read as zero usage: it is unknown
        raise InvalidRequest(f"state dir {folder} of site {cfg.name!r} does not exist: no "
                             "usage to read there (run this where the site's state dir is, "
                             "or give it with --state-dir)", state_dir=str(folder))
    since = parse_since(args.since) if args.since else None
    rows = usage_rows(Path(folder), since, args.by)
    if args.csv is not None and str(args.csv) == "-":  # the shell's usual "standard output"
        write_csv(rows, sys.stdout)
    elif args.csv is not None:
        write_csv(rows, args.csv)
        print(f"wrote {len(rows)} rows to {args.csv}")
    elif args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(table(rows) if rows else "no usage recorded" + (" since then" if since else ""))
    return 0
