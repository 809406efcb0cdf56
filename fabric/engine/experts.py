"""Which routed experts (and which slice of each) one rank of a pp x tp x ep plan owns.

Mixture-of-experts layers replace the dense MLP with a router (``gate``, replicated: every rank
routes every token of its stage) and ``experts`` SwiGLU experts, of which each token uses its
top ``k``. Three checkpoint layouts are served, as the families ship them:

* Mixtral (``MixtralForCausalLM``): ``model.layers.{i}.block_sparse_moe.gate.weight`` and
  ``...block_sparse_moe.experts.{e}.w1/w3`` (gate/up, ``[inter, hidden]``) and ``w2`` (down,
  ``[hidden, inter]``); every layer is sparse; top-k weights are renormalised.
* Qwen3-MoE (``Qwen3MoeForCausalLM``): ``model.layers.{i}.mlp.gate.weight`` and
  ``...mlp.experts.{e}.gate_proj/up_proj/down_proj``; layers are sparse when
  ``(i + 1) % decoder_sparse_step == 0`` and ``i`` is not in ``mlp_only_layers`` (the others
  keep a dense MLP of ``intermediate_size``); renormalised when ``norm_topk_prob``.
* Qwen2-MoE (``Qwen2MoeForCausalLM``): as Qwen3-MoE plus a shared expert
  (``mlp.shared_expert.*``, ``shared_expert_intermediate_size``) whose output every token gets,
  scaled by ``sigmoid(mlp.shared_expert_gate(h))``.
* DeepSeek-V3 / Kimi K2 (``DeepseekV3ForCausalLM``): ``mlp.gate.weight`` plus
  ``mlp.gate.e_score_correction_bias``, ``mlp.experts.{e}.gate_proj/up_proj/down_proj`` and
  ungated shared experts ``mlp.shared_experts.*`` (``moe_intermediate_size x
  n_shared_experts``); layers ``>= first_k_dense_replace`` are sparse. Routing is sigmoid
  scores, group-limited top-k (``n_group`` groups, the best ``topk_group`` of them by their
  two best biased scores), renormalised when ``norm_topk_prob``, times
  ``routed_scaling_factor`` (``fabric.engine.moe``).

The split (the one ``fabric.plans`` sizes): a stage's ``tp`` ranks form ``ep`` expert groups of
``tp / ep`` consecutive ranks; group ``g`` holds a contiguous range of the experts (sizes differ
by at most one), and inside a group each expert's intermediate dimension is split evenly over
the group's ranks (column-parallel gate/up, row-parallel down, as the dense MLP). A shared
expert is split over all ``tp`` ranks like a dense MLP. So with ``ep = tp`` a rank holds whole
experts, with ``ep = 1`` every rank holds a slice of every expert (plain tp). Every rank's
partial output is summed by the stage's one all-reduce (``fabric.engine.moe``).

Nothing here imports torch: ``fabric.engine.partition`` (and through it ``fabric.plans``) uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fabric.errors import InvalidPlan

STYLES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v3": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
"""``model_type`` -> (the MoE block's attribute, the experts' (gate, up, down) names)."""


@dataclass(frozen=True)
class MoeSpec:
    """A model's mixture-of-experts shape, from its config."""

    model_type: str
    experts: int
    top_k: int
    inter: int
    """Intermediate size of one routed expert."""
    renormalize: bool
    """Whether the top-k routing weights are divided by their sum."""
    shared_inter: int
    """Intermediate size of the shared expert (0: none)."""
    sparse_layers: frozenset[int]
    """Layers whose MLP is a mixture of experts (the others are dense)."""
    scoring: str = "softmax"
    """``softmax`` (Mixtral, Qwen) or ``sigmoid`` (DeepSeek-V3: biased, group-limited)."""
    groups: int = 1
    """Expert groups of the group-limited top-k (DeepSeek's ``n_group``)."""
    topk_groups: int = 1
    """Groups a token's experts are chosen from (``topk_group``)."""
    scaling: float = 1.0
    """Factor on the routing weights (``routed_scaling_factor``)."""
    shared_name: str = "shared_expert"
    """The shared expert's attribute (``shared_experts`` in DeepSeek)."""
    shared_gated: bool = True
    """Whether the shared expert's output is scaled by ``sigmoid(shared_expert_gate(h))``."""

    @property
    def block(self) -> str:
        """The MoE block's attribute name in the checkpoint (``block_sparse_moe`` or ``mlp``)."""
        return STYLES[self.model_type][0]

    @property
    def proj_names(self) -> tuple[str, str, str]:
        """An expert's (gate, up, down) projection names."""
        gate, up, down = STYLES[self.model_type][1]
        return gate, up, down


@dataclass(frozen=True)
class ExpertShare:
    """What one rank holds of every sparse layer (the same for all of its stage's layers)."""

    ep: int
    group: int
    """This rank's expert group (0..ep-1)."""
    experts: range
    """Global ids of the routed experts the group holds."""
    inter_start: int
    inter_stop: int
    """This rank's slice of each held expert's intermediate dimension."""
    shared_start: int
    shared_stop: int
    """This rank's slice of the shared expert's intermediate dimension (0, 0 when none)."""


def moe_spec(config: Any) -> MoeSpec | None:
    """The config's MoE shape, or None for a dense model."""
    kind = getattr(config, "model_type", "")
    if kind not in STYLES:
        return None
    layers = config.num_hidden_layers
    if kind == "deepseek_v3":
        n = config.n_routed_experts or 0
        first = config.first_k_dense_replace or 0
        return MoeSpec(kind, n, config.num_experts_per_tok, config.moe_intermediate_size,
                       bool(config.norm_topk_prob),
                       config.moe_intermediate_size * (config.n_shared_experts or 0),
                       frozenset(range(first, layers)) if n else frozenset(),
                       scoring="sigmoid", groups=config.n_group or 1,
                       topk_groups=config.topk_group or 1,
                       scaling=float(config.routed_scaling_factor),
                       shared_name="shared_experts", shared_gated=False)
    if kind == "mixtral":
        return MoeSpec(kind, config.num_local_experts, config.num_experts_per_tok,
                       config.intermediate_size, True, 0, frozenset(range(layers)))
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    sparse = frozenset(i for i in range(layers) if (i + 1) % step == 0 and i not in dense)
    if not config.num_experts:
        sparse = frozenset()
    shared = getattr(config, "shared_expert_intermediate_size", 0) if kind == "qwen2_moe" else 0
    return MoeSpec(kind, config.num_experts, config.num_experts_per_tok,
                   config.moe_intermediate_size, bool(config.norm_topk_prob), int(shared or 0),
                   sparse)


def sparse_layers(config: Any) -> frozenset[int]:
    """The layers of a model (a transformers config) that are mixtures of experts."""
    spec = moe_spec(config)
    return spec.sparse_layers if spec is not None else frozenset()


def even_ranges(total: int, parts: int) -> list[range]:
    """``parts`` contiguous ranges covering ``0..total``, sizes differing by at most one."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for p in range(parts):
        stop = start + base + (1 if p < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def check_ep(spec: MoeSpec | None, tp: int, ep: int) -> None:
    """Refuse an ``ep`` the model or the stage cannot take (``InvalidPlan``, do not retry)."""
    if ep == 1:
        return
    if spec is None or not spec.sparse_layers:
        raise InvalidPlan(f"ep={ep} needs a mixture-of-experts model; this one is dense "
                          "(use ep=1)", ep=ep, tp=tp)
    if ep < 1 or tp % ep:
        raise InvalidPlan(f"ep={ep} must divide tp={tp} (expert groups are made of a stage's "
                          "tp ranks)", ep=ep, tp=tp)
    if ep > spec.experts:
        raise InvalidPlan(f"ep={ep} exceeds the model's {spec.experts} experts", ep=ep, tp=tp)


def expert_share(spec: MoeSpec, tp: int, ep: int, tp_rank: int) -> ExpertShare:
    """The experts and slices rank ``tp_rank`` of a stage holds (``check_ep`` first)."""
    per_group = tp // ep
    group, member = divmod(tp_rank, per_group)
    inter = even_ranges(spec.inter, per_group)[member]
    shared = even_ranges(spec.shared_inter, tp)[tp_rank] if spec.shared_inter else range(0)
    return ExpertShare(ep, group, even_ranges(spec.experts, ep)[group], inter.start, inter.stop,
                       shared.start, shared.stop)


def moe_slice(spec: MoeSpec, share: ExpertShare, name: str
              ) -> tuple[bool, int | None, int, int | None]:
    """How a rank reads tensor ``name`` of a sparse layer's block, relative to the block.

    ``name`` is the part after ``{block}.`` (e.g. ``experts.3.w1.weight``). Returns (read it,
    dim, start, stop); ``dim=None`` reads the whole tensor.
    """
    parts = name.split(".")
    down = spec.proj_names[2]
    if parts[0] == "experts":
        if int(parts[1]) not in share.experts:
            return False, None, 0, None
        lo, hi = share.inter_start, share.inter_stop
        if (lo, hi) == (0, spec.inter):
            return True, None, 0, None
        return True, (1 if parts[2] == down else 0), lo, hi
    if parts[0] == spec.shared_name:
        lo, hi = share.shared_start, share.shared_stop
        if (lo, hi) == (0, spec.shared_inter):
            return True, None, 0, None
        return True, (1 if parts[1] == "down_proj" else 0), lo, hi
    return True, None, 0, None  # the router (and its bias), the shared expert's gate: replicated
