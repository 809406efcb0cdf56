"""``ServerJob``: a model server launched exactly as a site launches one, for the benchmarks.

``fabric.engine.launch.prepare_server_launch``, submitted as a job through ``JobLauncher`` over
Parsl's ``LocalProvider`` + ``SingleNodeLauncher``, waited for through its info file, talked to
with ``ServerClient`` and tickets; ``run_batch`` sends it a set of requests on one connection.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import SMOLLM, log, weights


class ServerJob:
    """One model server for a catalog model, launched as a site launches it.

    ``prepare_server_launch`` (``ServerLaunchConfig`` JSON + rank command) -> ``JobLauncher``
    (Parsl ``LocalProvider`` + ``SingleNodeLauncher``) with ``ranks = pp * tp``; ready when the
    head's info file says so. Use as a context manager: it drains the server and cancels the job.
    """

    def __init__(self, model: Any = SMOLLM, *, pp: int = 1, tp: int = 1, threads: int = 2,
                 dtype: str = "float32", shard_dir: Path | None = None,
                 workdir: Path | None = None, balance: str = "params", ep: int = 1,
                 **server: Any) -> None:
        """``model``: a catalog name, or a ``CatalogEntry`` (e.g. a local tiny checkpoint)."""
        from fabric.catalog import Catalog
        from fabric.engine.launch import prepare_server_launch
        from fabric.sites import Plan, ServerConfig
        from fabric.weights import prepare

        self.entry = Catalog().get(model) if isinstance(model, str) else model
        prepared = weights(model) if isinstance(model, str) else prepare(model)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fabric-bench-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.plan = Plan(pp=pp, tp=tp, ep=ep, dtype=dtype, balance=balance)
        self.threads = threads
        server.setdefault("threads_per_rank", threads)
        server.setdefault("idle_timeout_s", 900.0)
        self.server = ServerConfig(**server)
        self.launch = prepare_server_launch(
            f"bench-{uuid.uuid4().hex[:8]}", self.entry, prepared, self.plan, self.server,
            self.workdir, self.workdir, shard_dir=str(shard_dir) if shard_dir else None)
        self.cfg = self.launch.config
        self.job_id: str | None = None
        self.info: dict[str, Any] = {}
        self._launcher: Any = None
        self._key: bytes | None = None

    # lifecycle
    def start(self, timeout_s: float = 600.0) -> ServerJob:
        from fabric import tickets
        from fabric.endpoint.jobs import JobLauncher
        from fabric.sites import JobsConfig, TypedSpec

        self._key = tickets.load_or_create_key(Path(self.cfg.ticket_key_path))
        jobs = JobsConfig(provider=TypedSpec(type="LocalProvider", init_blocks=0, min_blocks=0,
                                             max_blocks=1),
                          launcher=TypedSpec(type="SingleNodeLauncher"), walltime="02:00:00")
        self._launcher = JobLauncher.from_config(jobs, self.workdir / "jobs")
        t0 = time.monotonic()
        self.job_id = self.launch.submit(self._launcher, self.cfg.deployment_id)
        info_path = Path(self.cfg.info_path)
        while time.monotonic() - t0 < timeout_s:
            with contextlib.suppress(OSError, ValueError):
                self.info = json.loads(info_path.read_text())
                if self.info.get("state") == "ready":
                    self.ready_s = time.monotonic() - t0
                    log(f"server {self.cfg.deployment_id} pp={self.plan.pp} tp={self.plan.tp} "
                        f"ready in {self.ready_s:.1f} s at {self.info['address']}")
                    return self
                if self.info.get("state") == "dead":
                    raise RuntimeError(f"model server died: {self.info.get('reason')}; "
                                       f"logs in {self.workdir / 'jobs'}")
            time.sleep(0.1)
        raise TimeoutError(f"model server not ready after {timeout_s} s ({self.workdir})")

    def stop(self) -> None:
        if self.job_id is None:
            return
        with contextlib.suppress(Exception):
            with self.client(timeout_s=5.0) as c:
                c.drain(self.admin_ticket())
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                info = json.loads(Path(self.cfg.info_path).read_text())
                if info.get("state") == "dead":
                    break
                time.sleep(0.2)
        with contextlib.suppress(Exception):
            self._launcher.cancel(self.job_id)
        self.job_id = None

    def __enter__(self) -> ServerJob:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # talking to it
    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    def rank_pids(self) -> list[int]:
        """PIDs of every rank's server process (their command line names this job's config)."""
        needle = str(self.workdir / "launch.json").encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    cmd = (proc / "cmdline").read_bytes()
                    if needle in cmd and b"fabric.engine.server" in cmd:
                        pids.append(int(proc.name))
        return sorted(pids)

    def client(self, timeout_s: float = 120.0) -> Any:
        from fabric.serverclient import ServerClient

        return ServerClient(self.info["address"], self.info["public_key"], timeout_s=timeout_s)

    def ticket(self, ttl_s: float = 7200.0) -> str:
        from fabric import tickets

        assert self._key is not None
        return tickets.issue(self._key, model=self.entry.name, ttl_s=ttl_s)

    def admin_ticket(self) -> str:
        from fabric import tickets

        assert self._key is not None
        return tickets.issue(self._key, model=self.entry.name, admin=True)

    def request(self, prompt: str | list[dict[str, str]], max_tokens: int = 64,
                **fields: Any) -> Any:
        """A greedy request: ``prompt`` is a string or chat messages."""
        from fabric.protocol import InferenceRequest, SamplingParams

        text = {"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt}
        return InferenceRequest(model=self.entry.name, sampling=SamplingParams(
            max_tokens=max_tokens), **text, **fields)


def run_batch(job: ServerJob, requests: Sequence[Any],
              arrivals: Sequence[float] | None = None) -> dict[str, Any]:
    """Submit ``requests`` (all at once, or at ``arrivals`` seconds after the start) on one
    connection and wait for every result.

    Returns wall time, results, refusals (typed errors at submit: e.g. ``Overloaded``) with how
    long the refusal took, and per-request server-side TTFT (queue + prefill, from the result's
    timings) and latency (their total_s). Server-side, because this client collects
    results only after its last submission, which would inflate a client-side latency under
    paced arrivals.
    """
    from fabric.errors import FabricError

    ticket = job.ticket()
    results: dict[str, dict[str, Any]] = {}
    refused: list[dict[str, Any]] = []
    sent: dict[str, float] = {}
    with job.client() as client:
        t0 = time.monotonic()
        for i, req in enumerate(requests):
            if arrivals is not None:
                delay = t0 + arrivals[i] - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            s = time.monotonic()
            try:
                client.submit(req, ticket)
                sent[req.request_id] = s
            except FabricError as exc:
                refused.append({"error": type(exc).__name__,
                                "answer_ms": round((time.monotonic() - s) * 1000, 3),
                                "retry_after": exc.details.get("retry_after")})
        for rid in sent:
            results[rid] = client.result(rid, timeout_s=3600)
        wall = time.monotonic() - t0
    tokens = sum(r["usage"]["completion_tokens"] for r in results.values())
    timings = [r["timings"] for r in results.values()]
    ttft = [t["queue_s"] + t["prefill_s"] for t in timings]
    latency = [t["total_s"] for t in timings]
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall if wall else 0.0,
            "results": results, "refused": refused, "ttft_s": ttft, "latency_s": latency}
