"""The remote path through the real Globus Compute pair vs the local site, same warm server.

Side by side in one run, one site definition and state dir (so both paths find the same warm
tiny-model server): the local site (``fabric endpoint start``'s process, ``LocalTransport``,
streams straight to the server) and the remote path (``GlobusTransport`` with its real
``globus_compute_sdk.Executor`` -> the local fake of the web service -> a real RabbitMQ broker
-> the real ``globus-compute-endpoint`` daemon and its user endpoint's GlobusComputeEngine,
streams long-polled through ``poll_stream`` tasks). Measured, interleaved: ``fab.generate``
latency; time to first token and delivered tokens/s per stream with 1 and with 8 concurrent
``fab.stream`` calls from one client. The Executor's settings are recorded.

Goal (issue 15): 8 concurrent streams each deliver >= 80 % of the local path's tokens/s, and a
single stream's TTFT is within 1.5 s of the local path's. Needs RabbitMQ (``rabbitmq-server``)
and port 5000 free; run it under ``flock /tmp/fabric-heavy.lock``::

    python benchmarks/globus_path.py [--quick]
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
PROMPT = "The mitochondria is"


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
                   "threads_per_rank": 1},
        "models": [{"name": MODEL, "plan": {"pp": 1, "tp": 1}}],
        "extra_models": [{"name": MODEL, "version": "bench", "family": "causal-lm",
                          "source": {"kind": "path", "path": str(model_dir)},
                          "description": "tiny random Llama", "params": 100_000}],
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


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--runs", type=int, help="interleaved runs per measurement (default 5)")
    p.add_argument("--tokens", type=int, help="tokens per stream (default 64)")
    args = p.parse_args()
    runs, new = (2, 16) if args.quick else (5, 64)
    runs, new = args.runs or runs, args.tokens or new
    workers = 8  # each polled stream holds a request worker while its long poll waits
    from fabric import Fabric
    from fabric.client.local import LocalTransport, start_site, stop_site
    from fabric.globus.transport import GlobusTransport
    from fabric.testing.tiny import build_tiny_llama

    root = Path(tempfile.mkdtemp(prefix="fabric-bench-gc-"))
    site = root / "site"
    model_dir = build_tiny_llama(root / "model")
    write_site(site, model_dir, workers)
    result: dict[str, Any] = {"benchmark": "globus_path", "model": MODEL, "max_tokens": new,
                              "runs": runs, "request_workers": workers}
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
            with common.stage("warm: local deploy + remote cold user endpoint"):
                t_local = common.timed(lambda: local_fab.generate(PROMPT, model=MODEL,
                                                                  max_tokens=4))[0]
                t_remote = common.timed(lambda: remote_fab.generate(PROMPT, model=MODEL,
                                                                    max_tokens=4))[0]
            result["first_call_s"] = {"local_with_deploy": round(t_local, 3),
                                      "remote_cold_user_endpoint": round(t_remote, 3)}
            ex = transport.executor
            result["executor"] = {
                "batch_size": transport.batch_size,
                "api_burst_limit": getattr(ex, "api_burst_limit", transport.burst[0]),
                "api_burst_window_s": getattr(ex, "api_burst_window_s", transport.burst[1]),
                "serializer": type(ex.serializer).__name__,
                "stream_mode": "poll (poll_stream tasks; the client cannot reach the server)"}
            gen = common.interleave(
                runs,
                local=lambda: common.timed(lambda: local_fab.generate(
                    PROMPT, model=MODEL, max_tokens=16, temperature=0.0))[0],
                remote=lambda: common.timed(lambda: remote_fab.generate(
                    PROMPT, model=MODEL, max_tokens=16, temperature=0.0))[0])
            result["generate_latency_s"] = {k: common.summary(v) for k, v in gen.items()}
            for concurrent in (1, 8):
                recs: dict[str, list[dict[str, float]]] = {"local": [], "remote": []}
                for i in range(runs):
                    for name, fab in (("local", local_fab), ("remote", remote_fab)):
                        batch = streams(fab, concurrent, new)
                        recs[name].extend(batch)
                        common.log(f"  {concurrent} stream(s) run {i + 1}/{runs} {name}: ttft "
                                   f"{common.median([b['ttft_s'] for b in batch]):.3f} s, "
                                   f"{common.median([b['delivered_tok_s'] for b in batch]):.1f}"
                                   " tok/s")
                section = {name: {key: common.summary([r[key] for r in rs]) for key in
                                  ("ttft_s", "delivered_tok_s", "decode_tok_s")}
                           for name, rs in recs.items()}
                med = {n: {k: common.median([r[k] for r in rs]) for k in
                           ("ttft_s", "delivered_tok_s")} for n, rs in recs.items()}
                section["remote_vs_local"] = {
                    "ttft_delta_s": round(med["remote"]["ttft_s"] - med["local"]["ttft_s"], 3),
                    "delivered_tok_s_ratio": common.ratio(med["remote"]["delivered_tok_s"],
                                                          med["local"]["delivered_tok_s"])}
                result[f"streams_{concurrent}"] = section
            s1, s8 = result["streams_1"]["remote_vs_local"], result["streams_8"]["remote_vs_local"]
            result["goal"] = {"ttft_within_1_5_s": s1["ttft_delta_s"] <= 1.5,
                              "streams_8_at_least_80pct": (s8["delivered_tok_s_ratio"] or 0)
                              >= 0.8}
            result["service_submissions"] = len(service.submissions)
            transport.close()
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
