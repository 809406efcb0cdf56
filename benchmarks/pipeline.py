"""Pipeline micro-batching and per-rank loading (issue 3).

1. Throughput: a pp=2 model server on SmolLM2-135M fp32 (two ranks, OMP_NUM_THREADS=1 each, so
   each rank has one of the two cores), ``micro_batches=0`` (one step in flight per stage:
   micro-batching on) vs ``micro_batches=1`` (one step at a time: off). Both use the plan's
   ``--balance`` (default ``compute``: stages even in work per step, 14 + 16 layers, which is
   what keeps both stages busy; ``params`` gives 11 + 19); a third server runs micro-batching
   on with the other balance in the same rounds (``--no-compare-balance`` skips it). All servers
   are up together (an idle server blocks in recv/wait and costs nothing) and the runs are
   interleaved on/off/on-other/on/off...; ``--prompts`` concurrent requests of ``--max-tokens``
   tokens each. Goal: on/off >= 1.6x. Greedy tokens of all must be identical.
2. Loading: for plans (pp, tp) in (2,1), (1,2), (2,2), every rank's ``build_stage`` in this
   process (``all_reduce=None``: loading needs no process group), from the unsharded checkpoint
   (ranks ``pread`` their slices) and from a ``write_shards`` folder (one file per rank):
   bytes read by the reader, bytes the process read from files (``/proc/self/io`` rchar,
   config and tokenizer included), load seconds (median of ``--load-runs``, the two sources
   interleaved), each as a fraction of the whole checkpoint vs the ideal 1/(pp*tp).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import common
import serverjob
from common import log, median, ratio


def throughput(args: Any, texts: list[str]) -> dict[str, Any]:
    cfg: dict[str, Any] = {"kv_budget_tokens": 16384, "max_running": 64,
                           "max_queue_requests": 256}
    jobs = {"on": serverjob.ServerJob(common.SMOLLM, pp=2, threads=1, micro_batches=0,
                                   balance=args.balance, **cfg),
            "off": serverjob.ServerJob(common.SMOLLM, pp=2, threads=1, micro_batches=1,
                                    balance=args.balance, **cfg)}
    other = "params" if args.balance == "compute" else "compute"
    if args.compare_balance:  # micro-batching on with the other balance, same rounds
        jobs[f"on_{other}"] = serverjob.ServerJob(common.SMOLLM, pp=2, threads=1, micro_batches=0,
                                               balance=other, **cfg)
    try:
        for job in jobs.values():
            job.start()
        runs: dict[str, list[float]] = {k: [] for k in jobs}
        tokens: dict[str, list[list[int]]] = {}
        for job in jobs.values():  # warm-up
            serverjob.run_batch(job, [job.request(t, max_tokens=4) for t in texts[:4]])
        for r in range(args.runs):
            for name, job in jobs.items():
                reqs = [job.request(t, max_tokens=args.max_tokens) for t in texts]
                run = serverjob.run_batch(job, reqs)
                runs[name].append(run["tokens_per_s"])
                tokens[name] = [run["results"][q.request_id]["token_ids"] for q in reqs]
                log(f"round {r + 1} micro-batching {name}: {run['tokens_per_s']:.1f} tok/s")
        walls = {k: len(texts) * args.max_tokens / median(v) for k, v in runs.items()}
        profile = (rank_profiles(args, texts, jobs["on"], jobs["off"], walls) if args.profile
                   else None)
        med = {k: median(v) for k, v in runs.items()}
        return {
            **({"profile": profile} if profile else {}),
            "plan": {"pp": 2, "tp": 1, "dtype": "float32", "balance": args.balance,
                     "stage_layers": stage_layers(args.balance)},
            **({f"on_{other}_stage_layers": stage_layers(other),
                f"ratio_on_{other}_vs_off": ratio(med[f"on_{other}"], med["off"])}
               if args.compare_balance else {}),
            "threads": "OMP_NUM_THREADS=1 per rank (2 ranks on 2 cores)",
            "prompts": len(texts), "max_new_tokens": args.max_tokens, "runs": args.runs,
            "tokens_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
            "median_tokens_per_s": {k: round(v, 1) for k, v in med.items()},
            "ratio_on_vs_off": ratio(med["on"], med["off"]), "goal": ">= 1.6",
            "met": (ratio(med["on"], med["off"]) or 0) >= 1.6,
            "identical_tokens": all(t == tokens["off"] for t in tokens.values()),
        }
    finally:
        for job in jobs.values():
            job.stop()


def stage_layers(balance: str) -> list[int]:
    """Layers per stage of SmolLM2 at pp=2 with ``balance``."""
    from fabric.engine.loader import load_config, rank_shards

    folder = common.weights(common.SMOLLM).path
    return [len(s.layers) for s in rank_shards(folder, load_config(folder), 2, 1, balance)]


def embedding_bytes(folder: Path, pp: int, tp: int) -> list[int]:
    """Bytes of each rank's share that are the (tied) token embedding / LM head."""
    from fabric.engine.checkpoint import SafetensorsReader
    from fabric.engine.loader import load_config, rank_shards

    reader = SafetensorsReader.from_folder(folder)
    try:
        out = []
        for shard in rank_shards(folder, load_config(folder), pp, tp):
            total = 0
            for s in shard.slices:
                if "embed_tokens" not in s.name and "lm_head" not in s.name:
                    continue
                shape = list(reader.shape(s.name))
                if s.dim is not None:
                    shape[s.dim] = (s.stop if s.stop is not None else shape[s.dim]) - s.start
                n = 1
                for d in shape:
                    n *= d
                total += n * 4  # float32 checkpoint
            out.append(total)
        return out
    finally:
        reader.close()


def rank_profiles(args: Any, texts: list[str], on: serverjob.ServerJob,
                  off: serverjob.ServerJob, walls: dict[str, float]) -> dict[str, Any]:
    """py-spy (idle frames included) on every rank during one run with micro-batching on and
    one with it off: the share of each rank's main-thread samples spent computing its stage
    (``forward_step``) vs waiting for the other stage (``recv``) or for work (``wait``)."""
    out: dict[str, Any] = {}
    folder = Path(tempfile.mkdtemp(prefix="fabric-bench-pp-prof-"))
    for name, job in (("on", on), ("off", off)):
        reqs = [job.request(t, max_tokens=args.max_tokens) for t in texts]
        seconds = max(3, int(0.8 * walls[name]))  # sample while the batch runs
        procs = []
        for i, pid in enumerate(job.rank_pids()):
            raw = folder / f"{name}-rank{i}.txt"
            label = "head (stage 0)" if pid == job.pid else "stage 1"
            procs.append((label, raw, common.py_spy_record(pid, seconds, raw, rate=100,
                                                         idle=True)))
        time.sleep(0.5)
        serverjob.run_batch(job, reqs)
        ranks = {}
        for label, raw, proc in procs:
            proc.communicate(timeout=seconds + 60)
            if raw.exists():
                top = common.top_frames(raw, 40, thread="MainThread")
                inc = top["inclusive_pct"]
                ranks[label] = {
                    "samples": top["samples"],
                    "forward_step_pct": sum(v for k, v in inc.items()
                                            if k.startswith("StageModel.forward_step")),
                    "recv_wait_pct": sum(v for k, v in top["self_pct"].items()
                                         if k.startswith(("_Wire.recv", "recv ", "wait ",
                                                          "Event.wait", "Condition.wait",
                                                          "Work.wait"))),
                    "top_self_pct": dict(list(top["self_pct"].items())[:8])}
        out[name] = ranks
    return out


def loading(args: Any) -> dict[str, Any]:
    from fabric.engine.loader import build_stage
    from fabric.engine.presplit import write_shards

    w = common.weights(common.SMOLLM)
    model_bytes = sum(f.stat().st_size for f in w.path.glob("*.safetensors"))
    embed = embedding_bytes(w.path, 1, 1)[0]
    out: dict[str, Any] = {"checkpoint_bytes": model_bytes, "runs": args.load_runs,
                           "embedding_bytes": embed,
                           "embedding_fraction": round(embed / model_bytes, 4), "plans": {}}
    tmp = Path(tempfile.mkdtemp(prefix="fabric-bench-shards-"))
    for pp, tp in ((2, 1), (1, 2), (2, 2)):
        shard_dir = tmp / f"pp{pp}tp{tp}"
        t0 = time.perf_counter()
        write_shards(w.path, shard_dir, pp, tp)
        t = time.perf_counter() - t0
        ranks = []
        emb = embedding_bytes(w.path, pp, tp)
        body = model_bytes - embed
        for rank in range(pp * tp):
            rep: dict[str, list[Any]] = {"unsharded": [], "sharded": []}
            for _ in range(args.load_runs):
                for name, sd in (("unsharded", None), ("sharded", shard_dir)):
                    model, report = build_stage(w.path, rank, pp, tp, "float32", None, sd)
                    rep[name].append(report)
                    del model
            row: dict[str, Any] = {"rank": rank, "ideal_fraction": round(1 / (pp * tp), 4),
                                   "embedding_bytes": emb[rank]}
            for name, reports in rep.items():
                last = reports[-1]
                row[name] = {
                    "bytes_read": last.bytes_read, "io_bytes": last.io_bytes,
                    "shard_bytes": last.shard_bytes,
                    "fraction_of_model": round(last.bytes_read / model_bytes, 4),
                    "io_fraction_of_model": round(last.io_bytes / model_bytes, 4),
                    "non_embedding_fraction": round(
                        (last.shard_bytes - emb[rank]) / body, 4),
                    "load_s_median": round(median([r.seconds for r in reports]), 3)}
            ranks.append(row)
            log(f"plan pp={pp} tp={tp} rank {rank}: unsharded "
                f"{row['unsharded']['fraction_of_model']:.3f} "
                f"({row['unsharded']['load_s_median']} s), sharded "
                f"{row['sharded']['fraction_of_model']:.3f} ({row['sharded']['load_s_median']} s)")
        out["plans"][f"pp{pp}_tp{tp}"] = {"write_shards_s": round(t, 2), "ranks": ranks,
                                          "max_rank_fraction": {
                                              k: max(r[k]["fraction_of_model"] for r in ranks)
                                              for k in ("unsharded", "sharded")}}
    return out


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--load-runs", type=int, default=3)
    p.add_argument("--balance", choices=("params", "compute"), default="compute",
                   help="the plan's stage balance for the throughput servers")
    p.add_argument("--no-compare-balance", dest="compare_balance", action="store_false",
                   help="skip the third server (micro-batching on with the other balance)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--profile", action="store_true", help="py-spy every rank, on and off")
    p.add_argument("--skip-loading", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.max_tokens, args.runs, args.load_runs = 4, 6, 1, 1
    common.set_threads(2)  # loading in this process; the servers set their own
    from transformers import AutoTokenizer

    w = common.weights(common.SMOLLM)
    tok = AutoTokenizer.from_pretrained(w.path)
    texts = common.prompts(tok, args.prompts, 30, 200)
    result: dict[str, Any] = {"benchmark": "pipeline", "model": common.SMOLLM,
                              "sha256": w.sha256}
    if not args.skip_throughput:
        result["micro_batching"] = throughput(args, texts)
    if not args.skip_loading:
        result["loading"] = loading(args)
    common.emit(result)


if __name__ == "__main__":
    main()
