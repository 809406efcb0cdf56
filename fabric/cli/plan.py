"""``fabric plan MODEL --site SITE``: the pp x tp x ep plan that holds a model on a site's nodes.

Arithmetic only (``fabric.plans``): the model's ``config.json`` (a shipped one by name, or a
path) and the site's ``node:`` shape; no weights are read and nothing is launched.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("model", help="a shipped model config (e.g. llama-3.1-405b, deepseek-v3, "
                   "kimi-k2), a config.json, or a model folder")
    site_arg(p)
    p.add_argument("--weights", choices=("bfloat16", "float16", "float32", "fp8"),
                   default="bfloat16", help="how the weights are stored on the GPUs (fp8: "
                   "resident FP8, which the engine does not do yet; default bfloat16)")
    p.add_argument("--nodes", type=int, help="most nodes the plan may use (default: the "
                   "site's node.max_nodes, else as many as it takes)")
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
    name, config = plans.load_model_config(args.model)
    model = plans.shape_from_config(config, name)
    min_tokens = plans.MIN_TOKENS if args.min_tokens is None else args.min_tokens
    if args.pp is not None:
        if args.tp is None:
            raise InvalidRequest("--pp needs --tp (or leave both out to search)")
        plan = plans.size_plan(model, site.node, args.pp, args.tp,
                               args.ep or plans.default_ep(model, args.tp), args.weights)
        plans.check_fits(plan, site.node, min_tokens, args.nodes or site.node.max_nodes)
    else:
        plan = plans.fit(model, site.node, args.weights, min_tokens, args.nodes, args.tp,
                         args.ep)
    if args.json:
        print(dumps({"site": site.name, **plan.to_dict()}))
        return 0
    _print(plan, site.name, site.node)
    return 0


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
