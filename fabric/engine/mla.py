"""Multi-head latent attention (DeepSeek-V3, Kimi K2) over a packed step, with a latent cache.

The shape and the tp split are in ``fabric.engine.deepseek``. A rank computes the whole
compressed latent (normed) and the one rotated key shared by every head, writes both into the
sequence's cache, and expands the cached latent into its own heads' keys and values with its
rows of ``kv_b_proj`` at every step, as transformers 5.17 does: its cache also holds the latent,
not per-head keys, so the two compute the same products in the same order.

The cache, in the runner's (K, V) pair per layer (``fabric.engine.kv``): "K" is the latent
``[1, columns, kv_lora_rank]``, "V" the rotated shared key ``[1, columns, qk_rope_head_dim]``:
``kv_lora_rank + qk_rope_head_dim`` values per token and layer, what ``fabric.plans`` sizes.

Not done: absorbing ``kv_b_proj`` into the query and output projections (DeepSeek's decode
kernel), which would skip the per-step expansion; it reorders the products, so it would no
longer match transformers to float rounding. No sliding windows (DeepSeek has none).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fabric.engine.deepseek import MlaSpec
from fabric.engine.steps import StepPlan

LATENT_NORM_EPS = 1e-6
"""transformers builds ``q_a_layernorm`` and ``kv_a_layernorm`` with the RMSNorm default eps,
not the config's ``rms_norm_eps``."""


class LatentNorm(nn.Module):
    """RMSNorm over a latent, in float32 as transformers computes it."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + LATENT_NORM_EPS)
        return self.weight * h.to(x.dtype)


class MlaAttention(nn.Module):
    """This rank's MLA heads; attribute names as the checkpoint's (``self_attn.*``)."""

    def __init__(self, hidden: int, heads: int, spec: MlaSpec) -> None:
        super().__init__()
        self.spec, self.heads = spec, heads
        self.window: int | None = None
        self.q_proj: nn.Linear | None = None
        self.q_a_proj: nn.Linear | None = None
        self.q_a_layernorm: LatentNorm | None = None
        self.q_b_proj: nn.Linear | None = None
        if spec.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * spec.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, spec.q_lora_rank, bias=spec.bias)
            self.q_a_layernorm = LatentNorm(spec.q_lora_rank)
            self.q_b_proj = nn.Linear(spec.q_lora_rank, heads * spec.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, spec.kv_lora_rank + spec.rope_dim,
                                            bias=spec.bias)
        self.kv_a_layernorm = LatentNorm(spec.kv_lora_rank)
        self.kv_b_proj = nn.Linear(spec.kv_lora_rank, heads * (spec.nope_dim + spec.v_dim),
                                   bias=False)
        # Its bias is whole on every tp rank: added once, after the all-reduce.
        self.o_proj = nn.Linear(heads * spec.v_dim, hidden, bias=spec.bias)

    def queries(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's queries ``[T, heads, qk_dim]`` (before RoPE)."""
        if self.q_proj is not None:
            q = self.q_proj(h)
        else:
            assert self.q_a_proj is not None and self.q_a_layernorm is not None
            assert self.q_b_proj is not None
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(h)))
        return q.view(h.shape[0], self.heads, self.spec.qk_dim)

    def forward(self, h: torch.Tensor, local: int, plan: StepPlan, caches: list[Any],
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention output of the packed rows ``h`` ``[T, hidden]``, ``[T, heads, v_dim]``
        (before ``o_proj``), after writing the step's latents into each sequence's cache."""
        spec = self.spec
        q = self.queries(h)
        q_pass, q_rot = q.split([spec.nope_dim, spec.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(h).split([spec.kv_lora_rank, spec.rope_dim],
                                                          dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_rot = rope(q_rot, cos[:, None, :], sin[:, None, :], spec.interleave)
        k_rot = rope(k_rot, cos, sin, spec.interleave)
        q = torch.cat((q_pass, q_rot), dim=-1)
        return self._attend(local, plan, caches, q, latent, k_rot)

    def _attend(self, local: int, plan: StepPlan, caches: list[Any], q: torch.Tensor,
                latent: torch.Tensor, k_rot: torch.Tensor) -> torch.Tensor:
        spec, heads = self.spec, self.heads
        out = q.new_empty(q.shape[0], heads, spec.v_dim)
        offset = 0
        for s, cache in zip(plan.seqs, caches, strict=True):
            rows = slice(offset, offset + s.n)
            lc, rc = cache[local]
            end = s.start + s.n
            lc[0, s.start:end], rc[0, s.start:end] = latent[rows], k_rot[rows]
            # Expand the whole cached latent into this rank's heads (transformers' expand_kv).
            kv = self.kv_b_proj(lc[0, :end]).view(end, heads, spec.nope_dim + spec.v_dim)
            k_nope, vals = kv.split([spec.nope_dim, spec.v_dim], dim=-1)
            keys = torch.cat((k_nope, rc[0, :end, None, :].expand(end, heads, spec.rope_dim)),
                             dim=-1).transpose(0, 1)
            vals = vals.transpose(0, 1)
            qs = q[rows].transpose(0, 1)
            if s.n == 1:
                probs = (torch.bmm(qs, keys.transpose(1, 2)) * spec.scale).softmax(-1)
                o = torch.bmm(probs, vals)
            else:
                mask = None
                if s.start > 0:  # keys are positions 0..end-1: causal from s.start
                    mask = torch.ones(s.n, end, dtype=torch.bool, device=q.device).tril(
                        diagonal=s.start)
                o = F.scaled_dot_product_attention(qs[None], keys[None], vals[None],
                                                   attn_mask=mask, is_causal=mask is None,
                                                   scale=spec.scale)[0]
            out[rows] = o.transpose(0, 1)
            offset += s.n
        return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool
         ) -> torch.Tensor:
    """RoPE on ``x`` (``cos``/``sin`` broadcastable, ``cat(freqs, freqs)`` wide), as
    transformers' DeepSeek-V3 applies it: over interleaved pairs ``(x0, x1), (x2, x3)...``
    (written back de-interleaved, for queries and keys alike) or over halves."""
    if interleave:
        half = cos.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
