"""``fabric keys create|list|revoke``: the gateway's API keys (see ``fabric.gateway.keys``).

A new key is printed once; only its SHA-256 is stored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fabric.cli.common import print_table


def _store(args: argparse.Namespace) -> Any:
    from fabric.gateway.keys import KeyStore

    return KeyStore(Path(args.home) if args.home else None)


def cmd_create(args: argparse.Namespace) -> int:
    """Issue a key for NAME and print it (it is not shown again)."""
    key, record = _store(args).create(args.name)
    if args.json:
        print(json.dumps({"key": key, **record.public()}))
    else:
        print(key)  # alone on stdout: KEY=$(fabric keys create NAME) holds just the key
        print(f"(key {record.id} for {record.name}: store it now, it is not shown again)",
              file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Show issued keys (never the keys themselves)."""
    keys = [k.public() for k in _store(args).all()]
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"

    print_table(["ID", "NAME", "CREATED", "REVOKED"],
                [[k["id"], k["name"], when(k["created"]), when(k["revoked"])] for k in keys])
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """Revoke a key by id (or every key of a name)."""
    record = _store(args).revoke(args.key_id)
    print(f"revoked key {record.id} of {record.name}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``keys create|list|revoke`` to the ``fabric`` CLI."""
    keys = subparsers.add_parser("keys", help="API keys for `fabric serve`")
    keys.add_argument("--home", help="gateway folder (default: $FABRIC_HOME/gateway)")
    sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    create = sub.add_parser("create", help="issue a key for an identity name")
    create.add_argument("name", help="who the key is for (rate limits and files are per name)")
    create.add_argument("--json", action="store_true", help="print JSON")
    create.set_defaults(func=cmd_create)
    listing = sub.add_parser("list", help="show issued keys")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_list)
    revoke = sub.add_parser("revoke", help="revoke a key (by id, or all keys of a name)")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_revoke)
