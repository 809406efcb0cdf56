"""What differs between the dense decoder families the engine serves, as data.

Llama, Qwen2, Qwen3 and Mistral share one layer (RMSNorm, GQA attention with RoPE, gated SiLU
MLP); they differ only in a few attention knobs, which ``attention_spec`` reads from a model's
config the way transformers' own classes read them:

* **bias** on the q/k/v projections (Qwen2 always; Llama and Qwen3 when ``attention_bias``) and
  on the o projection (Llama and Qwen3 when ``attention_bias``; never Qwen2 or Mistral);
* **qk-norm** (Qwen3): an RMSNorm over each head's ``head_dim`` on queries and keys, before
  RoPE. Its weight is one ``[head_dim]`` vector shared by all heads, so under tp every rank
  holds all of it and applies it to its own heads;
* **sliding window** per layer: a query at position ``p`` sees keys ``p - window < j <= p``
  (Mistral on every layer when ``sliding_window`` is set; Qwen2/Qwen3 on the layers
  ``layer_types`` marks ``sliding_attention``). ``None``: full causal attention.

DeepSeek-V3 (and Kimi K2, the same architecture) has multi-head latent attention instead
(``mla``: ``fabric.engine.deepseek`` and ``fabric.engine.mla``); its q/kv/o biases come from
its config there, and it has no qk-norm and no sliding window.

A family added here is added to ``fabric.engine.architectures.SERVED`` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fabric.engine.architectures import served_architecture

Bias = Literal["never", "always", "config"]
"""``config``: as the config's ``attention_bias`` says."""
Window = Literal["none", "all", "layer_types"]
"""Which layers slide: none, all (when ``sliding_window`` is set), or as ``layer_types`` says."""


@dataclass(frozen=True)
class FamilyKnobs:
    """One family's attention variations (see the module)."""

    qkv_bias: Bias
    o_bias: Bias
    qk_norm: bool
    window: Window
    mla: bool = False
    """Multi-head latent attention (DeepSeek-V3) instead of grouped-query attention."""


FAMILIES: dict[str, FamilyKnobs] = {
    "LlamaForCausalLM": FamilyKnobs("config", "config", qk_norm=False, window="none"),
    "Qwen2ForCausalLM": FamilyKnobs("always", "never", qk_norm=False, window="layer_types"),
    "Qwen3ForCausalLM": FamilyKnobs("config", "config", qk_norm=True, window="layer_types"),
    "MistralForCausalLM": FamilyKnobs("never", "never", qk_norm=False, window="all"),
    # Mixtures of experts: the attention of their dense relatives (experts: fabric.engine.moe).
    # Qwen2-MoE's q/k/v bias is its config's ``qkv_bias`` (true in every released model).
    "MixtralForCausalLM": FamilyKnobs("never", "never", qk_norm=False, window="all"),
    "Qwen2MoeForCausalLM": FamilyKnobs("always", "never", qk_norm=False, window="layer_types"),
    "Qwen3MoeForCausalLM": FamilyKnobs("config", "config", qk_norm=True, window="layer_types"),
    # DeepSeek-V3 and Kimi K2: latent attention (biases read by fabric.engine.deepseek).
    "DeepseekV3ForCausalLM": FamilyKnobs("never", "never", qk_norm=False, window="none",
                                         mla=True),
}
"""``config.json`` ``architectures`` value -> its knobs (causal-lm families only)."""


@dataclass(frozen=True)
class AttentionSpec:
    """A model's attention knobs, resolved from its config."""

    architecture: str
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    windows: tuple[int | None, ...]
    """Sliding window of each layer (``None``: full causal attention)."""
    mla: bool = False
    """Multi-head latent attention (``fabric.engine.mla``)."""

    @property
    def uniform_window(self) -> int | None:
        """The window when every layer slides over the same one (Mistral), else ``None``: a
        sequence then holds at most that many KV tokens per layer."""
        first = self.windows[0] if self.windows else None
        return first if all(w == first for w in self.windows) else None


def attention_spec(config: Any) -> AttentionSpec:
    """The attention knobs of a model (a transformers config); ``UnsupportedArchitecture``
    when its architecture is not a causal-lm family the engine serves."""
    arch = served_architecture(config, family="causal-lm")
    knobs = FAMILIES[arch]
    flag = bool(getattr(config, "attention_bias", False))

    def bias(b: Bias) -> bool:
        return b == "always" or (b == "config" and flag)

    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    windows: list[int | None] = [None] * n
    if window is not None and knobs.window == "all":
        windows = [int(window)] * n
    elif window is not None and knobs.window == "layer_types":
        types = getattr(config, "layer_types", None) or ["full_attention"] * n
        windows = [int(window) if t == "sliding_attention" else None for t in types]
    return AttentionSpec(arch, bias(knobs.qkv_bias), bias(knobs.o_bias), knobs.qk_norm,
                         tuple(windows), knobs.mla)
