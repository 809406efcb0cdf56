"""Shared helpers for the benchmark scripts (``python benchmarks/NAME.py [--quick]``).

Every script prints exactly one JSON object on stdout (progress goes to stderr) and compares
the fabric with its baseline side by side in the same run: ratios of medians, A/B interleaved
where possible, because these 2-core VMs are noisy. This module holds what the scripts share:

- statistics (``median``, ``percentile``, ``summary``) and ``emit``;
- the real SmolLM2 / MiniLM weights and a deterministic prompt set with exact token lengths;
- (``serverjob.ServerJob``, a model server launched as a site launches one, has its own
  module);
- ``TempSite``: a temporary local site definition (own state dir) started as
  ``fabric endpoint start`` starts one, for the SDK-level benchmarks;
- in-process transformers baselines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` from the repository root
    sys.path.insert(0, str(REPO_ROOT))

from fabric import env  # noqa: E402

# In-process baselines and loaders stay on the CPU; a model server picks its own from its plan.
env.DS_ACCELERATOR.setdefault("cpu")
env.TOKENIZERS_PARALLELISM.setdefault("false")

SMOLLM = "smollm2-135m"
MINILM = "minilm-l6"


# --- output and statistics ---------------------------------------------------------------------

def log(*parts: Any) -> None:
    """Progress on stderr (stdout carries only the JSON result)."""
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the common ``--quick`` flag. Every benchmark builds one first,
    so this is also where SIGTERM (``timeout``, a batch scheduler, ``kill``) is made to unwind
    like Ctrl-C: the ``finally`` blocks stop the sites and servers the benchmark started,
    which a plain SIGTERM would leave running."""
    signal.signal(signal.SIGTERM, _unwind)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, to check the script works")
    return p


def _unwind(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (k - lo))


def summary(values: Sequence[float], scale: float = 1.0, digits: int = 4) -> dict[str, Any]:
    """n, median, p10, p90, min, max of ``values`` (times ``scale``)."""
    xs = [v * scale for v in values]
    return {"n": len(xs), "median": round(median(xs), digits),
            "p10": round(percentile(xs, 10), digits), "p90": round(percentile(xs, 90), digits),
            "min": round(min(xs), digits) if xs else None,
            "max": round(max(xs), digits) if xs else None}


def bootstrap_diff(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]],
                   paired: bool = False, draws: int = 2000, seed: int = 0,
                   digits: int = 1) -> list[float]:
    """95% interval of median(b) - median(a), each side's values pooled over its rounds,
    resampling whole rounds (a round's values share its machine state, so they are not
    independent draws); ``paired``: round i of ``a`` and of ``b`` ran together, so they are
    drawn together."""
    import random

    rng = random.Random(seed)

    def pooled(rounds: Sequence[Sequence[float]], picks: list[int]) -> float:
        return median([x for i in picks for x in rounds[i]])

    diffs = []
    for _ in range(draws):
        pa = [rng.randrange(len(a)) for _ in a]
        pb = pa if paired else [rng.randrange(len(b)) for _ in b]
        diffs.append(pooled(b, pb) - pooled(a, pa))
    diffs.sort()
    return [round(percentile(diffs, 2.5), digits), round(percentile(diffs, 97.5), digits)]


def bootstrap_median(values: Sequence[float], draws: int = 4000, seed: int = 0,
                     digits: int = 1) -> list[float]:
    """95% interval of the median of ``values`` (independent draws: e.g. one difference per
    paired round)."""
    import random

    rng = random.Random(seed)
    meds = sorted(median([rng.choice(values) for _ in values]) for _ in range(draws))
    return [round(percentile(meds, 2.5), digits), round(percentile(meds, 97.5), digits)]


def ratio(a: float, b: float, digits: int = 3) -> float | None:
    return round(a / b, digits) if b else None


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch
    import transformers

    return {"host": platform.node(), "cpus": len(os.sched_getaffinity(0)),
            "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "omp_num_threads": env.OMP_NUM_THREADS.get(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def emit(result: dict[str, Any]) -> None:
    """Print the one JSON object (with the environment) on stdout."""
    result = {**result, "environment": environment(), "argv": sys.argv}
    print(json.dumps(result, indent=1, default=str), flush=True)


def set_threads(n: int) -> None:
    """Threads for this process's torch (set before heavy work; say it in the JSON)."""
    import torch

    env.OMP_NUM_THREADS.set(str(n))
    torch.set_num_threads(n)


# --- models and prompts -----------------------------------------------------------------------

def weights(name: str = SMOLLM) -> Any:
    """``PreparedWeights`` (path, sha256) of a catalog model (converted once, then cached)."""
    from fabric.catalog import Catalog
    from fabric.weights import prepare

    return prepare(Catalog().get(name))


_TEXT = (
    "The mitochondria is the powerhouse of the cell, turning nutrients into the energy that "
    "drives every living process. Supercomputers split very large models over many nodes: "
    "pipeline parallelism places consecutive layers on different machines while tensor "
    "parallelism divides each layer's matrices between accelerators. Scientists describe "
    "proteins, galaxies, climate and materials with numbers, and language models now help "
    "them read papers, write code and plan experiments. A federated inference fabric lets a "
    "researcher call a model that runs at a distant facility as easily as a local function, "
    "while the facility keeps control of who may use which model and how much. "
)


def prompts(tokenizer: Any, count: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """``count`` distinct prompts whose token lengths are spread evenly over [lo, hi]."""
    import random

    ids = tokenizer(_TEXT * 12, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    out = []
    for i in range(count):
        n = lo + round((hi - lo) * i / max(1, count - 1))
        start = rng.randrange(0, len(ids) - hi - 1)
        text = tokenizer.decode(ids[start:start + n])
        out.append(f"Question {i}: {text}")
    rng.shuffle(out)
    return out


def token_counts(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


ASK = "Explain the following passage in detail, in several paragraphs:\n\n"
"""Chat prompts ask for a long answer, so greedy decoding rarely stops at EOS before the
token limit and every path generates (nearly) the same number of tokens."""


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` with the chat template, exactly as the model server builds
    them (``apply_chat_template(..., add_generation_prompt=True)``)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(t) for t in ids]


def chat_prompts(tokenizer: Any, count: int, lo: int, hi: int, seed: int = 0
                 ) -> list[tuple[list[dict[str, str]], list[int]]]:
    """``count`` chat prompts (messages, ids) whose templated length spans about [lo, hi]."""
    overhead = len(chat_ids(tokenizer, [{"role": "user", "content": ASK}]))
    out = []
    for text in prompts(tokenizer, count, max(1, lo - overhead - 4), max(2, hi - overhead - 4),
                        seed):
        messages = [{"role": "user", "content": ASK + text}]
        out.append((messages, chat_ids(tokenizer, messages)))
    return out


def load_hf(folder: Path, dtype: str = "float32", causal: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode, in-process."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """``VmHWM`` (peak resident set) of a process, in MB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


# --- a temporary local site for the SDK -------------------------------------------------------

class TempSite:
    """A local site definition in a temp folder (own state dir), started like
    ``fabric endpoint start``; ``fabric()`` gives an SDK client to it. Stopping it undeploys
    its model servers."""

    def __init__(self, *, workers: int = 4, threads_per_rank: int = 2, **server: Any) -> None:
        import yaml

        self.folder = Path(tempfile.mkdtemp(prefix="fabric-bench-site-"))
        self.state_dir = self.folder / "state"
        data = {
            "name": "bench-local", "description": "temporary site for benchmarks",
            "state_dir": str(self.state_dir), "max_request_workers": workers,
            "allow_user_functions": True,
            "jobs": {"provider": {"type": "LocalProvider", "init_blocks": 0, "min_blocks": 0,
                                  "max_blocks": 1},
                     "launcher": {"type": "SingleNodeLauncher"}, "walltime": "02:00:00"},
            "server": {"idle_timeout_s": 900, "threads_per_rank": threads_per_rank,
                       **server},
            "models": [{"name": SMOLLM, "plan": {"pp": 1, "tp": 1, "dtype": "float32"}},
                       {"name": MINILM, "plan": {"pp": 1, "tp": 1, "dtype": "float32"}}],
        }
        (self.folder / "fabric.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        self.info: dict[str, Any] = {}

    def start(self) -> TempSite:
        from fabric.client.local import start_site

        old = os.environ.get("PYTHONPATH")
        # User functions defined in benchmarks/ are shipped by reference: workers import them.
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), str(REPO_ROOT / "benchmarks"), old) if p)
        try:
            t0 = time.monotonic()
            self.info = start_site(str(self.folder), self.state_dir, timeout_s=300)
            log(f"site started in {time.monotonic() - t0:.1f} s (pid {self.info['pid']})")
        finally:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old
        return self

    def fabric(self) -> Any:
        from fabric import Fabric
        from fabric.client.local import LocalTransport

        transport = LocalTransport(site=str(self.folder), state_dir=self.state_dir,
                                   autostart=False)
        return Fabric(transport=transport, on_status=None)

    def stop(self) -> None:
        from fabric.client.local import stop_site

        with contextlib.suppress(Exception):
            stop_site(str(self.folder), self.state_dir, all=True, timeout_s=60)

    def __enter__(self) -> TempSite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- timing helpers ----------------------------------------------------------------------------

def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def interleave(runs: int, **variants: Callable[[], float]) -> dict[str, list[float]]:
    """Run each variant ``runs`` times, alternating A, B, ... so drift hits them alike."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(runs):
        for name, fn in variants.items():
            out[name].append(fn())
            log(f"  run {i + 1}/{runs} {name}: {out[name][-1]:.4g}")
    return out


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    t0 = time.monotonic()
    log(f"{name} ...")
    yield
    log(f"{name} done in {time.monotonic() - t0:.1f} s")


# --- profiling -----------------------------------------------------------------------------------

def py_spy_record(pid: int, seconds: float, out: Path, rate: int = 50,
                  idle: bool = False) -> Any:
    """Start ``py-spy record`` (collapsed stacks, all threads, native frames off) on ``pid``;
    returns the Popen. ``idle`` also samples waiting threads (for busy-vs-waiting shares).
    ``top_frames`` summarises the file afterwards."""
    import shutil
    import subprocess

    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
         "--format", "raw", "--output", str(out), "--nonblocking", "--threads"]
        + (["--idle"] if idle else []),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def top_frames(collapsed: Path, n: int = 15, thread: str | None = None) -> dict[str, Any]:
    """From py-spy's collapsed stacks: the functions with the most samples on top of the stack
    (self) and anywhere in it (inclusive), as % of the samples (of ``thread`` if named)."""
    from collections import Counter

    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if thread is not None and thread not in frames[0]:
            continue
        c = int(count)
        total += c
        names = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                 for f in frames[1:]] or [frames[0]]
        self_c[names[-1]] += c
        for name in set(names):
            incl[name] += c

    def pct(c: int) -> float:
        return round(100.0 * c / total, 1) if total else 0.0

    return {"samples": total,
            "self_pct": {k: pct(v) for k, v in self_c.most_common(n)},
            "inclusive_pct": {k: pct(v) for k, v in incl.most_common(n)}}


# --- functions shipped to request workers (module level: workers import them by name) ---------

def noop(handle: Any = None, *args: Any) -> None:
    """Does nothing: the round trip is all there is to measure."""
    return None


def generate_once(handle: Any, prompt: str, max_tokens: int) -> list[int]:
    """Calls the model once through its handle: what ``fab.generate`` does, as a function."""
    return list(handle.generate(prompt, max_tokens=max_tokens).token_ids)


def hold(handle: Any, seconds: float) -> None:
    """Keeps its request worker busy (to have every worker take a call at once)."""
    time.sleep(seconds)


@contextlib.contextmanager
def compute_engine(workers: int = 4) -> Iterator[Any]:
    """A standalone ``GlobusComputeEngine`` (Parsl HTEX + LocalProvider) as the site runs it."""
    from globus_compute_endpoint.engines import GlobusComputeEngine
    from parsl.providers import LocalProvider

    saved = {k: os.environ.get(k) for k in ("PATH", "PYTHONPATH")}
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{saved['PATH'] or ''}"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), str(REPO_ROOT / "benchmarks"), saved["PYTHONPATH"]) if p)
    engine = GlobusComputeEngine(
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
        max_workers_per_node=workers, address="127.0.0.1",
        job_status_kwargs={"strategy_period": 0.5, "max_idletime": 3600.0})
    engine.start(endpoint_id=uuid.uuid4(), run_dir=tempfile.mkdtemp(prefix="fabric-bench-gce-"))
    try:
        yield engine
    finally:
        engine.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def engine_call(engine: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` through the engine, packed as Globus Compute packs it."""
    from globus_compute_endpoint.engines.base import GCFuture

    from fabric.wire import gcwire

    task_id, packed = gcwire.pack_task(fn, args, {})
    fut = GCFuture(task_id)
    engine.submit(fut, packed, resource_specification={})
    return gcwire.unpack_result(fut.result(timeout=300))
