"""``fabric shard``: write a checkpoint as one safetensors file per rank of a pp x tp plan.

Each rank then reads exactly its own file. The manifest records the plan, the full shapes
(so the partition can be recomputed), and a sha256 per file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from fabric.engine.checkpoint import SafetensorsReader
from fabric.engine.loader import SHARD_MANIFEST, load_config, rank_shards
from fabric.weights import file_sha256

_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "chat_template.jinja")


def write_shards(folder: Path, out: Path, pp: int, tp: int, source_sha256: str = "",
                 balance: str = "params", ep: int = 1) -> dict:
    """Shard the checkpoint in ``folder`` into ``out`` for a pp x tp x ep plan whose stages are
    balanced by ``balance`` (``partition.stage_costs``); returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(folder)
    shards = rank_shards(folder, config, pp, tp, balance, ep)
    reader = SafetensorsReader.from_folder(folder)
    ranks = []
    try:
        for shard in shards:
            tensors = {s.name: reader.read(s.name, s.dim, s.start, s.stop).contiguous()
                       for s in shard.slices}
            name = f"rank-{shard.rank:04d}.safetensors"
            save_file(tensors, str(out / name))
            ranks.append({
                "rank": shard.rank, "stage": shard.stage, "tp_rank": shard.tp_rank,
                "layers": [shard.layers.start, shard.layers.stop], "file": name,
                "bytes": (out / name).stat().st_size, "sha256": file_sha256(out / name),
            })
        full_shapes = {n: reader.shape(n) for n in reader.names()}
    finally:
        reader.close()
    for extra in _COPY:
        if (folder / extra).exists():
            shutil.copy2(folder / extra, out / extra)
    manifest = {"pp": pp, "tp": tp, "ep": ep, "balance": balance, "source": str(folder),
                "source_sha256": source_sha256, "full_shapes": full_shapes, "ranks": ranks}
    (out / SHARD_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
