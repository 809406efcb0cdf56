"""Resident FP8 weights multiplied with scaled FP8 matmuls (``Plan.fp8 = "keep"``).

By default an FP8 checkpoint is dequantized as it is read (``fabric.engine.checkpoint``); with
``keep`` the decoder layers' linear projections stay in their stored FP8 dtype with their
``weight_scale_inv`` factors (half the bytes of bf16), and each matmul quantizes its input rows
to ``float8_e4m3fn`` on the fly and calls ``torch._scaled_mm``:

* per-tensor and per-row weight scales: one scaled matmul, the activations scaled per token
  (``scale_a`` ``[tokens, 1]``) and the weight per output row (``scale_b`` ``[1, out]``, the
  per-tensor factor broadcast): torch's ``RowWise`` recipe;
* block-wise scales (DeepSeek-V3's 128 x 128 ``weight_scale_inv``): where torch multiplies
  block-scaled operands natively for the device (``F.scaled_mm`` with ``BlockWise1x128`` x
  ``BlockWise128x128``, SM90 in torch 2.13; found by a probe that checks the result, once per
  device), one call; elsewhere the K dimension is cut into block-wide slices, each multiplied
  with the RowWise recipe (the activations scaled per token and per K block, as DeepSeek-V3's
  ``act_quant`` does; the weight per output row from its block row) and summed in float32.
  On this torch's CPU build only TensorWise and RowWise exist, so the K-sliced form is what
  runs on CPUs.

``method="dequantize"`` (benchmarks only) keeps the same FP8 bytes but dequantizes the weight on
every call and multiplies in the compute dtype: it computes exactly what the dequantized model
does, which is the yardstick for the scaled path's error.

Embeddings, the LM head, norms and MoE routers are dequantized in every mode: DeepSeek-V3 ships
them in bf16, and routing decisions and the logits are where the FP8 error would show most.

What runs where (``docs/parallelism.md``, "FP8"): the CPU build of torch implements
``_scaled_mm`` as a slow reference (one 32 x 1024 x 1024 product: 1.8 s on the 2-core VM; as
8 K slices 7 ms; bf16 ``F.linear`` 0.2 ms: ``benchmarks/fp8.py``), so ``keep`` on CPUs proves the
numerics and the sharding, not speed; the default there stays ``dequantize``. On CUDA GPUs of
compute capability 8.9+ ``auto`` means ``keep``; nothing of it has run on a GPU yet
(``benchmarks/gpu_fp8_check.py`` is the check to run on one).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fabric.engine.checkpoint import Fp8Slice
from fabric.errors import Fp8MatmulUnavailable, Fp8SplitMisaligned

FP8_MODES = ("auto", "dequantize", "keep")
METHODS = ("scaled_mm", "dequantize")
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_CAPABILITY = (8, 9)
"""Ada (8.9) and Hopper (9.0) are the first NVIDIA GPUs with FP8 tensor cores."""


def keep_support(device: str | torch.device) -> tuple[bool, str]:
    """Whether FP8 weights can be multiplied on ``device`` without dequantizing them, and why
    (or why not) in words."""
    dev = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_mm"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        cap = torch.cuda.get_device_capability(dev)
        name = torch.cuda.get_device_name(dev)
        if cap < MIN_CAPABILITY:
            return False, (f"{name} has compute capability {cap[0]}.{cap[1]}; FP8 matmuls need "
                           f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada) or newer")
        return True, f"{name}, compute capability {cap[0]}.{cap[1]}"
    if dev.type == "cpu":
        return (True, "torch._scaled_mm on CPU (a slow reference kernel)") if _cpu_scaled_mm() \
            else (False, f"torch {torch.__version__} has no CPU kernel for torch._scaled_mm")
    return False, f"no FP8 matmul is wired for {dev.type} devices"


@functools.cache
def _cpu_scaled_mm() -> bool:
    """One tiny RowWise product on the CPU, to learn whether this torch build has the kernel."""
    try:
        a = torch.ones(1, 16).to(E4M3)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(1, 1), scale_b=torch.ones(1, 1),
                         out_dtype=torch.float32)
    except Exception:  # a probe: any failure means "not here"
        return False
    return True


def resolve_mode(requested: str, device: str | torch.device) -> str:
    """``dequantize`` or ``keep`` for a plan's ``fp8`` setting on ``device``.

    ``auto`` keeps FP8 on CUDA GPUs that multiply it (compute capability >= 8.9) and
    dequantizes everywhere else (CPUs included: their ``_scaled_mm`` is a slow reference).
    ``keep`` on a device that cannot raises ``Fp8MatmulUnavailable``, naming the device.
    """
    if requested not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {FP8_MODES}, not {requested!r}")
    dev = torch.device(device)
    if requested == "dequantize":
        return "dequantize"
    ok, why = keep_support(dev)
    if requested == "auto":
        return "keep" if ok and dev.type == "cuda" else "dequantize"
    if not ok:
        raise Fp8MatmulUnavailable(
            f"plan asks for fp8: keep, but {dev} cannot multiply FP8 weights: {why}; use "
            "fp8: dequantize (or auto)", device=str(dev), reason=why)
    return "keep"


def check_aligned(name: str, shape: list[int], block: tuple[int, int], dim: int | None,
                  start: int, stop: int | None, rank: int) -> None:
    """Refuse a rank's slice of a block-scaled FP8 weight that does not start and stop on
    block boundaries (``Fp8SplitMisaligned``): scaled-matmul kernels take whole blocks."""
    if dim is None:
        return
    full = shape[dim]
    stop = full if stop is None else stop
    size = block[dim]
    if size >= full:  # per-tensor, or per-row along dim 1: one block spans the dimension
        return
    if start % size or (stop % size and stop != full):
        axis = "rows (dim 0, column-parallel)" if dim == 0 else "columns (dim 1, row-parallel)"
        raise Fp8SplitMisaligned(
            f"fp8: keep needs every tp split of a block-scaled FP8 weight on {size}-wide block "
            f"boundaries, but rank {rank} gets {axis} {start}:{stop} of {name} {shape} "
            f"(blocks {block[0]}x{block[1]}); choose a tp that splits it on blocks, or "
            "fp8: dequantize", tensor=name, shape=shape, block=list(block), dim=dim,
            start=start, stop=stop, rank=rank)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[tokens, k]`` in ``float8_e4m3fn`` with one fp32 factor per row (its amax over
    448), so ``float(q) * scale`` approximates ``x``: dynamic per-token quantization."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Fp8Linear(nn.Module):
    """A linear layer whose weight stays in FP8 with its dequantization factors.

    ``weight`` ``[out, in]`` (``float8_e4m3fn`` or ``float8_e5m2``) and ``weight_scale_inv``
    are buffers (not in ``state_dict``: the loader builds the module from the checkpoint's
    slice); ``bias``, when the layer has one, is an ordinary parameter loaded with the rest.
    """

    weight: torch.Tensor
    weight_scale_inv: torch.Tensor

    def __init__(self, part: Fp8Slice, bias: bool, method: str = "scaled_mm") -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        self.per_row = part.scale.numel() == 1 or part.block[1] >= part.data.shape[1]
        if part.offset[1] and not self.per_row:  # the K slices must be the blocks' columns
            raise ValueError("a block-scaled slice must start on a block column boundary")
        self.method = method
        self.out_features, self.in_features = part.data.shape
        self.register_buffer("weight", part.data.contiguous(), persistent=False)
        self.register_buffer("weight_scale_inv", part.scale.float().contiguous(),
                             persistent=False)
        self.block, self.offset = part.block, part.offset
        self.bias = nn.Parameter(torch.empty(self.out_features, device="meta")) if bias \
            else None
        self._native: bool | None = None

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.weight.dtype}, "
                f"block={self.block}, method={self.method}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` (no bias), in ``x``'s dtype."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_zeros(*shape[:-1], self.out_features)
        if self.method == "dequantize":
            y = F.linear(x2, self.dequantized(x.dtype))
        elif self.per_row:
            y = self._rowwise(x2)
        else:
            y = self._blockwise(x2)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as the dequantized model holds it (``float(W) * factor``, cast once)."""
        return Fp8Slice(self.weight, self.weight_scale_inv, self.block,
                        self.offset).dequantize(dtype)

    def _row_scales(self, column: int | None) -> torch.Tensor:
        """``scale_b`` ``[1, out]``: each output row's factor (for block column ``column``)."""
        s = self.weight_scale_inv
        if s.numel() == 1:
            return s.reshape(1, 1).expand(1, self.out_features).contiguous()
        col = s[:, 0 if column is None else column]
        r0 = self.offset[0]  # a slice may start inside its first block row
        rows = col.repeat_interleave(self.block[0])[r0:r0 + self.out_features]
        return rows.reshape(1, -1).contiguous()

    def _rowwise(self, x: torch.Tensor) -> torch.Tensor:
        xp = _pad_rows(x)
        q, sa = quantize_rows(xp)
        out = slice_dtype(x.device, x.dtype)
        y = torch._scaled_mm(q, self.weight.t(), scale_a=sa, scale_b=self._row_scales(None),
                             out_dtype=out)
        return y[:x.shape[0]].to(x.dtype)

    def _blockwise(self, x: torch.Tensor) -> torch.Tensor:
        if self._native is None:
            self._native = native_blockwise(x.device, self.block, self.weight.dtype)
        if self._native:
            return _native_blockwise_mm(x, self.weight, self.weight_scale_inv)
        xp = _pad_rows(x)
        bc = self.block[1]
        out = slice_dtype(x.device, torch.float32)
        acc = torch.zeros(xp.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        for j in range(math.ceil(self.in_features / bc)):
            cols = slice(j * bc, (j + 1) * bc)
            q, sa = quantize_rows(xp[:, cols])
            acc += torch._scaled_mm(q, self.weight[:, cols].t(), scale_a=sa,
                                    scale_b=self._row_scales(j), out_dtype=out)
        return acc[:x.shape[0]].to(x.dtype)


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """On CUDA, token rows padded with zeros to a multiple of 16 (cuBLASLt's FP8 matmuls want
    every dimension so); elsewhere ``x`` as it is."""
    if x.device.type != "cuda" or x.shape[0] % 16 == 0:
        return x
    return F.pad(x, (0, 0, 0, -x.shape[0] % 16))


@functools.cache
def slice_dtype(device: torch.device, want: torch.dtype) -> torch.dtype:
    """``want`` if a RowWise scaled matmul on ``device`` can write it, else bfloat16 (CUDA's
    RowWise kernels have written bf16 only in some torch releases): probed once."""
    if device.type != "cuda" or want == torch.bfloat16:
        return want
    try:
        a = torch.ones(16, 16, device=device).to(E4M3)
        one = torch.ones(16, 1, device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one.t().contiguous(), out_dtype=want)
    except Exception:  # a probe: any failure means "not here"
        return torch.bfloat16
    return want


def _native_blockwise_mm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One ``F.scaled_mm`` with 1x128 activation blocks and the 128x128 weight blocks (the
    layout torch's SM90 kernel asks for: activation scales outer-dim-major, token rows padded
    to a multiple of 4 (16 here), K blocks padded to a multiple of 4)."""
    m, k = x.shape
    xp = _pad_rows(x)
    q, sa = quantize_rows(xp.reshape(xp.shape[0], k // 128, 128))
    q, sa = q.reshape(xp.shape[0], k), sa.reshape(xp.shape[0], k // 128)
    kb = scale.shape[1]
    s = F.pad(scale, (0, -kb % 4)) if kb % 4 else scale
    out = F.scaled_mm(q, w.t(), sa.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                      s.t(), F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)
    return out[:m].to(x.dtype)


@functools.cache
def native_blockwise(device: torch.device, block: tuple[int, int], dtype: torch.dtype) -> bool:
    """Whether ``F.scaled_mm`` multiplies 128 x 128 block-scaled weights on ``device`` and gets
    what the K-sliced product gets (probed once on a random 256 x 256 problem; any error or a
    wrong answer means no)."""
    if device.type != "cuda" or block != (128, 128) or dtype != E4M3 \
            or not hasattr(F, "scaled_mm"):
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        w = torch.randn(256, 256, generator=gen).to(device)
        scale = torch.rand(2, 2, generator=gen).add(0.5).to(device)
        part = Fp8Slice(w.to(E4M3), scale, block, (0, 0))
        x = torch.randn(8, 256, generator=gen).to(device, torch.bfloat16)
        got = _native_blockwise_mm(x, part.data, scale).float()
        ref = Fp8Linear(part, bias=False)
        ref._native = False
        want = ref(x).float()
        return bool(torch.allclose(got, want, rtol=0.02, atol=0.02 * float(want.abs().max())))
    except Exception:  # a probe: any failure means "not here"
        return False


def is_router(parent: nn.Module, attr: str) -> bool:
    """Whether ``parent.attr`` is a MoE router (kept in the compute dtype: routing decisions
    are discrete, and DeepSeek-V3 ships its routers unquantized)."""
    from fabric.engine.moe import MoeBlock

    return isinstance(parent, MoeBlock) and attr in ("gate", "shared_expert_gate")


def keep_target(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """For checkpoint tensor ``name``, the (parent, attribute) of the ``nn.Linear`` in a
    decoder layer of ``model`` whose weight it is, or None if it is not a kept projection."""
    local = name.removeprefix("model.")
    if not local.startswith("layers.") or not local.endswith(".weight"):
        return None
    path = local.removesuffix(".weight")
    parent_path, _, attr = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path)
    except AttributeError:
        return None
    if not isinstance(getattr(parent, attr, None), nn.Linear) or is_router(parent, attr):
        return None
    return parent, attr


def install(model: nn.Module, parts: dict[str, Fp8Slice], method: str = "scaled_mm") -> None:
    """Swap the named projections of ``model`` (still on the meta device) for ``Fp8Linear``
    modules holding ``parts`` (already on the model's device)."""
    for name, part in parts.items():
        target = keep_target(model, name)
        if target is None:
            raise ValueError(f"{name} is not a decoder layer's linear projection")
        parent, attr = target
        old: Any = getattr(parent, attr)
        setattr(parent, attr, Fp8Linear(part, old.bias is not None, method))


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's weights as stored (each storage counted once): ``fp8`` (kept FP8
    values), ``scales`` (their factors), ``other`` (everything else), ``total``."""
    seen: set[int] = set()
    out = {"fp8": 0, "scales": 0, "other": 0}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(storage.data_ptr())
        kind = "fp8" if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else \
            "scales" if name.endswith("weight_scale_inv") else "other"
        out[kind] += storage.nbytes()
    out["total"] = sum(out.values())
    return out
