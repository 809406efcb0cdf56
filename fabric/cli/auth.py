"""``fabric login``, ``fabric logout`` and ``fabric whoami``.

Thin wrappers over ``fabric.globus.auth``; they print who is logged in and until when each
token is valid, never a token.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fabric.sites import load_site


def _auth() -> Any:
    # globus-sdk is imported only when a login command runs, not for every `fabric` call.
    from fabric.globus import auth

    return auth


def _app(args: argparse.Namespace) -> Any:
    auth = _auth()
    sites = auth.known_sites()
    names = {s.name for s in sites}
    # A site given by path (an operator's own definition) joins the shipped ones.
    sites += [load_site(n) for n in (getattr(args, "site", None) or []) if n not in names]
    flow = None if getattr(args, "no_browser", True) else "local-server"
    return auth.make_app(sites, login_flow_manager=flow)


def _print(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return
    auth = _auth()
    who = info.get("username") or info.get("sub") or "unknown"
    print(f"logged in as {who} ({info['kind']}) -- tokens in {auth.token_file()}")
    for rs, until in info["tokens"].items():
        print(f"  {rs:<40} valid until {until}")


def cmd_login(args: argparse.Namespace) -> int:
    """Log in (browser or code prompt for people; client credentials for automation)."""
    _print(_auth().login(_app(args), force=args.force), args.json)
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    """Revoke and delete the stored tokens."""
    _auth().logout(_app(args))
    print(f"logged out; {_auth().token_file()} holds no tokens")
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    """Show the logged-in identity."""
    _print(_auth().whoami(_app(args)), args.json)
    return 0


def register(subparsers: Any) -> None:
    """Add ``login``, ``logout`` and ``whoami`` to the ``fabric`` CLI (argparse sub-parsers).

    Each command sets ``func`` (``func(args) -> int``, the exit status).
    """
    login = subparsers.add_parser("login", help="log in to Globus (FABRIC_CLIENT_ID/_SECRET: "
                                  "as a client)")
    login.add_argument("--force", action="store_true", help="log in again even if not needed")
    login.add_argument("--site", action="append", metavar="NAME",
                       help="also request this site's scope (a site folder outside endpoints/)")
    login.add_argument("--browser", dest="no_browser", action="store_false",
                       help="open a browser and listen locally instead of pasting a code")
    login.add_argument("--json", action="store_true", help="print JSON")
    login.set_defaults(func=cmd_login)
    logout = subparsers.add_parser("logout", help="revoke and delete stored Globus tokens")
    logout.set_defaults(func=cmd_logout)
    whoami = subparsers.add_parser("whoami", help="show who is logged in")
    whoami.add_argument("--json", action="store_true", help="print JSON")
    whoami.set_defaults(func=cmd_whoami)
