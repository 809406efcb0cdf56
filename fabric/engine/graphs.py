"""The decode fast path of a single-rank (pp=1, tp=1) stage: batched decode steps over the
slot cache, compiled and captured on CUDA.

A decode step of the eager path (``StageModel.forward_step``) launches a few hundred small
kernels and loops over sequences in Python, so on a GPU it is bound by the host, not by reading
the weights (18% of the HBM roofline for an 8B model at batch 1, 5% at batch 16). Here:

* the KV caches are the runner's slot cache (``fabric.engine.kv.SlotCache``: one tensor
  ``[slots, kv_heads, slot_tokens, head_dim]`` per layer, a slot per sequence that fits);
* a step whose sequences all decode one token with no hooks, captures or scores
  (``plain_decode``) runs as one batched function over slots ``0..S-1`` (``S`` the power-of-two
  bucket above the highest slot in the step): no per-sequence Python, no gather of caches.
  Rows of slots not in the step are padding and write their keys to the slot's last column,
  which no sequence uses;
* attention reads only the first ``L`` columns (``L`` a power-of-two bucket above the
  longest sequence), so short sequences do not pay for ``slot_tokens``;
* on CUDA the layer halves around attention (norm, fused QKV, RoPE; o-proj, norm, fused
  gate-up MLP) and the head are ``torch.compile``d, and each ``(S, L)`` step is captured once
  as a CUDA graph and replayed; greedy tokens are picked on the device so only their ids cross
  to the host. Rows that sample or want log-probs fetch their logits and use the same
  ``sampling.pick`` as every other path.

On the CPU the same code runs without compile or capture (``decode_graphs: on``), which is how
the tests check it token for token against transformers.

Invariants: ``DecodeGraphs`` owns no KV storage and changes no weights: it reads the slot cache
the runner (``fabric.engine.runner.StageRunner``) allocated and the fused weights the model
exposes (``StageModel.fused_weights``), and it runs only the steps the runner hands it (every
sequence a ``plain_decode`` with a slot); the runner has already dropped the step's freed
sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from fabric.engine.kv import SlotCache
from fabric.engine.model import StageModel, rms_norm, rotate_half
from fabric.engine.sampling import pick
from fabric.engine.steps import SeqOutput, SeqWork, StepPlan


@dataclass(frozen=True)
class GraphOptions:
    """How a stage builds its decode fast path (from ``ServerConfig``)."""

    slots: int
    """Sequences the slot cache holds at once."""
    slot_tokens: int
    """KV positions per slot (one is kept as the padding rows' scratch column)."""
    capture: bool
    """Capture each step shape as a CUDA graph (CUDA only)."""
    compile: bool
    """``torch.compile`` the per-layer functions (CUDA only)."""
    tune: Literal["batch1", "all", "none"] = "batch1"
    """With ``compile``: which step sizes get Inductor's coordinate-descent tuning (gpt-fast's
    setting: projections of one row become tuned Triton reductions with the norm fused in).
    Measured on an H200 (docs/benchmarks.md), it wins at batch 1 and not above, where the
    projections are left to cuBLAS."""


def _pre_attention(x: torch.Tensor, ln: torch.Tensor, w_qkv: torch.Tensor,
                   b_qkv: torch.Tensor | None, q_norm: torch.Tensor | None,
                   k_norm: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                   kc: torch.Tensor, vc: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, *,
                   eps: float, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Norm, fused QKV, qk-norm (where the family has it), RoPE, and the new keys/values
    written into the slots (in place, so compiled, the write fuses with RoPE); returns the
    queries."""
    s = x.shape[0]
    q, k, v = F.linear(rms_norm(x, ln, eps), w_qkv, b_qkv).split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(s, heads, head_dim)
    k = k.view(s, kv_heads, head_dim)
    if q_norm is not None and k_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    c, si = cos[:, None, :], sin[:, None, :]
    kc[rows, :, pos] = k * c + rotate_half(k) * si
    vc[rows, :, pos] = v.view(s, kv_heads, head_dim)
    return q * c + rotate_half(q) * si


def _post_attention(x: torch.Tensor, o: torch.Tensor, w_o: torch.Tensor,
                    b_o: torch.Tensor | None, ln: torch.Tensor, w_gu: torch.Tensor,
                    w_down: torch.Tensor, *, eps: float, inter: int) -> torch.Tensor:
    x = x + F.linear(o, w_o, b_o)
    gate, up = F.linear(rms_norm(x, ln, eps), w_gu).split([inter, inter], dim=-1)
    return x + F.linear(F.silu(gate) * up, w_down)


def _head(x: torch.Tensor, ln: torch.Tensor, w: torch.Tensor, *, eps: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(rms_norm(x, ln, eps), w).float()
    return logits, logits.argmax(-1)


def _bucket(n: int, low: int, high: int) -> int:
    """The power of two at or above ``n`` (at least ``low``), capped at ``high``."""
    b = low
    while b < n:
        b *= 2
    return min(b, high)


def plain_decode(seq: SeqWork) -> bool:
    """Whether the fast path can run ``seq``'s part of a step: one sampled token, with no
    hooks, captures or scores (it must also have a slot: the runner checks that)."""
    return (seq.n == 1 and seq.sample is not None and not seq.hooks and seq.capture is None
            and seq.score_targets is None)


class DecodeGraphs:
    """Runs pure-decode steps of a single-rank stage over its slot cache (see the module)."""

    def __init__(self, model: StageModel, slots: SlotCache, opts: GraphOptions) -> None:
        if not model.whole:
            raise ValueError("decode graphs need the whole model on one rank (pp=1, tp=1)")
        self.opts, self.slots = opts, slots
        self.device = model.device
        self.on_cuda = self.device.type == "cuda"
        self.eps = model.config.rms_norm_eps
        self.heads, self.kv_heads = model.shard.q_heads, model.shard.kv_heads
        self.head_dim = model.head_dim
        self.weights = model.fused_weights()
        positions = torch.arange(opts.slot_tokens, device=self.device)
        self.cos, self.sin = model.rope(positions)
        self.columns = positions
        # ids and positions of one step, in one buffer so one copy moves both
        self.inputs = torch.zeros(2, opts.slots, dtype=torch.long, device=self.device)
        self.host = torch.zeros(2, opts.slots, dtype=torch.long,
                                pin_memory=self.on_cuda)
        self._host_np = self.host.numpy()
        fns: tuple[Any, Any, Any] = (_pre_attention, _post_attention, _head)
        if self.on_cuda and opts.compile:
            fns = tuple(torch.compile(f, fullgraph=True, dynamic=False) for f in fns)  # type: ignore[assignment]
        self._pre, self._post, self._head = fns
        self.captured: dict[tuple[int, int], tuple[Any, tuple[torch.Tensor, torch.Tensor]]] = {}
        """Each captured step shape ``(S, L)``: its CUDA graph and output tensors."""
        self._pool = torch.cuda.graph_pool_handle() if self.on_cuda and opts.capture else None

    @torch.no_grad()
    def run(self, plan: StepPlan) -> list[SeqOutput]:
        """Run a step of plain decodes that all have slots; outputs as the eager path gives
        them."""
        slot_of = [self.slots.owner[s.seq_id] for s in plan.seqs]
        size = _bucket(max(slot_of) + 1, 1, self.opts.slots)
        span = _bucket(max(s.start for s in plan.seqs) + 1, 64, self.opts.slot_tokens)
        host = self._host_np  # numpy view: an item store costs ~0.1 us, a tensor's ~3 us
        host[0, :size] = 0
        host[1, :size] = self.slots.scratch
        for slot, s in zip(slot_of, plan.seqs, strict=True):
            host[0, slot], host[1, slot] = s.token_ids[0], s.start
        self.inputs[:, :size].copy_(self.host[:, :size], non_blocking=True)
        logits, tokens = self._launch(size, span)
        picked = tokens.cpu().tolist()
        outs = []
        for slot, s in zip(slot_of, plan.seqs, strict=True):
            spec = s.sample
            assert spec is not None
            if spec.temperature == 0.0 and not spec.logprobs:
                outs.append(SeqOutput(s.seq_id, token=picked[slot]))
            else:
                token, logprob, top = pick(logits[slot].cpu(), spec)
                outs.append(SeqOutput(s.seq_id, token=token, logprob=logprob, top=top))
        return outs

    def _launch(self, size: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not (self.on_cuda and self.opts.capture):
            return self._step(size, span)
        entry = self.captured.get((size, span))
        if entry is None:
            entry = self._capture(size, span)
            self.captured[(size, span)] = entry
        entry[0].replay()
        return entry[1]

    def _capture(self, size: int, span: int) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
        # Warm-up runs (compilation happens here) go on a side stream, as capture requires.
        # They write the same keys the captured step writes, so running them is harmless.
        if self.opts.compile:  # read when a new step size compiles, in the first warm-up
            import torch._inductor.config as inductor

            tune = self.opts.tune
            inductor.coordinate_descent_tuning = tune == "all" or (tune == "batch1" and size == 1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(size, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._step(size, span)
        return graph, out

    def _step(self, size: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, pos = self.inputs[0, :size], self.inputs[1, :size]
        weights = self.weights
        x = F.embedding(ids, weights.embed)
        cos, sin = self.cos[pos], self.sin[pos]
        columns = self.columns[:span][None, :]
        causal = columns <= pos[:, None]
        masks: dict[int | None, torch.Tensor] = {None: causal[:, None, None, :]}
        for window in {w.window for w in weights.layers} - {None}:
            assert window is not None  # sliding layers: nor the keys before the window
            masks[window] = (causal & (columns > pos[:, None] - window))[:, None, None, :]
        rows = torch.arange(size, device=self.device)
        group = self.heads // self.kv_heads
        for w, kc, vc in zip(weights.layers, self.slots.k, self.slots.v, strict=True):
            q = self._pre(x, w.ln1, w.qkv, w.qkv_bias, w.q_norm, w.k_norm, cos, sin, kc, vc,
                          rows, pos, eps=self.eps, heads=self.heads, kv_heads=self.kv_heads,
                          head_dim=self.head_dim)
            o = F.scaled_dot_product_attention(
                q.view(size, self.kv_heads, group, self.head_dim), kc[:size, :, :span],
                vc[:size, :, :span], attn_mask=masks[w.window], scale=self.head_dim**-0.5)
            x = self._post(x, o.reshape(size, -1), w.o, w.o_bias, w.ln2, w.gu, w.down,
                           eps=self.eps, inter=w.down.shape[1])
        return self._head(x, weights.norm, weights.head, eps=self.eps)

