"""``fabric serve``: the OpenAI-compatible gateway (``fabric.gateway``); also registers
``fabric keys``, the gateway's API keys.

Bound to 127.0.0.1 it needs no key; any other ``--host`` needs authentication (an API key from
``fabric keys create``, or a site with a Globus policy) or it refuses to start.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fabric.cli import keys
from fabric.cli.common import site_arg


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the OpenAI API for the site until interrupted."""
    from fabric.gateway import GatewayConfig, serve

    config = GatewayConfig(site=args.site, sites=args.sites or None, host=args.host,
                           port=args.port,
                           home=Path(args.home) if args.home else None,
                           require_auth=True if args.require_auth else None,
                           rate=args.rate, burst=args.burst,
                           max_concurrency=args.max_concurrency)
    serve(config)
    return 0


def register(subparsers: Any) -> None:
    """Add ``serve`` and ``keys`` to the ``fabric`` CLI."""
    p = subparsers.add_parser("serve", help="serve the OpenAI API (chat, completions, "
                              "embeddings, files, batches) for a site")
    site_arg(p)
    p.add_argument("--sites", nargs="+", metavar="SITE",
                   help="route among several sites (a federation; --site is then ignored)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs authentication)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--home", help="folder for keys, files and batches "
                   "(default: $FABRIC_HOME/gateway)")
    p.add_argument("--require-auth", action="store_true",
                   help="require a key or Globus token even on 127.0.0.1")
    p.add_argument("--rate", type=float, default=20.0,
                   help="requests per second per identity (0: no limit; default 20)")
    p.add_argument("--burst", type=int, default=100,
                   help="requests an identity may send at once (default 100)")
    p.add_argument("--max-concurrency", type=int, default=256,
                   help="SDK calls in flight at once (default 256)")
    p.set_defaults(func=cmd_serve)
    keys.register(subparsers)
