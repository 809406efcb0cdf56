"""One rank's slice of a decoder (Llama, Qwen2, Qwen3, Mistral, their mixtures of experts, and
DeepSeek-V3 / Kimi K2 with latent attention: ``fabric.engine.mla``), run over packed,
variable-length batches.

A step's tokens from all its sequences are packed into one ``[T, hidden]`` matrix so every
projection is one matmul; attention runs per sequence against that sequence's own KV cache,
which is why a request's output does not depend on what shares its batch. Weights are the
checkpoint's own tensors (tp slices when tp > 1); the families' attention variations (biases,
qk-norm, sliding windows) are data (``fabric.engine.families``). The row-parallel projections
all-reduce over the stage's tp group, and the embedding and LM head are vocab-parallel (each tp
rank holds a range of vocabulary rows; lookups all-reduce, logits all-gather). Per-request hooks
act only on their request's rows.

Invariants: the model only computes. It holds no per-sequence state: the KV caches of a step
are handed to ``StageModel.forward_step`` by the caller (``fabric.engine.runner.StageRunner``,
which allocates, slots and drops them), and it knows nothing of the decode fast path beyond
exposing its weights in the layout that path reads (``StageModel.fused_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fabric.engine.attention import SeqCache, attend
from fabric.engine.deepseek import mla_spec
from fabric.engine.families import AttentionSpec, attention_spec
from fabric.engine.fp8 import Fp8Linear
from fabric.engine.fused import FusedWeights, fuse_layer
from fabric.engine.mla import MlaAttention
from fabric.engine.moe import attach_moe, combine
from fabric.engine.partition import RankShard, vocab_slices
from fabric.engine.steps import HookSpec, StepPlan

HEAD_BLOCK = 2048
"""Vocabulary rows per block of the LM head matmul on CPUs (see ``StageModel._head_matmul``)."""



@dataclass(frozen=True)
class KVLayout:
    """The shape of this rank's KV cache, which whoever allocates it needs."""

    layers: int
    """Local layers (one (K, V) pair each)."""
    kv_heads: int
    """This rank's KV heads."""
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    windows: tuple[int | None, ...] = ()
    """Each local layer's sliding window (``None``: full attention); empty: none slide."""
    value_dim: int | None = None
    """Width of V's cache when it differs from K's ``head_dim`` (latent attention keeps its
    latent as "K" and its rotated key as "V": ``fabric.engine.mla``)."""


class TensorParallel(Protocol):
    """The collectives a stage's tp ranks use (``fabric.engine.dist.TPGroup``)."""

    size: int

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum ``t`` over the group, in place."""

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on all ranks), in rank order."""


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in float32 as transformers does."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """This rank's attention heads (q/k/v column slices, o row slice), with its family's
    biases, qk-norm and sliding window (``fabric.engine.families``)."""

    def __init__(self, hidden: int, q_heads: int, kv_heads: int, head_dim: int,
                 spec: AttentionSpec, window: int | None, eps: float) -> None:
        super().__init__()
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.window = window
        bias = spec.qkv_bias
        self.q_proj = nn.Linear(hidden, q_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        # Its bias is whole on every tp rank: added once, after the all-reduce.
        self.o_proj = nn.Linear(q_heads * head_dim, hidden, bias=spec.o_bias)
        self.q_norm = RMSNorm(head_dim, eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if spec.qk_norm else None


class MLP(nn.Module):
    """This rank's share of the gated MLP."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)


class Layer(nn.Module):
    """One decoder layer; attribute names match the checkpoint's. A sparse layer of a
    mixture of experts has a ``MoeBlock`` (named ``moe_name``) instead of the dense MLP."""

    def __init__(self, config: Any, shard: RankShard, head_dim: int, spec: AttentionSpec,
                 index: int) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        mla = mla_spec(config)
        self.self_attn: Attention | MlaAttention = (
            MlaAttention(config.hidden_size, shard.q_heads, mla) if mla is not None else
            Attention(config.hidden_size, shard.q_heads, shard.kv_heads, head_dim, spec,
                      spec.windows[index], eps))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.moe_name = attach_moe(self, config, shard.experts, index)
        if self.moe_name is None:
            self.mlp = MLP(config.hidden_size, shard.inter)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, in float32 as transformers computes it."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation of the second half of the last dimension into the first."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StageModel(nn.Module):
    """The layers one rank owns and the step function over KV caches it is handed."""

    def __init__(self, config: Any, shard: RankShard, comm: TensorParallel | None,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.config, self.shard, self._comm = config, shard, comm
        self.spec = attention_spec(config)  # refuses architectures it cannot serve
        self.mla = mla_spec(config)
        self.device = torch.device(device)
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        self.n_layers = config.num_hidden_layers
        hidden, vocab = config.hidden_size, shard.vocab_stop - shard.vocab_start
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(vocab, hidden) if shard.first else None
            self.layers = nn.ModuleDict(
                {str(i): Layer(config, shard, self.head_dim, self.spec, i) for i in shard.layers})
            self.norm = RMSNorm(hidden, config.rms_norm_eps) if shard.last else None
            self.lm_head = nn.Linear(hidden, vocab, bias=False) if shard.head else None
        self.rotary = _rotary(config, self.mla is not None)
        self._fused: FusedWeights | None = None

    @property
    def tp_size(self) -> int:
        """Tensor-parallel ranks in this stage."""
        return 1 if self._comm is None else self._comm.size

    @property
    def whole(self) -> bool:
        """Whether this rank holds the whole model (pp=1, tp=1)."""
        shard = self.shard
        return shard.first and shard.last and shard.head and self.tp_size == 1

    @property
    def sparse(self) -> bool:
        """Whether any of this rank's layers has experts (they take no decode fast path)."""
        return any(layer.moe_name for layer in self.layers.values())

    @property
    def kept_fp8(self) -> bool:
        """Whether some projections hold FP8 weights (``fabric.engine.fp8``; no decode fast
        path: it reads plain weight matrices)."""
        return any(isinstance(m, Fp8Linear) for m in self.modules())

    @property
    def fast_path_capable(self) -> bool:
        """Whether the decode fast path can run this rank: the whole of a dense model with
        grouped-query attention and plain weights (experts, latent attention and kept FP8
        weights run eagerly)."""
        return self.whole and not self.sparse and self.mla is None and not self.kept_fp8

    @property
    def kv_layout(self) -> KVLayout:
        """What one sequence's cache on this rank looks like (after ``load``)."""
        if self.mla is not None:  # the latent and the rotated key, whole on every tp rank
            return KVLayout(len(self.shard.layers), 1, self.mla.kv_lora_rank, self.dtype,
                            self.device, value_dim=self.mla.rope_dim)
        return KVLayout(len(self.shard.layers), self.shard.kv_heads, self.head_dim, self.dtype,
                        self.device, tuple(self.spec.windows[i] for i in self.shard.layers))

    # --- loading ---------------------------------------------------------------------------

    def load(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Materialise the parameters from checkpoint tensors (checkpoint names)."""
        local = {name.removeprefix("model."): t for name, t in tensors.items()}
        tied = self.lm_head is not None and "lm_head.weight" not in local
        if tied:  # the head is on the first stage and shares the embedding's rows
            local["lm_head.weight"] = local["embed_tokens.weight"]
        self.load_state_dict({k: v.to(self.device, _keep_fp32(k, dtype))
                              for k, v in local.items()}, strict=True, assign=True)
        if tied:
            assert self.lm_head is not None and self.embed_tokens is not None
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary.to(device=self.device, dtype=torch.float32)
        self.dtype = dtype
        self.eval()

    def fused_weights(self) -> FusedWeights:
        """The weights in the decode fast path's layout: Q/K/V and gate/up concatenated into
        one matrix each per layer.

        The layers' own projections are re-pointed at row slices (contiguous views) of the
        fused matrices, so no weight is held twice and the eager path computes exactly what it
        did. Whole models only; the first call re-lays the weights, later ones return the same.
        """
        if self._fused is None:
            if not self.fast_path_capable:
                raise ValueError("fused weights need the whole of a dense grouped-query "
                                 "attention model on one rank (pp=1, tp=1), not kept in FP8")
            assert self.embed_tokens is not None and self.norm is not None
            assert self.lm_head is not None
            self._fused = FusedWeights(
                self.embed_tokens.weight.detach(),
                [fuse_layer(self.layers[str(i)]) for i in self.shard.layers],
                self.norm.weight.detach(), self.lm_head.weight.detach())
        return self._fused

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and sin for 1-d ``positions`` (on this rank's device), in its dtype."""
        # The rotary module reads only its input's device and dtype: an empty probe (no
        # kernel launch) says both.
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, positions[None])
        return cos[0].to(self.dtype), sin[0].to(self.dtype)

    # --- the step --------------------------------------------------------------------------

    @torch.no_grad()
    def forward_step(self, plan: StepPlan, hidden: torch.Tensor | None,
                     caches: list[SeqCache]) -> torch.Tensor:
        """Run this rank's layers over the plan's packed tokens; return the hidden states.

        ``caches[j]`` is ``plan.seqs[j]``'s KV cache with room for its positions up to
        ``start + n``; this step's keys and values are written into it.
        """
        if len(caches) != len(plan.seqs):
            raise ValueError(f"{len(caches)} caches for {len(plan.seqs)} sequences")
        if not plan.seqs:
            return torch.zeros(0, self.config.hidden_size, device=self.device)
        positions = torch.cat([torch.arange(s.start, s.start + s.n) for s in plan.seqs]
                              ).to(self.device)
        if self.embed_tokens is not None:
            ids = torch.tensor([t for s in plan.seqs for t in s.token_ids], dtype=torch.long,
                               device=self.device)
            x = self._embed(ids)
            self._capture(plan, 0, x)
        else:
            assert hidden is not None
            x = hidden.to(self.device, self.dtype)
        cos, sin = self.rope(positions)
        for i in self.shard.layers:
            layer: Any = self.layers[str(i)]
            x = self._layer(i, layer, x, plan, caches, cos, sin)
            if i + 1 < self.n_layers:
                self._capture(plan, i + 1, x)
        return x

    @torch.no_grad()
    def head_rows(self, plan: StepPlan, x: torch.Tensor) -> torch.Tensor:
        """Final norm (captured as the last hidden state) and the rows that need logits.

        Rows, in order: each sequence's scored rows, then its last row if it samples. Every
        rank of the last stage calls this.
        """
        assert self.norm is not None
        x = self.norm(x)
        self._capture(plan, self.n_layers, x)
        rows: list[int] = []
        offset = 0
        for s in plan.seqs:
            if s.score_targets is not None:
                rows.extend(offset + j for j, t in enumerate(s.score_targets) if t >= 0)
            if s.sample is not None:
                rows.append(offset + s.n - 1)
            offset += s.n
        return x[torch.tensor(rows, dtype=torch.long, device=self.device)]

    @torch.no_grad()
    def logits(self, h: torch.Tensor | None) -> torch.Tensor:
        """Float32 logits over the whole vocabulary for rows ``h`` (from ``head_rows``).

        Every tp rank of the head stage calls this with the same rows; each computes its
        vocabulary slice and all of them get the gathered result, on the CPU (where sampling
        runs).
        """
        assert self.lm_head is not None
        vocab = self.config.vocab_size
        if h is None or h.shape[0] == 0:
            return torch.zeros(0, vocab)
        local = self._head_matmul(h.to(self.device, self.dtype)).float()
        if self._comm is None:
            return local.cpu()
        # all_gather needs equal shapes: pad each slice to the widest, then trim.
        sizes = [b - a for a, b in vocab_slices(vocab, self._comm.size)]
        padded = F.pad(local, (0, max(sizes) - local.shape[1]))
        parts = self._comm.all_gather(padded)
        return torch.cat([p[:, :n] for p, n in zip(parts, sizes, strict=True)], dim=1).cpu()

    # --- internals -------------------------------------------------------------------------

    def _head_matmul(self, h: torch.Tensor) -> torch.Tensor:
        assert self.lm_head is not None
        w = self.lm_head.weight
        if self.device.type != "cpu":
            return F.linear(h, w)
        # On CPUs the vocabulary matrix (49152 x 576 for SmolLM2) is done in row blocks that
        # stay in cache: 17-30% faster at 32-64 rows on the benchmark VM, and bit-identical
        # (each logit is the same dot product, only the order of the blocks changes).
        return torch.cat([F.linear(h, w[i:i + HEAD_BLOCK]) for i in range(0, w.shape[0],
                                                                           HEAD_BLOCK)], dim=1)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self._comm is not None:
            self._comm.all_reduce(t)
        return t

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        assert self.embed_tokens is not None
        if self._comm is None:
            return self.embed_tokens(ids)
        # Vocab-parallel: each rank looks up the ids in its row range, zeros the others, and
        # the sum over ranks is the full lookup (exact: one non-zero term per row).
        lo, hi = self.shard.vocab_start, self.shard.vocab_stop
        outside = (ids < lo) | (ids >= hi)
        x = self.embed_tokens((ids - lo).clamp(0, hi - lo - 1))
        x[outside] = 0
        return self._reduce(x)

    def _layer(self, index: int, layer: Layer, x: torch.Tensor, plan: StepPlan,
               caches: list[SeqCache], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        t = h.shape[0]
        local = index - self.shard.layers.start
        if isinstance(attn, MlaAttention):
            out = attn(h, local, plan, caches, cos, sin)
        else:
            out = self._gqa(attn, h, local, plan, caches, cos, sin)
        self._apply_hooks(plan, index, "ablate_heads", out)
        o = self._reduce(_no_bias(attn.o_proj, out.view(t, -1)))
        if attn.o_proj.bias is not None:
            o = o + attn.o_proj.bias
        x = x + o
        h = layer.post_attention_layernorm(x)
        if layer.moe_name is not None:  # experts: local dispatch, all-reduce combine
            x = x + combine(getattr(layer, layer.moe_name)(h), self._reduce)
            self._apply_hooks(plan, index, "steer", x)
            return x
        act = F.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h)
        self._apply_hooks(plan, index, "ablate_neurons", act)
        x = x + self._reduce(layer.mlp.down_proj(act))
        self._apply_hooks(plan, index, "steer", x)
        return x

    def _gqa(self, attn: Attention, h: torch.Tensor, local: int, plan: StepPlan,
             caches: list[SeqCache], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention of the packed rows ``h``, ``[T, heads, head_dim]``."""
        t = h.shape[0]
        q = attn.q_proj(h).view(t, attn.q_heads, self.head_dim)
        k = attn.k_proj(h).view(t, attn.kv_heads, self.head_dim)
        v = attn.v_proj(h).view(t, attn.kv_heads, self.head_dim)
        if attn.q_norm is not None and attn.k_norm is not None:  # qk-norm: per head, pre-RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        c, s_ = cos[:, None, :], sin[:, None, :]
        q = q * c + rotate_half(q) * s_
        k = k * c + rotate_half(k) * s_
        return attend(local, plan, caches, q, k, v, attn.window)

    def _apply_hooks(self, plan: StepPlan, index: int, kind: str, t: torch.Tensor) -> None:
        offset = 0
        for s in plan.seqs:
            for hook in s.hooks:
                if hook.layer == index and hook.kind == kind:
                    self._apply_hook(hook, t, slice(offset, offset + s.n))
            offset += s.n

    def _apply_hook(self, hook: HookSpec, t: torch.Tensor, rows: slice) -> None:
        if hook.kind == "steer":
            assert hook.vector is not None
            t[rows] += hook.scale * hook.vector.to(t.device, t.dtype)
        elif hook.kind == "ablate_heads":
            for head in hook.heads:
                local = head - self.shard.head_offset
                if 0 <= local < t.shape[1]:
                    t[rows, local] = 0
        elif hook.kind == "ablate_neurons":
            lo = self.shard.inter_offset
            cols = [n - lo for n in hook.neurons if lo <= n < lo + t.shape[1]]
            if cols:
                t[rows, torch.tensor(cols, device=t.device)] = 0

    def _capture(self, plan: StepPlan, hs_index: int, x: torch.Tensor) -> None:
        if self.shard.tp_rank != 0:
            return
        offset = 0
        for s in plan.seqs:
            if s.capture is not None and hs_index in s.capture.layers:
                rows = x[offset:offset + s.n].float().cpu()
                mode = s.capture.mode
                if mode == "all":
                    value: Any = rows.clone()
                elif mode == "mean":
                    value = (rows.sum(0), s.n)
                elif mode == "last":
                    value = rows[-1].clone()
                else:
                    value = rows[0].clone() if s.start == 0 else None
                if value is not None:
                    plan.captures.setdefault(s.seq_id, {})[hs_index] = value
            offset += s.n


def _no_bias(linear: Any, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` without the layer's bias (added once, after the tp all-reduce)."""
    if isinstance(linear, Fp8Linear):
        return linear.matmul(x)
    return F.linear(x, linear.weight)


def _rotary(config: Any, mla: bool) -> nn.Module:
    """The family's own rotary module (DeepSeek-V3's for latent attention: its ``head_dim``
    is the rotated width and its rope may be yarn-scaled)."""
    if mla:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3RotaryEmbedding,
        )

        return DeepseekV3RotaryEmbedding(config)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(config)


def _keep_fp32(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a checkpoint tensor is loaded in: DeepSeek's router bias stays float32, as
    transformers keeps it (``_keep_in_fp32_modules_strict``); it only ranks experts, but in
    bf16 it would round differently."""
    return torch.float32 if name.endswith("e_score_correction_bias") else dtype
