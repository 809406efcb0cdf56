"""Read exactly the bytes a rank needs from a safetensors file, and count them.

safetensors is a JSON header followed by raw row-major tensors. A rank that owns a slice of a
tensor reads only that slice with ``os.pread``: a slice along dim 0 is one contiguous range, a
slice along dim 1 is one range per row. ``bytes_read`` is the count of bytes actually read
(the benchmark cross-checks it against ``/proc/self/io``).

FP8 checkpoints (``F8_E4M3`` / ``F8_E5M2``) are dequantized as they are read, on the CPU, to
the reader's ``dequant_dtype``. The layout followed is DeepSeek-V3's (``deepseek-ai/DeepSeek-V3``,
``inference/fp8_cast_bf16.py`` and ``weight_dequant`` in ``inference/kernel.py``): a weight ``W``
stored in FP8 has a companion fp32 tensor named ``W + "_scale_inv"`` holding one factor per
``block`` (128 x 128 there, ``quantization_config.weight_block_size`` in ``config.json``), and
``dequantized[i, j] = float(W[i, j]) * scale_inv[i // 128, j // 128]`` (edge blocks are partial:
the scale tensor has ``ceil(rows / 128) x ceil(cols / 128)`` entries). A scale tensor with one
element is a per-tensor scale, one of shape ``(rows, 1)`` a per-row scale; both are read the same
way, as a single block. The companions are hidden from ``names()``: callers (the partition, the
loader, ``fabric shard``) see ordinary weights, and a rank that reads a slice of ``W`` reads only
the scale rows or columns of the blocks its slice touches, whatever the slice's alignment.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fabric.errors import UnsupportedCheckpoint

_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"
"""DeepSeek-V3's name for a weight's dequantization factors (``W`` -> ``W_scale_inv``)."""
DEFAULT_BLOCK = (128, 128)
"""DeepSeek-V3's block size, used when ``config.json`` gives none."""


@dataclass
class Fp8Slice:
    """An FP8 tensor slice as stored, with the scale blocks it touches, not yet dequantized.

    ``Plan.fp8 = "dequantize"`` turns it into the compute dtype at load (``dequantize``);
    ``"keep"`` holds it as it is in a ``fabric.engine.fp8.Fp8Linear``.
    """

    data: torch.Tensor
    """The stored values (``float8_e4m3fn`` or ``float8_e5m2``), shape of the slice."""
    scale: torch.Tensor
    """fp32 factors of the blocks the slice touches (2-D; 1 x 1 for a per-tensor scale)."""
    block: tuple[int, int]
    """Rows and columns each scale entry covers."""
    offset: tuple[int, int]
    """Where the slice starts inside its first block (rows, columns)."""

    def to(self, device: str | torch.device) -> Fp8Slice:
        """The same slice with its values and factors on ``device``."""
        return Fp8Slice(self.data.to(device), self.scale.to(device), self.block, self.offset)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``float(data) * scale`` broadcast over the blocks, in fp32, then cast to ``dtype``."""
        values = self.data.to(torch.float32)
        if self.scale.numel() == 1:  # per tensor (the only scale other ranks can have)
            return (values * self.scale.reshape(())).to(dtype)
        (br, bc), (r0, c0) = self.block, self.offset
        rows, cols = values.shape
        full = self.scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)
        return (values * full[r0:r0 + rows, c0:c0 + cols]).to(dtype)


class SafetensorsReader:
    """Random access to the tensors of one or more safetensors files.

    ``block``: the FP8 scale block size (rows, columns); ``dequant_dtype``: what FP8 tensors
    are dequantized to (other dtypes are returned as stored).
    """

    def __init__(self, paths: list[Path], *, block: tuple[int, int] = DEFAULT_BLOCK,
                 dequant_dtype: torch.dtype = torch.float32) -> None:
        self.bytes_read = 0
        self.block = (int(block[0]), int(block[1]))
        self.dequant_dtype = dequant_dtype
        self._index: dict[str, tuple[int, int, str, list[int]]] = {}
        self._fds: list[int] = []
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            self._fds.append(fd)
            (hlen,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, hlen, 8))
            self.bytes_read += 8 + hlen
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in _DTYPES:
                    self.close()
                    raise UnsupportedCheckpoint(
                        f"{path}: tensor {name} has dtype {meta['dtype']}; the reader accepts "
                        f"{sorted(_DTYPES)}", dtype=meta["dtype"], accepted=sorted(_DTYPES))
                start = 8 + hlen + meta["data_offsets"][0]
                self._index[name] = (len(self._fds) - 1, start, meta["dtype"], meta["shape"])
        self._scales = {n + SCALE_SUFFIX: n for n in self._index
                        if n + SCALE_SUFFIX in self._index and self.is_fp8(n)}

    @classmethod
    def from_folder(cls, folder: Path, *, dequant_dtype: torch.dtype = torch.float32
                    ) -> SafetensorsReader:
        """All ``*.safetensors`` files of a folder; the FP8 block size comes from its
        ``config.json`` (``quantization_config.weight_block_size``) when it says."""
        folder = Path(folder)
        return cls(sorted(folder.glob("*.safetensors")), block=fp8_block_size(folder),
                   dequant_dtype=dequant_dtype)

    def names(self) -> list[str]:
        """Tensor names in the checkpoint (FP8 scale companions left out)."""
        return [n for n in self._index if n not in self._scales]

    def shape(self, name: str) -> list[int]:
        """Full shape of a stored tensor."""
        return list(self._index[name][3])

    def is_fp8(self, name: str) -> bool:
        """True when ``name`` is stored in an FP8 dtype."""
        return self._index[name][2].startswith("F8_")

    def fp8_block(self, name: str) -> tuple[int, int] | None:
        """The rows x columns each scale factor of FP8 tensor ``name`` covers (the whole
        tensor for a per-tensor scale, ``(1, cols)`` per row); None when ``name`` is not FP8
        or has no scale companion."""
        scale_name = name + SCALE_SUFFIX
        if not self.is_fp8(name) or scale_name not in self._index:
            return None
        return self._block_of(name, self.shape(name), self.shape(scale_name))

    def read(self, name: str, dim: int | None = None, start: int = 0,
             stop: int | None = None) -> torch.Tensor:
        """The tensor ``name``, or its ``[start:stop]`` slice along ``dim`` (0 or 1); FP8
        tensors come back dequantized to ``dequant_dtype``."""
        if self.is_fp8(name):
            return self.read_fp8(name, dim, start, stop).dequantize(self.dequant_dtype)
        return self._read_raw(name, dim, start, stop)

    def read_fp8(self, name: str, dim: int | None = None, start: int = 0,
                 stop: int | None = None) -> Fp8Slice:
        """An FP8 tensor (or slice) as stored, with the scale blocks its rows/columns touch."""
        data = self._read_raw(name, dim, start, stop)
        shape = self.shape(name)
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self._index:  # no companion: the values are the weights
            return Fp8Slice(data, torch.ones(1, 1), (1, 1), (0, 0))
        block = self._block_of(name, shape, self.shape(scale_name))
        if len(shape) != 2 or block == (shape[0], shape[1]):
            return Fp8Slice(data, self._read_raw(scale_name).reshape(1, 1).float(),
                            block, (0, 0))
        if dim is None:
            return Fp8Slice(data, self._read_raw(scale_name).float(), block, (0, 0))
        stop = shape[dim] if stop is None else stop
        first, last = start // block[dim], math.ceil(stop / block[dim])
        scale = self._read_raw(scale_name, dim, first, last).float()
        offset = (start - first * block[0], 0) if dim == 0 else (0, start - first * block[1])
        return Fp8Slice(data, scale, block, offset)

    def _block_of(self, name: str, shape: list[int], scale_shape: list[int]) -> tuple[int, int]:
        """The block each scale entry covers, checked against the scale tensor's shape."""
        if math.prod(scale_shape) == 1:
            return (shape[0], shape[1]) if len(shape) == 2 else (1, 1)
        if len(shape) == 2 and scale_shape == [shape[0], 1]:
            return (1, shape[1])  # per-row scales
        br, bc = self.block
        want = [math.ceil(shape[0] / br), math.ceil(shape[1] / bc)] if len(shape) == 2 else None
        if scale_shape != want:
            raise UnsupportedCheckpoint(
                f"{name}{SCALE_SUFFIX} has shape {scale_shape}; for {name} {shape} with "
                f"{br}x{bc} blocks it must be {want}, one element (per tensor) or "
                f"[{shape[0]}, 1] (per row)", tensor=name, scale_shape=scale_shape)
        return br, bc

    def _read_raw(self, name: str, dim: int | None = None, start: int = 0,
                  stop: int | None = None) -> torch.Tensor:
        """The stored bytes of ``name`` (or a slice of it) as a tensor of the stored dtype."""
        fd_i, offset, dtype_name, shape = self._index[name]
        dtype = _DTYPES[dtype_name]
        item = torch.empty((), dtype=dtype).element_size()
        fd = self._fds[fd_i]
        if dim is None:
            stop, dim = shape[0] if shape else 1, 0
        stop = shape[dim] if stop is None else stop
        if dim == 0:
            row = item * (int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1)
            raw = os.pread(fd, row * (stop - start), offset + row * start)
            out_shape = [stop - start, *shape[1:]] if shape else []
        elif dim == 1 and len(shape) == 2:
            row = item * shape[1]
            width = item * (stop - start)
            raw = b"".join(
                os.pread(fd, width, offset + r * row + item * start) for r in range(shape[0])
            )
            out_shape = [shape[0], stop - start]
        else:
            raise ValueError(f"cannot slice {name} {shape} along dim {dim}")
        self.bytes_read += len(raw)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(out_shape)

    def close(self) -> None:
        """Close the files."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def fp8_block_size(folder: Path) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` of the checkpoint's ``config.json``, or
    DeepSeek-V3's 128 x 128 when the config has none."""
    try:
        config: dict[str, Any] = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return DEFAULT_BLOCK
    block = (config.get("quantization_config") or {}).get("weight_block_size")
    if not block:
        return DEFAULT_BLOCK
    return int(block[0]), int(block[1])


def fp8_matmul_available(device: str | torch.device) -> bool:
    """Whether ``device`` could multiply FP8 weights without dequantizing them first: a CUDA
    GPU of compute capability 8.9 or newer (Ada, Hopper) and a torch with ``_scaled_mm``.

    ``Plan.fp8 = "auto"`` keeps FP8 weights where this is true (``fabric.engine.fp8``,
    which also allows ``keep`` on CPUs for tests). Untested on a GPU here.
    """
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(dev) >= (8, 9)


def io_read_bytes() -> int:
    """Bytes this process has read through read/pread so far (Linux ``rchar``)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
