"""Tiny FP8 checkpoints for tests and benchmarks: a checkpoint's weights quantized the way
DeepSeek-V3 ships them (``W`` in FP8 plus a fp32 ``W_scale_inv`` per block, per row or per
tensor), next to the same model with those weights dequantized (the reference).

The dequantization here is DeepSeek-V3's ``weight_dequant``, block by block, written apart from
the engine's reader so tests compare two independent computations.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
Scheme = Callable[[str], "tuple[torch.dtype, tuple[int, int] | str] | None"]
"""Tensor name -> (FP8 dtype, block ``(rows, cols)`` or ``"tensor"`` or ``"row"``), or None to
store it unquantized."""


def quantize(w: torch.Tensor, dtype: torch.dtype, block: tuple[int, int]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` in FP8 with one fp32 scale_inv per ``block`` (amax / the format's max)."""
    rows, cols = w.shape
    br, bc = block
    scale = torch.empty(-(-rows // br), -(-cols // bc))
    q = torch.empty(rows, cols, dtype=dtype)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / FP8_MAX[dtype]
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (tile / scale[i, j]).to(dtype)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek-V3's ``weight_dequant`` block by block: ``float(q) * s[i // B, j // B]``."""
    br, bc = block
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (
                q[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float() * scale[i, j])
    return out


def write_fp8_pair(src: Path, fp8_dir: Path, ref_dir: Path, scheme: Scheme,
                   block: tuple[int, int]) -> None:
    """Write ``src`` (a checkpoint folder with one ``model.safetensors``) quantized by
    ``scheme`` into ``fp8_dir`` (``config.json`` gains DeepSeek-V3's ``quantization_config``
    with ``weight_block_size = block``) and the dequantized weights in fp32 into ``ref_dir``."""
    from safetensors.torch import load_file, save_file

    for d in (fp8_dir, ref_dir):
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors"))
    stored: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        how = scheme(name)
        if how is None:
            stored[name] = ref[name] = w
            continue
        dtype, kind = how
        cut = (w.shape[0], w.shape[1]) if kind == "tensor" else (1, w.shape[1]) \
            if kind == "row" else kind
        assert isinstance(cut, tuple)
        q, scale = quantize(w, dtype, cut)
        stored[name], ref[name] = q, dequantize(q, scale, cut)
        stored[name + "_scale_inv"] = scale.reshape(()) if kind == "tensor" else scale
    save_file(stored, str(fp8_dir / "model.safetensors"))
    save_file(ref, str(ref_dir / "model.safetensors"))
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (fp8_dir / "config.json").write_text(json.dumps(config, indent=1))


def fake_quant(x: torch.Tensor, group: int | None) -> torch.Tensor:
    """``x`` rounded through ``float8_e4m3fn`` with one factor per token and per ``group``
    columns (None: the whole row), back in ``x``'s dtype: what a scaled FP8 matmul multiplies
    instead of ``x``. Written apart from ``fabric.engine.fp8`` (the reference for its tests)."""
    xf = x.float()
    width = xf.shape[-1] if group is None else group
    out = torch.empty_like(xf)
    for j in range(0, xf.shape[-1], width):
        part = xf[..., j:j + width]
        amax = part.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
        scale = amax / 448.0
        out[..., j:j + width] = (part / scale).to(torch.float8_e4m3fn).float() * scale
    return out.to(x.dtype)


def add_fake_quant_hooks(model: torch.nn.Module, groups: dict[str, int | None]) -> None:
    """Round the input of each named linear module of a transformers model through FP8
    (``fake_quant``) before it multiplies: ``groups`` maps module names (as
    ``named_modules`` gives them) to the activation group width. The model then computes what
    a scaled-FP8-matmul model computes, in plain floating point."""
    modules = dict(model.named_modules())
    for name, group in groups.items():
        modules[name].register_forward_pre_hook(
            lambda _m, args, g=group: (fake_quant(args[0], g), *args[1:]))
