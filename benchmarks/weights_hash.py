"""Where the weights hash is paid for (issue 16 item 5, issue 19 item 4).

A request worker launching a server for a model whose hash is not known yet, on SmolLM2's
converted folder (copied without its manifest each run, so nothing is cached):

- ``worker_prepare_s``: the old path, ``fabric.weights.prepare`` in the worker (hashes every
  file before the job is even submitted);
- ``worker_locate_s``: the new path, ``fabric.weights.locate`` (reads no weight file);
- ``node_hash_s``: what the server's head then spends hashing in its background threads
  (``HashJob``), overlapped with loading; ``node_load_s``: loading the same files as a rank
  does (safetensors, all tensors), for scale; ``node_load_and_hash_s``: both at once, as the
  server runs them.

Medians of ``--runs`` runs, interleaved. Prints one JSON object.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import log, median


def _copy(src: Path, root: Path, i: int) -> Path:
    from fabric import weights

    return Path(shutil.copytree(src, root / f"w{i}",
                                ignore=shutil.ignore_patterns(weights.MANIFEST)))


def _load(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                # get_tensor maps the file lazily: sum to make every page be read.
                n += int(fh.get_tensor(k).sum().isfinite())
    return n


def main() -> None:
    """Run and print the JSON result."""
    from fabric import weights
    from fabric.catalog import CatalogEntry, WeightSource

    args = common.parser(__doc__).parse_args()
    runs = 2 if args.quick else 5
    src = Path(common.weights().path)
    root = Path(tempfile.mkdtemp(prefix="fabric-bench-hash-"))
    out: dict[str, list[float]] = {k: [] for k in ("worker_prepare_s", "worker_locate_s",
                                                   "node_hash_s", "node_load_s",
                                                   "node_load_and_hash_s")}
    try:
        for i in range(runs):
            folder = _copy(src, root, i)
            entry = CatalogEntry(name="bench", version=str(i), family="causal-lm",
                                 source=WeightSource(kind="path", path=str(folder)))
            t = time.perf_counter()
            located = weights.locate(entry)
            out["worker_locate_s"].append(time.perf_counter() - t)
            assert located.sha256 is None
            t = time.perf_counter()
            job = weights.HashJob(folder, None, weights.HashClaim())
            job.result()
            out["node_hash_s"].append(time.perf_counter() - t)
            (folder / weights.MANIFEST).unlink()
            t = time.perf_counter()
            _load(folder)
            out["node_load_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            job = weights.HashJob(folder, None, weights.HashClaim())
            _load(folder)
            job.result()
            out["node_load_and_hash_s"].append(time.perf_counter() - t)
            (folder / weights.MANIFEST).unlink()
            t = time.perf_counter()
            weights.prepare(entry)
            out["worker_prepare_s"].append(time.perf_counter() - t)
            shutil.rmtree(folder)
            log(f"run {i}: " + ", ".join(f"{k}={v[-1]:.4f}" for k, v in out.items()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    result: dict[str, Any] = {
        "benchmark": "weights_hash", "model": "smollm2-135m (fp32 safetensors)",
        "bytes": size, "runs": runs,
        **{k: round(median(v), 4) for k, v in out.items()},
        "samples": {k: [round(x, 4) for x in v] for k, v in out.items()},
    }
    common.emit(result)


if __name__ == "__main__":
    main()
