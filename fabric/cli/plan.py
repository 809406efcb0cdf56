"""``fabric plan MODEL --site SITE``: the pp x tp x ep plan that holds a model on a site's nodes.

Arithmetic only (``fabric.plans``): the model's ``config.json`` (a path, a shipped one by name,
or a model in the site's catalog) and the site's ``node:`` shape; no weights are read and
nothing is launched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fabric.cli.common import dumps, print_table, site_arg

GIB = 2 ** 30


def register(subparsers: Any) -> None:
    """Add the ``plan`` subcommand."""
    p = subparsers.add_parser(
        "plan", help="size a pp x tp x ep plan for a model on a site's nodes",
        description="Compute the smallest pp x tp x ep plan that holds MODEL's weights and a KV "
        "cache of at least --min-tokens tokens on SITE's nodes (its fabric.yaml `node:` block), "
        "or check the plan given with --pp/--tp/--ep. Prints the weights per GPU, the KV cache "
        "per token, the token budget and the nodes needed; a plan that does not fit is refused "
        "with its numbers (exit code 2).")
    p.add_argument("model", help="a model in the site's catalog (`fabric models`), a shipped "
                   "model config (e.g. llama-3.1-405b, deepseek-v3, kimi-k2), a config.json, or "
                   "a model folder")
    site_arg(p)
    p.add_argument("--weights", choices=("bfloat16", "float16", "float32", "fp8"),
                   default="bfloat16", help="how the weights are stored on the GPUs (fp8: an "
                   "FP8 checkpoint's projections kept in FP8, as a plan with `fp8: keep` holds "
                   "them; default bfloat16)")
    p.add_argument("--nodes", type=int, help="most nodes the plan may use (default and upper "
                   "bound: what the site's limits and node.max_nodes allow)")
    p.add_argument("--pp", type=int, help="check this many pipeline stages (with --tp)")
    p.add_argument("--tp", type=int, help="tensor-parallel ranks per stage")
    p.add_argument("--ep", type=int, help="expert-parallel groups per stage (MoE; divides tp)")
    p.add_argument("--min-tokens", type=int, default=None,
                   help="least KV-cache tokens the plan must hold (default 32768)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compute (or check) the plan and print it."""
    from fabric import plans
    from fabric.errors import InvalidRequest
    from fabric.sites import load_site

    site = load_site(args.site)
    name, config = model_config(args.model, site)
    model = plans.shape_from_config(config, name)
    min_tokens = plans.MIN_TOKENS if args.min_tokens is None else args.min_tokens
    if args.pp is not None:
        if args.tp is None:
            raise InvalidRequest("--pp needs --tp (or leave both out to search)")
        plan = plans.size_plan(model, site.node, args.pp, args.tp,
                               args.ep or plans.default_ep(model, args.tp), args.weights)
        plans.check_fits(plan, site.node, min_tokens, _max_nodes(site, args.nodes))
    else:
        plan = plans.fit(model, site.node, args.weights, min_tokens,
                         _max_nodes(site, args.nodes), args.tp, args.ep)
    _check_deployable(site, plan)
    if args.json:
        print(dumps({"site": site.name, **plan.to_dict()}))
        return 0
    _print(plan, site.name, site.node)
    return 0


def model_config(model: str, site: Any) -> tuple[str, dict[str, Any]]:
    """``(name, config)`` of ``model``: a ``config.json`` or model folder, a shipped config, or
    a model in ``site``'s catalog (built-in, ``extra_models``, registered with ``fabric models
    add``): its weights folder's ``config.json`` where it is readable here, else the shipped
    config whose name begins the model's (``llama-3.1-70b`` for ``llama-3.1-70b-instruct``,
    noted on stderr). ``UnknownModel`` otherwise, saying what was looked for."""
    from fabric import plans
    from fabric.errors import UnknownModel
    from fabric.models_registry import site_catalog
    from fabric.weights import folder_of

    try:
        return plans.load_model_config(model)
    except UnknownModel as exc:
        unknown = exc
    catalog = site_catalog(site)
    if model not in catalog.names():
        raise UnknownModel(f"{unknown.message}; site {site.name!r} serves "
                           f"{', '.join(catalog.names())}", model=model,
                           available=[*plans.known_models(), *catalog.names()])
    entry = catalog.get(model)
    folder = folder_of(entry, Path(site.weights_dir).expanduser() if site.weights_dir else None)
    for candidate in (folder, folder_of(entry)):  # a GGUF converted here has the same config
        if (candidate / "config.json").is_file():
            return model, plans.load_model_config(str(candidate / "config.json"))[1]
    shipped = [k for k in plans.known_models() if model.startswith(f"{k}-")]
    if shipped:
        like = max(shipped, key=len)
        print(f"fabric: {model}'s config.json ({folder}) is not readable here; sizing with "
              f"the shipped config {like}", file=sys.stderr)
        return model, plans.load_model_config(like)[1]
    why = ("not converted from its GGUF yet: serve it once at the site"
           if entry.source.kind == "gguf-package" else "not readable here")
    raise UnknownModel(f"model {model!r} of site {site.name!r}: its config.json ({folder}) is "
                       f"{why}; give its config.json (or run `fabric plan` where the weights "
                       "are)", model=model)


def _max_nodes(site: Any, asked: int | None) -> int:
    """The most nodes a plan may take: ``--nodes``, ``node.max_nodes`` and the site's
    ``limits`` (max_nodes, and max_gpus in whole nodes), whichever is least."""
    caps = [asked, site.node.max_nodes, site.limits.max_nodes,
            site.limits.max_gpus // site.node.gpus if site.node.gpus else None]
    return max(1, min(c for c in caps if c is not None))


def _check_deployable(site: Any, plan: Any) -> None:
    """``PlanDoesNotFit`` unless ``deploy`` would take the plan: the site's ``limits``, checked
    by the rule deploy checks them with (``fabric.sites.limit_exceeded``)."""
    from fabric.errors import PlanDoesNotFit
    from fabric.sites import Plan, limit_exceeded

    deployed = Plan(pp=plan.pp, tp=plan.tp, ep=plan.ep, nodes=plan.nodes,
                    gpus_per_node=plan.ranks // plan.nodes, device="cuda")
    over = limit_exceeded(site.limits, deployed, site.jobs.walltime)
    if over:
        raise PlanDoesNotFit(
            f"pp={plan.pp} x tp={plan.tp} = {plan.ranks} GPUs on {plan.nodes} nodes exceeds "
            f"site {site.name!r}'s {over[0]} = {over[1]} (it asks for {over[2]}): deploy "
            "would refuse it", rule=over[0], limit=over[1], requested=over[2])


def _print(plan: Any, site: str, node: Any) -> None:
    print(f"{plan.model} on {site} ({node.gpus} x {node.gpu_kind or 'GPU'} "
          f"{node.gpu_memory_gib:g} GiB per node): pp={plan.pp} x tp={plan.tp} x ep={plan.ep}"
          f" = {plan.ranks} GPUs on {plan.nodes} node{'s' if plan.nodes > 1 else ''}")
    print(f"  {plan.params / 1e9:.1f}B parameters, {plan.weights} weights "
          f"{plan.weight_bytes / 1e9:.1f} GB; usable per GPU {plan.usable_bytes / GIB:.1f} GiB")
    rows = [[str(i), f"{s.layers[0]}-{s.layers[1] - 1}", f"{s.weight_bytes / GIB:.2f}",
             f"{s.kv_bytes_per_token:,}", f"{s.kv_tokens:,}"]
            for i, s in enumerate(plan.stages)]
    print_table(["stage", "layers", "weights GiB/GPU", "KV bytes/token/GPU", "KV tokens"], rows,
                right=(2, 3, 4))
    print(f"token budget: {plan.kv_tokens:,} tokens of KV cache")
