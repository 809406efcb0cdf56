"""The decode fast path's weight layout (``fabric.engine.graphs`` reads it): per layer, Q/K/V
and gate/up concatenated into one matrix each. ``StageModel.fused_weights`` builds it from a
whole model's layers, re-pointing their projections at row slices of the fused matrices, so
no weight is held twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LayerWeights:
    """One layer's weights as the decode fast path reads them (``StageModel.fused_weights``)."""

    ln1: torch.Tensor
    qkv: torch.Tensor
    """Q, K and V projections' rows, concatenated."""
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    ln2: torch.Tensor
    gu: torch.Tensor
    """Gate and up projections' rows, concatenated."""
    down: torch.Tensor
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    """Per-head RMSNorm weights of queries and keys (qk-norm families), ``[head_dim]``."""
    k_norm: torch.Tensor | None = None
    window: int | None = None
    """The layer's sliding window (``None``: full causal attention)."""


@dataclass(frozen=True)
class FusedWeights:
    """A whole model's weights for the decode fast path (pp=1, tp=1 only)."""

    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    head: torch.Tensor


def fuse_layer(layer: Any) -> LayerWeights:
    """One layer's fast-path weights, its projections re-pointed at their slices of them
    (``StageModel.fused_weights`` says why)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = _fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj], "weight")
    bias = (_fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj], "bias")
            if attn.q_proj.bias is not None else None)
    gu = _fuse_rows([mlp.gate_proj, mlp.up_proj], "weight")
    return LayerWeights(layer.input_layernorm.weight.detach(), qkv, bias,
                        attn.o_proj.weight.detach(),
                        layer.post_attention_layernorm.weight.detach(), gu,
                        mlp.down_proj.weight.detach(), _detached(attn.o_proj.bias),
                        _detached(attn.q_norm.weight if attn.q_norm is not None else None),
                        _detached(attn.k_norm.weight if attn.k_norm is not None else None),
                        attn.window)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _fuse_rows(linears: list[Any], name: str) -> torch.Tensor:
    """Concatenate the linears' ``name`` tensors by rows and re-point each at its slice."""
    fused = torch.cat([getattr(lin, name).detach() for lin in linears], dim=0)
    start = 0
    for lin in linears:
        n = getattr(lin, name).shape[0]
        setattr(lin, name, torch.nn.Parameter(fused[start:start + n], requires_grad=False))
        start += n
    return fused
