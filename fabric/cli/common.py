"""Pieces shared by the CLI's model commands: argument groups, the ``Fabric`` they open,
``--hook`` parsing, tables and JSON output.

Nothing here imports numpy or torch at module level: ``fabric --help`` and text-only commands
must start fast (``tests/test_sdk_validation.py`` checks that the CLI does not load torch).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.errors import InvalidRequest

if TYPE_CHECKING:
    from fabric.cli.progress import StatusSpinner
    from fabric.client.fabric import Fabric
    from fabric.protocol import Hook

__all__ = ["dumps", "hook_arg", "int_list", "model_args", "open_fabric", "parse_hooks", "plain",
           "print_table", "site_arg"]

HOOK_EXAMPLE = '{"kind": "steer", "layer": 10, "vector_file": "v.npy", "scale": 4.0}'


# -- argument groups ----------------------------------------------------------------------------

def site_arg(p: argparse.ArgumentParser) -> None:
    """Add ``--site``."""
    p.add_argument("--site", default="local",
                   help="site name from endpoints/ or a site definition path (default: local)")


def model_args(p: argparse.ArgumentParser, default: str) -> None:
    """Add ``--model``, ``--version`` and ``--site``."""
    p.add_argument("-m", "--model", default=default, help=f"model name (default: {default})")
    p.add_argument("--version", help="pin a model version")
    site_arg(p)


def hook_arg(p: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--hook JSON`` (parsed by ``parse_hooks`` when the command runs)."""
    p.add_argument(
        "--hook", action="append", default=[], metavar="JSON",
        help="a per-request hook as a JSON object, as fabric.protocol.Hook (repeatable): kind "
             "capture|steer|ablate_heads|ablate_neurons, layer, and vector/scale, heads or "
             "neurons; a steering vector can come from a .npy file with \"vector_file\", e.g. "
             f"'{HOOK_EXAMPLE}' (see docs/inference-modes.md)")


def int_list(text: str) -> list[int]:
    """argparse type for comma-separated integers (``"0,-1"``)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 0,-1, got {text!r}") from None
    return values


def open_fabric(args: argparse.Namespace, spinner: StatusSpinner | None = None) -> Fabric:
    """The ``Fabric`` for ``args.site``; a cold model server's state goes to ``spinner``."""
    from fabric.client.fabric import Fabric

    return Fabric(site=args.site, on_status=None if spinner is None else spinner.update,
                  status_interval_s=1.0)


def fetch_listing(args: argparse.Namespace, what: str) -> list[dict[str, Any]] | None:
    """``fab.<what>()`` for a listing command, with a spinner while a cold site starts; with
    ``--json`` it is printed here and None is returned (the caller prints its table otherwise)."""
    from fabric.cli.progress import StatusSpinner

    with StatusSpinner("fabric") as spinner, open_fabric(args, spinner) as fab:
        rows = list(getattr(fab, what)())
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return None
    return rows


# -- hooks --------------------------------------------------------------------------------------

def parse_hooks(texts: Sequence[str]) -> list[Hook] | None:
    """The ``--hook`` values as validated ``Hook``s (``None`` when there are none).

    Each value is a JSON object with the fields of ``fabric.protocol.Hook``; in place of an
    inline ``"vector"`` a steering vector may be read from ``"vector_file"``, a ``.npy`` file
    holding one 1-D array (``numpy.save(path, vec)``): a 576-float vector does not fit on a
    command line. Anything wrong raises ``InvalidRequest`` naming the hook and the problem, so
    the CLI exits 2 with ``error: ...`` before any request is sent.
    """
    if not texts:
        return None
    return [_parse_hook(text, f"--hook #{i}") for i, text in enumerate(texts, 1)]


def _parse_hook(text: str, where: str) -> Hook:
    from pydantic import ValidationError

    from fabric.protocol import Hook

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}): "
                             f"{text!r}; expected an object like '{HOOK_EXAMPLE}'") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"{where} must be a JSON object like '{HOOK_EXAMPLE}', "
                             f"got {type(data).__name__} {text!r}")
    if "vector_file" in data:
        if "vector" in data:
            raise InvalidRequest(f"{where} has both vector and vector_file: give one")
        data["vector"] = _load_vector(data.pop("vector_file"), where)
    try:
        # strict: a command line is typed by hand, so "layer": "10" or true is a mistake to
        # point out rather than coerce.
        return Hook.model_validate(data, strict=True)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'hook'}: {err['msg']}"
            for err in exc.errors())
        raise InvalidRequest(f"{where} is not a valid hook: {problems}") from None


def _load_vector(value: Any, where: str) -> list[float]:
    import numpy as np

    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where}: vector_file must be a path to a .npy file, "
                             f"got {value!r}")
    path = Path(value).expanduser()
    if not path.is_file():
        raise InvalidRequest(f"{where}: vector_file {value!r} does not exist")
    try:
        # allow_pickle=False: loading a pickle would run code from the file.
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InvalidRequest(f"{where}: vector_file {value!r} is not a readable .npy file "
                             f"({exc}); write it with numpy.save(path, vector)") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise InvalidRequest(f"{where}: vector_file {value!r} is an .npz archive; save one "
                             "vector with numpy.save(path, vector)")
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer)
                               or np.issubdtype(array.dtype, np.floating)):
        raise InvalidRequest(f"{where}: vector_file {value!r} must hold a 1-D array of numbers, "
                             f"got {array.dtype} with shape {tuple(array.shape)}")
    return [float(x) for x in array]


# -- output -------------------------------------------------------------------------------------

def dumps(value: Any, indent: int | None = 2) -> str:
    """JSON text of ``value``; tensors and numpy arrays become nested lists."""
    return json.dumps(value, indent=indent, ensure_ascii=False, default=plain)


def plain(value: Any) -> Any:
    """A JSON-able form of a tensor or array (``json``'s ``default``, pydantic's ``fallback``)."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def print_table(header: list[str], rows: list[list[str]], right: Sequence[int] = ()) -> None:
    """Columns two spaces apart, to stdout; the columns numbered in ``right`` (numbers) are
    right-aligned so that their digits line up."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    for row in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())
