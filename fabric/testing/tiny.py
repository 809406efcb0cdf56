"""Build tiny random-initialised dense decoder checkpoints (Llama, Qwen2, Qwen3, Mistral:
safetensors + a real BPE tokenizer).

Tests and benchmarks use them so that most runs take seconds; nothing is downloaded: the
byte-level BPE tokenizer is trained in-process on a few sentences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The mitochondria is the powerhouse of the cell.",
    "Tensor parallel splits each layer; pipeline parallel splits the stack of layers.",
    "Scientists call models through a federated fabric of supercomputer sites.",
    "Proteins fold into shapes that decide what they do.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]


def build_tokenizer(vocab_size: int = 384) -> Any:
    """A small byte-level BPE tokenizer with chat special tokens (<|im_end|> is eos and pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
"""The dense families ``build_tiny`` writes (transformers ``model_type`` names)."""


def build_tiny_llama(out: Path, **kwargs: Any) -> Path:
    """A tiny random Llama (``build_tiny`` with ``family="llama"``)."""
    return build_tiny(out, family="llama", **kwargs)


def build_tiny(
    out: Path,
    *,
    family: str = "llama",
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    tie: bool = True,
    seed: int = 0,
    vocab: int = 384,
    head_dim: int | None = None,
    **extra: Any,
) -> Path:
    """Write a random checkpoint of a dense ``family`` (fp32 safetensors) plus tokenizer into
    ``out``.

    ``vocab`` is the tokenizer's (and so the model's) vocabulary size; an odd size makes the
    vocab-parallel split of the embedding and LM head uneven under tp. ``head_dim`` defaults to
    ``hidden // heads``; ``extra`` goes to the family's config (``sliding_window``,
    ``attention_bias``, ``use_sliding_window``, ``max_window_layers``...). Outside Llama, the
    biases and norm weights are randomised too (transformers initialises them to 0 and 1, which
    would leave a bias or a qk-norm weight read wrongly unnoticed).
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
               "mistral": MistralConfig}
    if family not in classes:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    tok = build_tokenizer(vocab)
    config = classes[family](
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    return _save_random(model, tok, out, randomise_1d=family != "llama")


def _save_random(model: Any, tok: Any, out: Path, randomise_1d: bool = True) -> Path:
    """Re-draw the model's weights, save it and the tokenizer into ``out``."""
    import torch

    with torch.no_grad():
        # Larger-than-default weights give peaked, prompt-dependent next-token distributions,
        # so greedy-equivalence tests compare real choices, not near-ties. (Experts are 3-d in
        # transformers' modules: one tensor for all of a layer's experts.)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
            elif randomise_1d:  # Llama's fixtures stay as they were
                p.normal_(1.0, 0.2) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


MOE_ARCHITECTURES = ("mixtral", "qwen3_moe", "qwen2_moe")


def build_tiny_moe(
    out: Path,
    kind: str = "mixtral",
    *,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    experts: int = 8,
    top_k: int = 2,
    expert_inter: int = 48,
    tie: bool = False,
    seed: int = 0,
    vocab: int = 384,
) -> Path:
    """Write a random mixture-of-experts checkpoint (fp32 safetensors) plus tokenizer.

    ``kind``: ``mixtral`` (every layer sparse, renormalised top-k), ``qwen3_moe`` (q/k norms,
    ``norm_topk_prob``, layer 1 kept dense through ``mlp_only_layers``) or ``qwen2_moe``
    (q/k/v biases, a shared expert with a sigmoid gate, top-k not renormalised).
    """
    import torch
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    if kind not in MOE_ARCHITECTURES:
        raise ValueError(f"kind must be one of {MOE_ARCHITECTURES}, not {kind!r}")
    tok = build_tokenizer(vocab)
    common: dict[str, Any] = dict(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=512, tie_word_embeddings=tie, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        num_experts_per_tok=top_k)
    model: Any
    config: Any
    if kind == "mixtral":
        config = MixtralConfig(**common, intermediate_size=expert_inter,
                               num_local_experts=experts)
        torch.manual_seed(seed)
        model = MixtralForCausalLM(config)
    elif kind == "qwen3_moe":
        config = Qwen3MoeConfig(**common, intermediate_size=2 * expert_inter,
                                moe_intermediate_size=expert_inter, num_experts=experts,
                                norm_topk_prob=True, decoder_sparse_step=1,
                                mlp_only_layers=[1])
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config)
    else:
        config = Qwen2MoeConfig(**common, intermediate_size=2 * expert_inter,
                                moe_intermediate_size=expert_inter, num_experts=experts,
                                shared_expert_intermediate_size=2 * expert_inter,
                                norm_topk_prob=False, decoder_sparse_step=1)
        torch.manual_seed(seed)
        model = Qwen2MoeForCausalLM(config)
    model.eval()
    return _save_random(model, tok, out)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "rope_theta": 10000.0}
"""Yarn rope as DeepSeek-V3 ships it (factor 40 there), scaled down to a 512-token context."""


def build_tiny_deepseek(
    out: Path,
    *,
    hidden: int = 64,
    layers: int = 3,
    heads: int = 4,
    experts: int = 8,
    groups: int = 4,
    topk_groups: int = 2,
    top_k: int = 2,
    q_lora_rank: int | None = 32,
    rope: dict[str, Any] | None = YARN,
    interleave: bool = True,
    seed: int = 0,
    vocab: int = 384,
    **extra: Any,
) -> Path:
    """Write a random DeepSeek-V3-architecture checkpoint (fp32 safetensors) plus tokenizer.

    Latent attention with every width different (kv_lora_rank 24, qk_nope 16, qk_rope 8,
    v_head 12), a low-rank query path unless ``q_lora_rank`` is ``None``, yarn rope by default
    (so the softmax scale carries yarn's mscale); layer 0 dense (``first_k_dense_replace=1``),
    the others ``experts`` routed experts in ``groups`` groups, top-``top_k`` from the best
    ``topk_groups`` groups, renormalised, scaled by 2.5, plus one shared expert. The router's
    ``e_score_correction_bias`` is randomised too (transformers initialises it to 0), so it
    changes which experts are chosen.
    """
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    tok = build_tokenizer(vocab)
    config = DeepseekV3Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        n_shared_experts=1, n_routed_experts=experts, routed_scaling_factor=2.5,
        kv_lora_rank=24, q_lora_rank=q_lora_rank, qk_rope_head_dim=8, v_head_dim=12,
        qk_nope_head_dim=16, n_group=groups, topk_group=topk_groups,
        num_experts_per_tok=top_k, first_k_dense_replace=1, norm_topk_prob=True,
        max_position_embeddings=512, rope_parameters=dict(rope or {"rope_type": "default",
                                                                   "rope_theta": 10000.0}),
        rope_interleave=interleave, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, **extra)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # a buffer, not a parameter: _save_random would leave it at 0
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.3)
    return _save_random(model, tok, out)
