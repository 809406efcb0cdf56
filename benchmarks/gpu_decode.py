#!/usr/bin/env python3
"""Single-GPU decode benchmark for a Llama-3-8B-shaped model with random bf16 weights.

Measures, on one GPU (H100/H200):
  1. device-to-device copy bandwidth (the roofline's memory ceiling);
  2. decode tokens/s at batch 1 and 16 (prompt 128, 128 new tokens, greedy) for
     (a) transformers eager ``generate`` (dynamic cache),
     (b) ``generate`` with ``cache_implementation="static"`` and automatic ``torch.compile``,
     (c) DeepSpeed ``init_inference(replace_with_kernel_inject=True)`` in a subprocess with a
         hard timeout (expected to fail with transformers 5.x; the error is recorded),
     (d) our own decode path: preallocated static KV cache, a decode step written against the
         model's own weights, captured once in a ``torch.cuda.CUDAGraph`` and replayed per token
         (plain weights and a variant with fused QKV / gate-up weights),
     (e) (d') with each decoder layer and the head as a ``torch.compile``'d function (fullgraph,
         static shapes, Inductor with coordinate-descent tuning: RMSNorm, RoPE, KV-cache write,
         residual adds and SiLU*up fused; batch-1 matmuls as tuned Triton reductions), the whole
         step again captured in our own CUDA graph; variants: batch-1 matmuls left to cuBLAS
         (``own_compiled_cublas``) and ``max-autotune-no-cudagraphs`` at the largest batch.
     A torch.profiler pass over a few captured steps of (d') and (e) gives the kernel breakdown.

Decode rates exclude prefill: the time from the first generated token to the last, over the
127 decode steps. Fraction of roofline = steps/s * weight bytes / copy bandwidth (all weights,
the issue's definition); also steps/s * needed bytes / copy bandwidth, where needed bytes are
the weights without the embedding table, one embedding row per sequence and the live KV prefix.

Prints one JSON object on stdout and writes it to ``$OUT/gpu_decode.json`` when ``OUT`` is set
(rewritten after every item, so a run killed late still leaves partial results).

``--tiny`` runs the same code end to end on CPU with a tiny float32 model (a smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

T_START = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# configuration


def llama_config(tiny: bool, rope_type: str = "llama3"):
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


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, rope_type: str = "llama3"):
    """Random weights created directly on `device` in `dtype` (no CPU copy of the weights)."""
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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# 1. bandwidth


def measure_bandwidth(device, nbytes: int, iters: int = 20) -> dict:
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
        # event timing for the copy as a cross-check (no host overhead)
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


# --------------------------------------------------------------------------------------------
# (a)/(b) transformers generate


class FirstTokenTimer:
    """Logits processor: synchronises once, at the first call (right after prefill)."""

    def __init__(self, device):
        self.device = device
        self.t_first = None

    def __call__(self, input_ids, scores):
        if self.t_first is None:
            sync(self.device)
            self.t_first = time.perf_counter()
        return scores


def hf_generate_timed(model, input_ids, new_tokens, device, **kw):
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
    return {"total_s": t1 - t0, "prefill_s": timer.t_first - t0,
            "decode_s": t1 - timer.t_first}, gen


def rate_entry(runs, batch, new_tokens, weight_bytes, bw_Bps, needed_bytes=None):
    decode_s = statistics.median(r["decode_s"] for r in runs)
    total_s = statistics.median(r["total_s"] for r in runs)
    steps_per_s = (new_tokens - 1) / decode_s
    e = {
        "batch": batch,
        "repeats": len(runs),
        "decode_steps_per_s": steps_per_s,
        "decode_tok_per_s": steps_per_s * batch,
        "end_to_end_tok_per_s": new_tokens * batch / total_s,
        "prefill_s_median": statistics.median(r["prefill_s"] for r in runs),
        "decode_s_all": [round(r["decode_s"], 5) for r in runs],
    }
    if bw_Bps:
        e["roofline_fraction"] = steps_per_s * weight_bytes / bw_Bps
        if needed_bytes:
            e["needed_bytes_per_step"] = needed_bytes
            e["roofline_fraction_needed_bytes"] = steps_per_s * needed_bytes / bw_Bps
    return e


# --------------------------------------------------------------------------------------------
# (d) our own static-cache decode step, CUDA-graph captured


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rms(x, w, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


class OwnWeights:
    """References (plain) or fused copies (fuse=True) of the HF model's weights."""

    def __init__(self, model, fuse: bool):
        m = model.model
        self.fuse = fuse
        self.embed = m.embed_tokens.weight
        self.norm = m.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = []
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            d = {"ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
                 "o": a.o_proj.weight, "down": mlp.down_proj.weight}
            if fuse:
                d["qkv"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0)
                d["gu"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0)
            else:
                d.update(q=a.q_proj.weight, k=a.k_proj.weight, v=a.v_proj.weight,
                         gate=mlp.gate_proj.weight, up=mlp.up_proj.weight)
            self.layers.append(d)


class OwnDecoder:
    """Static KV cache [layers, batch, kv_heads, max_len, head_dim] + a one-token decode step."""

    def __init__(self, model, weights: OwnWeights, batch: int, max_len: int):
        cfg = model.config
        self.w = weights
        self.B, self.max_len = batch, max_len
        self.nh, self.kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = cfg.head_dim
        self.g = self.nh // self.kvh
        self.eps = cfg.rms_norm_eps
        self.inter = cfg.intermediate_size
        dev, dt = weights.embed.device, weights.embed.dtype
        L = cfg.num_hidden_layers
        self.k_cache = torch.zeros(L, batch, self.kvh, max_len, self.hd, device=dev, dtype=dt)
        self.v_cache = torch.zeros_like(self.k_cache)
        pos = torch.arange(max_len, device=dev)
        # RoPE tables from the model's own rotary module (llama3 scaling included)
        cos, sin = model.model.rotary_emb(self.k_cache[0, :1, 0], pos[None])
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # [max_len, hd]
        self.arange = pos
        # static decode-step state
        self.tok_in = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos_t = torch.zeros(1, dtype=torch.long, device=dev)
        self.out_buf = torch.zeros(batch, max_len, dtype=torch.long, device=dev)
        self.graph = None

    def forward(self, tokens, positions, mask):
        """tokens [B,T]; positions [T] (cache slots written); mask [T,max_len] bool (True=attend).
        Returns last-position logits [B, vocab]."""
        B, T = tokens.shape
        nh, kvh, hd, g = self.nh, self.kvh, self.hd, self.g
        x = F.embedding(tokens, self.w.embed)
        cos = self.cos.index_select(0, positions)[None, None]  # [1,1,T,hd]
        sin = self.sin.index_select(0, positions)[None, None]
        maskg = mask.repeat(g, 1)  # rows ordered (group, t) to match q's reshape below
        qd, kd = nh * hd, kvh * hd
        for i, lw in enumerate(self.w.layers):
            h = _rms(x, lw["ln1"], self.eps)
            if self.w.fuse:
                qkv = F.linear(h, lw["qkv"])
                q, k, v = qkv.split([qd, kd, kd], dim=-1)
            else:
                q, k, v = F.linear(h, lw["q"]), F.linear(h, lw["k"]), F.linear(h, lw["v"])
            q = q.view(B, T, nh, hd).transpose(1, 2)
            k = k.view(B, T, kvh, hd).transpose(1, 2)
            v = v.view(B, T, kvh, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = self.k_cache[i], self.v_cache[i]  # [B,kvh,max_len,hd]
            kc.index_copy_(2, positions, k)
            vc.index_copy_(2, positions, v)
            # GQA without repeating K/V: fold the query heads of a KV group into the query axis
            qg = q.reshape(B, kvh, g * T, hd)
            o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=maskg)
            o = o.reshape(B, nh, T, hd).transpose(1, 2).reshape(B, T, qd)
            x = x + F.linear(o, lw["o"])
            h = _rms(x, lw["ln2"], self.eps)
            if self.w.fuse:
                gu = F.linear(h, lw["gu"])
                gate, up = gu.split([self.inter, self.inter], dim=-1)
            else:
                gate, up = F.linear(h, lw["gate"]), F.linear(h, lw["up"])
            x = x + F.linear(F.silu(gate) * up, lw["down"])
        x = _rms(x[:, -1], self.w.norm, self.eps)
        return F.linear(x, self.w.lm_head)

    @torch.no_grad()
    def prefill(self, prompt):
        P = prompt.shape[1]
        positions = self.arange[:P]
        mask = self.arange[None, :] <= positions[:, None]
        first = self.forward(prompt, positions, mask).argmax(-1)
        self._P, self._first = P, first.clone()
        self.reset()
        return first

    def reset(self):
        self.tok_in.copy_(self._first)
        self.pos_t.fill_(self._P)

    @torch.no_grad()
    def step(self):
        mask = (self.arange <= self.pos_t)[None, :]
        logits = self.forward(self.tok_in[:, None], self.pos_t, mask)
        nxt = logits.argmax(-1)
        self.out_buf.index_copy_(1, self.pos_t, nxt[:, None])
        self.tok_in.copy_(nxt)
        self.pos_t.add_(1)

    def capture(self):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        torch.cuda.synchronize()
        self.reset()

    def run(self, steps):
        if self.graph is not None:
            for _ in range(steps):
                self.graph.replay()
        else:
            for _ in range(steps):
                self.step()

    def tokens(self, steps):
        return torch.cat([self._first[:, None], self.out_buf[:, self._P:self._P + steps]], 1)


def bench_own(model, weights, prompt, new_tokens, device, repeats, use_graph, time_left,
              make_dec=None, prof=None):
    """Returns (runs, tokens, capture_s, extra); `make_dec(B, max_len)` builds a (e) decoder,
    `prof` (a dict) receives a profile of the captured step when given."""
    B = prompt.shape[0]
    max_len = prompt.shape[1] + new_tokens
    dec = make_dec(B, max_len) if make_dec else OwnDecoder(model, weights, B, max_len)
    extra = {}
    sync(device)
    t0 = time.perf_counter()
    dec.prefill(prompt)
    sync(device)
    prefill_s = time.perf_counter() - t0
    if hasattr(dec, "warm"):
        t0 = time.perf_counter()
        dec.warm()
        extra["compile_warm_s"] = round(time.perf_counter() - t0, 1)
        log(f"  compiled/warm in {extra['compile_warm_s']} s")
    t0 = time.perf_counter()
    if use_graph:
        try:
            dec.capture()
        except Exception as e:  # keep the fused kernels' numbers, launched one by one
            if make_dec is None:
                raise
            extra["graph_error"] = f"{type(e).__name__}: {e}"[:800]
            log(f"  capture failed, timing without the graph: {extra['graph_error']}")
            dec.graph = None
            sync(device)
            dec.reset()
    capture_s = time.perf_counter() - t0
    steps = new_tokens - 1
    dec.run(steps)  # warm-up pass
    sync(device)
    runs = []
    for r in range(repeats):
        if r and time_left() < 30:
            break
        dec.reset()
        sync(device)
        t0 = time.perf_counter()
        dec.run(steps)
        sync(device)
        d = time.perf_counter() - t0
        runs.append({"decode_s": d, "total_s": d + prefill_s, "prefill_s": prefill_s})
    toks = dec.tokens(steps).clone()
    if prof is not None and time_left() > 40:
        try:
            prof.update(profile_step(dec, device))
        except Exception as e:
            prof["error"] = f"{type(e).__name__}: {e}"[:800]
    del dec
    return runs, toks, capture_s, extra


# --------------------------------------------------------------------------------------------
# (e) our path with torch.compile'd layer/head functions, captured in our own CUDA graph


def _layer_fn(x, cos, sin, mask, pos, kc, vc, ln1, w_qkv, w_o, ln2, w_gu, w_down, *,
              nh, kvh, hd, inter, eps):
    """One decoder layer for T new tokens: x [B,T,D]; kc/vc [B,kvh,max_len,hd] (updated in
    place at `pos`); mask [g*T, max_len] bool.  Pure tensor code, so one compiled graph serves
    every layer (same shapes): the weights are arguments, not attributes."""
    B, T, _ = x.shape
    g = nh // kvh
    qd, kd = nh * hd, kvh * hd
    h = _rms(x, ln1, eps)
    q, k, v = F.linear(h, w_qkv).split([qd, kd, kd], dim=-1)
    q = q.view(B, T, nh, hd).transpose(1, 2)
    k = k.view(B, T, kvh, hd).transpose(1, 2)
    v = v.view(B, T, kvh, hd).transpose(1, 2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    kc.index_copy_(2, pos, k)
    vc.index_copy_(2, pos, v)
    qg = q.reshape(B, kvh, g * T, hd)
    o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask)
    o = o.reshape(B, nh, T, hd).transpose(1, 2).reshape(B, T, qd)
    x = x + F.linear(o, w_o)
    h = _rms(x, ln2, eps)
    gate, up = F.linear(h, w_gu).split([inter, inter], dim=-1)
    return x + F.linear(F.silu(gate) * up, w_down)


def _head_fn(x, w_norm, w_lm, *, eps):
    """Final norm + lm_head + greedy pick for the last position: x [B,T,D] -> [B] token ids."""
    return F.linear(_rms(x[:, -1], w_norm, eps), w_lm).argmax(-1)


INDUCTOR_PATCH = {
    # gpt-fast's settings: with coordinate-descent tuning Inductor rewrites a matmul with one
    # row (batch-1 decode) as a Triton multiply+sum reduction (torch/_inductor/decomposition.py
    # `mm`), into which it fuses the RMSNorm scaling / SiLU*up producer, and tunes its blocks.
    "coordinate_descent_tuning": True,
    "triton.unique_kernel_names": True,  # readable kernel names in the profile
}
# (e-cublas): the same fusion but batch-1 matmuls left to cuBLAS. Added after run 2, where the
# profile showed cuBLAS's batch-1 kernels (d') beating Inductor's GEMV reductions (e) per call
# (gate/up 57 vs 69 us); not yet measured on a GPU.
INDUCTOR_PATCH_CUBLAS = {**INDUCTOR_PATCH, "coordinate_descent_tuning": False}


def make_compiled(fn, mode, backend):
    if backend == "inductor":
        return torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)


class CompiledDecoder(OwnDecoder):
    """(e): the (d') decode step with each layer and the head as a torch.compile'd function
    (RMSNorm, RoPE, residual adds and SiLU*up fused; batch-1 GEMVs as tuned Triton reductions),
    the whole step then captured in one CUDA graph as in (d').  Prefill runs the eager path.
    KV caches are one contiguous tensor per layer (graph inputs, not views of one big buffer)."""

    def __init__(self, model, weights: OwnWeights, batch: int, max_len: int, layer_c, head_c):
        assert weights.fuse
        super().__init__(model, weights, batch, max_len)
        L = len(weights.layers)
        shape = tuple(self.k_cache.shape[1:])
        dev, dt = self.k_cache.device, self.k_cache.dtype
        del self.k_cache, self.v_cache
        self.k_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(L)]
        self.v_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(L)]
        self.layer_c, self.head_c = layer_c, head_c
        self.kw = dict(nh=self.nh, kvh=self.kvh, hd=self.hd, inter=self.inter, eps=self.eps)

    @torch.no_grad()
    def step(self):
        pos = self.pos_t
        x = F.embedding(self.tok_in[:, None], self.w.embed)
        cos = self.cos.index_select(0, pos)[None, None]
        sin = self.sin.index_select(0, pos)[None, None]
        mask = (self.arange <= pos)[None, :].expand(self.g, self.max_len)
        for i, lw in enumerate(self.w.layers):
            x = self.layer_c(x, cos, sin, mask, pos, self.k_cache[i], self.v_cache[i],
                             lw["ln1"], lw["qkv"], lw["o"], lw["ln2"], lw["gu"], lw["down"],
                             **self.kw)
        nxt = self.head_c(x, self.w.norm, self.w.lm_head, eps=self.eps)
        self.out_buf.index_copy_(1, pos, nxt[:, None])
        self.tok_in.copy_(nxt)
        self.pos_t.add_(1)

    def warm(self):
        """First calls compile (and tune); kept out of the graph capture."""
        self.step()
        self.step()
        sync(self.k_cache[0].device)
        self.reset()


def profile_step(dec, device, steps: int = 8, top: int = 14) -> dict:
    """torch.profiler over `steps` decode steps (graph replays if captured): per-step kernel
    time by kernel name, the sum of kernel time per step, and the wall time per step.  If the
    profiler sees no kernels inside graph replays, the step is profiled again without the graph
    (same kernels, launched one by one: kernel times hold, the wall time does not)."""
    res = _profile_once(dec, device, steps, top)
    if res["kernels_per_step"] == 0 and dec.graph is not None:
        graph, dec.graph = dec.graph, None
        try:
            res = _profile_once(dec, device, steps, top)
            res["note"] = "no kernels seen inside graph replays; profiled without the graph"
        finally:
            dec.graph = graph
    else:
        res["note"] = "graph replays" if dec.graph is not None else "no graph"
    return res


def _profile_once(dec, device, steps, top):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    dec.reset()
    dec.run(2)
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        dec.run(steps)
        sync(device)
        wall = time.perf_counter() - t0
    kern = {}
    for e in prof.events():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        d = kern.setdefault(e.name, [0, 0.0])
        d[0] += 1
        d[1] += e.time_range.elapsed_us()
    total_us = sum(v[1] for v in kern.values())
    rows = sorted(kern.items(), key=lambda kv: -kv[1][1])
    dec.reset()
    return {"steps": steps, "wall_us_per_step": wall / steps * 1e6,
            "kernel_us_per_step": total_us / steps,
            "kernels_per_step": sum(v[0] for v in kern.values()) / steps,
            "top_kernels": [{"name": k[:160], "calls_per_step": v[0] / steps,
                             "us_per_step": round(v[1] / steps, 1),
                             "share": round(v[1] / total_us, 4) if total_us else None}
                            for k, v in rows[:top]]}


# --------------------------------------------------------------------------------------------
# (c) DeepSpeed kernel injection, in a child process


def ds_child(args) -> None:
    """Kernel injection, first with the Llama-3 rope scaling, then (if that is refused) with plain
    RoPE (same shapes), so the second attempt shows what fails after the rope check."""
    res = {"stage": "import", "attempts": []}
    try:
        t0 = time.perf_counter()
        import deepspeed

        res["deepspeed_version"] = deepspeed.__version__
        res["import_s"] = round(time.perf_counter() - t0, 2)
    except BaseException as e:
        res.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000],
                   traceback_tail=traceback.format_exc()[-2500:])
        print("DSRESULT " + json.dumps(res), flush=True)
        return
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    res["ok"] = False
    for rope in ("llama3", "default"):
        a = {"rope_type": rope, "stage": "build_model"}
        res["attempts"].append(a)
        model = engine = None
        try:
            model = build_model(args.tiny, device, dtype, rope)
            a["stage"] = "init_inference"
            t0 = time.perf_counter()
            engine = deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=True,
                                              tensor_parallel={"tp_size": 1})
            a["init_inference_s"] = round(time.perf_counter() - t0, 1)
            a["stage"] = "generate"
            g = torch.Generator(device="cpu").manual_seed(0)
            prompt = torch.randint(1000, 100000 if not args.tiny else 500, (1, args.prompt_len),
                                   generator=g).to(device)
            n = 32
            hf_model = getattr(engine, "module", engine)
            run, _ = hf_generate_timed(hf_model, prompt, n, device)
            run, _ = hf_generate_timed(hf_model, prompt, n, device)
            a["batch1_decode_tok_per_s_32tok"] = (n - 1) / run["decode_s"]
            a["stage"] = "done"
            a["ok"] = res["ok"] = True
        except BaseException as e:  # the error text is the result
            a["ok"] = False
            a["error"] = f"{type(e).__name__}: {e}"[:2000]
            a["traceback_tail"] = traceback.format_exc()[-2000:]
        brief = {k: v for k, v in a.items() if k != "traceback_tail"}
        print("DSATTEMPT " + json.dumps(brief), flush=True)
        if os.environ.get("OUT"):  # survives the parent being killed
            with open(os.path.join(os.environ["OUT"], "gpu_decode_ds.json"), "w") as f:
                json.dump(res, f, indent=1)
        del model, engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if a["ok"] or "rope_type" not in a.get("error", ""):
            break
    res["stage"] = res["attempts"][-1]["stage"]
    res["error"] = " || ".join(
        f"[rope {a['rope_type']}] {a['error']}" for a in res["attempts"] if "error" in a)
    print("DSRESULT " + json.dumps(res), flush=True)


def start_ds_child(args):
    env = dict(os.environ)
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    if args.tiny:
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, os.path.abspath(__file__), "--ds-child",
           "--prompt-len", str(args.prompt_len)] + (["--tiny"] if args.tiny else [])
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True), time.monotonic()


def finish_ds_child(proc, t_started, timeout_s) -> dict:
    remaining = max(1.0, timeout_s - (time.monotonic() - t_started))
    try:
        out, err = proc.communicate(timeout=remaining)
        timed_out = False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    res = {"wall_s": round(time.monotonic() - t_started, 1), "timed_out": timed_out,
           "returncode": proc.returncode}
    attempts = []
    for line in (out or "").splitlines():
        if line.startswith("DSATTEMPT "):
            attempts.append(json.loads(line[len("DSATTEMPT "):]))
        if line.startswith("DSRESULT "):
            res.update(json.loads(line[len("DSRESULT "):]))
    if attempts and "attempts" not in res:
        res["attempts"] = attempts  # child killed before its summary
    if timed_out:
        res.setdefault("ok", False)
        res["error"] = (f"timed out after {timeout_s:.0f} s (killed); attempts so far: "
                        f"{json.dumps(attempts)[:1500]}")
    res["stderr_tail"] = (err or "")[-1500:]
    return res


# --------------------------------------------------------------------------------------------


def leading_match(a, b):
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny float32 model on CPU (smoke test)")
    ap.add_argument("--budget-s", type=float, default=390.0,
                    help="wall-clock budget for the script")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="",
                    help="comma list of items to skip: eager,compile,deepspeed,own,own_plain,"
                    "own_compiled,own_compiled_cublas,own_compiled_autotune,profile,eager_b16")
    ap.add_argument("--compile-backend", default=None,
                    help="backend for (e): inductor (default on GPU), aot_eager (default --tiny)")
    ap.add_argument("--ds-timeout-s", type=float, default=150.0)
    ap.add_argument("--ds-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prompt_len is None:
        args.prompt_len = 16 if args.tiny else 128
    if args.new_tokens is None:
        args.new_tokens = 16 if args.tiny else 128
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.tiny else "inductor"
    if args.ds_child:
        torch.set_grad_enabled(False)
        return ds_child(args)

    torch.set_grad_enabled(False)
    deadline = T_START + args.budget_s
    time_left = lambda: deadline - time.monotonic()  # noqa: E731
    skip = set(filter(None, args.skip.split(",")))
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    P, N = args.prompt_len, args.new_tokens
    out_dir = os.environ.get("OUT")

    import transformers

    R = {"env": {"torch": torch.__version__, "transformers": transformers.__version__,
                 "python": sys.version.split()[0], "tiny": args.tiny,
                 "deepspeed_importable": importlib.util.find_spec("deepspeed") is not None,
                 "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST")},
         "setup": {"prompt_len": P, "new_tokens": N, "batches": batches, "dtype": str(dtype),
                   "greedy": True, "rate_definition": "decode steps/s = (new_tokens-1) / time from "
                   "first generated token to last; tok/s = steps/s * batch; roofline_fraction = "
                   "steps/s * weight_bytes / copy_GBps"},
         "results": {}, "skipped": {}, "errors": {}}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        R["env"].update(gpu=p.name, sm_count=p.multi_processor_count,
                        gpu_mem_GiB=round(p.total_memory / 2**30, 1),
                        capability=f"{p.major}.{p.minor}")

    def dump():
        R["wall_s"] = round(time.monotonic() - T_START, 1)
        if out_dir:
            with open(os.path.join(out_dir, "gpu_decode.json"), "w") as f:
                json.dump(R, f, indent=1)

    def guard(name, need_s):
        if name in skip:
            R["skipped"][name] = "skipped by --skip"
            return False
        if time_left() < need_s:
            R["skipped"][name] = f"out of time: {time_left():.0f} s left, needs ~{need_s:.0f} s"
            log(f"skip {name}: {R['skipped'][name]}")
            return False
        return True

    # 1. bandwidth
    log("bandwidth")
    bw = measure_bandwidth(device, (64 << 20) if args.tiny else (4 << 30))
    R["bandwidth"] = bw
    bw_Bps = bw["copy_GBps"] * 1e9
    log(f"copy {bw['copy_GBps']:.0f} GB/s, read-only sum {bw['read_only_sum_GBps']:.0f} GB/s")
    dump()

    # model
    t0 = time.perf_counter()
    model = build_model(args.tiny, device, dtype)
    sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.model.embed_tokens.weight
    embed_bytes = emb.numel() * emb.element_size()
    R["model"] = {"params": n_params, "weight_bytes": weight_bytes,
                  "weight_bytes_read_per_step_excl_embedding": weight_bytes - embed_bytes,
                  "build_s": round(time.perf_counter() - t0, 2),
                  "weight_std_sample": float(
                      model.model.layers[0].mlp.down_proj.weight.float().std()),
                  "roofline_steps_per_s": bw_Bps / weight_bytes}
    cfg = model.config
    kv_bytes_per_pos = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
                        * emb.element_size())

    def needed_bytes(B):
        """Bytes a decode step must read: every weight except the embedding table, one embedding
        row per sequence, and the live KV prefix (mean over the N-1 decode steps)."""
        live = P + (N - 1) / 2
        return int(weight_bytes - embed_bytes + B * emb.shape[1] * emb.element_size()
                   + B * live * kv_bytes_per_pos)

    R["model"]["needed_bytes_definition"] = (
        "weights excluding the embedding table + B embedding rows + live KV prefix "
        "(prompt + (new_tokens-1)/2 positions, K and V, all layers)")
    R["model"]["needed_bytes_per_step"] = {f"batch{B}": needed_bytes(B) for B in batches}
    R["model"]["static_kv_bytes_read_per_step_own_paths"] = {
        f"batch{B}": B * (P + N) * kv_bytes_per_pos for B in batches}
    log(f"model built: {n_params / 1e9:.3f} B params, {weight_bytes / 1e9:.2f} GB, "
        f"{R['model']['build_s']} s; roofline {bw_Bps / weight_bytes:.1f} steps/s")
    dump()

    g = torch.Generator(device="cpu").manual_seed(1234)
    vocab_hi = model.config.vocab_size - 1
    base = torch.randint(1, vocab_hi, (max(batches), P), generator=g)
    prompts = {B: base[:B].contiguous().to(device) for B in batches}  # batch-1 prompt = row 0
    tokens = {}

    def record(name, B, runs):
        e = rate_entry(runs, B, N, weight_bytes, bw_Bps, needed_bytes(B))
        R["results"].setdefault(name, {})[f"batch{B}"] = e
        log(f"{name} b{B}: {e['decode_tok_per_s']:.1f} tok/s, "
            f"{100 * e.get('roofline_fraction', 0):.1f}% of roofline (all weights), "
            f"{100 * e.get('roofline_fraction_needed_bytes', 0):.1f}% (needed bytes)")
        dump()

    # (d) our CUDA-graph decode path (first: it is the fast, important one)
    use_graph = device.type == "cuda"
    profiles = R.setdefault("profiles", {})
    w_fused = None
    for fuse in (False, True):
        name = "own_cudagraph" + ("_fused" if fuse else "")
        if not use_graph:
            name = name.replace("cudagraph", "nograph")
        if not guard("own", 25) or (not fuse and not guard("own_plain", 0)):
            continue
        try:
            w = OwnWeights(model, fuse)
            for B in batches:
                prof = {} if fuse and "profile" not in skip else None
                runs, toks, cap_s, _ = bench_own(model, w, prompts[B], N, device, args.repeats,
                                                 use_graph, time_left, prof=prof)
                record(name, B, runs)
                R["results"][name][f"batch{B}"]["capture_s"] = round(cap_s, 3)
                tokens[(name, B)] = toks.cpu()
                if prof:
                    profiles[f"{name}_b{B}"] = prof
            if fuse:
                w_fused = w
            del w
        except Exception as e:
            R["errors"][name] = f"{type(e).__name__}: {e}"[:1500]
            log(f"{name} failed: {traceback.format_exc()}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dump()

    # (a) eager generate
    for B in batches:
        if not guard("eager", 40 if not args.tiny else 1):
            break
        if B > 1 and not guard("eager_b16", 0):
            break
        try:
            hf_generate_timed(model, prompts[B], 4, device)  # warm-up
            runs = []
            for r in range(args.repeats):
                if r and time_left() < 150:
                    break
                run, gen = hf_generate_timed(model, prompts[B], N, device)
                runs.append(run)
            tokens[("eager", B)] = gen.cpu()
            record("eager", B, runs)
        except Exception as e:
            R["errors"][f"eager_b{B}"] = f"{type(e).__name__}: {e}"[:1500]
            log(f"eager b{B} failed: {traceback.format_exc()}")

    # (e) compiled layer/head functions inside our CUDA graph; then the same with max-autotune
    # (Triton GEMM templates vs cuBLAS) at the largest batch only
    import torch._dynamo as dynamo
    import torch._inductor.config as ind_cfg

    variants = [("own_compiled", "default", batches, 90, INDUCTOR_PATCH),
                ("own_compiled_cublas", "default", [min(batches)], 60, INDUCTOR_PATCH_CUBLAS),
                ("own_compiled_autotune", "max-autotune-no-cudagraphs", [max(batches)], 120,
                 INDUCTOR_PATCH)]
    for name, mode, vb, need, patch in variants:
        if args.tiny and args.compile_backend != "inductor" and name.endswith("autotune"):
            vb = batches[:1]  # mode is ignored off Inductor: just exercise the code path
        if w_fused is None:
            w_fused = OwnWeights(model, True)
        dynamo.reset()
        layer_c = make_compiled(_layer_fn, mode, args.compile_backend)
        head_c = make_compiled(_head_fn, mode, args.compile_backend)
        R["setup"][f"{name}_compile"] = {"mode": mode, "backend": args.compile_backend,
                                         "fullgraph": True, "dynamic": False,
                                         "inductor_config": patch}
        for B in vb:
            if not guard(name, need if not args.tiny else 1):
                break
            try:
                with ind_cfg.patch(patch):
                    prof = {} if "profile" not in skip else None
                    runs, toks, cap_s, extra = bench_own(
                        model, w_fused, prompts[B], N, device, args.repeats, use_graph,
                        time_left, make_dec=lambda b, ml, w=w_fused, lc=layer_c, hc=head_c:
                        CompiledDecoder(model, w, b, ml, lc, hc), prof=prof)
                record(name, B, runs)
                R["results"][name][f"batch{B}"].update(capture_s=round(cap_s, 3), **extra)
                tokens[(name, B)] = toks.cpu()
                if prof:
                    profiles[f"{name}_b{B}"] = prof
                    log(f"  profile: {prof.get('kernels_per_step', 0):.0f} kernels/step, "
                        f"kernel time {prof.get('kernel_us_per_step', 0):.0f} us/step, wall "
                        f"{prof.get('wall_us_per_step', 0):.0f} us/step {prof.get('error', '')}")
                need = max(need, extra.get("compile_warm_s", 0) + 20)
            except Exception as e:
                R["errors"][f"{name}_b{B}"] = f"{type(e).__name__}: {e}"[:1500]
                log(f"{name} b{B} failed: {traceback.format_exc()}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            dump()
    w_fused = None
    dynamo.reset()

    # (c) DeepSpeed child runs while (b) compiles; joined before any timed (b) run
    ds = None
    if guard("deepspeed", 60 if not args.tiny else 1):
        ds = start_ds_child(args)
        log("deepspeed child started")

    def join_ds():
        nonlocal ds
        if ds is not None:
            R["results"]["deepspeed_kernel_inject"] = finish_ds_child(
                ds[0], ds[1], min(args.ds_timeout_s, max(5.0, time_left() - 5)))
            ds = None
            brief = {k: v for k, v in R["results"]["deepspeed_kernel_inject"].items()
                     if k not in ("stderr_tail", "attempts")}
            log(f"deepspeed: {json.dumps(brief)[:800]}")
            dump()

    def agreement():
        """Token agreement at batch 1 (and row-wise at the largest batch)."""
        agree = {}
        ref = tokens.get(("eager", 1))
        if ref is not None:
            for key, t in tokens.items():
                if key[1] != 1 or key[0] == "eager":
                    continue
                a, b = ref[0].tolist(), t[0].tolist()
                agree[f"{key[0]}_vs_eager_b1"] = {
                    "leading_match": leading_match(a, b),
                    "first16_equal": sum(x == y for x, y in zip(a[:16], b[:16], strict=False)),
                    "all_equal": sum(x == y for x, y in zip(a, b, strict=False)), "of": len(a),
                    "eager_first16": a[:16], "other_first16": b[:16]}
        bmax = max(batches)
        if ("eager", bmax) in tokens:
            for key, t in tokens.items():
                if key[1] == bmax and key[0] != "eager":
                    e = tokens[("eager", bmax)]
                    agree[f"{key[0]}_vs_eager_b{bmax}_rows_leading16"] = sum(
                        leading_match(e[i].tolist(), t[i].tolist()) >= 16 for i in range(bmax))
        if ("eager", 1) in tokens and ("eager", bmax) in tokens and bmax != 1:
            agree["eager_b1_vs_eager_bmax_row0_leading"] = leading_match(
                tokens[("eager", 1)][0].tolist(), tokens[("eager", bmax)][0].tolist())
        R["token_agreement"] = agree
        # (e) against (d'), the same arithmetic before fusion by Inductor
        dref = "own_cudagraph_fused" if use_graph else "own_nograph_fused"
        for B in batches:
            for key, t in tokens.items():
                if key[1] == B and key[0].startswith("own_compiled") and (dref, B) in tokens:
                    ref_t = tokens[(dref, B)]
                    agree[f"{key[0]}_vs_{dref}_b{B}_leading_min_over_rows"] = min(
                        leading_match(ref_t[i].tolist(), t[i].tolist()) for i in range(B))
        dump()

    agreement()  # now too, in case (b) runs past the hard limit

    # (b) static cache + torch.compile (transformers auto-compile, mode reduce-overhead)
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=False, mode="reduce-overhead")
    if args.tiny:
        cc._compile_all_devices = True
    compile_need = 90.0
    for B in batches:
        if not guard("compile", compile_need if not args.tiny else 1):
            break
        kw = dict(cache_implementation="static", compile_config=cc)
        try:
            t0 = time.perf_counter()
            hf_generate_timed(model, prompts[B], N, device, **kw)  # compiles + records graphs
            warm1 = time.perf_counter() - t0
            hf_generate_timed(model, prompts[B], N, device, **kw)
            warm2 = time.perf_counter() - t0 - warm1
            compile_need = 1.6 * warm1 + warm2 + 15  # the next batch size recompiles
            join_ds()
            runs = []
            for r in range(args.repeats):
                if r and time_left() < 20:
                    break
                run, gen = hf_generate_timed(model, prompts[B], N, device, **kw)
                runs.append(run)
            tokens[("compile", B)] = gen.cpu()
            record("static_compile", B, runs)
            R["results"]["static_compile"][f"batch{B}"].update(
                warmup1_s=round(warm1, 1), warmup2_s=round(warm2, 1))
        except Exception as e:
            R["errors"][f"static_compile_b{B}"] = f"{type(e).__name__}: {e}"[:1500]
            log(f"compile b{B} failed: {traceback.format_exc()}")
    join_ds()

    agreement()
    for name, res in R["results"].items():
        for bk, e in res.items():
            if isinstance(e, dict) and "decode_tok_per_s" in e:
                log(f"SUMMARY {name:28s} {bk:8s} {e['decode_tok_per_s']:8.1f} tok/s "
                    f"{e['decode_steps_per_s']:6.1f} steps/s "
                    f"{100 * e.get('roofline_fraction', 0):5.1f}% all-weights "
                    f"{100 * e.get('roofline_fraction_needed_bytes', 0):5.1f}% needed-bytes")
    for k, v in R.get("profiles", {}).items():
        log(f"PROFILE {k}: {v.get('kernels_per_step', 0):.0f} kernels/step, kernels "
            f"{v.get('kernel_us_per_step', 0):.0f} us/step, wall {v.get('wall_us_per_step', 0):.0f}"
            f" us/step ({v.get('note', v.get('error', ''))})")
    ints = {k: v for k, v in R["token_agreement"].items() if isinstance(v, int)}
    lead = {k: v["leading_match"] for k, v in R["token_agreement"].items() if isinstance(v, dict)}
    log(f"token agreement (leading tokens equal): {json.dumps(lead)} {json.dumps(ints)}")
    print(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
