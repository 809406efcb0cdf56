"""``fabric campaign``: batch campaigns from the command line.

.. code:: text

    fabric campaign run manifest.yaml              validate, then run here with a progress bar
    fabric campaign submit manifest.yaml [--at TIME | --every CRON] [--wait]
                                                   hand it to the site's scheduler
    fabric campaign list | status NAME [--json] | resume NAME | cancel NAME
    fabric campaign results NAME [--errors] [--format parquet [--out FILE]]

Campaigns live in ``<site state dir>/campaigns`` (``--site``/``--state-dir`` pick the site,
``--home`` another folder). A bad manifest or input line fails here, before any model time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``campaign ...`` to the ``fabric`` parser."""
    p = subparsers.add_parser(
        "campaign", help="batch campaigns: a manifest plus a JSONL of inputs, run or scheduled",
        description="Run a manifest's inputs through a model, sharded over sites, resumable, "
                    "with exactly one result or error line per input (docs/campaigns.md).")
    sub = p.add_subparsers(dest="campaign_command", metavar="ACTION", required=True)

    run = sub.add_parser("run", help="validate and run a campaign in this process")
    run.add_argument("manifest", help="campaign manifest (YAML)")
    _common(run)
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.set_defaults(func=cmd_run)

    submit = sub.add_parser("submit", help="hand a campaign to the site's scheduler")
    submit.add_argument("manifest", help="campaign manifest (YAML)")
    when = submit.add_mutually_exclusive_group()
    when.add_argument("--at", help="run once at this ISO time (UTC unless it names a zone)")
    when.add_argument("--every", help="run on every match of this 5-field cron (UTC)")
    submit.add_argument("--wait", action="store_true", help="show progress until it finishes")
    _common(submit)
    submit.set_defaults(func=cmd_submit)

    for name, helptext, func in (
            ("status", "counts, throughput, ETA, per-site progress, errors by kind", cmd_status),
            ("resume", "continue a stopped, interrupted or cancelled campaign", cmd_resume),
            ("cancel", "stop a campaign (in-flight shards are abandoned)", cmd_cancel),
            ("results", "print the committed result (or error) lines", cmd_results)):
        action = sub.add_parser(name, help=helptext)
        action.add_argument("name", help="campaign name")
        _common(action)
        action.set_defaults(func=func)
    resume = sub.choices["resume"]
    resume.add_argument("--here", action="store_true",
                        help="run it in this process (default: where it ran before)")
    resume.add_argument("--retry-failed", action="store_true",
                        help="give failed inputs fresh attempts too")
    resume.add_argument("--quiet", action="store_true", help="no progress display")
    results = sub.choices["results"]
    results.add_argument("--errors", action="store_true", help="errors.jsonl instead")
    results.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl",
                         help="jsonl (default): print the lines; parquet: write them to a "
                              "Parquet file (needs pyarrow) and print its path")
    results.add_argument("--out", default=None,
                         help="Parquet file to write (default: results.parquet or "
                              "errors.parquet in the campaign's output folder)")
    listing = sub.add_parser("list", help="campaigns with their status and counts")
    _common(listing)
    listing.set_defaults(func=cmd_list)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", default="local",
                   help="site whose scheduler and campaign folder to use (default: local)")
    p.add_argument("--state-dir", default=None, help="override the site's state dir")
    p.add_argument("--home", default=None, help="campaign folder (default: <state dir>/campaigns)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def _home(args: argparse.Namespace) -> Path:
    from fabric.campaign.store import default_home

    return Path(args.home).expanduser() if args.home else default_home(args.site, args.state_dir)


def cmd_run(args: argparse.Namespace) -> int:
    """Create the campaign and run it here until done."""
    from fabric.campaign import store

    folder = store.create(args.manifest, _home(args), runner="here")
    return _run_here(folder, args)


def _run_here(folder: Path, args: argparse.Namespace) -> int:
    import threading

    from fabric.campaign import store
    from fabric.campaign.dispatch import CampaignRunner
    from fabric.campaign.progress import watch

    runner = CampaignRunner(folder)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            runner.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True, name="campaign-runner")
    thread.start()
    try:
        if not (args.quiet or args.json):
            watch(folder, until=lambda s: not thread.is_alive())
        thread.join()
    except KeyboardInterrupt:
        # Leave it resumable: the runner stops after its current wait and requeues in-flight.
        runner.stop.set()
        thread.join(30.0)
        print(f"campaign {folder.name} stopped; what is done is kept. Continue it with: "
              f"fabric campaign resume {folder.name}", file=sys.stderr)
        raise
    if errors:
        raise errors[0]
    return _report(store.status(folder), args)


def cmd_submit(args: argparse.Namespace) -> int:
    """Create the campaign for the site's scheduler (starting the site if needed)."""
    from fabric.campaign import store
    from fabric.client.local import start_site

    schedule = {"at": args.at} if args.at else {"every": args.every} if args.every else None
    folder = store.create(args.manifest, _home(args), runner="site", schedule=schedule)
    start_site(args.site, args.state_dir)
    status = store.status(folder)
    if not args.json:
        print(f"campaign {status['name']}: {status['status']}, {status['total']} inputs, "
              f"next run {_when(status['next_run'])}")
    if args.wait:
        from fabric.campaign.progress import watch

        status = watch(folder) if not args.json else _poll(folder)
        return _report(status, args)
    if args.json:
        print(json.dumps(status, indent=2))
    return 0


def _poll(folder: Path) -> dict[str, Any]:
    import time

    from fabric.campaign import store

    while True:
        status = store.status(folder)
        if store.is_final(status):
            return status
        time.sleep(1.0)


def cmd_status(args: argparse.Namespace) -> int:
    """Print one campaign's status."""
    from fabric.campaign import store

    status = store.status(store.campaign_dir(_home(args), args.name))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    from fabric.campaign.progress import describe

    print(f"{status['name']}  {status['model']}  {status['kind']}")
    print(f"  {status['done']} done, {status['failed']} failed, {status['running']} running, "
          f"{status['pending']} pending of {status['total']}")
    print(f"  {describe(status, counts=False)}")
    for site, rec in sorted(status["sites"].items()):
        shards = ", ".join(f"{n} {s}" for s, n in sorted(rec["shards"].items()))
        print(f"  site {site}: {rec['inputs_done']} inputs done, {rec['tokens']} tokens; "
              f"shards {shards}")
    for kind, n in sorted(status["errors_by_kind"].items()):
        print(f"  errors {kind}: {n}")
    if status.get("last_error"):
        print(f"  last error: {status['last_error']}")
    if status["status"] in ("scheduled", "recurring"):
        print(f"  next run {_when(status['next_run'])}")
    print(f"  results {status['output']}\n  errors  {status['errors']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print every campaign with its status and counts."""
    from fabric.campaign import store

    home = _home(args)
    rows = [store.status(home / name) for name in store.list_names(home)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no campaigns in {home}")
    for s in rows:
        print(f"{s['name']:<32} {s['status']:<12} {s['done']:>8}/{s['total']:<8} "
              f"failed {s['failed']:<6} {s['model']}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Requeue a campaign; run it here if it was run here (or ``--here``)."""
    from fabric.campaign import store
    from fabric.campaign.ledger import Ledger

    folder = store.campaign_dir(_home(args), args.name)
    ledger = Ledger(folder / store.LEDGER)
    try:
        runner = "here" if args.here else str(ledger.get("runner") or "here")
    finally:
        ledger.close()
    store.mark_resumable(folder, runner=runner, retry_failed=args.retry_failed)
    if runner == "here":
        return _run_here(folder, args)
    from fabric.client.local import start_site

    start_site(args.site, args.state_dir)
    print(f"campaign {args.name} queued for the {args.site} site's scheduler")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a campaign."""
    from fabric.campaign import store

    new = store.cancel(store.campaign_dir(_home(args), args.name))
    print(json.dumps({"name": args.name, "status": new}) if args.json
          else f"campaign {args.name}: {new}")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    """Print committed lines (JSONL) to stdout, or write them to a Parquet file."""
    from fabric.campaign import store

    folder = store.campaign_dir(_home(args), args.name)
    if args.format == "parquet":
        from fabric.campaign.export import write_parquet

        # Parquet is binary: it goes to a file, never to the terminal.
        path, rows = write_parquet(folder, errors=args.errors, path=args.out)
        print(json.dumps({"path": str(path), "rows": rows}) if args.json
              else f"wrote {rows} rows to {path}")
        return 0
    for record in store.read_records(folder, errors=args.errors):
        sys.stdout.write(json.dumps(record) + "\n")
    return 0


def _report(status: dict[str, Any], args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(f"campaign {status['name']}: {status['status']}: {status['done']} done, "
              f"{status['failed']} failed of {status['total']}\n  results {status['output']}"
              f"\n  errors  {status['errors']}")
    if status["status"] not in ("done",):
        return 1
    return 0


def _when(epoch: Any) -> str:
    if not epoch:
        return "now"
    return dt.datetime.fromtimestamp(float(epoch), dt.UTC).isoformat(timespec="seconds")
