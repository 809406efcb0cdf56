"""``fabric shard MODEL --pp P --tp T --out DIR``: pre-split a checkpoint, one file per rank."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fabric.catalog import Catalog, CatalogEntry, WeightSource
from fabric.errors import InvalidRequest


def register(subparsers: Any) -> None:
    """Add the ``shard`` subcommand."""
    p = subparsers.add_parser(
        "shard", help="write a checkpoint as per-rank shard files for a pp x tp plan",
        description="Split MODEL (a catalog name or a local transformers folder) into one "
        "safetensors file per rank of a pp x tp plan, plus shard-manifest.json with a sha256 "
        "per file. Each model-server rank then reads exactly its own file.")
    p.add_argument("model", help="catalog name (see `fabric models`) or a checkpoint folder")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel groups per stage "
                   "(mixtures of experts; must divide --tp)")
    p.add_argument("--balance", choices=("params", "compute"), default="params",
                   help="how layers are spread over stages: even weights per rank (default) or "
                   "even work per step; must match the plan's balance")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Shard the model and print one line per rank file."""
    from fabric.engine.presplit import write_shards
    from fabric.weights import prepare

    if args.pp < 1 or args.tp < 1:
        raise InvalidRequest(f"--pp and --tp must be >= 1 (got pp={args.pp}, tp={args.tp})")
    weights = prepare(_entry(args.model))
    try:
        manifest = write_shards(weights.path, args.out, args.pp, args.tp, weights.sha256,
                                args.balance, args.ep)
    except ValueError as exc:  # the plan does not fit the model (too many stages or tp ranks)
        raise InvalidRequest(str(exc)) from None
    if args.json:
        print(json.dumps({k: v for k, v in manifest.items() if k != "full_shapes"}, indent=1))
        return 0
    for r in manifest["ranks"]:
        print(f"rank {r['rank']}: stage {r['stage']} tp {r['tp_rank']} layers "
              f"{r['layers'][0]}-{r['layers'][1] - 1}  {r['bytes'] / 1e6:8.1f} MB  "
              f"{r['file']}  sha256 {r['sha256'][:16]}...")
    print(f"wrote {len(manifest['ranks'])} shard files and shard-manifest.json to {args.out}")
    return 0


def _entry(model: str) -> CatalogEntry:
    if Path(model).is_dir():
        return CatalogEntry(name=Path(model).name, version="local",
                            source=WeightSource(kind="path", path=str(Path(model).resolve())))
    return Catalog().get(model)
