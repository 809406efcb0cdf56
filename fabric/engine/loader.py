"""Build one rank's ``StageModel`` reading only the bytes it owns.

Two sources: a full checkpoint folder (each rank reads its slices with ``pread``) or a folder
written by ``fabric shard`` (each rank reads exactly its own file). Either way the model is
constructed on the meta device and materialised from those tensors only, so no rank ever holds
the whole model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fabric.engine import fp8 as fp8_weights
from fabric.engine.checkpoint import Fp8Slice, SafetensorsReader, io_read_bytes
from fabric.engine.deepseek import MODEL_TYPE_ALIASES
from fabric.engine.model import StageModel, TensorParallel
from fabric.engine.partition import RankShard, TensorSlice, plan_ranks
from fabric.errors import DeploymentError

SHARD_MANIFEST = "shard-manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadReport:
    """What loading cost this rank."""

    rank: int
    bytes_read: int
    """Bytes of tensor data and headers read by the reader."""
    io_bytes: int
    """Bytes the process read from files meanwhile (``/proc/self/io`` rchar), config included."""
    seconds: float
    shard_bytes: int
    """Size of the tensors this rank owns (as held: FP8 kept at one byte a value)."""
    fp8: str = ""
    """What was done with FP8 weights: ``keep`` or ``dequantize`` ("" : the checkpoint had
    none)."""


def load_config(folder: Path) -> Any:
    """The transformers config of a checkpoint or shard folder (a ``model_type`` in
    ``deepseek.MODEL_TYPE_ALIASES``, e.g. Kimi K2's ``kimi_k2``, read as the type it aliases,
    without its remote code)."""
    from transformers import AutoConfig

    path = Path(folder) / "config.json"
    raw = json.loads(path.read_text()) if path.is_file() else {}
    alias = MODEL_TYPE_ALIASES.get(str(raw.get("model_type")))
    if alias is None:
        return AutoConfig.from_pretrained(folder)
    raw = {k: v for k, v in raw.items() if k != "auto_map"}
    return AutoConfig.for_model(**{**raw, "model_type": alias})


def rank_shards(folder: Path, config: Any, pp: int, tp: int, balance: str = "params",
                ep: int = 1) -> list[RankShard]:
    """The partition of a full checkpoint for a pp x tp x ep plan (``partition.plan_ranks``)."""
    reader = SafetensorsReader.from_folder(folder)
    try:
        shapes = {n: reader.shape(n) for n in reader.names()}
    finally:
        reader.close()
    return plan_ranks(config, shapes, pp, tp, balance, ep)


def build_stage(folder: Path, rank: int, pp: int, tp: int, dtype: str,
                comm: TensorParallel | None, shard_dir: Path | None = None,
                device: str = "cpu", balance: str = "params", ep: int = 1,
                fp8: str = "auto", fp8_method: str = "scaled_mm"
                ) -> tuple[StageModel, LoadReport]:
    """This rank's stage model, materialised from its share of the weights on ``device``
    (``balance``: how the plan spreads layers over stages, ``partition.stage_costs``; ``ep``:
    expert groups per stage, ``fabric.engine.experts``; ``fp8``: the plan's FP8 mode,
    ``fabric.engine.fp8.resolve_mode``; ``fp8_method``: how kept weights multiply,
    ``Fp8Linear``)."""
    t0, io0 = time.perf_counter(), io_read_bytes()
    config = load_config(shard_dir or folder)
    kept: dict[str, Fp8Slice] = {}
    if shard_dir is not None:
        shard, reader, names = _from_shard_dir(shard_dir, config, rank, pp, tp, balance, ep)
        mode = _fp8_mode(reader, fp8, device)
        model = StageModel(config, shard, comm, device)
        if mode == "keep":  # a shard file holds its slices whole: nothing to align
            kept = {n: reader.read_fp8(n).to(device) for n in names
                    if reader.is_fp8(n) and fp8_weights.keep_target(model, n)}
        tensors = {n: reader.read(n) for n in names if n not in kept}
    else:
        shards = rank_shards(folder, config, pp, tp, balance, ep)
        shard = shards[rank]
        reader = SafetensorsReader.from_folder(folder, dequant_dtype=DTYPES[dtype])
        mode = _fp8_mode(reader, fp8, device)
        model = StageModel(config, shard, comm, device)
        if mode == "keep":
            _check_blocks(reader, shards)  # every rank's slices: all ranks refuse alike
            kept = {s.name: reader.read_fp8(s.name, s.dim, s.start, s.stop).to(device)
                    for s in shard.slices
                    if reader.is_fp8(s.name) and fp8_weights.keep_target(model, s.name)}
        tensors = {s.name: reader.read(s.name, s.dim, s.start, s.stop) for s in shard.slices
                   if s.name not in kept}
    reader.close()
    fp8_weights.install(model, kept, fp8_method)
    model.load(tensors, DTYPES[dtype])
    size = sum(t.numel() * t.element_size() for t in tensors.values()) + sum(
        p.data.numel() * p.data.element_size() + p.scale.numel() * 4 for p in kept.values())
    report = LoadReport(rank, reader.bytes_read, io_read_bytes() - io0,
                        time.perf_counter() - t0, size, mode)
    return model, report


def _fp8_mode(reader: SafetensorsReader, requested: str, device: str) -> str:
    """The plan's FP8 mode resolved for ``device``; "" when the checkpoint has no FP8 tensor
    (then ``keep`` is not refused anywhere: there is nothing to keep)."""
    if not any(reader.is_fp8(n) for n in reader.names()):
        return ""
    try:
        return fp8_weights.resolve_mode(requested, device)
    except BaseException:
        reader.close()
        raise


def _check_blocks(reader: SafetensorsReader, shards: list[RankShard]) -> None:
    """Refuse the plan if any rank's slice of a block-scaled FP8 layer weight cuts a block."""
    try:
        for shard in shards:
            for s in shard.slices:
                block = reader.fp8_block(s.name)
                if block is not None and s.name.startswith("model.layers."):
                    fp8_weights.check_aligned(s.name, reader.shape(s.name), block, s.dim,
                                              s.start, s.stop, shard.rank)
    except BaseException:
        reader.close()
        raise


def _from_shard_dir(shard_dir: Path, config: Any, rank: int, pp: int, tp: int, balance: str,
                    ep: int = 1) -> tuple[RankShard, SafetensorsReader, list[str]]:
    manifest = json.loads((shard_dir / SHARD_MANIFEST).read_text())
    # Manifests from before plans had a balance (or ep) were balanced by parameters, ep=1.
    written = (manifest["pp"], manifest["tp"], manifest.get("balance", "params"),
               manifest.get("ep", 1))
    if written != (pp, tp, balance, ep):
        raise DeploymentError(
            f"{shard_dir} is sharded for pp={written[0]} tp={written[1]} balance={written[2]} "
            f"ep={written[3]}, not pp={pp} tp={tp} balance={balance} ep={ep}; run "
            "`fabric shard` for this plan")
    entry = manifest["ranks"][rank]
    shapes = {k: list(v) for k, v in manifest["full_shapes"].items()}
    shard = plan_ranks(config, shapes, pp, tp, balance, ep)[rank]
    reader = SafetensorsReader([shard_dir / entry["file"]])
    want = {s.name: _sliced(shapes[s.name], s) for s in shard.slices}
    have = {n: reader.shape(n) for n in reader.names()}
    if have != want:  # e.g. written by an older fabric that split the model differently
        reader.close()
        odd = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))
        raise DeploymentError(
            f"{shard_dir / entry['file']} does not hold what this fabric's plan gives rank "
            f"{rank} ({len(odd)} tensors differ, e.g. {odd[0]}: file {have.get(odd[0])}, plan "
            f"{want.get(odd[0])}); it was sharded differently: run `fabric shard` again")
    return shard, reader, reader.names()


def _sliced(full: list[int], s: TensorSlice) -> list[int]:
    """The shape of slice ``s`` of a tensor of shape ``full``."""
    if s.dim is None:
        return list(full)
    out = list(full)
    out[s.dim] = (full[s.dim] if s.stop is None else s.stop) - s.start
    return out
