"""Streaming latency through the SDK vs in-process transformers (issue 2).

- Warm: time to first token (TTFT) and mean inter-token time (ITL) of ``fab.stream`` (local
  site, model server already warm, direct ZMQ stream) vs in-process transformers ``generate``
  with a streamer (a ``BaseStreamer`` that timestamps every token it is handed), on the same
  SmolLM2-135M fp32 weights, same chat prompt, same ``--max-tokens``, greedy. ``--runs`` of
  each, interleaved; medians and ratios; goal: < 1 ms extra per token.
- Cold vs warm: TTFT of the first ``fab.stream`` when no model server is deployed (the site is
  running; the call launches the server job and waits for it to load), measured on a fresh
  site and again after ``fab.undeploy`` of the warm server, vs the warm TTFT.

Threads: the model server rank runs with OMP_NUM_THREADS=2; transformers here uses
``torch.set_num_threads(2)``; they never compute at the same time.
"""

from __future__ import annotations

import time
from typing import Any

import common
from common import log, median, ratio

PROMPT = [{"role": "user", "content": common.ASK + "The mitochondria is the powerhouse of "
           "the cell, turning nutrients into the energy that drives every living process."}]


class TimingStreamer:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_stream(model: Any, ids: list[int], new: int) -> dict[str, float]:
    import torch

    streamer = TimingStreamer()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                       dtype=torch.long), max_new_tokens=new, do_sample=False,
                       streamer=streamer)
    t = streamer.times
    return {"ttft_s": t[0] - t0, "itl_s": (t[-1] - t[0]) / max(1, len(t) - 1),
            "tokens": len(t), "total_s": t[-1] - t0}


def fab_stream(fab: Any, new: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = last = None
    n_first = 0
    with fab.stream(messages=PROMPT, model=common.SMOLLM, max_tokens=new) as stream:
        for _chunk in stream:
            now = time.perf_counter()
            if first is None:
                first, n_first = now, len(stream.token_ids)
            last = now
        tokens = list(stream.token_ids)
    assert first is not None and last is not None
    n = len(tokens)
    # Chunks carry one token each unless text was held back (partial UTF-8): count tokens.
    return {"ttft_s": first - t0, "itl_s": (last - first) / max(1, n - n_first),
            "tokens": n, "total_s": last - t0, "token_ids": tokens}


def undeploy_all(fab: Any, model: str, timeout_s: float = 120.0) -> None:
    for dep in fab.deployments():
        if dep.get("model") == model and dep.get("state") not in ("dead",):
            fab.undeploy(dep["id"])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        live = [d for d in fab.deployments()
                if d.get("model") == model and d.get("state") != "dead"]
        if not live:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{model} still deployed after {timeout_s} s")


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.max_tokens, args.runs = 8, 2
    common.set_threads(args.threads)
    w = common.weights(common.SMOLLM)
    model, tok = common.load_hf(w.path)
    ids = common.chat_ids(tok, PROMPT)
    result: dict[str, Any] = {"benchmark": "streaming", "model": common.SMOLLM,
                              "sha256": w.sha256, "dtype": "float32", "prompt_tokens": len(ids),
                              "max_new_tokens": args.max_tokens, "runs": args.runs,
                              "threads": f"server OMP_NUM_THREADS={args.threads}; "
                                         f"transformers torch.set_num_threads({args.threads})"}
    with common.TempSite(threads_per_rank=args.threads) as site:
        fab = site.fabric()
        with common.stage("cold stream (fresh site, no server)"):
            cold1 = fab_stream(fab, args.max_tokens)
        hf_stream(model, ids, 4)  # warm-up of the in-process path
        fab_stream(fab, 4)
        runs: dict[str, list[dict[str, Any]]] = {"fabric": [], "transformers": []}
        for r in range(args.runs):
            runs["fabric"].append(fab_stream(fab, args.max_tokens))
            runs["transformers"].append(hf_stream(model, ids, args.max_tokens))
            log(f"run {r + 1}: fabric ttft {runs['fabric'][-1]['ttft_s'] * 1e3:.1f} ms itl "
                f"{runs['fabric'][-1]['itl_s'] * 1e3:.2f} ms | transformers ttft "
                f"{runs['transformers'][-1]['ttft_s'] * 1e3:.1f} ms itl "
                f"{runs['transformers'][-1]['itl_s'] * 1e3:.2f} ms")
        with common.stage("undeploy, then cold stream again"):
            undeploy_all(fab, common.SMOLLM)
            cold2 = fab_stream(fab, args.max_tokens)
        fab.close()
    med = {k: {m: median([x[m] for x in v]) for m in ("ttft_s", "itl_s")}
           for k, v in runs.items()}
    same = all(x["token_ids"] == runs["fabric"][0]["token_ids"] for x in runs["fabric"])
    result.update({
        "warm": {
            k: {"ttft_ms": common.summary([x["ttft_s"] for x in v], 1e3, 2),
                "itl_ms": common.summary([x["itl_s"] for x in v], 1e3, 3),
                "tokens": [x["tokens"] for x in v]} for k, v in runs.items()},
        "ratio_ttft": ratio(med["fabric"]["ttft_s"], med["transformers"]["ttft_s"]),
        "ratio_itl": ratio(med["fabric"]["itl_s"], med["transformers"]["itl_s"]),
        "extra_ms_per_token": round((med["fabric"]["itl_s"] - med["transformers"]["itl_s"])
                                    * 1e3, 3),
        "extra_ttft_ms": round((med["fabric"]["ttft_s"] - med["transformers"]["ttft_s"]) * 1e3,
                               2),
        "goal": "< 1 ms extra per token",
        "met": (med["fabric"]["itl_s"] - med["transformers"]["itl_s"]) * 1e3 < 1.0,
        "fabric_tokens_deterministic": same,
        "cold": {"fresh_site_ttft_s": round(cold1["ttft_s"], 2),
                 "after_undeploy_ttft_s": round(cold2["ttft_s"], 2),
                 "warm_ttft_s": round(med["fabric"]["ttft_s"], 4),
                 "cold_over_warm": ratio(cold2["ttft_s"], med["fabric"]["ttft_s"], 1)},
    })
    common.emit(result)


if __name__ == "__main__":
    main()
