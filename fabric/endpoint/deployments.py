"""Find or launch a warm model server for (model, version): the deployment manager.

.. code:: text

    ensure(entry) --lock--> live record for (model, version)?
                              ready  -> health ping ok -> use it
                              queued/loading -> wait for it
                              none / dead -> write launch config -> JobLauncher.submit
                  <-unlock--  wait: job state + info file + health "ready" -> record "ready"

Request workers are separate processes, so the launch decision is made under a file lock
(``fcntl``, works across processes on one host and on most shared filesystems) plus an immediate
SQLite transaction: two concurrent requests for a cold model launch exactly one server. Waiting
for readiness happens outside the lock, so requests for other models are not held up.

Any reader advances a record through its life (``refresh``): queued -> loading once the job
runs, -> ready once the head rank's info file names an address and health says "ready", -> dead
when the job ends (crash, ``scancel``, walltime), the health ping fails or readiness takes longer
than ``server.ready_timeout_s``. A dead record is never reused; the next request launches anew.

A request worker reads no weight file: it only locates the weights and what the site knows of
their hash (``fabric.weights.locate``). The server converts (GGUF) and hashes them on its node
and reports the hash in its info file; the record takes it when the server is first seen bound,
and the site keeps it per model version (``StateDB.record_weights``) for the next launch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fabric import tickets
from fabric.catalog import CatalogEntry
from fabric.endpoint import pings
from fabric.endpoint.schedulers import clock_seconds
from fabric.endpoint.state import LIVE_STATES, Deployment, StateDB
from fabric.errors import DeploymentError, FabricError
from fabric.sites import Plan, SiteConfig
from fabric.weights import check_plan_fits

HEALTH_TIMEOUT_S = 3.0
"""How long a health ping may take before the server counts as gone."""
TOUCH_EVERY_S = 1.0
"""A ready server's last use is written at most this often: each write is a write-locked
transaction that the site's request workers queue on, and idle times are minutes."""


class DeploymentManager:
    """Deployment records and model-server jobs of one site (one per worker process is fine)."""

    def __init__(self, site: SiteConfig, state_dir: Path) -> None:
        self.site = site
        self.state_dir = Path(state_dir)
        self.db = StateDB(self.state_dir)
        self._launcher: Any = None

    # -- public verbs ---------------------------------------------------------------------

    def ensure(self, entry: CatalogEntry, plan: Plan | None = None,
               wait_s: float | None = None) -> Deployment:
        """A ready deployment of ``entry`` (reusing a warm one, else launching one and waiting).

        ``plan`` None takes any live deployment of the model (or the site's default plan when
        launching). Raises ``DeploymentError`` if the server dies or is not ready in time.
        """
        dep = self._find_or_launch(entry, plan)
        if dep.state == "ready":
            if time.time() - dep.last_used >= TOUCH_EVERY_S:
                self.db.touch(dep.id)
            return dep
        return self.wait_ready(dep.id, wait_s)

    def deploy(self, entry: CatalogEntry, plan: Plan | None = None) -> Deployment:
        """Launch (pre-warm) a deployment with ``plan`` unless a live one with it exists."""
        return self._find_or_launch(entry, plan, exact_plan=plan is not None)

    def wait_ready(self, dep_id: str, wait_s: float | None = None) -> Deployment:
        """Block until deployment ``dep_id`` is ready; raise ``DeploymentError`` if it dies."""
        limit = wait_s if wait_s is not None else self.site.server.ready_timeout_s
        deadline = time.monotonic() + limit
        delay = 0.05
        while True:
            dep = self._get(dep_id)
            dep = self.refresh(dep)
            if dep.state == "ready":
                self.db.touch(dep.id)
                return dep
            if dep.state in ("dead", "draining"):
                raise DeploymentError(
                    f"model server for {dep.model} ({dep.id}) {dep.state}: {dep.reason}",
                    deployment=dep.id, reason=dep.reason)
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"model server for {dep.model} ({dep.id}) not ready after {limit:.0f} s "
                    f"(state {dep.state})", deployment=dep.id, state=dep.state)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def undeploy(self, dep_id: str, drain_wait_s: float = 10.0) -> Deployment:
        """Drain the server (operator ticket), then cancel its job; the record ends dead."""
        dep = self._get(dep_id)
        if dep.state == "dead":
            return dep
        if dep.address and dep.public_key:
            from fabric.serverclient import ServerClient

            self.collect_usage(dep)  # finished streams' tokens, while it surely answers
            ticket = tickets.issue(self.ticket_key(), model=dep.model, admin=True,
                                   subject="operator", ttl_s=60)
            with contextlib.suppress(FabricError), \
                    ServerClient(dep.address, dep.public_key, timeout_s=HEALTH_TIMEOUT_S) as c:
                c.drain(ticket)
                self.db.update(dep.id, state="draining")
                # Give running requests a moment to finish before the job is cancelled.
                end = time.monotonic() + drain_wait_s
                while time.monotonic() < end and self._job_alive(dep):
                    time.sleep(0.2)
            self.collect_usage(dep)  # if it still runs; else its epitaph has them (_mark_dead)
        if dep.job_id:
            with contextlib.suppress(FabricError):
                self.launcher().cancel(dep.job_id)
        self._mark_dead(dep, "undeployed")
        # The drained server may have exited, and another worker recorded it dead for that
        # first: the operator's undeploy is still why it ended.
        return self.db.update(dep.id, reason="undeployed") or dep

    def collect_usage(self, dep: Deployment | None = None) -> int:
        """Record in the usage DB the tokens servers delivered on streams (``open_stream``
        tickets: ``fabric.engine.usage_ledger``), against the identity each ticket names;
        ``dep`` alone, or every ready or draining deployment. Returns the entries recorded.
        A server that does not answer keeps its entries for the next collection."""
        from fabric.serverclient import ServerClient

        deps = [dep] if dep is not None else self.db.query(states=("ready", "draining"))
        recorded = 0
        for d in deps:
            if not d.address or not d.public_key:
                continue
            ticket = tickets.issue(self.ticket_key(), model=d.model, admin=True,
                                   subject="operator", ttl_s=60)
            try:
                with ServerClient(d.address, d.public_key, timeout_s=HEALTH_TIMEOUT_S) as c:
                    entries = c.usage(ticket, HEALTH_TIMEOUT_S)
            except FabricError:
                continue
            recorded += self._record_usage(d, entries)
        return recorded

    def _record_usage(self, dep: Deployment, entries: list[dict[str, Any]]) -> int:
        """Record a server's usage entries (``fabric.engine.usage_ledger``) in the usage DB."""
        from fabric.endpoint.policy import record_usage

        for e in entries:
            record_usage(self.state_dir, str(e.get("subject") or ""), dep.model,
                         int(e.get("tokens") or 0), str(e.get("request_id") or ""),
                         prompt_tokens=int(e.get("prompt_tokens") or 0),
                         completion_tokens=int(e.get("completion_tokens") or 0),
                         ts=float(e["ts"]) if e.get("ts") else None)
        return len(entries)

    def list_all(self, include_dead: bool = False) -> list[dict[str, Any]]:
        """Every deployment with live state, idle time, job detail and server health."""
        now = time.time()
        out = []
        for dep in self.db.query():
            if dep.state != "dead":
                dep = self.refresh(dep)
            if dep.state == "dead" and not include_dead:
                continue
            out.append(self.describe(dep, now))
        return out

    def status(self, entry: CatalogEntry, plan: Plan | None = None) -> dict[str, Any]:
        """Non-blocking: the state of the live deployment of ``entry`` (or ``absent``)."""
        for dep in self._live(entry, plan):
            dep = self.refresh(dep)
            if dep.state in LIVE_STATES:
                return self.describe(dep)
        return {"state": "absent", "model": entry.name, "version": entry.version,
                "message": "no model server yet; the first request launches one"}

    def reap(self) -> list[str]:
        """Refresh every live record; returns the ids found dead."""
        dead = []
        for dep in self.db.query(states=(*LIVE_STATES, "draining")):
            if self.refresh(dep).state == "dead":
                dead.append(dep.id)
        return dead

    def describe(self, dep: Deployment, now: float | None = None) -> dict[str, Any]:
        """A record as shown to users: fields plus idle time, job detail and health."""
        now = now or time.time()
        info = dep.to_dict()
        info["idle_s"] = round(now - dep.last_used, 1)
        info["age_s"] = round(now - dep.created, 1)
        info["message"] = dep.reason
        if dep.state in ("queued", "loading") and dep.job_id:
            job = self._job_status(dep)
            if job is not None:
                info["job_state"] = job.state.value
                info["queue_position"] = job.queue_position
                info["estimated_start"] = (job.estimated_start.isoformat()
                                           if job.estimated_start else None)
                info["job_reason"] = job.reason
        if dep.state == "ready":
            health = self.health(dep)
            if health is not None:
                info["health"] = health
        return info

    # -- lifecycle ----------------------------------------------------------------------------

    def refresh(self, dep: Deployment, quick: bool = False) -> Deployment:
        """Advance ``dep`` by what its job, info file and health ping say now. ``quick`` (the
        admission's fast path): a ready server that answers its health ping ready is taken
        at its word, without asking the batch scheduler: that is an ``squeue`` or ``qstat``
        (two, with Parsl's own) per admission, which a busy site's scheduler rate-limits."""
        if dep.state == "dead":
            return dep
        info = _read_json(Path(dep.info_path)) if dep.info_path else None
        if info and info.get("address") and not dep.address:
            dep = self._bound(dep, info)
        if _walltime_marker(self.script_dir(), dep.id):
            return self._mark_dead(dep, f"walltime {dep.walltime} reached")
        if info and info.get("state") == "dead":
            # The server wrote its own epitaph (idle timeout, drain, SIGTERM).
            return self._mark_dead(dep, f"model server exited: {info.get('reason') or 'stopped'}")
        if info and _local_pid_dead(dep.address, info.get("pid")):
            return self._mark_dead(dep, "model server process exited" + self._log_tail(dep))
        asked = quick and dep.state == "ready" and bool(dep.address)
        health = self.health(dep) if asked else None
        if health is not None and health.get("state") == "ready":
            return dep
        job = self._job_status(dep)
        if job is not None and job.state.terminal:
            return self._mark_dead(dep, f"job {job.state.value}"
                                   + (f" ({job.message})" if job.message else "")
                                   + self._log_tail(dep))
        if not asked:
            health = self.health(dep) if dep.address else None
        if health is not None:
            state = {"ready": "ready", "draining": "draining"}.get(str(health.get("state")),
                                                                  "loading")
            if state != dep.state:
                if state == "ready" and dep.state in ("queued", "loading"):
                    from fabric.endpoint.site_events import record_cold_start

                    record_cold_start(self.state_dir, dep.model, dep.id,
                                      time.time() - dep.created)
                dep = self.db.update(dep.id, state=state) or dep
            return dep
        if dep.state in ("ready", "draining"):
            # It answered before and does not now: crashed, killed, wedged, or its node is gone.
            # A wedged server's job would hold its nodes until walltime: end it.
            return self._reap(dep, "model server stopped answering health pings"
                              + self._log_tail(dep))
        if job is not None and job.state.value == "unknown" and not info:
            return self._mark_dead(dep, "job ended before the server started" + self._log_tail(dep))
        if job is not None and job.state.value == "running" and dep.state == "queued":
            dep = self.db.update(dep.id, state="loading") or dep
        queued = job is not None and job.state.value == "queued"
        if not queued and time.time() - dep.created > self.site.server.ready_timeout_s:
            return self._reap(dep, f"not ready within {self.site.server.ready_timeout_s:.0f}"
                              " s (server.ready_timeout_s)" + self._log_tail(dep))
        return dep

    def walltime_reached(self, dep: Deployment) -> bool:
        """True when ``dep``'s job ended at its walltime (the scheduler says ``TIMEOUT``; the
        ``LocalProvider`` watchdog left its marker) or is being ended for it (still running or
        completing with no time left). Such a server was stopped by the scheduler, not by a
        request: what it had in hand may go to its successor."""
        if _walltime_marker(self.script_dir(), dep.id):
            return True
        job = self._job_status(dep)
        if job is None:
            return False
        if job.state.value == "timeout":
            return True
        # Slurm keeps a job it is ending COMPLETING (running, to us) until KillWait has
        # passed; its reason already says TimeLimit and it has no time left.
        return job.state.value == "running" and (
            job.reason == "TimeLimit" or clock_seconds(job.time_left) == 0)

    def _bound(self, dep: Deployment, info: dict[str, Any]) -> Deployment:
        """The server is up: record its address and the weights hash it settled on its node
        (once per deployment), and keep that hash for the model version's next launch."""
        weights = info.get("weights")
        changes: dict[str, Any] = {"address": info["address"],
                                   "public_key": info.get("public_key")}
        if isinstance(weights, dict) and weights.get("sha256"):
            changes["sha256"] = str(weights["sha256"])
            known = self.db.weights_of(dep.model, dep.version)
            if known is None or (known["sha256"], known["stamp"]) != (weights["sha256"],
                                                                      weights.get("stamp")):
                self.db.record_weights(dep.model, dep.version, weights)
        return self.db.update(dep.id, **changes) or dep

    def health(self, dep: Deployment) -> dict[str, Any] | None:
        """The server's health reply, or None if it does not answer in time."""
        if not dep.address or not dep.public_key:
            return None
        return pings.health(dep.address, dep.public_key, HEALTH_TIMEOUT_S)

    # -- launching ------------------------------------------------------------------------

    def _find_or_launch(self, entry: CatalogEntry, plan: Plan | None,
                        exact_plan: bool = False) -> Deployment:
        # Fast path, no lock: a warm server that answers its health ping (the common case, so
        # concurrent requests do not queue on the launch lock).
        for dep in self._live(entry, plan if exact_plan else None):
            if dep.state == "ready" and self.refresh(dep, quick=True).state == "ready":
                return dep
        # Where the weights are and what the site knows of their hash: no weight file is read
        # here (a request worker on a login node); the server converts and hashes on its node.
        weights = self.locate(entry)
        with self._lock():
            for dep in self._live(entry, plan if exact_plan else None):
                dep = self.refresh(dep)
                if dep.state in LIVE_STATES:
                    return dep
            chosen = plan or self._default_plan(entry)
            check_plan_fits(entry, chosen.pp, chosen.tp, Path(weights.path), chosen.ep)
            return self._launch(entry, chosen, weights)

    def locate(self, entry: CatalogEntry) -> Any:
        """``fabric.weights.locate`` with this site's weight cache and its record of the hash
        an earlier server of this version settled (``StateDB.weights_of``)."""
        from fabric.weights import locate

        return locate(entry, Path(self.site.weights_dir).expanduser()
                      if self.site.weights_dir else None,
                      self.db.weights_of(entry.name, entry.version))

    def _launch(self, entry: CatalogEntry, plan: Plan, weights: Any) -> Deployment:
        from fabric.engine.launch import prepare_server_launch

        dep_id = Deployment.new_id()
        folder = self.state_dir / "servers" / dep_id
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        dep = Deployment(
            id=dep_id, model=entry.name, version=entry.version, state="queued",
            sha256=weights.sha256 or "", plan=plan.model_dump(),
            provider=self.site.jobs.provider.type,
            walltime=self.site.jobs.walltime, created=now, last_used=now,
            info_path=str(folder / "info.json"), log_path=str(self.script_dir()),
        )
        self.ticket_key()  # created before the server reads it
        hosted = self.site.hosted(entry.name)
        shard_dir = hosted.shard_dir if hosted is not None and hosted.plan == plan else None
        launch = prepare_server_launch(
            dep_id, entry, weights, plan, self.site.server, self.state_dir, folder,
            shard_dir=str(Path(shard_dir).expanduser()) if shard_dir else None)
        self.db.insert(dep)
        try:
            job_id = launch.submit(self.launcher(), _job_name(dep_id))
        except FabricError as exc:
            self._mark_dead(dep, f"launch failed: {exc.message}")
            raise
        return self.db.update(dep_id, job_id=job_id) or dep

    def _default_plan(self, entry: CatalogEntry) -> Plan:
        hosted = self.site.hosted(entry.name)
        if hosted is not None:
            return hosted.plan
        return Plan.model_validate({"dtype": entry.dtype})

    def _live(self, entry: CatalogEntry, plan: Plan | None) -> list[Deployment]:
        deps = self.db.query(model=entry.name, version=entry.version, states=LIVE_STATES)
        if plan is not None:
            wanted = plan.model_dump()
            deps = [d for d in deps if d.plan == wanted]
        # Ready ones first, then the newest.
        return sorted(deps, key=lambda d: (d.state != "ready", -d.created))

    # -- helpers --------------------------------------------------------------------------

    def launcher(self) -> Any:
        """The site's ``JobLauncher`` (built on first use)."""
        if self._launcher is None:
            from fabric.endpoint.jobs import JobLauncher

            self._launcher = JobLauncher.from_config(self.site.jobs, self.script_dir())
        return self._launcher

    def script_dir(self) -> Path:
        """Where job scripts and their stdout/stderr live."""
        return self.state_dir / "jobs"

    def ticket_key(self) -> bytes:
        """The site's HMAC ticket key (created on first use, mode 0600)."""
        return tickets.load_or_create_key(self.state_dir / "ticket.key")

    def find(self, model: str) -> Deployment | None:
        """The newest live deployment of ``model`` (ready preferred)."""
        deps = self.db.query(model=model, states=LIVE_STATES)
        deps.sort(key=lambda d: (d.state != "ready", -d.created))
        return deps[0] if deps else None

    def _get(self, dep_id: str) -> Deployment:
        dep = self.db.get(dep_id)
        if dep is None:
            raise DeploymentError(f"no deployment {dep_id!r}", deployment=dep_id)
        return dep

    def _job_status(self, dep: Deployment) -> Any:
        if not dep.job_id:
            return None
        try:
            return self.launcher().status([dep.job_id]).get(dep.job_id)
        except FabricError:
            return None

    def _job_alive(self, dep: Deployment) -> bool:
        job = self._job_status(dep)
        return job is not None and not job.state.terminal and job.state.value != "unknown"

    def _mark_dead(self, dep: Deployment, reason: str) -> Deployment:
        """Record ``dep`` dead, and the usage its server left in its epitaph (once: only
        the call that changes the record to dead records it, however many workers found the
        server gone at once)."""
        if dep.address:
            pings.forget(dep.address)
        if self.db.mark_dead(dep.id, reason):
            info = _read_json(Path(dep.info_path)) if dep.info_path else None
            if info and info.get("usage"):
                self._record_usage(dep, list(info["usage"]))
        return self.db.get(dep.id) or dep

    def _reap(self, dep: Deployment, reason: str) -> Deployment:
        """Mark ``dep`` dead and cancel its job, which may still hold its nodes."""
        if dep.job_id:
            with contextlib.suppress(FabricError):
                self.launcher().cancel(dep.job_id)
        return self._mark_dead(dep, reason)

    def _log_tail(self, dep: Deployment, lines: int = 8) -> str:
        tails = []
        for path in sorted(self.script_dir().glob(f"{_job_name(dep.id)}*.err")):
            text = path.read_text(errors="replace").strip().splitlines()
            if text:
                tails.append("\n".join(text[-lines:]))
        return ("; server log tail:\n" + "\n".join(tails)) if tails else ""

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "deployments.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def undeploy_all(site: SiteConfig, state_dir: Path, drain_wait_s: float = 5.0) -> list[str]:
    """Drain and stop every model server recorded in ``state_dir`` that is not dead (what
    ``fabric endpoint stop --all`` does, through the site or, when the site is down, from the
    CLI); the ids stopped."""
    mgr = DeploymentManager(site, state_dir)
    done = []
    for dep in mgr.db.query(states=(*LIVE_STATES, "draining")):
        mgr.undeploy(dep.id, drain_wait_s=drain_wait_s)
        done.append(dep.id)
    return done


def _job_name(dep_id: str) -> str:
    return f"fabric-{dep_id}"


def _walltime_marker(script_dir: Path, dep_id: str) -> bool:
    # The job launcher's LocalProvider watchdog leaves this marker when it ends a job.
    return any(script_dir.glob(f"{_job_name(dep_id)}.*.walltime"))


def _local_pid_dead(address: str | None, pid: Any) -> bool:
    # Only meaningful when the server runs on this host: it advertises one of our addresses.
    from fabric.engine.netaddr import is_local

    host = (address or "").removeprefix("tcp://").rpartition(":")[0]
    if not host or not is_local(host) or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not written yet, or caught mid-write
    return data if isinstance(data, dict) else None
