"""What the batch scheduler itself says about a job, asked by job id from any process::

                  +--------------------------------------------------------+
    [job ids] --->| query   -> squeue (+ sacct) / qstat -f -F json -x / pid |--> {id: JobView}
    job id    --->| cancel  -> scancel / qdel / kill the process group      |
                  +--------------------------------------------------------+

Parsl's providers only know the jobs they submitted themselves, so a request worker that did not
submit a deployment's job (or an endpoint restarted since) would see it as unknown. These ask the
scheduler about the id instead, so liveness, queue position, estimated start and cancellation
work from whichever worker asks. The parsers are pure functions over the commands' text
(tested on recorded outputs in ``tests/data/``); ``scheduler_for`` picks the one for a Parsl
provider class.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from fabric.errors import DeploymentError
from fabric.procs import process_running


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
    "OUT_OF_MEMORY": JobState.FAILED, "REQUEUE_HOLD": JobState.QUEUED,
    "REQUEUE_FED": JobState.QUEUED, "RESV_DEL_HOLD": JobState.QUEUED,
    "STAGE_OUT": JobState.RUNNING, "STOPPED": JobState.RUNNING, "SIGNALING": JobState.RUNNING,
    "RESIZING": JobState.RUNNING, "REVOKED": JobState.CANCELLED, "SPECIAL_EXIT": JobState.FAILED,
}


def state_of(name: str) -> JobState:
    """Our state for a Parsl ``JobState`` name or a Slurm state (``CANCELLED by 0`` too)."""
    name = name.split()[0] if name.strip() else name
    return _ALIASES.get(name) or JobState.__members__.get(name, JobState.UNKNOWN)


@dataclass(frozen=True)
class JobView:
    """One job as the scheduler reports it."""

    state: JobState
    raw_state: str
    """The scheduler's own word (``PENDING``, ``Q``...)."""
    reason: str | None = None
    """Why it waits (Slurm's reason; PBS's comment)."""
    queue: str | None = None
    """Partition or queue."""
    limit: str | None = None
    """Time limit as the scheduler reports it."""
    time_left: str | None = None
    position: int | None = None
    """1-based among the queue's pending jobs, highest priority first (Slurm only)."""
    estimated_start: datetime | None = None
    """The scheduler's estimate, local time; None: no estimate yet."""
    exit_code: int | None = None
    message: str | None = None


class BatchScheduler(Protocol):
    """Asks a batch system about jobs by id."""

    def query(self, job_ids: Sequence[str]) -> dict[str, JobView]:
        """What the scheduler says about each id it knows (unknown ids are left out)."""
        ...

    def cancel(self, job_id: str) -> None:
        """Cancel the job; cancelling a finished or unknown job is not an error."""
        ...


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a scheduler client command (30 s at most); ``DeploymentError`` when it cannot."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:  # not on PATH, or hung
        raise DeploymentError(f"{argv[0]} failed: {exc}") from None


def _time(text: str, fmt: str | None = None) -> datetime | None:
    with contextlib.suppress(ValueError):  # "N/A", "Unknown", "None": no estimate
        return (datetime.strptime(" ".join(text.split()), fmt) if fmt
                else datetime.fromisoformat(text.strip()))
    return None


def clock_seconds(text: str | None) -> int | None:
    """Seconds in a scheduler's clock: Slurm's ``[D-][H:]M:SS`` (``52:17``, ``1-02:00:00``)
    or PBS's ``HH:MM:SS``; None for anything else (``UNLIMITED``, ``N/A``, ``INVALID``)."""
    days, _, clock = (text or "").strip().rpartition("-")
    parts = clock.split(":")
    if not (2 <= len(parts) <= 3 and all(p.isdigit() for p in parts)) \
            or not (days.isdigit() or days == ""):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return seconds + int(days or 0) * 86400


# --- Slurm ---------------------------------------------------------------------------------------

SQUEUE_FORMAT = "%i|%T|%r|%P|%l|%L|%S"
"""Job id, state, reason, partition, time limit, time left, (expected) start time."""
SACCT_FIELDS = "JobIDRaw,State,ExitCode,Timelimit"
_SCANCEL_DONE = ("already completing or completed", "Invalid job id")


def parse_squeue(text: str) -> dict[str, JobView]:
    """``squeue -h -t all -j IDS -o SQUEUE_FORMAT`` -> views (start only for pending jobs)."""
    out = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 7 or not parts[0]:
            continue
        jid, raw, reason, part, limit, left, start = (p or None for p in parts)
        state = state_of(raw or "")
        out[str(jid)] = JobView(
            state, raw or "", reason=reason, queue=part, limit=limit, time_left=left,
            estimated_start=_time(start or "") if state is JobState.QUEUED else None)
    return out


def parse_queue_order(text: str) -> list[tuple[str, str]]:
    """``squeue -h -t PD --sort=-p,i -o %i|%P`` -> [(job id, partition)] in priority order."""
    return [(a.strip(), b.strip()) for a, _, b in (ln.partition("|") for ln in text.splitlines())
            if a.strip()]


def parse_sacct(text: str) -> dict[str, JobView]:
    """``sacct -X -n -P -j IDS -o SACCT_FIELDS`` -> views (jobs squeue has forgotten)."""
    out = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != 4 or not parts[0].strip():
            continue
        jid, raw, code, limit = (p.strip() for p in parts)
        exit_code, _, sig = code.partition(":")
        state = state_of(raw)
        out[jid] = JobView(state, raw, limit=limit or None,
                           exit_code=int(exit_code) if exit_code.isdigit() else None,
                           message=f"signal {sig}" if sig not in ("", "0") else None)
    return out


class Slurm:
    """``squeue`` for live jobs (and, with ``MinJobAge``, recently finished ones), ``sacct``
    for older ones where accounting runs, ``scancel`` to stop them."""

    def query(self, job_ids: Sequence[str]) -> dict[str, JobView]:
        """Slurm's view of ``job_ids``, with queue positions for pending jobs."""
        if not job_ids or shutil.which("squeue") is None:
            return {}
        out = run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", SQUEUE_FORMAT])
        views = parse_squeue(out.stdout)
        missing = [j for j in job_ids if j not in views]
        if missing and shutil.which("sacct"):  # without slurmdbd sacct fails: nothing added
            acct = run(["sacct", "-X", "-n", "-P", "-j", ",".join(missing), "-o", SACCT_FIELDS])
            views.update({j: v for j, v in parse_sacct(acct.stdout).items() if j in missing})
        pending = [j for j, v in views.items() if v.raw_state == "PENDING"]
        if pending:
            order = parse_queue_order(run(["squeue", "-h", "-t", "PD", "--sort=-p,i", "-o",
                                           "%i|%P"]).stdout)
            for jid in pending:
                ahead = [j for j, part in order if part == views[jid].queue]
                if jid in ahead:
                    views[jid] = replace(views[jid], position=ahead.index(jid) + 1)
        return views

    def cancel(self, job_id: str) -> None:
        """``scancel``; a job that already finished (or that Slurm forgot) is fine."""
        proc = run(["scancel", job_id])
        if proc.returncode and not any(s in proc.stderr for s in _SCANCEL_DONE):
            raise DeploymentError(f"scancel {job_id} failed: {proc.stderr.strip()}")


# --- PBS Pro -------------------------------------------------------------------------------------

_PBS_STATES = {  # job_state letters (qstat(1B)); E still holds its nodes
    "Q": JobState.QUEUED, "H": JobState.QUEUED, "W": JobState.QUEUED, "T": JobState.QUEUED,
    "S": JobState.QUEUED, "U": JobState.QUEUED, "R": JobState.RUNNING, "E": JobState.RUNNING,
    "B": JobState.RUNNING, "M": JobState.UNKNOWN,
}
_PBS_TIME = "%a %b %d %H:%M:%S %Y"  # ctime(3): "Wed Dec  2 09:12:00 2026"
_PBS_KILL_WALLTIME = -29  # JOB_EXEC_KILL_WALLTIME


def _seconds(hms: Any) -> int | None:
    parts = str(hms or "").split(":")
    return (int(parts[0]) * 3600 + int(parts[1]) * 60 + int(parts[2])
            if len(parts) == 3 and all(p.isdigit() for p in parts) else None)


def _pbs_finished(job: dict[str, Any]) -> tuple[JobState, int | None]:
    """State of a finished (F/X) job from its exit status: 0 completed; -29 or a used
    walltime at the limit timed out; 256+SIGTERM/SIGKILL (qdel) or no exit status (deleted
    before it ran) cancelled; anything else failed."""
    status = job.get("Exit_status")
    limit = _seconds((job.get("Resource_List") or {}).get("walltime"))
    used = _seconds((job.get("resources_used") or {}).get("walltime"))
    if status is None:
        return JobState.CANCELLED, None
    code = int(status)
    if code == 0:
        return JobState.COMPLETED, 0
    if code == _PBS_KILL_WALLTIME or (limit is not None and used is not None and used >= limit):
        return JobState.TIMEOUT, code
    if code - 256 in (signal.SIGTERM, signal.SIGKILL):
        return JobState.CANCELLED, code
    return JobState.FAILED, code


def parse_qstat_json(text: str) -> dict[str, JobView]:
    """``qstat -f -F json -x IDS`` -> views (``estimated.start_time`` for queued jobs)."""
    try:
        jobs = (json.loads(text) or {}).get("Jobs") or {}
    except ValueError:
        return {}
    out = {}
    for jid, job in jobs.items():
        raw = str(job.get("job_state", ""))
        state, code = _PBS_STATES.get(raw, JobState.UNKNOWN), job.get("Exit_status")
        if raw in ("F", "X"):
            state, code = _pbs_finished(job)
        limit = (job.get("Resource_List") or {}).get("walltime")
        used = _seconds((job.get("resources_used") or {}).get("walltime"))
        left = None
        if state is JobState.RUNNING and _seconds(limit) is not None and used is not None:
            rest = max(0, (_seconds(limit) or 0) - used)
            left = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
        start = (job.get("estimated") or {}).get("start_time")
        out[str(jid)] = JobView(
            state, raw, reason=job.get("comment"), queue=job.get("queue"), limit=limit,
            time_left=left, exit_code=None if code is None else int(code),
            estimated_start=(_time(str(start), _PBS_TIME)
                             if start and state is JobState.QUEUED else None))
    return out


class PBSPro:
    """``qstat -f -F json -x`` (``-x``: finished jobs too, while the server keeps history),
    ``qdel`` to stop them."""

    def query(self, job_ids: Sequence[str]) -> dict[str, JobView]:
        """PBS's view of ``job_ids`` (unknown ids are left out: qstat names them on stderr)."""
        if not job_ids or shutil.which("qstat") is None:
            return {}
        return parse_qstat_json(run(["qstat", "-f", "-F", "json", "-x", *job_ids]).stdout)

    def cancel(self, job_id: str) -> None:
        """``qdel``; a job that already finished is fine."""
        proc = run(["qdel", job_id])
        if proc.returncode and "finished" not in proc.stderr and "Unknown Job" not in proc.stderr:
            raise DeploymentError(f"qdel {job_id} failed: {proc.stderr.strip()}")


# --- LocalProvider: the job id is the pid of the job's shell ------------------------------------

class LocalJobs:
    """Jobs of Parsl's ``LocalProvider`` on this host, by pid: running while the job's shell
    lives (its exit status is only known to the process that started it)."""

    def query(self, job_ids: Sequence[str]) -> dict[str, JobView]:
        """``RUNNING`` for each id whose shell lives; dead or foreign ids are left out."""
        return {j: JobView(JobState.RUNNING, "alive") for j in job_ids
                if j.isdigit() and process_running(int(j))}

    def cancel(self, job_id: str) -> None:
        """TERM the job's process group (the shell, its ranks and the walltime watchdog)."""
        if not job_id.isdigit():
            raise DeploymentError(f"LocalProvider job ids are pids, not {job_id!r}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(int(job_id)), signal.SIGTERM)


def scheduler_for(provider_kind: str) -> BatchScheduler | None:
    """The scheduler behind a Parsl provider class name, or None where none is known."""
    kinds: dict[str, type[Slurm | PBSPro | LocalJobs]] = {
        "SlurmProvider": Slurm, "PBSProProvider": PBSPro, "LocalProvider": LocalJobs}
    cls = kinds.get(provider_kind)
    return cls() if cls else None
