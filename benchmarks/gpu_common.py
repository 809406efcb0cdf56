"""What the GPU benchmark (``gpu_engine.py``) needs besides the engine: a Llama-3-8B-shaped
model with random weights drawn on the device, the device's copy bandwidth (the roofline's
memory ceiling), a timed transformers ``generate`` that separates prefill from decode, and a
token-agreement count.

These came from ``gpu_decode.py``, the session-1 prototype decode path (superseded by
``fabric.engine.graphs``; its recorded results stay in ``benchmarks/results/gpu_decode.*``).
The roofline definition is the one those results use: fraction = decode steps/s x all weight
bytes / measured copy bandwidth.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch


def llama_config(tiny: bool, rope_type: str = "llama3") -> Any:
    """Llama-3-8B's shape (or a 2-layer toy for ``tiny``), rope ``llama3`` or ``default``."""
    from transformers import LlamaConfig

    if tiny:
        shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, vocab_size=512)
    else:
        shape = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256)
    return LlamaConfig(
        **shape,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        } if rope_type == "llama3" else {"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=128000 if not tiny else 1,
        eos_token_id=None,
        pad_token_id=0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype,
                rope_type: str = "llama3") -> Any:
    """Random weights created directly on ``device`` in ``dtype`` (no CPU copy), greedy, no EOS."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(tiny, rope_type)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval().requires_grad_(False)
    gc = model.generation_config
    gc.eos_token_id = None
    gc.pad_token_id = 0
    gc.do_sample = False
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None
    return model


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: torch.device, nbytes: int, iters: int = 20) -> dict[str, float]:
    """Copy bandwidth (read + written bytes over the median copy time; CUDA events on a GPU)
    and the read-only bandwidth of a bf16 sum, over an ``nbytes`` buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.random_(0, 255) if device.type == "cpu" else src.fill_(7)
    dst = torch.empty_like(src)
    big = src.view(torch.bfloat16)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    copy_t, read_t = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        copy_t.append(time.perf_counter() - t0)
    if device.type == "cuda":
        # Event timing for the copy (no host overhead) replaces the host timer's figures.
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev_t = []
        for _ in range(iters):
            ev[0].record()
            dst.copy_(src)
            ev[1].record()
            torch.cuda.synchronize()
            ev_t.append(ev[0].elapsed_time(ev[1]) / 1e3)
        copy_t = ev_t
    for _ in range(max(3, iters // 2)):
        t0 = time.perf_counter()
        big.sum(dtype=torch.float32)
        sync(device)
        read_t.append(time.perf_counter() - t0)
    del src, dst, big
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t_copy = statistics.median(copy_t)
    t_read = statistics.median(read_t)
    return {
        "bytes_per_copy": nbytes,
        "copy_GBps": 2 * nbytes / t_copy / 1e9,  # bytes read + written
        "read_only_sum_GBps": nbytes / t_read / 1e9,
        "copy_median_ms": t_copy * 1e3,
    }


class FirstTokenTimer:
    """Logits processor: synchronises once, at the first call (right after prefill)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t_first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.t_first is None:
            sync(self.device)
            self.t_first = time.perf_counter()
        return scores


def hf_generate_timed(model: Any, input_ids: torch.Tensor, new_tokens: int,
                      device: torch.device, **kw: Any) -> tuple[dict[str, float], torch.Tensor]:
    """Greedy ``generate`` of exactly ``new_tokens``: ``({total_s, prefill_s, decode_s}, ids)``."""
    from transformers import LogitsProcessorList

    timer = FirstTokenTimer(device)
    attn = torch.ones_like(input_ids)
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=attn, max_new_tokens=new_tokens,
                         min_new_tokens=None, do_sample=False,
                         logits_processor=LogitsProcessorList([timer]), **kw)
    sync(device)
    t1 = time.perf_counter()
    gen = out[:, input_ids.shape[1]:]
    assert gen.shape[1] == new_tokens, gen.shape
    assert timer.t_first is not None
    return {"total_s": t1 - t0, "prefill_s": timer.t_first - t0,
            "decode_s": t1 - timer.t_first}, gen


def leading_match(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
