"""DeepSeek-V3's multi-head latent attention (MLA), as data: its shape, and how tp splits it.

DeepSeek-V3 (671B) and Kimi K2 (~1T) share the ``DeepseekV3ForCausalLM`` architecture
(``model_type`` ``deepseek_v3``). Its attention, as transformers 5.17 computes it
(``modeling_deepseek_v3.DeepseekV3Attention``):

* queries: ``q_b_proj(q_a_layernorm(q_a_proj(h)))`` (``q_proj(h)`` when ``q_lora_rank`` is
  null), ``heads x (qk_nope_head_dim + qk_rope_head_dim)`` wide;
* keys and values from one compressed latent: ``kv_a_proj_with_mqa(h)`` splits into a latent
  of ``kv_lora_rank`` (normed by ``kv_a_layernorm``) and one key of ``qk_rope_head_dim`` shared
  by every head; ``kv_b_proj(latent)`` expands the latent into each head's un-rotated key part
  (``qk_nope_head_dim``) and value (``v_head_dim``, which may differ from the key's width);
* RoPE only on the ``qk_rope_head_dim`` part (interleaved pairs when ``rope_interleave``), and a
  softmax scale of ``qk_head_dim ** -0.5`` times yarn's ``mscale(factor, mscale_all_dim) ** 2``
  when the rope is scaled.

What a rank of a pp x tp plan holds (``partition.plan_ranks``): the query heads split over the
stage's tp ranks (contiguous, sizes differing by at most one), so ``q_proj``/``q_b_proj`` and
``kv_b_proj`` are column-parallel by head rows and ``o_proj`` row-parallel by head columns;
the low-rank projections (``q_a_proj``, ``kv_a_proj_with_mqa``) and their norms are small and
replicated: every rank computes the whole latent. Its KV cache is that latent and the rotated
shared key, ``kv_lora_rank + qk_rope_head_dim`` values per token and layer on every tp rank
(what ``fabric.plans`` sizes), expanded per head at each step (``fabric.engine.mla``).

Nothing here imports torch: ``partition`` (and through it ``fabric.plans``) uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fabric.errors import UnsupportedModelConfig

ROPE_TYPES = ("default", "yarn")
"""RoPE variants served: unscaled, and yarn (what DeepSeek-V3 and Kimi K2 ship)."""
MLA_MODEL_TYPES = ("deepseek_v3",)
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}
"""``model_type`` values transformers does not know whose checkpoints are the architecture of
a known one: Kimi K2 ships ``DeepseekV3ForCausalLM`` weights with ``model_type`` ``kimi_k2``
and remote code for its config (``fabric.engine.loader.load_config`` reads it as DeepSeek-V3's,
running no remote code)."""


@dataclass(frozen=True)
class MlaSpec:
    """One model's MLA shape and softmax scale (from its config)."""

    heads: int
    q_lora_rank: int | None
    """Rank of the query's low-rank path (``None``: a full ``q_proj``)."""
    kv_lora_rank: int
    nope_dim: int
    """Each head's un-rotated key width (``qk_nope_head_dim``)."""
    rope_dim: int
    """The shared rotated key width (``qk_rope_head_dim``)."""
    v_dim: int
    bias: bool
    """``attention_bias``: biases on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj``."""
    interleave: bool
    """``rope_interleave``: RoPE over interleaved pairs, as DeepSeek lays its weights out."""
    scale: float
    """Softmax scale (yarn's mscale folded in)."""

    @property
    def qk_dim(self) -> int:
        """Query/key width per head."""
        return self.nope_dim + self.rope_dim

    @property
    def cache_values(self) -> int:
        """KV-cache values per token and layer, on every tp rank (latent + rotated key)."""
        return self.kv_lora_rank + self.rope_dim


def _rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return dict(params or {})


def mla_spec(config: Any) -> MlaSpec | None:
    """The config's MLA shape, ``None`` for a model without MLA; ``UnsupportedModelConfig``
    (do not retry) for a rope scaling the engine does not serve."""
    if getattr(config, "model_type", "") not in MLA_MODEL_TYPES:
        return None
    rope = _rope_parameters(config)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise UnsupportedModelConfig(
            f"rope type {kind!r} of a {config.model_type} model is not served; the engine "
            f"serves {', '.join(ROPE_TYPES)}", rope_type=kind, supported=list(ROPE_TYPES))
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    scale = qk ** -0.5
    # transformers' yarn_apply_mscale: any scaled rope with mscale_all_dim set.
    if kind != "default" and rope.get("mscale_all_dim"):
        factor = float(rope["factor"])
        m = 1.0 if factor <= 1 else 0.1 * float(rope["mscale_all_dim"]) * math.log(factor) + 1.0
        scale = scale * m * m
    return MlaSpec(
        heads=config.num_attention_heads, q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank, nope_dim=config.qk_nope_head_dim,
        rope_dim=config.qk_rope_head_dim, v_dim=config.v_head_dim,
        bias=bool(getattr(config, "attention_bias", False)),
        interleave=bool(getattr(config, "rope_interleave", True)), scale=scale)


def mla_slice(spec: MlaSpec, first_head: int, n_heads: int, name: str
              ) -> tuple[int | None, int, int | None]:
    """How a rank holding heads ``first_head .. first_head + n_heads`` reads tensor ``name``
    of a layer's attention (the part after ``self_attn.``): (dim, start, stop), ``dim=None``
    for the whole tensor."""
    module, kind = name.rsplit(".", 1)
    if n_heads == spec.heads:
        return None, 0, None
    per_head = {"q_proj": spec.qk_dim, "q_b_proj": spec.qk_dim,
                "kv_b_proj": spec.nope_dim + spec.v_dim}
    if module in per_head:
        width = per_head[module]
        return 0, first_head * width, (first_head + n_heads) * width
    if module == "o_proj" and kind == "weight":  # its bias is added once, after the all-reduce
        return 1, first_head * spec.v_dim, (first_head + n_heads) * spec.v_dim
    return None, 0, None  # the low-rank projections and their norms: replicated
