"""``fabric models [list|add|remove]``: what a site serves, and bringing your own model.

``list`` (the default) asks the site, like every other command, and shows each model's size on
disk and weights hash where known. ``add`` and ``remove`` change the site's registry of models
(``fabric.models_registry``) in its state dir, so the operator runs them where that folder is
(the login node of a cluster, or this machine for the local site).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, cast

from fabric.cli.common import dumps, fetch_listing, print_table, site_arg

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``models`` with its ``list``, ``add`` and ``remove`` subcommands."""
    p = subparsers.add_parser(
        "models", help="list the models a site serves; add or remove your own",
        description="List the site's model catalog with size, weights hash, plan and where "
        "each is served (`fabric models` or `fabric models list`); register a Hugging Face "
        "folder as a model version (`fabric models add PATH --name N --version V`), or "
        "unregister one (`fabric models remove N [--version V]`).")
    site_arg(p)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_list)
    sub = p.add_subparsers(dest="models_command", metavar="{list,add,remove}")

    q = sub.add_parser("list", help="list the site's models (the default)")
    site_arg(q)
    q.add_argument("--json", action="store_true", help="print as JSON")
    q.set_defaults(func=cmd_list)

    q = sub.add_parser(
        "add", help="register a model folder (config.json, *.safetensors, tokenizer)",
        description="Validate PATH (config.json with an architecture the engine serves, "
        "*.safetensors weights, tokenizer files), hash its weights once (in parallel) and "
        "register it at the site as NAME VERSION. Requests pin it by version or by hash "
        "(version='sha256:<hex>', or >= 12 hex digits).")
    q.add_argument("path", type=Path, help="the model folder")
    q.add_argument("--name", required=True, help="model name users pass as model=")
    q.add_argument("--version", required=True, help="version name (e.g. a date or run id)")
    q.add_argument("--description", default="", help="one line for the listing")
    site_arg(q)
    q.add_argument("--json", action="store_true", help="print the record as JSON")
    q.set_defaults(func=cmd_add)

    q = sub.add_parser("remove", help="unregister a model (one version, or all)")
    q.add_argument("name", help="registered model name")
    q.add_argument("--version", help="only this version (default: every version)")
    site_arg(q)
    q.set_defaults(func=cmd_remove)


def _registry(site_name: str) -> tuple[Any, Any]:
    """``(site, ModelRegistry)`` of the site named on the command line."""
    from fabric.models_registry import ModelRegistry
    from fabric.sites import load_site

    site = load_site(site_name)
    return site, ModelRegistry(site.resolved_state_dir())


def cmd_add(args: argparse.Namespace) -> int:
    """``fabric models add``: validate, hash once, register."""
    from fabric.models_registry import site_catalog

    site, registry = _registry(args.site)
    model = registry.add(args.path, args.name, args.version, description=args.description,
                         existing=site_catalog(site))
    plan = _site_plan(model, site)
    if args.json:
        print(dumps({**model.model_dump(), "site_plan": plan}))
        return 0
    print(f"registered {model.name} {model.version} at site {site.name}: {model.architecture}, "
          f"{_bytes(model.size_bytes)} in {len(model.files)} file(s), sha256:{model.sha256}")
    if isinstance(plan, dict):
        print(f"plan on {site.name}'s nodes: pp={plan['pp']} x tp={plan['tp']} x ep={plan['ep']}"
              f" on {plan['nodes']} node(s) (fabric plan {model.path} --site {args.site})")
    elif plan:
        print(f"plan on {site.name}'s nodes: {plan}")
    return 0


def _site_plan(model: Any, site: Any) -> dict[str, Any] | str | None:
    """The smallest plan holding ``model`` on the site's declared nodes (``fabric.plans``,
    arithmetic only); why none fits, as text; ``None`` when the site declares no GPU node."""
    from fabric import plans
    from fabric.errors import InvalidRequest

    if site.node.gpus < 1:
        return None
    config = json.loads((Path(model.path) / "config.json").read_text())
    weights = cast("plans.WeightsDtype", model.dtype if model.dtype in (
        "bfloat16", "float16", "float32") else "bfloat16")
    try:
        fit = plans.fit(plans.shape_from_config(config, model.name), site.node, weights)
    except InvalidRequest as exc:  # PlanDoesNotFit, or a config fabric.plans cannot size
        return exc.message
    return fit.to_dict()


def cmd_remove(args: argparse.Namespace) -> int:
    """``fabric models remove``: unregister (the folder itself is left alone)."""
    site, registry = _registry(args.site)
    for model in registry.remove(args.name, args.version):
        print(f"removed {model.name} {model.version} (files left in {model.path})")
        _still_served(site, model.name, model.version, args.site)
    return 0


def _still_served(site: Any, name: str, version: str, site_arg: str) -> None:
    """Say which servers of a removed version still run: their callers now get
    ``UnknownModel``, but the servers hold their nodes until undeployed or idle."""
    state_dir = Path(site.resolved_state_dir())
    if not (state_dir / "fabric.sqlite").is_file():
        return  # no site state here yet: nothing was ever served
    from fabric.endpoint.state import LIVE_STATES, StateDB

    for dep in StateDB(state_dir).query(model=name, version=version,
                                        states=(*LIVE_STATES, "draining")):
        print(f"note: deployment {dep.id} of {name} {version} still runs ({dep.state}) and "
              f"holds its nodes; stop it with: fabric undeploy {dep.id} --site {site_arg}",
              file=sys.stderr)


def cmd_list(args: argparse.Namespace) -> int:
    """``fabric models``: the catalog with size on disk, hash and where each is served."""
    models = fetch_listing(args, "models")
    if models is None:
        return 0
    rows = [[
        str(m.get("name", "")), str(m.get("version", "")), str(m.get("family", "")),
        str(m.get("size") or _params(m.get("params"))), _bytes(m.get("size_bytes")),
        f"{m['sha256'][:12]}" if m.get("sha256") else "", _plan(m.get("plan")), _served(m),
    ] for m in models]
    print_table(["MODEL", "VERSION", "FAMILY", "SIZE", "DISK", "SHA256", "PLAN", "SERVED"],
                rows, right=(3, 4))
    return 0


def _served(model: dict[str, Any]) -> str:
    deps = model.get("deployments") or []
    if deps:
        return ", ".join(f"{d.get('id')} {d.get('state')}" for d in deps)
    if model.get("hosted"):
        return f"{model.get('site', '')} (on demand)".strip()
    return "not hosted here"


def _plan(plan: Any) -> str:
    if not isinstance(plan, dict):
        return "default"  # the site's default plan (pp=1 tp=1) for a model it does not list
    return f"pp={plan.get('pp', 1)} tp={plan.get('tp', 1)}"


def _params(n: Any) -> str:
    if not isinstance(n, int | float) or n <= 0:
        return ""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def _bytes(n: Any) -> str:
    if not isinstance(n, int) or n < 0:
        return ""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
