"""Model servers as batch jobs: three verbs over a real Parsl provider and launcher::

                      +--------------------------------------------+
    command, ranks -->| submit  -> Parsl provider (sbatch/qsub/sh) |--> job id
    [job ids]      -->| status  -> Parsl state + squeue detail      |--> {id: JobStatus}
    job id         -->| cancel  -> scancel / qdel / kill group      |
                      +--------------------------------------------+

``from_config`` resolves the site's ``jobs:`` block to real ``parsl.providers`` /
``parsl.launchers`` classes. ``submit`` writes the command into its own script
(``<script_dir>/<job_name>.<token>.sh``: no quoting lost in a launcher's heredoc) and asks the
launcher for ``ranks`` copies of it over ``nodes`` nodes.

Where each copy learns its rank (the model server reads these):

- ``SingleNodeLauncher``: copies are background calls of one shell function, each given its
  1-based index as ``$1``; ``CORES`` = the machine's cores. (Inside a Slurm/PBS job the
  scheduler's variables, e.g. ``SLURM_PROCID=0``, are the batch script's, the same for all.)
- ``SrunLauncher``: ``srun --ntasks N``; ``SLURM_PROCID`` (0-based global rank), ``SLURM_NTASKS``,
  ``SLURM_LOCALID``, ``SLURM_NODEID``.
- ``MpiExecLauncher`` / ``MpiRunLauncher``: ``PMI_RANK`` + ``PMI_SIZE`` (MPICH/Cray PMI),
  ``PALS_RANKID`` (Aurora's PALS), ``OMPI_COMM_WORLD_RANK`` (Open MPI) or ``PMIX_RANK``.
- ``SimpleLauncher``: one copy, no rank.

Every copy also gets ``FABRIC_RANK`` (0-based: ``$1 - 1`` when ``$1`` is set, else the first of
the variables above, else 0), ``FABRIC_WORLD_SIZE`` (= ``ranks``) and ``FABRIC_JOB_NAME``.

Walltime: providers with a ``walltime`` (Slurm, PBS, ...) pass it to the scheduler, which ends
the job as ``TIMEOUT``. ``LocalProvider`` has none, so the job script carries a watchdog that
kills the job's process group at the walltime; ``status`` then reports ``TIMEOUT``.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import os
import re
import shlex
import shutil
import signal
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import parsl.launchers
import parsl.providers
from parsl.launchers.base import Launcher
from parsl.providers.base import ExecutionProvider

from fabric.errors import DeploymentError, InvalidSiteConfig
from fabric.sites import JobsConfig, TypedSpec

_SUBMIT_COMMAND = {"SlurmProvider": "sbatch", "PBSProProvider": "qsub", "TorqueProvider": "qsub",
                   "GridEngineProvider": "qsub", "LSFProvider": "bsub"}  # checked before submit


class JobState(enum.Enum):
    """Where a batch job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    UNKNOWN = "unknown"

    @property
    def terminal(self) -> bool:
        """True once the job can no longer run (``UNKNOWN`` is not terminal)."""
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT)


_ALIASES = {  # Parsl's and Slurm's state names that are not ours
    "PENDING": JobState.QUEUED, "HELD": JobState.QUEUED, "CONFIGURING": JobState.QUEUED,
    "REQUEUED": JobState.QUEUED, "SUSPENDED": JobState.QUEUED, "COMPLETING": JobState.RUNNING,
    "DEADLINE": JobState.TIMEOUT, "PREEMPTED": JobState.CANCELLED, "SCALED_IN": JobState.CANCELLED,
    "MISSING": JobState.FAILED, "NODE_FAIL": JobState.FAILED, "BOOT_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
}


def _state(name: str) -> JobState:  # from a Parsl JobState name or a Slurm %T state
    return _ALIASES.get(name) or JobState.__members__.get(name, JobState.UNKNOWN)


@dataclass(frozen=True)
class JobStatus:
    """One job's state plus what the scheduler says about it (Slurm detail when available)."""

    job_id: str
    state: JobState
    message: str | None = None  # provider's note, or why the state is a guess
    exit_code: int | None = None
    walltime: str | None = None  # time limit as submitted (HH:MM:SS) or as Slurm reports it
    reason: str | None = None  # Slurm's reason: Resources, Priority, None...
    queue_position: int | None = None  # 1-based among the partition's pending jobs, by priority
    estimated_start: datetime | None = None  # ``squeue --start``, local time; None: no estimate
    time_left: str | None = None  # Slurm's TIME_LEFT
    stdout_path: str | None = None
    stderr_path: str | None = None


def _resolve(spec: TypedSpec, module: Any, base: type, kind: str) -> type:
    """The class a ``type:`` name means (a name in ``parsl.providers``/``parsl.launchers``)."""
    accepted = sorted(module.__all__)
    cls = getattr(module, spec.type, None) if spec.type in accepted else None
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise InvalidSiteConfig(f"unknown {kind} type {spec.type!r}; accepted: {accepted}",
                                accepted=accepted)
    return cls


def _instantiate(cls: type, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except Exception as exc:  # TypeError, typeguard's TypeCheckError, ValueError...
        raise InvalidSiteConfig(f"{cls.__name__}({', '.join(kwargs)}): {exc}") from None


def _seconds(walltime: str) -> int:
    if not re.fullmatch(r"\d+:\d{2}:\d{2}", walltime):
        raise InvalidSiteConfig(f"walltime {walltime!r} is not HH:MM:SS")
    hours, minutes, secs = (int(p) for p in walltime.split(":"))
    return hours * 3600 + minutes * 60 + secs


class JobLauncher:
    """Submit, watch and cancel model-server jobs through one Parsl provider."""

    def __init__(self, provider: ExecutionProvider, script_dir: Path, walltime: str) -> None:
        self.provider, self._kind = provider, type(provider).__name__
        self.script_dir = Path(script_dir).resolve()
        self.script_dir.mkdir(parents=True, exist_ok=True)
        provider.script_dir = str(self.script_dir)
        self.walltime, self._seconds = walltime, _seconds(walltime)
        self._native_walltime = hasattr(provider, "walltime")
        if self._native_walltime and self._seconds < 60:
            raise InvalidSiteConfig(f"walltime {walltime!r}: schedulers count whole minutes")
        self._base_init = str(getattr(provider, "worker_init", "") or "")
        self._markers: dict[str, Path | None] = {}

    @classmethod
    def from_config(cls, jobs: JobsConfig, script_dir: Path, *, nodes: int = 1,
                    walltime: str | None = None, worker_init: str | None = None,
                    **provider_overrides: Any) -> JobLauncher:
        """Build from a site's ``jobs:`` block; keyword overrides win over the config."""
        launcher_cls = _resolve(jobs.launcher, parsl.launchers, Launcher, "launcher")
        provider_cls = _resolve(jobs.provider, parsl.providers, ExecutionProvider, "provider")
        launcher = _instantiate(launcher_cls, jobs.launcher.kwargs())
        if launcher("true", 1, 1, "").strip().splitlines()[-1].startswith('[[ "0" == "1" ]]'):
            raise InvalidSiteConfig(f"{jobs.launcher.type} with debug: false ends its script "
                                    "with a failing test, so every job exits 1: leave debug on")
        wall = walltime or jobs.walltime
        init = "\n".join(filter(None, [jobs.provider.kwargs().get("worker_init"),
                                       jobs.worker_init if worker_init is None else worker_init]))
        kwargs = {**jobs.provider.kwargs(), "launcher": launcher, "nodes_per_block": nodes,
                  "walltime": wall, "worker_init": init, **provider_overrides}
        params = inspect.signature(provider_cls).parameters  # LocalProvider has no walltime
        unused = {"walltime", "worker_init", "nodes_per_block"} - set(params)
        kwargs = {k: v for k, v in kwargs.items() if k not in unused}
        return cls(_instantiate(provider_cls, kwargs), script_dir, wall)

    def submit(self, command: str, ranks: int, nodes: int, job_name: str) -> str:
        """Launch ``ranks`` copies of ``command`` over ``nodes`` nodes; returns the job id."""
        if ranks < 1 or nodes < 1 or ranks % nodes:
            raise DeploymentError(f"cannot place {ranks} ranks on {nodes} nodes evenly",
                                  ranks=ranks, nodes=nodes)
        client = _SUBMIT_COMMAND.get(self._kind)
        if client and shutil.which(client) is None:
            raise DeploymentError(f"{client} not found on PATH: {self._kind} needs the "
                                  "scheduler's client commands here", provider=self._kind)
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", job_name) or "fabric"
        script = self.script_dir / f"{safe}.{uuid.uuid4().hex[:8]}.sh"
        script.write_text(
            "#!/bin/bash\n# written by fabric.endpoint.jobs\n"
            'if [ -n "${1:-}" ]; then FABRIC_RANK=$(( $1 - 1 )); else FABRIC_RANK='
            "${SLURM_PROCID:-${PMI_RANK:-${PALS_RANKID:-${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-0}}}}}"
            f"; fi\nexport FABRIC_RANK FABRIC_WORLD_SIZE={ranks} FABRIC_JOB_NAME={safe}\n"
            f"{command}\n")
        provider: Any = self.provider
        provider.nodes_per_block = nodes
        marker: Path | None = None
        if not self._native_walltime and hasattr(provider, "worker_init"):  # LocalProvider
            marker = script.with_suffix(".walltime")  # the watchdog kills the job's group
            provider.worker_init = (
                f"__fabric_wall() {{ sleep {self._seconds} & s=$!; "
                f"trap 'kill $s 2>/dev/null; exit 0' TERM; wait $s; "
                f"echo 'fabric: walltime {self.walltime} reached' >&2; "
                f"touch {shlex.quote(str(marker))}; kill -TERM 0; }}\n__fabric_wall & wd=$!\n"
                f"trap 'kill $wd 2>/dev/null' EXIT\n{self._base_init}")
        try:
            job_id = self.provider.submit(f'bash {shlex.quote(str(script))} "${{1:-}}"',
                                          ranks // nodes, safe)
        except Exception as exc:  # Parsl's SubmitException carries the scheduler's stderr
            raise DeploymentError(f"{self._kind} submit failed: {exc}", provider=self._kind,
                                  stderr=str(getattr(exc, "stderr", None) or "")) from None
        if not job_id:
            raise DeploymentError(f"{self._kind} submit returned no job id", provider=self._kind)
        job_id = str(job_id)  # Slurm/PBS job id; LocalProvider: PID of the job's shell
        self._markers[job_id] = marker
        return job_id

    def status(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """Current status of each job (jobs this launcher did not submit are looked up too)."""
        ids = [str(j) for j in job_ids]
        known = [j for j in ids if j in getattr(self.provider, "resources", {})]
        try:
            states = self.provider.status(known) if known else []
        except Exception as exc:
            raise DeploymentError(f"{self._kind} status failed: {exc}") from None
        parsl_status = dict(zip(known, states, strict=True))
        detail = _squeue(ids) if self._kind == "SlurmProvider" else {}
        return {jid: self._status_of(jid, parsl_status.get(jid), detail.get(jid, {}))
                for jid in ids}

    def _status_of(self, jid: str, ps: Any, d: dict[str, Any]) -> JobStatus:
        fields: dict[str, Any] = {"walltime": self.walltime if ps is not None else d.get("limit"),
                                  "reason": d.get("reason"), "queue_position": d.get("position"),
                                  "estimated_start": d.get("start"), "time_left": d.get("left")}
        state = JobState.UNKNOWN
        if ps is not None:
            state = _state(ps.state.name)
            fields.update(message=ps.message, exit_code=ps.exit_code,
                          stdout_path=ps.stdout_path, stderr_path=ps.stderr_path)
        if d and state is not JobState.CANCELLED:  # Parsl's squeue misses finished jobs' states
            state = _state(d["state"])
        elif ps is None and not d:
            alive = self._kind == "LocalProvider" and jid.isdigit() and _pid_alive(int(jid))
            state = JobState.RUNNING if alive else JobState.UNKNOWN
            fields["message"] = "unknown to this launcher and the scheduler; exit status lost"
        marker = self._markers.get(jid)
        if marker is not None and marker.exists() and state is not JobState.COMPLETED:
            state, fields["message"] = JobState.TIMEOUT, f"walltime {self.walltime} reached"
        return JobStatus(jid, state, **fields)

    def cancel(self, job_id: str) -> None:
        """Cancel a job (queued or running); cancelling a finished job is not an error."""
        job_id = str(job_id)
        if job_id in getattr(self.provider, "resources", {}):
            try:
                ok = all(self.provider.cancel([job_id]))
            except Exception as exc:
                raise DeploymentError(f"{self._kind} cancel of {job_id} failed: {exc}") from None
            if not ok:
                raise DeploymentError(f"{self._kind} could not cancel job {job_id}")
        elif self._kind == "SlurmProvider":
            if (proc := _run(["scancel", job_id])).returncode:
                raise DeploymentError(f"scancel {job_id} failed: {proc.stderr.strip()}")
        elif self._kind == "LocalProvider" and job_id.isdigit():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(int(job_id)), signal.SIGTERM)
        else:
            raise DeploymentError(f"{self._kind} cannot cancel job {job_id}: not submitted here")


def _pid_alive(pid: int) -> bool:
    with contextlib.suppress(ProcessLookupError):
        return os.getpgid(pid) > 0  # works for other users' processes too
    return False


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:  # not on PATH, or hung
        raise DeploymentError(f"{argv[0]} failed: {exc}") from None


def _squeue(job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Slurm's own view of ``job_ids``: state, reason, limit, queue position, estimated start."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    out = _run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r|%P|%l|%L"])
    keys = ("state", "reason", "partition", "limit", "left")
    info: dict[str, dict[str, Any]] = {
        jid: dict(zip(keys, [v or None for v in rest], strict=False))
        for jid, *rest in (line.split("|") for line in out.stdout.splitlines())}
    pending = [j for j, d in info.items() if d["state"] == "PENDING"]
    if not pending:
        return info  # nothing queued: no position, no estimate
    queue = [ln.split("|")[:2] for ln in
             _run(["squeue", "-h", "-t", "PD", "--sort=-p,i", "-o", "%i|%P"]).stdout.splitlines()]
    for jid in pending:  # position among the partition's pending jobs, highest priority first
        order = [j for j, part in queue if part == info[jid]["partition"]]
        info[jid]["position"] = order.index(jid) + 1 if jid in order else None
    starts = _run(["squeue", "--start", "-h", "-j", ",".join(pending), "-o", "%i|%S"]).stdout
    for line in starts.splitlines():
        jid, _, start = line.partition("|")
        with contextlib.suppress(ValueError, KeyError):  # "N/A": no estimate yet
            info[jid.strip()]["start"] = datetime.fromisoformat(start.strip())
    return info
