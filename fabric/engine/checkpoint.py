"""Read exactly the bytes a rank needs from a safetensors file, and count them.

safetensors is a JSON header followed by raw row-major tensors. A rank that owns a slice of a
tensor reads only that slice with ``os.pread``: a slice along dim 0 is one contiguous range, a
slice along dim 1 is one range per row. ``bytes_read`` is the count of bytes actually read
(the benchmark cross-checks it against ``/proc/self/io``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsReader:
    """Random access to the tensors of one or more safetensors files."""

    def __init__(self, paths: list[Path]) -> None:
        self.bytes_read = 0
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
                start = 8 + hlen + meta["data_offsets"][0]
                self._index[name] = (len(self._fds) - 1, start, meta["dtype"], meta["shape"])

    @classmethod
    def from_folder(cls, folder: Path) -> SafetensorsReader:
        """All ``*.safetensors`` files of a folder."""
        return cls(sorted(Path(folder).glob("*.safetensors")))

    def names(self) -> list[str]:
        """Tensor names in the checkpoint."""
        return list(self._index)

    def shape(self, name: str) -> list[int]:
        """Full shape of a stored tensor."""
        return list(self._index[name][3])

    def read(self, name: str, dim: int | None = None, start: int = 0,
             stop: int | None = None) -> torch.Tensor:
        """The tensor ``name``, or its ``[start:stop]`` slice along ``dim`` (0 or 1)."""
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
            out_shape = [stop - start, *shape[1:]]
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


def io_read_bytes() -> int:
    """Bytes this process has read through read/pread so far (Linux ``rchar``)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
