"""Serving throughput, latency under load and memory of the model server (issue 4).

SmolLM2-135M fp32, N prompts of 30-200 tokens, 64 new tokens each, greedy, on this machine:

- aggregate tokens/s of the fabric's model server (launched as a job, every request submitted
  at once over ZMQ) vs in-process transformers (a) ``generate`` one prompt at a time,
  (b) one left-padded static batch ``generate``, (c) ``generate_batch`` continuous batching
  with its KV cache capped (block_size 64 x 64 blocks, max_batch_tokens 1024), run under
  ``no_grad`` (under ``inference_mode`` it returns empty results). The variants are interleaved,
  ``--runs`` rounds, medians and ratios reported; greedy tokens are compared with (b).
  (a) runs a stratified subset of the prompts (every ``--a-stride``-th by length) because one at
  a time it is ~6x slower; its tokens/s does not depend on how many prompts it runs.
- TTFT p50/p99 (server-side: queue + prefill, from each result's timings) under Poisson
  arrivals at 25/50/100/150 % of the capacity measured above (a bounded count per level), on
  a second server with a short waiting queue (``--poisson-queue``) and a bounded prefill
  backlog (``--poisson-prefill-tokens``); at 150 % the number of
  ``Overloaded`` refusals, how fast they were answered, and the admitted requests' TTFT.
- peak RSS (``VmHWM``) of the server process after serving N concurrent requests vs the KV
  budget it is configured with.
- with ``--profile`` (or automatically when the server is slower than (b)): a py-spy profile of
  the server during one concurrent run, top frames by samples.

Threads: the server runs with OMP_NUM_THREADS=2 (one rank, both cores); the in-process
baselines use torch.set_num_threads(2). Only one of them computes at a time.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import serverjob
from common import log, median, ratio


def hf_one_at_a_time(model: Any, tok: Any, ids: list[list[int]], new: int) -> tuple[float, dict]:
    import torch

    outs, tokens = {}, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, row in enumerate(ids):
            out = model.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row),
                                 dtype=torch.long), max_new_tokens=new, do_sample=False)
            outs[i] = _strip(out[0, len(row):].tolist(), tok)
            tokens += len(outs[i])
    return tokens / (time.perf_counter() - t0), outs


def hf_static_batch(model: Any, tok: Any, ids: list[list[int]], new: int) -> tuple[float, dict]:
    import torch

    width = max(len(r) for r in ids)
    pad = tok.pad_token_id
    t0 = time.perf_counter()
    with torch.no_grad():
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new,
                             do_sample=False)
    dt = time.perf_counter() - t0
    outs = {i: _strip(out[i, width:].tolist(), tok) for i in range(len(ids))}
    return sum(len(v) for v in outs.values()) / dt, outs


def hf_continuous(model: Any, tok: Any, ids: list[list[int]], new: int) -> tuple[float, dict]:
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    cb = ContinuousBatchingConfig(block_size=64, num_blocks=64, max_batch_tokens=1024)
    t0 = time.perf_counter()
    with torch.no_grad():  # not inference_mode: with it, generate_batch returns empty results
        res = model.generate_batch(inputs=ids, generation_config=gen,
                                   continuous_batching_config=cb, progress_bar=False)
    dt = time.perf_counter() - t0
    by_prompt = {tuple(r.prompt_ids): _strip(list(r.generated_tokens), tok)
                 for r in res.values()}
    outs = {i: by_prompt.get(tuple(p), []) for i, p in enumerate(ids)}
    return sum(len(v) for v in outs.values()) / dt, outs


def _strip(tokens: list[int], tok: Any) -> list[int]:
    """Generated tokens up to and including the first EOS (padding after it dropped)."""
    eos = tok.eos_token_id
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def server_run(job: serverjob.ServerJob, texts: list[Any], new: int) -> tuple[float, dict, dict]:
    reqs = [job.request(t, max_tokens=new) for t in texts]
    run = serverjob.run_batch(job, reqs)
    outs = {i: run["results"][r.request_id]["token_ids"] for i, r in enumerate(reqs)}
    return run["tokens_per_s"], outs, run


def mismatches(a: dict, b: dict) -> int:
    return sum(1 for k in a if a[k] != b.get(k))


def poisson_levels(job: serverjob.ServerJob, texts: list[Any], new: int, capacity_rps: float,
                   levels: list[float], counts: list[int], seed: int = 1) -> dict[str, Any]:
    out = {}
    rng = random.Random(seed)
    for level, count in zip(levels, counts, strict=True):
        rate = capacity_rps * level
        t, arrivals = 0.0, []
        for _ in range(count):
            t += rng.expovariate(rate)
            arrivals.append(t)
        reqs = [job.request(texts[i % len(texts)], max_tokens=new) for i in range(count)]
        log(f"Poisson {level:.0%} of capacity: {count} requests at {rate:.2f}/s "
            f"(~{arrivals[-1]:.0f} s of arrivals)")
        run = serverjob.run_batch(job, reqs, arrivals)
        ttft = run["ttft_s"]
        refused = run["refused"]
        out[f"{round(level * 100)}%"] = {
            "rate_rps": round(rate, 3), "requests": count, "admitted": len(ttft),
            "ttft_p50_s": round(common.percentile(ttft, 50), 3),
            "ttft_p99_s": round(common.percentile(ttft, 99), 3),
            "latency_p50_s": round(common.percentile(run["latency_s"], 50), 3),
            "latency_p99_s": round(common.percentile(run["latency_s"], 99), 3),
            "tokens_per_s": round(run["tokens_per_s"], 1),
            "overloaded": len(refused),
            "overloaded_answer_ms": common.summary([r["answer_ms"] for r in refused], 1, 2)
            if refused else None,
            "retry_after_s": sorted({r["retry_after"] for r in refused}) if refused else None,
        }
        log("  ", out[f"{round(level * 100)}%"])
    return out


def kv_bytes(config: Any, tokens: int, dtype_bytes: int = 4) -> int:
    head_dim = (getattr(config, "head_dim", None)
                or config.hidden_size // config.num_attention_heads)
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim
    return tokens * per_token * dtype_bytes


def profile_server(job: serverjob.ServerJob, texts: list[Any], new: int, seconds: float,
                   out_dir: Path) -> dict[str, Any]:
    """py-spy on the server (all threads) while it serves one concurrent batch."""
    raw = out_dir / "serving-profile.txt"
    proc = common.py_spy_record(job.pid, seconds, raw)
    time.sleep(1.0)
    server_run(job, texts, new)
    _, err = proc.communicate(timeout=seconds + 60)
    if not raw.exists():
        return {"error": f"py-spy produced nothing: {err.decode()[-500:]}"}
    return {"file": str(raw), "engine_thread": common.top_frames(raw, 20, thread="MainThread"),
            "all_threads": common.top_frames(raw, 12)}


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--a-stride", type=int, default=4, help="(a) runs every k-th prompt")
    p.add_argument("--threads", type=int, default=2, help="server rank and baselines")
    p.add_argument("--profile", action="store_true", help="always profile the server")
    p.add_argument("--no-poisson", action="store_true")
    p.add_argument("--poisson-count", type=int, default=16,
                   help="requests per load level (7x at 150%%)")
    p.add_argument("--poisson-queue", type=int, default=0,
                   help="max_queue_requests of the Poisson server")
    p.add_argument("--poisson-prefill-tokens", type=int, default=1024,
                   help="max_prefill_tokens of the Poisson server (0: unbounded): admitted "
                   "prompts wait at most ~this / max_batch_tokens steps for their prefill")
    p.add_argument("--poisson-only", action="store_true",
                   help="only the Poisson levels, at --capacity-rps")
    p.add_argument("--capacity-rps", type=float, default=None,
                   help="requests/s the server sustains (from a full run)")
    p.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "fabric-bench",
                   help="where the py-spy profile is written")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.max_tokens, args.runs, args.a_stride = 8, 12, 1, 4
    args.out_dir.mkdir(parents=True, exist_ok=True)
    common.set_threads(args.threads)
    if args.poisson_only:
        if not args.capacity_rps:
            p.error("--poisson-only needs --capacity-rps")
        poisson_only(args)
        return
    w = common.weights(common.SMOLLM)
    model, tok = common.load_hf(w.path)
    chats = common.chat_prompts(tok, args.prompts, 30, 200)
    texts = [m for m, _ in chats]  # what the server gets (it applies the chat template)
    ids = [i for _, i in chats]  # what the baselines get: the same token ids
    lengths = [len(i) for i in ids]
    by_len = sorted(range(len(texts)), key=lambda i: lengths[i])
    sub_idx = by_len[args.a_stride // 2::args.a_stride]
    subset = [ids[i] for i in sub_idx]
    kv_budget = 16384
    server_cfg = {"kv_budget_tokens": kv_budget, "max_running": args.prompts,
                  "max_queue_requests": args.prompts, "max_batch_tokens": 512}
    result: dict[str, Any] = {
        "benchmark": "serving", "model": common.SMOLLM, "sha256": w.sha256, "dtype": "float32",
        "prompts": len(texts), "prompt_tokens": {"min": min(lengths), "max": max(lengths),
                                                 "mean": round(sum(lengths) / len(lengths), 1)},
        "max_new_tokens": args.max_tokens, "greedy": True, "runs": args.runs,
        "threads": {"server": f"OMP_NUM_THREADS={args.threads}, 1 rank",
                    "baselines": f"torch.set_num_threads({args.threads})"},
        "prompt_format": "chat template, user asks to explain a 30-200 token passage",
        "server_config": server_cfg, "a_subset_prompts": len(subset)}
    with serverjob.ServerJob(common.SMOLLM, threads=args.threads, **server_cfg) as job:
        result["server_ready_s"] = round(job.ready_s, 1)
        # warm-up: every path once at a small size (allocator, lazy inits, CB warm-up)
        server_run(job, texts[:4], 4)
        hf_static_batch(model, tok, ids[:2], 2)
        tps: dict[str, list[float]] = {"server": [], "a": [], "b": [], "c": []}
        outs: dict[str, dict] = {}
        last_run: dict[str, Any] = {}
        for r in range(args.runs):
            s, outs["server"], last_run = server_run(job, texts, args.max_tokens)
            tps["server"].append(s)
            b, outs["b"] = hf_static_batch(model, tok, ids, args.max_tokens)
            tps["b"].append(b)
            c, outs["c"] = hf_continuous(model, tok, ids, args.max_tokens)
            tps["c"].append(c)
            a, outs["a"] = hf_one_at_a_time(model, tok, subset, args.max_tokens)
            tps["a"].append(a)
            log(f"round {r + 1}: server {s:.1f}  (a) {a:.1f}  (b) {b:.1f}  (c) {c:.1f} tok/s")
        med = {k: median(v) for k, v in tps.items()}
        result["tokens_per_s"] = {
            "server": [round(x, 1) for x in tps["server"]],
            "a_one_at_a_time": [round(x, 1) for x in tps["a"]],
            "b_static_batch": [round(x, 1) for x in tps["b"]],
            "c_generate_batch": [round(x, 1) for x in tps["c"]]}
        result["median_tokens_per_s"] = {k: round(v, 1) for k, v in med.items()}
        result["ratios"] = {"server_vs_a": ratio(med["server"], med["a"]),
                            "server_vs_b": ratio(med["server"], med["b"]),
                            "server_vs_c": ratio(med["server"], med["c"])}
        result["goals"] = {"vs_a": ">= 5.0", "vs_b": ">= 1.0", "vs_c": ">= 1.0",
                           "met": {"vs_a": (result["ratios"]["server_vs_a"] or 0) >= 5.0,
                                   "vs_b": (result["ratios"]["server_vs_b"] or 0) >= 1.0,
                                   "vs_c": (result["ratios"]["server_vs_c"] or 0) >= 1.0}}
        result["token_mismatches"] = {
            "server_vs_b": mismatches(outs["server"], outs["b"]),
            "c_vs_b": mismatches(outs["c"], outs["b"]),
            "a_vs_b": sum(1 for j, i in enumerate(sub_idx) if outs["a"][j] != outs["b"][i]),
            "of": len(texts)}
        timings = [r["timings"] for r in last_run["results"].values()]
        result["server_last_run"] = {
            "wall_s": round(last_run["wall_s"], 2), "tokens": last_run["tokens"],
            "ttft_p50_s": round(common.percentile(last_run["ttft_s"], 50), 3),
            "ttft_p99_s": round(common.percentile(last_run["ttft_s"], 99), 3),
            "queue_s_median": round(median([t["queue_s"] for t in timings]), 3),
            "prefill_s_median": round(median([t["prefill_s"] for t in timings]), 3),
            "decode_s_median": round(median([t["decode_s"] for t in timings]), 3)}
        # memory: the server's high-water mark after N concurrent requests
        health = job.client().health()
        config = model.config
        result["memory"] = {
            "server_peak_rss_mb": common.peak_rss_mb(job.pid),
            "kv_budget_tokens": kv_budget,
            "kv_budget_mb_fp32": round(kv_bytes(config, kv_budget) / 1e6, 1),
            "kv_needed_by_batch_mb_fp32": round(kv_bytes(
                config, sum(lengths) + len(texts) * args.max_tokens) / 1e6, 1),
            "weights_mb_fp32": round(sum(p.numel() for p in model.parameters()) * 4 / 1e6, 1),
            "this_process_peak_rss_mb": common.peak_rss_mb(),
            "health_after": {k: health.get(k) for k in ("kv_used_tokens", "kv_budget_tokens",
                                                         "queue_depth", "running")}}
        if args.profile or med["server"] < med["b"]:
            seconds = max(8.0, 0.9 * last_run["wall_s"])
            log(f"profiling the server for {seconds:.0f} s")
            result["profile"] = profile_server(job, texts, args.max_tokens, seconds,
                                               args.out_dir)
        capacity_rps = len(texts) / median([len(texts) * args.max_tokens / x
                                            for x in tps["server"]])
    if not args.no_poisson:
        result["poisson"] = poisson(args, texts, capacity_rps, server_cfg)
    common.emit(result)


def poisson(args: Any, texts: list[Any], capacity_rps: float, server_cfg: dict[str, Any]
            ) -> dict[str, Any]:
    """TTFT under Poisson arrivals, on a second server that admits at most ``--poisson-queue``
    waiting requests (the throughput server's queue holds a whole burst of N, so it would never
    refuse): at 150 % the in-system count grows until running + queue is full, then the
    overload path answers; enough requests are sent at 150 % to get there."""
    cfg = {**server_cfg, "max_queue_requests": args.poisson_queue}
    if args.poisson_prefill_tokens:
        cfg["max_prefill_tokens"] = args.poisson_prefill_tokens
    n = 6 if args.quick else args.poisson_count
    with serverjob.ServerJob(common.SMOLLM, threads=args.threads, **cfg) as job:
        server_run(job, texts[:4], 4)  # warm-up
        return {"capacity_rps": round(capacity_rps, 3), "server_config": cfg,
                "ttft_definition": "server-side queue_s + prefill_s of each admitted request",
                "levels": poisson_levels(job, texts, args.max_tokens, capacity_rps,
                                         [0.25, 0.5, 1.0, 1.5], [n, n, n, 7 * n])}


def poisson_only(args: Any) -> None:
    """``--poisson-only``: just the Poisson levels, at ``--capacity-rps`` measured before."""
    w = common.weights(common.SMOLLM)
    _, tok = common.load_hf(w.path)
    texts = [m for m, _ in common.chat_prompts(tok, args.prompts, 30, 200)]
    server_cfg = {"kv_budget_tokens": 16384, "max_running": args.prompts,
                  "max_queue_requests": args.prompts, "max_batch_tokens": 512}
    common.emit({"benchmark": "serving-poisson", "model": common.SMOLLM, "sha256": w.sha256,
                 "prompts": len(texts), "max_new_tokens": args.max_tokens,
                 "threads": f"OMP_NUM_THREADS={args.threads}, 1 rank",
                 "poisson": poisson(args, texts, args.capacity_rps, server_cfg)})


if __name__ == "__main__":
    main()
