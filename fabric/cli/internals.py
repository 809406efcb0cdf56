"""CLI commands for a model's internals: ``logprobs`` and ``hidden-states``.

Thin layers over ``Fabric.logprobs`` and ``Fabric.hidden_states`` (see docs/inference-modes.md):
the SDK checks the arguments and does the work; these functions parse arguments and print.
Results go to stdout, the spinner to stderr.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from fabric.cli.common import (
    dumps,
    hook_arg,
    int_list,
    model_args,
    open_fabric,
    parse_hooks,
    print_table,
)
from fabric.errors import FabricError, InvalidRequest

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands to the ``fabric`` parser."""
    raw = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "logprobs", help="log-probability of each token of a text (or of a continuation)",
        description="Score CONTINUATION given TEXT: log p(token | everything before it) for "
                    "each of its tokens, their total and the perplexity exp(-mean). Without "
                    "--continuation every token of TEXT after the first is scored.",
        epilog='examples:\n  fabric logprobs "The capital of France is" --continuation " Paris."\n'
               '  fabric logprobs "The mitochondria is the powerhouse of the cell." --json',
        formatter_class=raw)
    p.add_argument("text", metavar="TEXT", help="the text (the prompt when scoring a continuation)")
    p.add_argument("-c", "--continuation", metavar="C", help="the text to score after TEXT")
    model_args(p, default="smollm2-135m")
    hook_arg(p)
    p.add_argument("--json", action="store_true", help="print the SDK's result as JSON")
    p.set_defaults(func=cmd_logprobs)

    p = subparsers.add_parser(
        "hidden-states", help="the residual stream at chosen layers and token positions",
        description="Run TEXT through the model and return the hidden state after each of "
                    "LAYERS (0: token embeddings, -1: the final normed output) at POSITIONS "
                    "(default: every token). Prints a summary per layer, or writes the arrays "
                    "to an .npz file with --out.",
        epilog="examples:\n  fabric hidden-states \"The mitochondria is\" --layers 0,15,-1\n"
               "  fabric hidden-states \"The mitochondria is\" --layers=-1 --positions=-1 "
               "--out h.npz\n"
               "(a list starting with a minus sign needs '=': --layers=-1,0)",
        formatter_class=raw)
    p.add_argument("text", metavar="TEXT", help="the text")
    p.add_argument("--layers", type=int_list, default=[-1], metavar="L[,L...]",
                   help="hidden-state layers, comma-separated; negative counts from the end "
                        "(default: -1)")
    p.add_argument("--positions", type=int_list, metavar="P[,P...]",
                   help="token positions, comma-separated; negative counts from the end "
                        "(default: every token)")
    model_args(p, default="smollm2-135m")
    hook_arg(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", metavar="FILE.npz", type=Path,
                     help="write one array per layer (layer_0, layer_-1, ...) plus token_ids "
                          "and positions to this .npz file")
    out.add_argument("--json", action="store_true",
                     help="print the SDK's result as JSON (arrays as nested lists)")
    p.set_defaults(func=cmd_hidden_states)


# -- logprobs -----------------------------------------------------------------------------------

def cmd_logprobs(args: argparse.Namespace) -> int:
    """``fabric logprobs``: per-token log-probabilities, their total and the perplexity."""
    from fabric.cli.progress import StatusSpinner

    hooks = parse_hooks(args.hook)
    with StatusSpinner(f"waiting for {args.model}") as spinner, \
            open_fabric(args, spinner) as fab:
        result = fab.logprobs(args.text, args.continuation, model=args.model,
                              version=args.version, hooks=hooks)
        spinner.stop()
    if args.json:
        print(dumps(result))
        return 0
    token_ids = [int(t) for t in result.get("token_ids") or []]
    values = [float(v) for v in result.get("logprobs") or []]
    # Token text comes from the model server (the client may not have the tokenizer).
    pieces = [repr(p) for p in result.get("tokens") or []] or [""] * len(token_ids)
    if not len(token_ids) == len(values) == len(pieces):
        raise FabricError(f"logprobs result has {len(token_ids)} token ids, {len(pieces)} "
                          f"tokens and {len(values)} log-probabilities")
    rows = [[str(i), str(t), piece, f"{v:.4f}"]
            for i, (t, piece, v) in enumerate(zip(token_ids, pieces, values, strict=True))]
    print_table(["POS", "TOKEN_ID", "TOKEN", "LOGPROB"], rows, right=(0, 1, 3))
    total = float(result.get("total", sum(values)))
    print(f"total {total:.4f} over {len(values)} tokens; perplexity {_perplexity(values)}")
    return 0


def _perplexity(values: list[float]) -> str:
    """``exp(-mean(values))`` formatted, or "n/a" when nothing was scored."""
    if not values:
        return "n/a"
    try:
        return f"{math.exp(-sum(values) / len(values)):.4f}"
    except OverflowError:  # a mean log-prob below about -709
        return "inf"


# -- hidden states ------------------------------------------------------------------------------

def cmd_hidden_states(args: argparse.Namespace) -> int:
    """``fabric hidden-states``: a summary per layer, the arrays as JSON, or an .npz file."""
    from fabric.cli.progress import StatusSpinner

    hooks = parse_hooks(args.hook)
    if args.out is not None and not args.out.expanduser().parent.is_dir():
        # Checked before the request: a model run should not be lost to a typo in the path.
        raise InvalidRequest(f"--out: folder {str(args.out.parent)!r} does not exist")
    with StatusSpinner(f"waiting for {args.model}") as spinner, \
            open_fabric(args, spinner) as fab:
        result = fab.hidden_states(args.text, model=args.model, version=args.version,
                                   layers=args.layers, positions=args.positions, hooks=hooks)
        spinner.stop()
    if args.json:
        print(dumps(result))
        return 0
    arrays = _layer_arrays(result)
    if args.out is not None:
        print(_write_npz(args.out.expanduser(), arrays, result))
        return 0
    positions = [int(p) for p in result.get("positions") or []]
    print(f"{len(result.get('token_ids') or [])} tokens; positions "
          f"{','.join(str(p) for p in positions) or 'none'}")
    rows = [_summary(layer, array) for layer, array in arrays.items()]
    print_table(["LAYER", "SHAPE", "MEAN", "STD", "LAST_NORM"], rows, right=(2, 3, 4))
    return 0


def _summary(layer: str, array: Any) -> list[str]:
    """Layer, shape, mean, std and the L2 norm of the last position's row, as table cells."""
    import numpy as np

    # float64: a float32 sum over a large model's rows loses the digits we print.
    values = array.astype(np.float64)
    last = float(np.linalg.norm(values[-1])) if values.ndim == 2 and len(values) else math.nan
    return [layer, "x".join(str(n) for n in values.shape), f"{values.mean():.4f}",
            f"{values.std():.4f}", f"{last:.4f}"]


def _layer_arrays(result: dict[str, Any]) -> dict[str, Any]:
    """``{layer: float32 numpy array (positions, hidden)}`` in the order the site returned."""
    import numpy as np

    layers = result.get("layers")
    if not isinstance(layers, dict):
        raise FabricError("hidden_states result has no 'layers'")
    out: dict[str, Any] = {}
    for layer, value in layers.items():
        # The SDK hands back torch tensors; .numpy() shares their memory, no copy.
        array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        out[str(layer)] = array.astype(np.float32, copy=False)
    return out


def _write_npz(path: Path, arrays: dict[str, Any], result: dict[str, Any]) -> Path:
    """Write ``layer_<n>`` arrays, ``token_ids`` and ``positions`` to ``path``; returns it."""
    import numpy as np

    data = {f"layer_{layer}": array for layer, array in arrays.items()}
    data["token_ids"] = np.asarray(result.get("token_ids") or [], dtype=np.int64)
    data["positions"] = np.asarray(result.get("positions") or [], dtype=np.int64)
    try:
        # An open file, not the name: numpy.savez would append ".npz" to any other suffix and
        # the printed path would be wrong.
        with path.open("wb") as fh:
            np.savez(fh, **data)
    except OSError as exc:
        raise FabricError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    return path
