"""The ``fabric`` command: one argparse parser, subcommands registered by their modules.

Each module in ``REGISTRARS`` has ``register(subparsers)``, which adds its subcommands and sets
``func(args) -> int | None`` on each. A registrar that fails to import is a bug and its error
is shown, never hidden.

Typed errors print ``error: <message>`` on stderr without a traceback; the exit code is 2 for a
bad request (like argparse's own usage errors) and 1 for everything else.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from fabric.errors import FabricError, InvalidRequest

__all__ = ["REGISTRARS", "build_parser", "main"]

REGISTRARS: tuple[str, ...] = (
    "fabric.cli.generate",  # generate, chat, embed, deploy, deployments, undeploy
    "fabric.cli.models",  # models [list|add|remove] (bring your own model)
    "fabric.cli.internals",  # logprobs, hidden-states
    "fabric.cli.endpoint",  # endpoint start|status|stop (the local site)
    "fabric.cli.auth",  # login, logout, whoami
    "fabric.cli.sites",  # sites, site
    "fabric.cli.shard",  # shard (pre-split checkpoints per rank)
    "fabric.cli.plan",  # plan (size a pp x tp x ep plan for a site's nodes)
    "fabric.cli.campaign",  # campaign (batch runs)
    "fabric.cli.serve",  # serve (the OpenAI gateway), keys
    "fabric.cli.usage",  # usage (per identity and model; CSV export)
    "fabric.cli.metrics",  # metrics (a site's /metrics beside a Globus Compute endpoint)
    "fabric.cli.flow",  # flow (Globus Flow definitions and a Timer body for a site)
)

EPILOG = """\
examples:
  fabric generate "The mitochondria is" --model smollm2-135m --max-tokens 24
  fabric chat --model smollm2-135m
  fabric embed "first text" "second text" --json
  fabric logprobs "The capital of France is" --continuation " Paris."
  fabric hidden-states "The mitochondria is" --layers 0,15,-1 --out h.npz
  fabric models
  fabric deploy smollm2-135m --pp 2 --tp 1 --site local-slurm
  fabric deployments
  fabric endpoint status
  fabric usage --since 7d --by identity

Run "fabric COMMAND --help" for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every available subcommand registered."""
    from fabric import __version__

    parser = argparse.ArgumentParser(
        prog="fabric",
        description="Run inference on very large models at HPC sites through the fabric.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tpm-fabric {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what the fabric is doing (to stderr)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in REGISTRARS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fabric`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except FabricError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidRequest) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `fabric generate ... | head`: the reader left; that is not an error of ours. Point
        # stdout at /dev/null so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
