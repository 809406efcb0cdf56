"""A mixture-of-experts block holding one rank's experts, and its dispatch and combine.

Routing is transformers' (Mixtral, Qwen3-MoE, Qwen2-MoE): router logits -> softmax in float32
-> top ``k`` -> divided by their sum when the family renormalises. DeepSeek-V3's (Kimi K2's):
sigmoid scores in float32, plus ``e_score_correction_bias`` for choosing only; the best
``topk_group`` of ``n_group`` expert groups (ranked by the sum of each group's two best biased
scores), top ``k`` within them; the weights are the unbiased scores, renormalised when
``norm_topk_prob``, times ``routed_scaling_factor``. The experts are SwiGLU MLPs
(``down(silu(gate(h)) * up(h))``); an optional shared expert runs on every token, scaled by
``sigmoid(shared_expert_gate(h))`` (Qwen2-MoE) or not (DeepSeek's ``shared_experts``).

Expert parallelism (``fabric.engine.experts`` says who holds what). Dispatch is local and
combine is one all-reduce over the stage's tp group, the collective the dense MLP already ends
with:

* the hidden states entering the block are already on every rank of the stage (attention is
  tensor-parallel over those same ranks and ends with an all-reduce), and the router is
  replicated, so every rank computes the same top-k for every token and picks out the rows
  routed to its own experts (an ``index_select``): no bytes move to dispatch;
* each rank computes its experts' (slice of the) outputs for those rows, weighted by their
  routing weights, into a zero ``[tokens, hidden]`` partial sum; the all-reduce of the partials
  is the combined output (a sum over experts and over intermediate slices alike).

The alternative, all-to-all dispatch of token rows to the ranks owning their experts and back,
pays off when the tokens are not replicated (data-parallel attention), which this engine's
attention does not do: here it would move rows every rank already has. (On gloo, torch 2.13,
the list form ``all_to_all`` refuses tensors of unequal sizes; ``all_to_all_single`` with split
sizes works. Tokens per expert vary every step, so an all-to-all design would need the latter
plus a size exchange first.) ``all_reduce`` works on gloo and nccl alike and moves
``tokens x hidden`` values per layer, as the dense layer does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fabric.engine.experts import ExpertShare, MoeSpec, moe_spec


@dataclass
class MoeTimings:
    """Seconds this process spent in MoE blocks (for ``benchmarks/moe.py``); off by default."""

    enabled: bool = False
    route_s: float = 0.0
    """Router matmul, softmax, top-k and picking each expert's rows (the dispatch)."""
    experts_s: float = 0.0
    """The experts' matmuls (and the shared expert's)."""
    combine_s: float = 0.0
    """The all-reduce summing every rank's partial output (the combine), after the wait."""
    wait_s: float = 0.0
    """Waiting for the stage's slowest rank before the combine: timed as a one-element
    all-reduce just before it (only while timing: it adds that collective to every block)."""
    calls: int = 0

    def reset(self) -> None:
        """Zero the counters."""
        self.route_s = self.experts_s = self.combine_s = self.wait_s = 0.0
        self.calls = 0


TIMINGS = MoeTimings()


class Expert(nn.Module):
    """One SwiGLU expert (or this rank's slice of it); names as the checkpoint's."""

    def __init__(self, hidden: int, inter: int, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.names = names
        for name, shape in zip(names, ((inter, hidden), (inter, hidden), (hidden, inter)),
                               strict=True):
            setattr(self, name, nn.Linear(shape[1], shape[0], bias=False))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(h)) * up(h))


class MoeBlock(nn.Module):
    """This rank's share of one sparse layer: the router, its experts, its shared-expert slice.

    ``forward`` returns the rank's partial output; the caller's all-reduce (``combine``) sums
    the partials of the stage's ranks.
    """

    def __init__(self, hidden: int, spec: MoeSpec, share: ExpertShare) -> None:
        super().__init__()
        self.spec, self.share = spec, share
        self.gate = nn.Linear(hidden, spec.experts, bias=False)
        inter = share.inter_stop - share.inter_start
        self.experts = nn.ModuleDict(
            {str(e): Expert(hidden, inter, spec.proj_names) for e in share.experts})
        if spec.scoring == "sigmoid":  # DeepSeek: a bias for choosing experts (float32)
            self.gate.register_parameter("e_score_correction_bias", nn.Parameter(
                torch.empty(spec.experts), requires_grad=False))
        self.shared_expert_gate: nn.Linear | None = None
        if spec.shared_inter:
            setattr(self, spec.shared_name, Expert(
                hidden, share.shared_stop - share.shared_start,
                ("gate_proj", "up_proj", "down_proj")))
            if spec.shared_gated:
                self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    @property
    def shared(self) -> Expert | None:
        """This rank's slice of the shared expert(s), if the family has one."""
        shared = getattr(self, self.spec.shared_name, None)
        return shared if isinstance(shared, Expert) else None

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k routing weights and expert ids, ``[tokens, k]`` each; the weights in float32
        (Mixtral, DeepSeek) or in the hidden states' dtype (Qwen), as transformers returns
        them."""
        if self.spec.scoring == "sigmoid":
            return self._route_grouped(h)
        probs = F.softmax(self.gate(h).float(), dim=-1)
        weights, ids = torch.topk(probs, self.spec.top_k, dim=-1)
        if self.spec.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.spec.model_type != "mixtral":  # Qwen's routers hand back the hidden dtype
            weights = weights.to(h.dtype)
        return weights, ids

    def _route_grouped(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V3's router, op for op as transformers' ``DeepseekV3TopkRouter`` (the
        same top-k calls, so ties break the same way)."""
        spec, n = self.spec, self.spec.experts
        scores = F.linear(h.float(), self.gate.weight.float()).sigmoid()
        bias = self.gate.get_parameter("e_score_correction_bias")
        choice = scores + bias
        per_group = n // spec.groups
        group_scores = choice.view(-1, spec.groups, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=spec.topk_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, spec.groups, per_group).reshape(-1, n)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=spec.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if spec.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * spec.scaling, ids

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter() if TIMINGS.enabled else 0.0
        weights, ids = self.route(h)
        # Dispatch: for each of this rank's experts, the rows (and top-k slots) routed to it.
        routed = []
        for e in self.share.experts:
            rows, slot = torch.where(ids == e)
            if rows.numel():
                routed.append((e, rows, weights[rows, slot, None]))
        t1 = time.perf_counter() if TIMINGS.enabled else 0.0
        # Each expert's output weighted in the routing weights' dtype, the top-k terms summed
        # in float32 and cast once, as transformers' experts do (``grouped_mm``, its default);
        # summing in a bf16 buffer would round after every term.
        acc = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        for e, rows, w in routed:
            y = self.experts[str(e)](h[rows])
            acc.index_add_(0, rows, (y * w).float())
        out = acc.to(h.dtype)
        shared = self.shared
        if shared is not None:
            y = shared(h)
            if self.shared_expert_gate is not None:
                y = torch.sigmoid(self.shared_expert_gate(h)) * y
            out += y
        if TIMINGS.enabled:
            TIMINGS.route_s += t1 - t0
            TIMINGS.experts_s += time.perf_counter() - t1
            TIMINGS.calls += 1
        return out


def attach_moe(layer: nn.Module, config: Any, share: ExpertShare | None, index: int
               ) -> str | None:
    """Give decoder layer ``index`` its ``MoeBlock`` under the checkpoint's name when the
    layer is sparse; returns that name (None: the layer keeps a dense MLP)."""
    spec = moe_spec(config)
    if spec is None or index not in spec.sparse_layers:
        return None
    assert share is not None  # plan_ranks gives every rank of a sparse model its share
    setattr(layer, spec.block, MoeBlock(config.hidden_size, spec, share))
    return spec.block


def combine(partial: torch.Tensor, reduce: Any) -> torch.Tensor:
    """Sum the stage's partial outputs in place with ``reduce`` (the tp all-reduce), timed."""
    if not TIMINGS.enabled:
        return reduce(partial)
    t0 = time.perf_counter()
    reduce(partial.new_zeros(1))  # returns when every rank has got here: the wait
    t1 = time.perf_counter()
    out = reduce(partial)
    TIMINGS.wait_s += t1 - t0
    TIMINGS.combine_s += time.perf_counter() - t1
    return out
