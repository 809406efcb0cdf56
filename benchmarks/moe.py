"""Mixture of experts on CPU: expert parallelism ep=2 vs ep=1 (issue 19, "Measure").

A tiny random Mixtral (``fabric.testing.tiny.build_tiny_moe``; ``--hidden``, ``--experts``,
``--expert-inter``, ``--layers``) is served three ways: tp=1 (one rank, ``--threads`` threads),
tp=2 x ep=1 (every rank holds half of every expert) and tp=2 x ep=2 (every rank holds half of
the experts, whole), each rank of the two-rank plans with ``--threads / 2`` threads.

1. Throughput: the three model servers run as jobs (``serverjob.ServerJob``), up together, runs
   interleaved; ``--requests`` concurrent greedy requests of ``--max-tokens`` tokens. Greedy
   tokens must be identical across plans (and are checked against transformers for one prompt).
2. Bytes per rank: every rank's ``build_stage`` in this process (loading needs no process
   group): bytes the reader read, expert bytes held, each as a share of the checkpoint.
3. Step composition: the plan's ranks as processes joined by gloo (``torch.multiprocessing``),
   each running the engine's own ``StageRunner`` over ``--requests`` sequences (one prefill,
   then ``--steps`` decode steps), with ``fabric.engine.moe.TIMINGS`` on: the share of step
   time spent routing and picking each expert's rows (dispatch, local), waiting for the
   stage's slowest rank (a one-element all-reduce before the combine, added only while timing)
   and in the all-reduce that sums the ranks' partial outputs (combine). Medians over
   ``--runs`` runs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import common
import serverjob
from common import log, median, ratio

PLANS = {"tp1": (1, 1), "tp2_ep1": (2, 1), "tp2_ep2": (2, 2)}


def build(args: Any, root: Path) -> Path:
    from fabric.testing.tiny import build_tiny_moe

    return build_tiny_moe(root / "tiny-moe", "mixtral", hidden=args.hidden, layers=args.layers,
                          heads=4, kv_heads=2, experts=args.experts, top_k=2,
                          expert_inter=args.expert_inter)


def throughput(args: Any, folder: Path, texts: list[str]) -> dict[str, Any]:
    from fabric.catalog import CatalogEntry, WeightSource

    entry = CatalogEntry(name="tiny-moe", version="bench",
                         source=WeightSource(kind="path", path=str(folder)))
    cfg = {"kv_budget_tokens": 16384, "max_running": 64, "max_queue_requests": 256}
    jobs = {name: serverjob.ServerJob(entry, tp=tp, ep=ep, threads=max(1, args.threads // tp),
                                   **cfg)
            for name, (tp, ep) in PLANS.items()}
    try:
        for job in jobs.values():
            job.start()
        for job in jobs.values():  # warm-up
            serverjob.run_batch(job, [job.request(t, max_tokens=2) for t in texts[:4]])
        runs: dict[str, list[float]] = {k: [] for k in jobs}
        tokens: dict[str, list[list[int]]] = {}
        for r in range(args.runs):
            for name, job in jobs.items():
                reqs = [job.request(t, max_tokens=args.max_tokens) for t in texts]
                run = serverjob.run_batch(job, reqs)
                runs[name].append(run["tokens_per_s"])
                tokens[name] = [run["results"][q.request_id]["token_ids"] for q in reqs]
                log(f"round {r + 1} {name}: {run['tokens_per_s']:.1f} tok/s")
    finally:
        for job in jobs.values():
            job.stop()
    med = {k: median(v) for k, v in runs.items()}
    return {"tokens_per_s": {k: round(v, 1) for k, v in med.items()},
            "runs_tokens_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
            "ep2_over_ep1": ratio(med["tp2_ep2"], med["tp2_ep1"]),
            "ep2_over_tp1": ratio(med["tp2_ep2"], med["tp1"]),
            "tokens_identical": len({str(v) for v in tokens.values()}) == 1}


def bytes_per_rank(folder: Path) -> dict[str, Any]:
    from fabric.engine.loader import build_stage

    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    out: dict[str, Any] = {"checkpoint_bytes": total}
    for name, (tp, ep) in PLANS.items():
        ranks = []
        for rank in range(tp):
            model, report = build_stage(folder, rank, 1, tp, "float32", None, ep=ep)
            experts = sum(t.numel() * t.element_size()
                          for n, t in model.state_dict().items() if ".experts." in n)
            share = model.shard.experts
            assert share is not None
            ranks.append({"rank": rank, "experts": [share.experts.start, share.experts.stop],
                          "bytes_read": report.bytes_read, "expert_bytes": experts,
                          "share_of_checkpoint": round(report.bytes_read / total, 4)})
        out[name] = ranks
    return out


def _rank_main(rank: int, folder: str, tp: int, ep: int, port: int, n_seqs: int, steps: int,
               threads: int, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    from fabric.engine.dist import TPGroup
    from fabric.engine.loader import build_stage
    from fabric.engine.moe import TIMINGS
    from fabric.engine.runner import StageRunner
    from fabric.engine.steps import SampleSpec, SeqWork, StepPlan

    torch.set_num_threads(threads)
    comm = None
    if tp > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=tp)
        comm = TPGroup(dist.group.WORLD)
    try:
        runner = StageRunner(build_stage(Path(folder), rank, 1, tp, "float32", comm, ep=ep)[0])
        prompts = [[(7 * i + j) % 300 + 3 for j in range(8 + i % 8)] for i in range(n_seqs)]
        seqs = [SeqWork(f"s{i}", 0, p, len(p) + steps + 1, sample=SampleSpec())
                for i, p in enumerate(prompts)]
        last: list[int] = []
        step_s = 0.0
        for step in range(steps + 1):
            if step == 1:  # time the decode steps only: the steady state of a batch
                TIMINGS.reset()
                TIMINGS.enabled = True
            t0 = time.perf_counter()
            plan = StepPlan(step, seqs)
            logits = runner.logits(runner.head_rows(plan, runner.forward(plan, None)))
            last = logits.argmax(-1).tolist()
            if step >= 1:
                step_s += time.perf_counter() - t0
            seqs = [SeqWork(f"s{i}", len(p) + step, [last[i]], 0, sample=SampleSpec())
                    for i, p in enumerate(prompts)]
        if rank == 0:
            queue.put({"step_s": step_s / steps, "route_s": TIMINGS.route_s / steps,
                       "experts_s": TIMINGS.experts_s / steps,
                       "combine_s": TIMINGS.combine_s / steps,
                       "wait_s": TIMINGS.wait_s / steps, "tokens": last})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def step_composition(args: Any, folder: Path) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from fabric.testing.rabbitmq import free_port  # one host: loopback ranks

    ctx = mp.get_context("spawn")
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in PLANS}
    for r in range(args.runs):
        for name, (tp, ep) in PLANS.items():
            queue = ctx.Queue()
            port = free_port()
            procs = [ctx.Process(target=_rank_main, args=(
                rank, str(folder), tp, ep, port, args.requests, args.steps,
                max(1, args.threads // tp), queue)) for rank in range(tp)]
            for p in procs:
                p.start()
            try:
                samples[name].append(queue.get(timeout=600))
            finally:
                for p in procs:
                    p.join(timeout=60)
                    if p.is_alive():
                        p.kill()
            s = samples[name][-1]
            log(f"round {r + 1} {name}: step {s['step_s'] * 1000:.1f} ms, "
                f"combine {s['combine_s'] * 1000:.2f} ms")
    out: dict[str, Any] = {}
    for name, runs in samples.items():
        step = median([s["step_s"] for s in runs])
        route = median([s["route_s"] for s in runs])
        combine = median([s["combine_s"] for s in runs])
        experts = median([s["experts_s"] for s in runs])
        wait = median([s["wait_s"] for s in runs])
        out[name] = {"decode_step_ms": round(step * 1000, 3),
                     "decode_tokens_per_s": round(args.requests / step, 1),
                     "dispatch_ms": round(route * 1000, 3), "experts_ms": round(experts * 1000, 3),
                     "combine_ms": round(combine * 1000, 3),
                     "wait_before_combine_ms": round(wait * 1000, 3),
                     "wait_share": round(wait / step, 4),
                     "dispatch_share": round(route / step, 4),
                     "combine_share": round(combine / step, 4),
                     "dispatch_plus_combine_share": round((route + combine) / step, 4)}
    out["tokens_identical"] = len({str(s["tokens"]) for runs in samples.values()
                                   for s in runs}) == 1
    return out


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per run (part 3)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="threads per plan (split over ranks)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-inter", type=int, default=512)
    p.add_argument("--no-servers", action="store_true", help="skip part 1")
    args = p.parse_args()
    if args.quick:
        args.requests, args.max_tokens, args.steps, args.runs = 4, 4, 2, 1
        args.hidden, args.expert_inter = 64, 48
    root = Path(tempfile.mkdtemp(prefix="fabric-moe-"))
    folder = build(args, root)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    texts = common.prompts(tok, args.requests, 8, 24)
    result: dict[str, Any] = {
        "benchmark": "moe", "model": {"kind": "mixtral", "hidden": args.hidden,
                                      "layers": args.layers, "experts": args.experts,
                                      "top_k": 2, "expert_inter": args.expert_inter},
        "requests": args.requests, "max_tokens": args.max_tokens, "runs": args.runs,
        "threads": args.threads, "environment": common.environment()}
    with common.stage("bytes per rank"):
        result["bytes_per_rank"] = bytes_per_rank(folder)
    with common.stage("step composition"):
        result["step_composition"] = step_composition(args, folder)
    if not args.no_servers:
        with common.stage("throughput"):
            result["throughput"] = throughput(args, folder, texts)
    common.emit(result)


if __name__ == "__main__":
    main()
