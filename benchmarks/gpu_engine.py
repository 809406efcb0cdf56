"""The fabric's own engine step on one GPU (issues 3 and 4).

``fabric.engine.model.StageModel`` is the step function every model-server rank runs; a
single-rank server runs each step through ``fabric.engine.runner.StageRunner.run_local``, which
hands pure-decode steps to the decode fast path (``fabric.engine.graphs``: static slot KV
cache, torch.compile'd layer halves, one CUDA graph per batch/length bucket) and everything
else to the eager path.
This script runs exactly that code on a CUDA device:

1. equivalence: a small random Llama in fp32; 4 prompts of different lengths decoded together
   give the same greedy tokens as transformers ``generate`` for each prompt alone, through the
   eager engine, the fast path with graphs, and the fast path with graphs + compile;
2. decode throughput: Llama-3-8B shape with random bf16 weights drawn on the GPU (the model of
   ``gpu_common.py``), 128-token prompts, ``--new`` decode steps at batch 1 and 16 (median of
   ``--repeats``): the engine with the fast path (compiled + graphs, and graphs alone), the
   eager engine (fast path off), and transformers eager ``generate`` on the same weights;
   tokens/s and the fraction of the HBM roofline (steps/s x all weight bytes / measured copy
   bandwidth, as in ``benchmarks/results/gpu_decode.md``), plus how many greedy tokens each
   engine variant shares with the eager engine (bf16: kernels differ, so late tokens may drift).

    python benchmarks/gpu_engine.py [--tiny] [--new 64] [--repeats 3]

Prints one JSON object; with $OUT set, also writes $OUT/gpu_engine.json (after every item, so
a run cut short keeps what it measured). ``--tiny`` runs a 2-layer model (also on CPU, where
the fast path runs without capture or compile) to check that the script works.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_common import (  # noqa: E402
    build_model,
    hf_generate_timed,
    leading_match,
    measure_bandwidth,
    sync,
)

from fabric.engine.graphs import GraphOptions  # noqa: E402
from fabric.engine.model import StageModel  # noqa: E402
from fabric.engine.partition import plan_ranks  # noqa: E402
from fabric.engine.runner import StageRunner  # noqa: E402
from fabric.engine.steps import SampleSpec, SeqWork, StepPlan  # noqa: E402

T0 = time.monotonic()


def log(msg: str) -> None:
    """Progress on stderr."""
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def engine_from(hf: Any, device: torch.device, dtype: torch.dtype) -> StageModel:
    """A pp=1 tp=1 ``StageModel`` sharing the transformers model's weight tensors."""
    state = hf.state_dict()
    shapes = {name: list(t.shape) for name, t in state.items()}
    shard = plan_ranks(hf.config, shapes, 1, 1)[0]
    model = StageModel(hf.config, shard, None, device)
    model.load({s.name: state[s.name] for s in shard.slices}, dtype)
    return model


class Decoder:
    """Drives the engine's step function the way the serving loop does (greedy)."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner
        self.n = 0

    def step(self, work: list[SeqWork]) -> list[int]:
        """One step; returns each sequence's next token."""
        self.n += 1
        outs = self.runner.run_local(StepPlan(self.n, work))
        return [int(o.token) for o in outs if o.token is not None]

    def generate(self, prompts: list[list[int]], new: int) -> tuple[list[list[int]], dict]:
        """Prefill every prompt in one step, then ``new - 1`` decode steps of the whole batch."""
        ids = [f"s{self.n}-{i}" for i in range(len(prompts))]
        sync(self.runner.model.device)
        t0 = time.perf_counter()
        first = self.step([SeqWork(i, 0, p, len(p) + new, sample=SampleSpec())
                           for i, p in zip(ids, prompts, strict=True)])
        t1 = time.perf_counter()
        out = [[t] for t in first]
        for k in range(1, new):
            nxt = self.step([SeqWork(i, len(p) + k - 1, [o[-1]], 0, sample=SampleSpec(index=k))
                             for i, p, o in zip(ids, prompts, out, strict=True)])
            for o, t in zip(out, nxt, strict=True):
                o.append(t)
        t2 = time.perf_counter()
        for i in ids:  # the server drops finished sequences' caches the same way
            self.runner.drop(i)
        return out, {"total_s": t2 - t0, "prefill_s": t1 - t0, "decode_s": t2 - t1}


VARIANTS = {
    # name: fast-path options (None: the eager engine, fast path off)
    "engine_fast": {"capture": True, "compile": True},  # the server's default
    "engine_fast_tune_all": {"capture": True, "compile": True, "tune": "all"},
    "engine_fast_cublas": {"capture": True, "compile": True, "tune": "none"},
    "engine_fast_nocompile": {"capture": True, "compile": False},
    "engine_eager": None,
}


def build(hf: Any, device: torch.device, dtype: torch.dtype, variant: str, slots: int,
          slot_tokens: int) -> Decoder:
    """A decoder over a fresh engine for ``variant`` (see ``VARIANTS``)."""
    model = engine_from(hf, device, dtype)
    opts = VARIANTS[variant]
    if opts is not None and opts.get("compile"):
        torch._dynamo.reset()  # compiled code is cached per function, whatever the settings
    fast = None if opts is None else GraphOptions(slots=slots, slot_tokens=slot_tokens, **opts)
    return Decoder(StageRunner(model, fast))


def equivalence(device: torch.device) -> dict[str, Any]:
    """Greedy tokens of each engine variant (4 prompts batched) vs transformers (each alone),
    fp32."""
    hf = build_model(True, device, torch.float32, rope_type="llama3")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 500, (n,), generator=gen).tolist() for n in (5, 17, 33, 64)]
    want = [hf_generate_timed(hf, torch.tensor([p], device=device), 16, device)[1][0].tolist()
            for p in prompts]
    out: dict[str, Any] = {"prompts": 4, "new_tokens": 16, "dtype": "float32"}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        try:
            ours, _ = build(hf, device, torch.float32, variant, 4, 128).generate(prompts, 16)
            out[variant] = [w == o for w, o in zip(want, ours, strict=True)]
        except Exception as exc:  # the error is the result; the other variants still run
            out[variant] = f"{type(exc).__name__}: {exc}"[:1500]
        log(f"equivalence {variant}: {out[variant]} ({time.perf_counter() - t0:.1f} s)")
    out["all_identical"] = all(isinstance(out[k], list) and all(out[k]) for k in VARIANTS)
    del hf
    return out


def _time_variant(args: argparse.Namespace, hf: Any, device: torch.device, variant: str,
                  prompts: list[list[int]]) -> tuple[dict[str, Any], list[list[int]]]:
    runs, tokens, first_s = [], [], 0.0
    dec = None if variant == "transformers_eager" else build(
        hf, device, torch.bfloat16, variant, len(prompts), args.slot_tokens)
    for r in range(args.repeats + 1):  # the first is warm-up (compiles and captures)
        t0 = time.perf_counter()
        if dec is not None:
            toks, t = dec.generate(prompts, args.new)
        else:
            t, gen = hf_generate_timed(hf, torch.tensor(prompts, device=device), args.new,
                                       device)
            toks = gen.tolist()
        if r:
            runs.append(t)
        else:
            tokens, first_s = toks, time.perf_counter() - t0
    replay = _replay_only(dec, device) if dec is not None else None
    del dec
    steps_s = (args.new - 1) / statistics.median(r["decode_s"] for r in runs)
    return {"decode_steps_per_s": round(steps_s, 2),
            "decode_tok_per_s": round(steps_s * len(prompts), 1),
            "decode_s_all": [round(r["decode_s"], 4) for r in runs],
            "prefill_s_median": round(statistics.median(r["prefill_s"] for r in runs), 4),
            "first_run_s": round(first_s, 2),
            **({"graph_replay_only_steps_per_s": replay} if replay else {})}, tokens


def _replay_only(dec: Decoder, device: torch.device, n: int = 50) -> float | None:
    """Steps/s of the captured decode graph replayed back to back, with no host work between
    steps: the fast path's ceiling, next to which the engine's rate shows its host cost."""
    graphs = dec.runner.fast
    if graphs is None or not graphs.captured or device.type != "cuda":
        return None
    graph = max(graphs.captured.items())[1][0]  # the largest bucket the run used
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        graph.replay()
    sync(device)
    return round(n / (time.perf_counter() - t0), 2)


def throughput(args: argparse.Namespace, device: torch.device, result: dict[str, Any]
               ) -> dict[str, Any]:
    """Every engine variant vs transformers eager decode at each batch on the 8B shape."""
    bw = measure_bandwidth(device, 2 << 30 if device.type == "cuda" else 64 << 20)
    log(f"copy bandwidth {bw['copy_GBps']:.0f} GB/s")
    hf = build_model(args.tiny, device, torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    gen = torch.Generator().manual_seed(1)
    vocab = hf.config.vocab_size
    out: dict[str, Any] = {"bandwidth": bw, "weight_bytes": weight_bytes, "batches": {}}
    result["throughput"] = out
    for batch in args.batches:
        prompts = [torch.randint(1, vocab, (128,), generator=gen).tolist()
                   for _ in range(batch)]
        entry: dict[str, Any] = {}
        out["batches"][str(batch)] = entry
        tokens: dict[str, list[list[int]]] = {}
        for name in [*VARIANTS, "transformers_eager"]:
            try:
                entry[name], tokens[name] = _time_variant(args, hf, device, name, prompts)
            except Exception as exc:  # recorded; the other variants still run
                entry[name] = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
                log(f"batch {batch} {name}: {entry[name]['error']}")
                continue
            e = entry[name]
            e["roofline_fraction"] = round(
                e["decode_steps_per_s"] * weight_bytes / (bw["copy_GBps"] * 1e9), 4)
            log(f"batch {batch} {name}: {e['decode_tok_per_s']} tok/s, "
                f"{100 * e['roofline_fraction']:.1f}% of roofline, first run {e['first_run_s']} s")
            _write(result)
        for name, toks in tokens.items():  # bf16: how long each path agrees with the eager one
            if "engine_eager" in tokens:
                entry[name]["leading_tokens_equal_engine_eager"] = [
                    leading_match(a, b) for a, b in zip(toks, tokens["engine_eager"],
                                                         strict=True)]
        _write(result)
    return out


def _write(result: dict[str, Any]) -> None:
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_engine.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    """Run both parts and print the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="2-layer model: check the script")
    p.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--slot-tokens", type=int, default=512, help="fast path: KV positions per slot")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"benchmark": "gpu_engine", "device": str(device),
                              "torch": torch.__version__}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    with torch.no_grad():
        result["equivalence"] = equivalence(device)
        _write(result)
        throughput(args, device, result)
    print(json.dumps(result, indent=1))
    _write(result)


if __name__ == "__main__":
    main()
