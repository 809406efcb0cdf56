"""``fabric flow SITE MODEL --out DIR``: Globus Flow definitions, input schemas and a Timer body.

Writes, for the site's published endpoint and registered functions (``fabric.flows``)::

    request.flow.json   request.schema.json    one generate (or embed) request
    shard.flow.json     shard.schema.json      one campaign shard (run_shard)
    campaign.timer.json                        with --timer-flow-id: a Globus Timers flow timer
                                               starting the shard flow every --every seconds

``--check INPUT.json`` prints the body the Globus Compute action provider would receive for
that request-flow input (the JSONPath parameters resolved), without writing anything.
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Any

from fabric.errors import InvalidRequest


def register(subparsers: Any) -> None:
    """Add the ``flow`` subcommand."""
    p = subparsers.add_parser(
        "flow", help="write Globus Flow definitions (request, campaign shard) and a Timer body",
        description="Write a Globus Flow definition and input schema that run one fabric "
        "request, and one that runs a campaign shard, at SITE's Globus Compute endpoint "
        "through the Globus Compute action provider (V3); with --timer-flow-id also a Globus "
        "Timers body that starts the shard flow on a schedule.")
    p.add_argument("site", help="site name or definition folder (with endpoint_id and "
                   "function_ids published by its operator)")
    p.add_argument("model", help="catalog name of the model the flows use")
    p.add_argument("--kind", choices=("generate", "embed"), default="generate",
                   help="what the request flow runs (default generate)")
    p.add_argument("--out", type=Path, help="folder to write the files into")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="site template value")
    p.add_argument("--timer-flow-id", metavar="UUID",
                   help="the registered shard flow's id: also write campaign.timer.json")
    p.add_argument("--timer-input", type=Path, metavar="INPUT.json",
                   help="the shard flow input the timer starts it with (required with "
                   "--timer-flow-id)")
    p.add_argument("--every", type=int, default=86400, metavar="SECONDS",
                   help="timer interval (default one day)")
    p.add_argument("--runs", type=int, help="stop the timer after this many runs")
    p.add_argument("--check", type=Path, metavar="INPUT.json",
                   help="print the action provider's body for this request-flow input")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write (or check) the flow files."""
    from fabric import flows
    from fabric.cli.sites import _parse_sets
    from fabric.sites import load_site

    site = load_site(args.site, _parse_sets(args.set))
    request_def, request_schema = flows.request_flow(site, args.model, args.kind)
    if args.check is not None:
        flow_input = _read(args.check)
        flows.check_input(request_schema, flow_input, str(args.check))
        print(json.dumps(flows.action_body(request_def, flow_input), indent=2))
        return 0
    if args.out is None:
        raise InvalidRequest("--out DIR is required (or --check INPUT.json)")
    shard_def, shard_schema = flows.shard_flow(site, args.model)
    files: dict[str, Any] = {"request.flow.json": request_def,
                             "request.schema.json": request_schema,
                             "shard.flow.json": shard_def, "shard.schema.json": shard_schema}
    if args.timer_flow_id:
        if args.timer_input is None:
            raise InvalidRequest("--timer-flow-id needs --timer-input (the shard flow input)")
        try:
            uuid.UUID(args.timer_flow_id)
        except ValueError:
            raise InvalidRequest(f"--timer-flow-id {args.timer_flow_id!r} is not a flow id: "
                                 "the UUID Globus Flows gave the registered shard flow") from None
        shard_input = _read(args.timer_input)
        flows.check_input(shard_schema, shard_input, str(args.timer_input))
        files["campaign.timer.json"] = flows.campaign_timer(
            args.timer_flow_id, shard_input, interval_s=args.every,
            stop_after_runs=args.runs, name=f"fabric campaign shard: {args.model} at "
            f"{site.name}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (args.out / name).write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.out / name}")
    return 0


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"{path}: expected a JSON object")
    return data
