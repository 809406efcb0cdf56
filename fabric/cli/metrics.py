"""``fabric metrics``: a site's Prometheus ``/metrics`` served on its own (operators).

The local site's process serves ``/metrics`` itself (``metrics.enabled`` in its config). A
remote site runs ``globus-compute-endpoint`` instead, so its operator runs this beside it, on a
host that sees the site's state dir (a login node): the same series, from the same records.
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

from fabric.errors import EndpointError


def register(subparsers: Any) -> None:
    """Add ``metrics`` to the ``fabric`` parser."""
    p = subparsers.add_parser(
        "metrics", help="serve a site's Prometheus /metrics (for sites behind Globus Compute)",
        description="Serve GET /metrics for a site from its state dir until interrupted. "
                    "Address and port default to the site config's metrics section "
                    "(127.0.0.1:9464).")
    p.add_argument("--site", default="local",
                   help="site name from endpoints/ or a site definition path (default: local)")
    p.add_argument("--state-dir", default=None, help="override the site's state dir")
    p.add_argument("--host", default=None, help="address to listen on (default: the config's)")
    p.add_argument("--port", type=int, default=None, help="port (default: the config's)")
    p.set_defaults(func=cmd_metrics)


def cmd_metrics(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM."""
    from fabric.endpoint.site_metrics import serve_metrics
    from fabric.errors import InvalidRequest
    from fabric.sites import resolve_site

    cfg, _, folder = resolve_site(args.site, args.state_dir)
    if not folder.is_dir():  # empty metrics would read as an idle site: it is unknown
        raise InvalidRequest(f"state dir {folder} of site {cfg.name!r} does not exist: no "
                             "metrics to serve from there (run this where the site's state "
                             "dir is, or give it with --state-dir)", state_dir=str(folder))
    host = args.host or cfg.metrics.host
    port = cfg.metrics.port if args.port is None else args.port
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    print(f"serving /metrics of site {cfg.name} on {host}:{port} (Ctrl-C stops)", flush=True)
    try:
        serve_metrics(cfg, folder, host, port, stopping)
    except OSError as exc:
        raise EndpointError(f"cannot listen on {host}:{port}: {exc}") from None
    return 0
