"""Which tensors (and which slices of them) each rank of a pp x tp plan owns.

Stages get contiguous layer ranges balanced by parameter count (the first stage also carries
the embeddings, the last the final norm), or, with ``balance="compute"``, by the work of a step
(``stage_costs``). The LM head lives on the last stage, except when it is tied to the
embedding: then the first stage computes it too (the last stage sends the
normed hidden rows back), so the one tensor is read once, not once per end of the pipeline.
The embedding and the LM head are split by vocabulary rows over the tp ranks of their stage
(vocab-parallel, as Megatron does), so every rank reads about 1/(pp*tp) of the model. Within
a stage, attention splits the way DeepSpeed's AutoTP splits it
(``deepspeed.module_inject.tp_shard.get_shard_size_list``): by key/value-head groups (so 9
heads / 3 KV heads over tp=2 give 6+3 query heads); the MLP splits in shares that even out each
rank's parameters (``balanced_mlp_split``; AutoTP would split it evenly). q/k/v/gate/up are
column-parallel (dim 0), o/down row-parallel (dim 1).
DeepSeek-V3's latent attention splits by query heads, evenly, its low-rank projections
replicated (``fabric.engine.deepseek``).
The same ``RankShard`` drives loading from a full checkpoint and ``fabric shard``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fabric.engine.deepseek import MlaSpec, mla_slice, mla_spec
from fabric.engine.experts import (
    ExpertShare,
    MoeSpec,
    check_ep,
    even_ranges,
    expert_share,
    moe_slice,
    moe_spec,
)

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


@dataclass(frozen=True)
class TensorSlice:
    """Read ``name[start:stop]`` along ``dim`` (``dim=None``: the whole tensor)."""

    name: str
    dim: int | None = None
    start: int = 0
    stop: int | None = None


@dataclass
class RankShard:
    """Everything one rank loads."""

    rank: int
    stage: int
    tp_rank: int
    layers: range
    first: bool
    last: bool
    head: bool
    """True for the ranks that compute a vocabulary slice of the LM head (every tp rank of
    the head stage: the last stage, or the first when the head is tied to the embedding)."""
    head_stage: int
    """The stage that computes the LM head."""
    vocab_start: int
    vocab_stop: int
    """This rank's rows of the embedding / LM head (the whole vocabulary when tp = 1)."""
    q_heads: int
    kv_heads: int
    """This rank's KV heads (1 for latent attention: the latent, whole on every rank)."""
    head_offset: int
    """Global index of this rank's first query head (for per-head hooks)."""
    inter: int
    inter_offset: int
    """Global index of this rank's first MLP neuron."""
    slices: list[TensorSlice] = field(default_factory=list)
    experts: ExpertShare | None = None
    """This rank's routed experts (and slices of them) in sparse layers; None for dense
    models (``fabric.engine.experts``)."""


def split_sizes(total: int, tp: int, name: str, kv_heads: int) -> list[int]:
    """AutoTP's shard sizes for a dimension of ``total`` split over ``tp`` ranks."""
    if tp == 1:
        return [total]
    from deepspeed.module_inject.tp_shard import AutoTPMeta, get_shard_size_list

    return list(get_shard_size_list(total, tp, AutoTPMeta(num_kv_heads=kv_heads), name))


def assign_layers(layer_params: list[int], pp: int, first_extra: float, last_extra: float
                  ) -> list[range]:
    """Contiguous layer ranges, one per stage, minimising the largest stage's cost (layer
    parameters plus the first and last stage's extras)."""
    n = len(layer_params)
    if not 1 <= pp <= n:
        raise ValueError(f"pp={pp} needs 1..{n} stages (the model has {n} layers)")
    prefix = [0]
    for p in layer_params:
        prefix.append(prefix[-1] + p)

    def cost(a: int, b: int, stage: int) -> float:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == pp - 1 else 0)
        return prefix[b] - prefix[a] + extra

    # best[s][i]: minimal max-stage cost placing the first i layers in s stages.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for s in range(1, pp + 1):
        for i in range(s, n - (pp - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], cost(j, i, s - 1))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds, i = [], n
    for s in range(pp, 0, -1):
        bounds.append(range(cut[s][i], i))
        i = cut[s][i]
    return bounds[::-1]


BALANCES = ("params", "compute")
LOGITS_SHARE = 0.25
"""For ``balance="compute"``: the share of a step's tokens that need logits, so what the LM
head costs per token relative to its parameters. Decode rows all need logits, prefill rows only
a prompt's last one; a quarter is a mixed load of ~100-token prompts and ~30 new tokens each
(``benchmarks/pipeline.py``: 7.4k prompt and 2k generated tokens)."""


def stage_costs(embed: int, head: int, norm: int, tied: bool, balance: str) -> tuple[float, float]:
    """What the first and last stage carry besides their layers, in layer-parameter units.

    ``params`` counts parameters (bytes each rank reads and holds): the embedding on the first
    stage (with a tied head, the same matrix), the norm and an untied head on the last.
    ``compute`` counts the work of a step, where a layer costs its parameters per token: the
    embedding lookup is free, the LM head costs ``LOGITS_SHARE`` of its parameters, on the
    first stage when tied to the embedding, else on the last.
    """
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, not {balance!r}")
    if balance == "params":
        return float(embed), float(norm + (0 if tied else head))
    logits = LOGITS_SHARE * head
    return (logits, float(norm)) if tied else (0.0, norm + logits)


def plan_ranks(config: Any, shapes: dict[str, list[int]], pp: int, tp: int,
               balance: str = "params", ep: int = 1) -> list[RankShard]:
    """The ``RankShard`` of every rank for a Llama-family checkpoint (dense or a mixture of
    experts split over ``ep`` groups of each stage's tp ranks: ``fabric.engine.experts``);
    ``balance`` picks how layers are spread over the stages (``stage_costs``)."""
    moe = moe_spec(config)
    check_ep(moe, tp, ep)
    mla = mla_spec(config)
    n_layers = config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if tp > kv:
        raise ValueError(f"tp={tp} exceeds the model's {kv} key/value heads")

    def numel(name: str) -> int:
        out = 1
        for d in shapes[name]:
            out *= d
        return out

    layer_params = [
        sum(numel(k) for k in shapes if k.startswith(f"model.layers.{i}.")) for i in range(n_layers)
    ]
    tied = "lm_head.weight" not in shapes
    embed = "model.embed_tokens.weight"
    first_extra, last_extra = stage_costs(
        numel(embed), numel(embed if tied else "lm_head.weight"), numel("model.norm.weight"),
        tied, balance)
    stages = assign_layers(layer_params, pp, first_extra, last_extra)
    head_stage = 0 if tied else pp - 1
    vocab = shapes[embed][0]
    vocab_split = vocab_slices(vocab, tp)
    inter = config.intermediate_size
    hidden = config.hidden_size
    if mla is None:
        kv_split = split_sizes(kv * head_dim, tp, "self_attn.k_proj", kv)
        q_split = split_sizes(heads * head_dim, tp, "self_attn.q_proj", kv)
        # Per tp rank: q and o rows/columns, k and v rows, each `hidden` wide.
        attn = [hidden * (2 * q + 2 * k) for q, k in zip(q_split, kv_split, strict=True)]
    else:  # latent attention: heads split evenly, one latent "KV head" on every rank
        q_split = [len(r) * head_dim for r in even_ranges(heads, tp)]
        kv_split = [head_dim] * tp
        attn = [hidden * q for q in q_split]
    mlp_split = balanced_mlp_split(inter, attn, 3 * hidden,
                                   split_sizes(inter, tp, "mlp.gate_proj", kv))
    out = []
    for rank in range(pp * tp):
        stage, t = divmod(rank, tp)
        q0, k0, m0 = sum(q_split[:t]), sum(kv_split[:t]), sum(mlp_split[:t])
        shard = RankShard(
            rank=rank, stage=stage, tp_rank=t, layers=stages[stage], first=stage == 0,
            last=stage == pp - 1, head=stage == head_stage, head_stage=head_stage,
            vocab_start=vocab_split[t][0], vocab_stop=vocab_split[t][1],
            q_heads=q_split[t] // head_dim, kv_heads=kv_split[t] // head_dim,
            head_offset=q0 // head_dim, inter=mlp_split[t], inter_offset=m0,
            experts=expert_share(moe, tp, ep, t) if moe is not None else None,
        )
        rows = (0, shard.vocab_start, shard.vocab_stop)
        if shard.first:
            shard.slices.append(TensorSlice(embed, *rows))
        for i in stages[stage]:
            shard.slices.extend(_layer_slices(i, shapes, q0, q_split[t], k0, kv_split[t],
                                              m0, mlp_split[t], moe, shard.experts, mla,
                                              (shard.head_offset, shard.q_heads)))
        if shard.last:
            shard.slices.append(TensorSlice("model.norm.weight"))
        if shard.head and not tied:
            shard.slices.append(TensorSlice("lm_head.weight", *rows))
        out.append(shard)
    return out


def balanced_mlp_split(inter: int, attn: list[int], per_neuron: int, fallback: list[int]
                       ) -> list[int]:
    """MLP neurons per tp rank so that attention + MLP parameters are as equal as possible.

    AutoTP splits attention by key/value-head groups, which is uneven when the groups do not
    divide by tp (SmolLM2: 3 KV heads over tp=2 give 2/3 and 1/3 of the attention), and the MLP
    evenly; giving the rank with fewer heads more neurons evens out each rank's bytes and
    FLOPs. ``fallback`` (AutoTP's split) is kept when attention is already even.
    """
    tp = len(attn)
    if tp == 1 or max(attn) == min(attn):
        return fallback
    target = (sum(attn) + inter * per_neuron) / tp
    sizes = [round((target - a) / per_neuron) for a in attn]
    sizes[-1] += inter - sum(sizes)
    return sizes if min(sizes) >= 1 else fallback


def vocab_slices(vocab: int, tp: int) -> list[tuple[int, int]]:
    """Contiguous vocabulary row ranges, one per tp rank, sizes differing by at most one."""
    base, extra = divmod(vocab, tp)
    bounds, start = [], 0
    for t in range(tp):
        stop = start + base + (1 if t < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _layer_slices(i: int, shapes: dict[str, list[int]], q0: int, qn: int, k0: int, kn: int,
                  m0: int, mn: int, moe: MoeSpec | None = None,
                  share: ExpertShare | None = None, mla: MlaSpec | None = None,
                  heads: tuple[int, int] = (0, 0)) -> list[TensorSlice]:
    p = f"model.layers.{i}."
    attn = f"{p}self_attn."
    block = f"{p}{moe.block}." if moe is not None and i in moe.sparse_layers else None
    spans = {"q_proj": (q0, qn), "k_proj": (k0, kn), "v_proj": (k0, kn), "o_proj": (q0, qn),
             "gate_proj": (m0, mn), "up_proj": (m0, mn), "down_proj": (m0, mn)}
    out = []
    for name in sorted(k for k in shapes if k.startswith(p)):
        leaf = name.split(".")[-2]
        if block is not None and name.startswith(block):
            assert moe is not None and share is not None
            keep, dim, start, stop = moe_slice(moe, share, name.removeprefix(block))
            if keep:  # a rank reads nothing of the experts other groups hold
                out.append(TensorSlice(name, dim, start, stop))
        elif mla is not None and name.startswith(attn):
            out.append(TensorSlice(name, *mla_slice(mla, *heads, name.removeprefix(attn))))
        elif leaf in spans:
            start, size = spans[leaf]
            is_bias = name.endswith(".bias")
            if leaf in ROW and is_bias:
                out.append(TensorSlice(name))  # added once, after the all-reduce
            else:
                dim = 0 if (leaf in COLUMN or is_bias) else 1
                out.append(TensorSlice(name, dim, start, start + size))
        else:
            out.append(TensorSlice(name))
    return out
