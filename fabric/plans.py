"""Plans that fit: a pp x tp x ep plan for a model on a site's nodes, from the numbers alone.

Pure arithmetic over a Hugging Face ``config.json`` and a site's ``node`` shape
(``fabric.sites.NodeShape``); nothing here imports torch or reads weights. For every rank it
counts the bytes of the weights it holds, what is left of its GPU for the KV cache, and so how
many tokens of KV cache the plan holds (the token budget); ``fit`` picks the smallest plan that
holds the weights and at least ``min_tokens`` tokens, and refuses with ``PlanDoesNotFit``
(carrying the numbers) when none does within the nodes allowed.

The model of memory, per GPU: ``gpu_memory_gib x memory_fraction - reserve_gib`` is usable for
weights plus KV cache (the reserve covers the runtime, communication buffers and activations).
Layers are spread over stages with the engine's own balancing (``partition.assign_layers``, by
bytes here) so the first stage carries the embedding and the last the LM head; a stage's bytes
are split evenly over its ``tp`` ranks (the engine evens out uneven head splits with the MLP,
``partition.balanced_mlp_split``). Routed experts are split over ``ep`` groups of the stage's
ranks (each expert then split ``tp / ep`` ways), so a rank holds ``ceil(experts / ep)`` experts'
share. The KV cache per token and layer is ``2 x kv_heads x head_dim`` values for grouped-query
attention (kv heads split over tp, the busiest rank counted) and ``kv_lora_rank +
qk_rope_head_dim`` values, on every tp rank, for DeepSeek's multi-head latent attention (the
latent cache the engine keeps: ``fabric.engine.mla``). DeepSeek's multi-token-prediction layers
(``num_nextn_predict_layers``) are not served and not counted.

``weights="fp8"`` counts one byte per weight of the layers' linear maps plus an fp32 scale per
128 x 128 block, with embeddings, norms, routers and the LM head in bf16, as DeepSeek-V3 and Kimi
K2 ship. It is a plan for FP8 weights *resident on the GPU*, which the engine serves with
``Plan.fp8 = "keep"`` (``engine.fp8``, the same split: layers' projections FP8, the rest
dequantized); with ``fp8: dequantize`` what it runs needs the ``bfloat16`` plan.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from fabric.engine.partition import assign_layers
from fabric.errors import InvalidModelFolder, InvalidRequest, PlanDoesNotFit, UnknownModel

WeightsDtype = Literal["float32", "bfloat16", "float16", "fp8"]
WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0 + 4.0 / 128 ** 2}
"""Bytes per weight of the layers' linear maps (fp8: plus an fp32 scale per 128 x 128 block)."""
GIB = 2 ** 30
MIN_TOKENS = 32768
"""Default least token budget a plan must hold: a handful of requests of a few thousand
tokens each (``fabric plan --min-tokens``)."""
KNOWN_DIR = Path(__file__).resolve().parent / "known_models"
"""Published ``config.json`` files of large models, for plans without the weights."""


class Node(Protocol):
    """The node shape sizing reads (``fabric.sites.NodeShape``)."""

    gpus: int
    gpu_memory_gib: float
    memory_fraction: float
    reserve_gib: float
    max_nodes: int | None


@dataclass(frozen=True)
class ModelShape:
    """What sizing needs from a model's config (parameter counts, not bytes)."""

    name: str
    layers: int
    hidden: int
    vocab: int
    tied: bool
    kv_heads: int
    """Key/value heads (the tp limit of grouped-query attention; heads for MLA)."""
    attn_params: int
    """Parameters of one layer's attention maps (norms excluded)."""
    kv_values: int
    """KV-cache values per token and layer, before any tp split."""
    kv_split: bool
    """True when the KV cache splits over tp ranks by kv head (GQA), False when every rank
    keeps it whole (MLA's latent)."""
    dense_mlp_params: int
    expert_params: int
    """One routed expert's parameters (0: a dense model)."""
    experts: int
    shared_params: int
    """Shared experts' parameters per MoE layer."""
    moe_layers: tuple[int, ...]
    context: int

    @property
    def is_moe(self) -> bool:
        """True for a mixture of experts."""
        return self.experts > 0

    def layer_params(self, i: int) -> int:
        """Parameters of layer ``i`` (attention, MLP or experts with their router, norms)."""
        return self.attn_params + self._mlp(i) + 2 * self.hidden

    def total_params(self) -> int:
        """Parameters of the served model (embedding, layers, norm, LM head)."""
        heads = 1 if self.tied else 2
        return sum(self.layer_params(i) for i in range(self.layers)) + \
            heads * self.vocab * self.hidden + self.hidden

    def _mlp(self, i: int) -> int:
        if i in self.moe_layers:
            return self.experts * (self.expert_params + self.hidden) + self.shared_params
        return self.dense_mlp_params


def shape_from_config(config: dict[str, Any], name: str = "") -> ModelShape:
    """A ``ModelShape`` from a Hugging Face ``config.json`` (Llama, Mistral, Qwen2/3, Mixtral,
    Qwen3-MoE, DeepSeek-V3 / Kimi K2 field names); a nested ``text_config`` is used.
    ``InvalidModelFolder`` names a field it needs and the config lacks."""
    c = (config.get("text_config") or config) if isinstance(config, dict) else None
    if not isinstance(c, dict):
        raise InvalidModelFolder(f"{name or 'the model'}: config.json is not a JSON object")
    try:
        return _shape(c, name)
    except KeyError as exc:
        raise InvalidModelFolder(f"{name or 'the model'}: config.json has no {exc.args[0]!r}, "
                                 "which sizing needs", missing=exc.args[0]) from None


def _shape(c: dict[str, Any], name: str) -> ModelShape:
    hidden, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    if c.get("kv_lora_rank"):  # DeepSeek multi-head latent attention
        attn, kv_values, kv_split = _mla(c, hidden, heads), \
            c["kv_lora_rank"] + c["qk_rope_head_dim"], False
    else:
        hd = c.get("head_dim") or hidden // heads
        attn = hidden * hd * (2 * heads + 2 * kv_heads)
        if c.get("attention_bias") or c.get("model_type") == "qwen2":
            attn += hd * (heads + 2 * kv_heads)
        if c.get("attention_bias") and c.get("model_type") != "qwen2":  # o's bias (not Qwen2's)
            attn += hidden
        if str(c.get("model_type", "")).startswith("qwen3"):  # per-head q and k norms
            attn += 2 * hd
        kv_values, kv_split = 2 * kv_heads * hd, True
    experts = c.get("n_routed_experts") or c.get("num_experts") or c.get("num_local_experts") or 0
    expert_inter = c.get("moe_intermediate_size") or c["intermediate_size"]
    shared = (c.get("n_shared_experts") or 0) * expert_inter * 3 * hidden
    if c.get("shared_expert_intermediate_size"):  # Qwen2-MoE: one wide shared expert + gate
        shared = 3 * hidden * c["shared_expert_intermediate_size"] + hidden
    return ModelShape(
        name=name or str(c.get("_name_or_path") or c.get("model_type") or "model"),
        layers=layers, hidden=hidden, vocab=c["vocab_size"],
        tied=bool(c.get("tie_word_embeddings", False)), kv_heads=kv_heads, attn_params=attn,
        kv_values=kv_values, kv_split=kv_split,
        dense_mlp_params=3 * hidden * c["intermediate_size"],
        expert_params=3 * hidden * expert_inter if experts else 0, experts=experts,
        shared_params=shared, moe_layers=_moe_layers(c, layers) if experts else (),
        context=int(c.get("max_position_embeddings") or 0),
    )


def _mla(c: dict[str, Any], hidden: int, heads: int) -> int:
    """Parameters of one DeepSeek-V3 attention block (q low-rank or full, kv low-rank, o)."""
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    q_rank = c.get("q_lora_rank")
    q = hidden * q_rank + q_rank + q_rank * heads * qk if q_rank else hidden * heads * qk
    kv = hidden * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) + c["kv_lora_rank"] + \
        c["kv_lora_rank"] * heads * (c["qk_nope_head_dim"] + c["v_head_dim"])
    return q + kv + heads * c["v_head_dim"] * hidden


def _moe_layers(c: dict[str, Any], layers: int) -> tuple[int, ...]:
    """Which layers route to experts: Qwen's ``decoder_sparse_step`` and ``mlp_only_layers``
    (``(i + 1) % step == 0``), DeepSeek's ``first_k_dense_replace`` and ``moe_layer_freq``
    (``i >= k and i % freq == 0``), every layer otherwise (Mixtral)."""
    if "decoder_sparse_step" in c:
        step, dense = c["decoder_sparse_step"] or 1, set(c.get("mlp_only_layers") or [])
        return tuple(i for i in range(layers) if (i + 1) % step == 0 and i not in dense)
    first, freq = c.get("first_k_dense_replace") or 0, c.get("moe_layer_freq") or 1
    return tuple(i for i in range(layers) if i >= first and i % freq == 0)


@dataclass(frozen=True)
class StageFit:
    """One stage of a plan: its layers and what each of its ranks holds."""

    layers: tuple[int, int]
    """First and one-past-last layer."""
    weight_bytes: int
    """Weights per rank."""
    kv_bytes_per_token: int
    """KV cache per token per rank."""
    kv_tokens: int
    """Tokens of KV cache the rank's free memory holds (0 when the weights do not fit)."""


@dataclass(frozen=True)
class PlanFit:
    """A pp x tp x ep plan sized for a node shape."""

    model: str
    weights: str
    pp: int
    tp: int
    ep: int
    nodes: int
    gpus_per_node: int
    params: int
    weight_bytes: int
    """All weights (every rank's share added up)."""
    usable_bytes: int
    """Per GPU, for weights plus KV cache."""
    stages: tuple[StageFit, ...]

    @property
    def ranks(self) -> int:
        """GPUs (processes) the plan uses."""
        return self.pp * self.tp

    @property
    def weight_bytes_per_rank(self) -> int:
        """Weights on the fullest rank."""
        return max(s.weight_bytes for s in self.stages)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache per token on the rank that keeps the most."""
        return max(s.kv_bytes_per_token for s in self.stages)

    @property
    def kv_tokens(self) -> int:
        """The plan's token budget: what its fullest rank's KV cache holds."""
        return min(s.kv_tokens for s in self.stages)

    @property
    def weights_fit(self) -> bool:
        """True when every rank's weights fit its usable memory."""
        return self.weight_bytes_per_rank <= self.usable_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record, with the derived figures."""
        out = asdict(self)
        out.update(ranks=self.ranks, weight_bytes_per_rank=self.weight_bytes_per_rank,
                   kv_bytes_per_token=self.kv_bytes_per_token, kv_tokens=self.kv_tokens)
        return out


def size_plan(model: ModelShape, node: Node, pp: int, tp: int, ep: int = 1,
              weights: WeightsDtype = "bfloat16") -> PlanFit:
    """The bytes and token budget of one pp x tp x ep plan on ``node`` (a ``NodeShape``)."""
    _check_plan(model, node, pp, tp, ep)
    wb = WEIGHT_BYTES[weights]
    small = 2.0 if weights == "fp8" else wb  # embeddings, norms, routers stay 16-bit in FP8
    kv_bytes = 4 if weights == "float32" else 2
    per_layer = [_layer_bytes(model, i, tp, ep, wb, small) for i in range(model.layers)]
    vocab_rows = math.ceil(model.vocab / tp)
    embed = int(vocab_rows * model.hidden * small)
    first_extra, last_extra = embed, (0 if model.tied else embed) + int(model.hidden * small)
    bounds = assign_layers(per_layer, pp, first_extra, last_extra)
    usable = int(node.gpu_memory_gib * GIB * node.memory_fraction - node.reserve_gib * GIB)
    kv_per_layer = (math.ceil(model.kv_heads / tp) * model.kv_values // model.kv_heads
                    if model.kv_split else model.kv_values) * kv_bytes
    stages = []
    for s, r in enumerate(bounds):
        held = sum(per_layer[i] for i in r) + (first_extra if s == 0 else 0) + \
            (last_extra if s == pp - 1 else 0)
        kv = kv_per_layer * len(r)
        stages.append(StageFit((r.start, r.stop), held, kv, max(0, usable - held) // kv))
    total = int(sum(st.weight_bytes for st in stages) * tp)
    return PlanFit(model.name, weights, pp, tp, ep, placed_nodes(pp * tp, node.gpus),
                   node.gpus, model.total_params(), total, usable, tuple(stages))


def placed_nodes(ranks: int, gpus: int) -> int:
    """The fewest nodes of ``gpus`` GPUs that hold ``ranks`` ranks *evenly* (a job's launcher
    starts as many on each node): 90 ranks on 4-GPU nodes need 30 nodes of 3, not 23."""
    return next(n for n in range(math.ceil(ranks / gpus), ranks + 1) if ranks % n == 0)


def _layer_bytes(model: ModelShape, i: int, tp: int, ep: int, wb: float, small: float) -> int:
    """Bytes of layer ``i`` on one of ``tp`` ranks (routed experts split over ``ep`` groups)."""
    norms = 2 * model.hidden * small
    if i not in model.moe_layers:
        return int((model.attn_params + model.dense_mlp_params) * wb / tp + norms)
    experts = math.ceil(model.experts / ep) * model.expert_params * wb / (tp // ep)
    router = model.experts * model.hidden * small  # replicated: every rank routes its tokens
    return int((model.attn_params + model.shared_params) * wb / tp + experts + router + norms)


def _check_node(node: Node) -> None:
    if node.gpus < 1 or node.gpu_memory_gib <= 0:
        raise InvalidRequest("the site declares no GPU node shape (node.gpus and "
                             "node.gpu_memory_gib in its fabric.yaml); nothing to plan against")


def _check_plan(model: ModelShape, node: Node, pp: int, tp: int, ep: int) -> None:
    _check_node(node)
    problems = []
    if not 1 <= pp <= model.layers:
        problems.append(f"pp={pp} must be 1..{model.layers} (the model's layers)")
    if not 1 <= tp <= min(node.gpus, model.kv_heads):
        problems.append(f"tp={tp} must be 1..{min(node.gpus, model.kv_heads)} (GPUs per node "
                        f"{node.gpus}, key/value heads {model.kv_heads})")
    if ep < 1 or tp % ep or (ep > 1 and not model.is_moe):
        problems.append(f"ep={ep} must divide tp={tp}" +
                        ("" if model.is_moe else " and be 1 for a dense model"))
    if problems:
        raise InvalidRequest("; ".join(problems), problems=problems)


def default_ep(model: ModelShape, tp: int) -> int:
    """Whole experts per rank where the expert count allows: the largest divisor of ``tp``
    that divides the experts (1 for dense models)."""
    if not model.is_moe:
        return 1
    return max(d for d in range(1, tp + 1) if tp % d == 0 and model.experts % d == 0)


def fit(model: ModelShape, node: Node, weights: WeightsDtype = "bfloat16",
        min_tokens: int = MIN_TOKENS, max_nodes: int | None = None, tp: int | None = None,
        ep: int | None = None) -> PlanFit:
    """The smallest plan whose weights fit and whose KV cache holds ``min_tokens``: fewest
    nodes, then (on one node) fewest GPUs, then the widest tp (tp and ep within a node, pp
    across nodes: the node's fast links carry the per-layer all-reduces and expert dispatch).
    Multi-node plans fill their nodes. Raises ``PlanDoesNotFit`` with the closest plan's
    numbers."""
    _check_node(node)
    limit = max_nodes or node.max_nodes or model.layers  # pp <= layers, a stage a node
    tps = [tp] if tp else [t for t in range(1, node.gpus + 1)
                           if node.gpus % t == 0 and t <= model.kv_heads]
    closest: PlanFit | None = None
    usable = node.gpu_memory_gib * GIB * node.memory_fraction - node.reserve_gib * GIB
    least = model.total_params() * min(WEIGHT_BYTES[weights], 2.0)  # bytes, all ranks
    for nodes in range(1, limit + 1):
        ranks = [nodes * node.gpus] if nodes > 1 else sorted(
            {r for r in range(1, node.gpus + 1) if node.gpus % r == 0})
        for n_ranks in ranks:
            if least > usable * n_ranks and nodes < limit:  # cannot fit: skip the sizing
                continue
            found = []
            for t in tps:
                if n_ranks % t or n_ranks // t > model.layers:
                    continue
                plan = size_plan(model, node, n_ranks // t, t,
                                 ep or default_ep(model, t), weights)
                if plan.weights_fit and plan.kv_tokens >= min_tokens:
                    found.append(plan)
                closest = _closer(closest, plan)
            if found:
                return max(found, key=lambda p: (p.tp, p.kv_tokens))
    raise _refusal(model, node, weights, min_tokens, limit, closest)


def _closer(a: PlanFit | None, b: PlanFit) -> PlanFit:
    """The plan nearer to fitting: more room left on its fullest rank (to 0.1 GiB), then the
    wider tp."""
    if a is None:
        return b
    room_a = (round((a.usable_bytes - a.weight_bytes_per_rank) / GIB, 1), a.tp, a.kv_tokens)
    room_b = (round((b.usable_bytes - b.weight_bytes_per_rank) / GIB, 1), b.tp, b.kv_tokens)
    return b if room_b >= room_a else a


def shortfall(plan: PlanFit, node: Node, min_tokens: int = MIN_TOKENS,
              max_nodes: int | None = None) -> str:
    """Why ``plan`` does not fit, in words with its numbers ("" when it fits)."""
    if not plan.weights_fit:
        return (f"its fullest rank needs {plan.weight_bytes_per_rank / GIB:.1f} GiB of weights, "
                f"{plan.usable_bytes / GIB:.1f} GiB usable per GPU ({node.gpu_memory_gib:g} GiB"
                f" x {node.memory_fraction:g} - {node.reserve_gib:g} GiB reserve)")
    if plan.kv_tokens < min_tokens:
        return (f"its KV cache holds {plan.kv_tokens} tokens ({plan.kv_bytes_per_token} bytes "
                f"per token per GPU), fewer than the {min_tokens} asked for")
    if max_nodes is not None and plan.nodes > max_nodes:
        return f"it needs {plan.nodes} nodes, more than the {max_nodes} allowed"
    return ""


def check_fits(plan: PlanFit, node: Node, min_tokens: int = MIN_TOKENS,
               max_nodes: int | None = None) -> None:
    """Raise ``PlanDoesNotFit`` with the numbers unless ``plan`` fits (``shortfall``)."""
    why = shortfall(plan, node, min_tokens, max_nodes)
    if why:
        raise PlanDoesNotFit(
            f"{plan.model} ({plan.weights} weights, {plan.weight_bytes / 1e9:.1f} GB) does not "
            f"fit as pp={plan.pp} x tp={plan.tp} x ep={plan.ep} on {plan.nodes} nodes of "
            f"{node.gpus} x {node.gpu_memory_gib:g} GiB: {why}", plan=plan.to_dict(),
            min_tokens=min_tokens, max_nodes=max_nodes)


def _refusal(model: ModelShape, node: Node, weights: str, min_tokens: int, limit: int,
             closest: PlanFit | None) -> PlanDoesNotFit:
    gpus = f"{limit} nodes of {node.gpus} x {node.gpu_memory_gib:g} GiB"
    if closest is None:
        return PlanDoesNotFit(f"{model.name}: no pp x tp plan exists on at most {gpus}",
                              model=model.name, max_nodes=limit)
    c = closest
    return PlanDoesNotFit(
        f"{model.name} ({weights} weights, {c.weight_bytes / 1e9:.1f} GB) does not fit on at "
        f"most {gpus}: the closest plan, pp={c.pp} x tp={c.tp} x ep={c.ep} on {c.nodes} nodes, "
        f"does not: {shortfall(c, node, min_tokens)}", model=model.name, weights=weights,
        max_nodes=limit, min_tokens=min_tokens, closest=c.to_dict())


def known_models() -> list[str]:
    """Names of the shipped ``known_models/*.json`` configs."""
    return sorted(p.stem for p in KNOWN_DIR.glob("*.json"))


def load_model_config(model: str) -> tuple[str, dict[str, Any]]:
    """(name, config) for a shipped model name, a ``config.json`` path or a model folder."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return path.parent.name if path.name == "config.json" else path.stem, _read_json(path)
    known = KNOWN_DIR / f"{model}.json"
    if not known.is_file():
        raise UnknownModel(f"no config for {model!r}: give a config.json or model folder, or "
                           f"one of {known_models()}", available=known_models())
    return model, _read_json(known)


def _read_json(path: Path) -> Any:
    """A config file's JSON, or ``InvalidModelFolder`` naming the file and the fault."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelFolder(f"{path}: not a readable JSON config ({exc})",
                                 path=str(path)) from None
