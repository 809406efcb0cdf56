"""The model architectures the engine serves, and which runner family serves each.

One list: ``fabric models add`` validates a folder against it before registering the model. A
family added to the engine (a runner that serves it) is added here.
"""

from __future__ import annotations

from typing import Any

from fabric.catalog import Family
from fabric.errors import UnsupportedArchitecture

SERVED: dict[str, Family] = {
    "LlamaForCausalLM": "causal-lm",  # fabric.engine.model (pp x tp StageModel)
    "MixtralForCausalLM": "causal-lm",  # the same, experts in fabric.engine.moe (pp x tp x ep)
    "BertModel": "embedding",  # fabric.engine.encoder (BERT-style sentence encoders)
}
"""``config.json`` ``architectures`` value -> the family whose runner serves it."""


def family_of(config: dict[str, Any]) -> Family:
    """The family serving a model's ``config.json`` (``UnsupportedArchitecture`` if none)."""
    names = config.get("architectures") or []
    for name in names:
        if name in SERVED:
            return SERVED[name]
    raise UnsupportedArchitecture(
        f"architecture {', '.join(names) or '(none in config.json)'} "
        f"(model_type {config.get('model_type')!r}) is not served; the engine serves: "
        f"{', '.join(sorted(SERVED))}",
        architectures=list(names), supported=sorted(SERVED))
