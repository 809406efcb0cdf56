"""The model architectures the engine serves, and which runner family serves each.

One list, checked wherever a model enters: ``fabric models add`` validates a folder against it
before registering the model, a catalog entry's folder is checked when its weights are prepared
(``fabric.weights.prepare``, before any deployment starts), and a model server checks it again
when it builds its stage (``fabric.engine.families.attention_spec``). A family added to the
engine (a runner that serves it) is added here.
"""

from __future__ import annotations

from typing import Any

from fabric.catalog import Family
from fabric.errors import UnsupportedArchitecture

SERVED: dict[str, Family] = {
    # fabric.engine.model (pp x tp StageModel); per-family knobs in fabric.engine.families
    "LlamaForCausalLM": "causal-lm",
    "MistralForCausalLM": "causal-lm",
    "Qwen2ForCausalLM": "causal-lm",
    "Qwen3ForCausalLM": "causal-lm",
    # the same, with experts in fabric.engine.moe (pp x tp x ep)
    "MixtralForCausalLM": "causal-lm",
    "Qwen2MoeForCausalLM": "causal-lm",
    "Qwen3MoeForCausalLM": "causal-lm",
    # latent attention (fabric.engine.mla) and DeepSeek routing: DeepSeek-V3, Kimi K2
    "DeepseekV3ForCausalLM": "causal-lm",
    "BertModel": "embedding",  # fabric.engine.encoder (BERT-style sentence encoders)
}
"""``config.json`` ``architectures`` value -> the family whose runner serves it."""


def served_architecture(config: dict[str, Any] | Any, family: Family | None = None) -> str:
    """The first of a model's ``architectures`` the engine serves (as ``family``, if given);
    ``config``: ``config.json`` as a dict, or a transformers config. ``UnsupportedArchitecture``
    (listing the supported ones) if none is."""
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    names = list(get("architectures") or [])
    supported = sorted(a for a, f in SERVED.items() if family in (None, f))
    for name in names:
        if name in supported:
            return name
    raise UnsupportedArchitecture(
        f"architecture {', '.join(names) or '(none in config.json)'} "
        f"(model_type {get('model_type')!r}) is not served"
        f"{f' as {family}' if family else ''}; the engine serves: {', '.join(supported)}",
        architectures=names, supported=supported)


def family_of(config: dict[str, Any] | Any) -> Family:
    """The family serving a model's ``config.json`` (``UnsupportedArchitecture`` if none)."""
    return SERVED[served_architecture(config)]
