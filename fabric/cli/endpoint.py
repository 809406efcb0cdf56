"""``fabric endpoint start|status|stop``: the local site process.

The site usually starts itself on first use (``LocalTransport``); these commands let a user
start it ahead of time, see what it runs (pid, address, state dir, deployments with their
servers' health) and stop it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fabric.errors import EndpointError


def register(subparsers: Any) -> None:
    """Add ``endpoint start|status|stop`` to the ``fabric`` parser."""
    p = subparsers.add_parser(
        "endpoint", help="start, inspect or stop the local site (its endpoint process)",
        description="The local site runs in a background process: a Globus Compute engine "
                    "whose request workers run the fabric's endpoint functions. The SDK and CLI "
                    "start it on first use; these commands manage it explicitly.")
    sub = p.add_subparsers(dest="endpoint_command", metavar="ACTION", required=True)

    start = sub.add_parser("start", help="start the site in the background (no-op if running)")
    _common(start)
    start.add_argument("--timeout", type=float, default=180.0,
                       help="seconds to wait for the site to come up (default 180)")
    start.set_defaults(func=cmd_start)

    status = sub.add_parser("status", help="pid, address, state dir and deployments")
    _common(status)
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    status.set_defaults(func=cmd_status)

    stop = sub.add_parser("stop", help="stop the site (model servers exit on their idle timeout)")
    _common(stop)
    stop.add_argument("--all", action="store_true",
                      help="also drain and stop every model server the site launched "
                           "(also when the site itself is already down)")
    stop.add_argument("--timeout", type=float, default=60.0, metavar="S",
                      help="seconds to wait for the site to answer, and then to exit after "
                           "SIGTERM, before SIGKILL (default 60)")
    stop.set_defaults(func=cmd_stop)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", default="local",
                   help="site name from endpoints/ or a site definition path (default: local)")
    p.add_argument("--state-dir", default=None, help="override the site's state dir")


def cmd_start(args: argparse.Namespace) -> int:
    """Start the site unless it runs; print where it serves."""
    from fabric.client.local import read_info, start_site
    from fabric.sites import resolve_site

    _, _, folder = resolve_site(args.site, args.state_dir)
    was = read_info(folder)
    info = was or start_site(args.site, args.state_dir, timeout_s=args.timeout)
    verb = "already running" if was else "started"
    print(f"site {info.get('site')} {verb}: pid {info['pid']}, {info['address']}, "
          f"state dir {info['state_dir']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the site's status; exit code 3 if it is not running."""
    from fabric.client.local import site_status

    status = site_status(args.site, args.state_dir)
    if status is None:
        left = _servers_left(args)
        if args.json:
            print(json.dumps({"running": False, "servers_left": left}))
        else:
            print(f"site {args.site} is not running (start it with `fabric endpoint start`)")
            if left:
                print(f"{len(left)} model server(s) it started may still run ({', '.join(left)}):"
                      " `fabric endpoint stop --all` stops them, a restarted site takes them "
                      "over")
        return 3
    if args.json:
        print(json.dumps({"running": True, **status}, indent=2, default=str))
        return 0
    print(format_status(status))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop the site (and with ``--all`` its model servers)."""
    from fabric.client.local import stop_site

    reply = stop_site(args.site, args.state_dir, all=args.all, timeout_s=args.timeout)
    if reply is None:
        # Servers outlive a plain stop (they exit on their idle timeout): --all stops them
        # without the site, from the deployment records in its state dir.
        left = _undeploy_without_site(args) if args.all else []
        extra = f"; stopped {len(left)} model server(s) it had left running" if left else ""
        print(f"site {args.site} is not running{extra}")
        return 0
    stopped = reply.get("undeployed") or []
    if args.all and "undeployed" not in reply:
        # It did not answer (wedged) and was signalled: its servers are stopped from here.
        stopped = _undeploy_without_site(args)
    extra = f"; stopped {len(stopped)} model server(s)" if stopped else ""
    how = f" ({reply['note']}{', then SIGKILL' if reply.get('killed') else ''})" \
        if reply.get("note") else ""
    print(f"site {args.site} stopped{how}{extra}")
    return 0


def _servers_left(args: argparse.Namespace) -> list[str]:
    """Deployments a site that is down left recorded live (their servers outlive it until
    their idle timeout); what their processes say is checked only by a running site."""
    from fabric.endpoint.state import LIVE_STATES, StateDB
    from fabric.sites import resolve_site

    _, _, state_dir = resolve_site(args.site, args.state_dir)
    if not (state_dir / "fabric.sqlite").exists():  # nothing ever deployed there
        return []
    return [d.id for d in StateDB(state_dir).query(states=(*LIVE_STATES, "draining"))]


def _undeploy_without_site(args: argparse.Namespace) -> list[str]:
    """``stop --all`` of a site that is down: its live deployments' servers, stopped here."""
    from fabric.endpoint.deployments import undeploy_all
    from fabric.sites import resolve_site

    site, _, state_dir = resolve_site(args.site, args.state_dir)
    return undeploy_all(site, state_dir)


def _workers(status: dict[str, Any]) -> str:
    """Request workers running now (what the engine's pool reports), and how many the site
    is configured for when they differ."""
    running, configured = status.get("workers_running"), status.get("workers")
    if running is None:
        return f"{configured} configured (running count unknown)"
    if running == configured:
        return f"{running} running"
    return f"{running} running (of {configured} configured)"


def format_status(status: dict[str, Any]) -> str:
    """Human-readable status: the site, then one line per deployment with server health."""
    lines = [
        f"site        {status.get('site')}",
        f"pid         {status.get('pid')}",
        f"address     {status.get('address')}",
        f"state dir   {status.get('state_dir')}",
        f"workers     {_workers(status)}",
        f"uptime      {_duration(status.get('uptime_s'))}",
        f"log         {status.get('log')}",
    ]
    deps = status.get("deployments") or []
    if not deps:
        lines.append("deployments none")
        return "\n".join(lines)
    lines.append("deployments")
    header = (f"  {'ID':<13} {'MODEL':<16} {'PLAN':<9} {'STATE':<9} {'JOB':<8} {'IDLE':>6}  "
              f"{'QUEUE':>5} {'RUN':>4} {'KV USED':>13} {'TOK/S':>7}  ADDRESS")
    lines.append(header)
    for d in deps:
        plan = d.get("plan") or {}
        health = d.get("health") or {}
        kv = ""
        if health.get("kv_budget_tokens"):
            kv = f"{health.get('kv_used_tokens', 0)}/{health['kv_budget_tokens']}"
        state = str(d.get("state"))
        if state == "queued" and d.get("queue_position"):
            state = f"queued#{d['queue_position']}"
        lines.append(
            f"  {d.get('id', ''):<13} {d.get('model', ''):<16} "
            f"{_plan(plan):<9} {state:<9} "
            f"{d.get('job_id') or '-':<8} {_duration(d.get('idle_s')):>6}  "
            f"{_num(health.get('queue_depth')):>5} {_num(health.get('running')):>4} "
            f"{kv or '-':>13} {_num(health.get('tokens_per_s'), 1):>7}  {d.get('address') or '-'}")
        if d.get("state") != "ready" and d.get("message"):
            lines.append(f"    {str(d['message']).splitlines()[0]}")
    return "\n".join(lines)


def _plan(plan: dict[str, Any]) -> str:
    return f"pp{plan.get('pp', 1)} tp{plan.get('tp', 1)}"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _num(value: Any, digits: int = 0) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    """Run ``fabric endpoint ...`` alone (for debugging without the full CLI)."""
    parser = argparse.ArgumentParser(prog="fabric")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EndpointError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
