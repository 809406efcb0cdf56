"""Model servers as batch jobs: three verbs over a real Parsl provider and launcher::

                      +----------------------------------------------------+
    command, ranks -->| submit  -> Parsl provider (sbatch/qsub/sh)         |--> job id
    [job ids]      -->| status  -> Parsl state + the scheduler's own view  |--> {id: JobStatus}
    job id         -->| cancel  -> Parsl, else scancel / qdel / kill group |
                      +----------------------------------------------------+

``status`` and ``cancel`` work for any job id, not only this launcher's submissions: they ask
the scheduler itself (``fabric.endpoint.schedulers``: squeue/sacct, qstat, the pid), so every
request worker of a site sees a queued deployment as queued and can cancel it.

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

import inspect
import re
import shlex
import shutil
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

from fabric.endpoint.schedulers import JobState, JobView, scheduler_for, state_of
from fabric.errors import DeploymentError, InvalidSiteConfig
from fabric.sitepolicy import walltime_seconds
from fabric.sites import JobsConfig, TypedSpec

__all__ = ["JobLauncher", "JobState", "JobStatus"]

_SUBMIT_COMMAND = {"SlurmProvider": "sbatch", "PBSProProvider": "qsub", "TorqueProvider": "qsub",
                   "GridEngineProvider": "qsub", "LSFProvider": "bsub"}  # checked before submit


@dataclass(frozen=True)
class JobStatus:
    """One job's state plus what the scheduler says about it (detail where it reports it)."""

    job_id: str
    state: JobState
    message: str | None = None  # provider's note, or why the state is a guess
    exit_code: int | None = None
    walltime: str | None = None  # time limit as submitted (HH:MM:SS) or as Slurm reports it
    reason: str | None = None  # Slurm's reason (Resources, Priority, None...); PBS's comment
    queue_position: int | None = None  # 1-based among the partition's pending jobs (Slurm)
    estimated_start: datetime | None = None  # the scheduler's estimate, local time; None: none
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


def _check_types(cls: type, kwargs: dict[str, Any], where: str) -> None:
    """Refuse a value of another type than a parameter's plain annotation (``int``, ``float``,
    ``str``, ``bool``) or, unannotated, its default: Parsl's PBS provider, unlike its
    typeguarded Slurm one, would write ``cpus_per_node: sixtyfour`` straight into
    ``#PBS -l select=...:ncpus=sixtyfour``, and a launcher's ``debug: "yes"`` fails in its
    script template."""
    params = inspect.signature(cls).parameters
    for name, value in kwargs.items():
        param = params.get(name)
        if param is None:
            continue  # the constructor names what it does not take
        plain = param.annotation if param.annotation is not param.empty \
            else type(param.default)
        accepted = _ACCEPTED_TYPES.get(_PLAIN.get(plain, plain))
        if accepted and (not isinstance(value, accepted)
                         or (isinstance(value, bool) and bool not in accepted)):
            raise InvalidSiteConfig(
                f"{where}.{name}: {value!r} is not {' or '.join(t.__name__ for t in accepted)}"
                f" ({cls.__name__}({name}=...))", key=f"{where}.{name}")


_ACCEPTED_TYPES: dict[type, tuple[type, ...]] = {
    int: (int,), float: (int, float), str: (str,), bool: (bool,)}
"""What a value given for a parameter with an ``int``/``float``/``str``/``bool`` type may be."""
_PLAIN: dict[Any, type] = {t.__name__: t for t in _ACCEPTED_TYPES}
"""The same types as string annotations (modules with ``from __future__ import annotations``)."""


def _instantiate(cls: type, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except Exception as exc:  # TypeError, typeguard's TypeCheckError, ValueError...
        raise InvalidSiteConfig(f"{cls.__name__}({', '.join(kwargs)}): {exc}") from None


def _seconds(walltime: str) -> int:
    try:
        return walltime_seconds(walltime)
    except ValueError as exc:
        raise InvalidSiteConfig(str(exc), walltime=walltime) from None


class _DryRun(Exception):
    """Raised in place of a scheduler's submit command by ``JobLauncher.render``."""


def check_placement(ranks: int, nodes: int) -> None:
    """``DeploymentError`` unless ``ranks`` spread evenly over ``nodes`` (the launchers start
    the same number of ranks on every node of a job)."""
    if ranks < 1 or nodes < 1 or ranks % nodes:
        raise DeploymentError(f"cannot place {ranks} ranks on {nodes} nodes evenly: ranks "
                              "(pp x tp) must be a multiple of nodes", ranks=ranks, nodes=nodes)


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
        self._scheduler = scheduler_for(self._kind)

    @classmethod
    def from_config(cls, jobs: JobsConfig, script_dir: Path, *, nodes: int = 1,
                    walltime: str | None = None, worker_init: str | None = None,
                    **provider_overrides: Any) -> JobLauncher:
        """Build from a site's ``jobs:`` block; keyword overrides win over the config."""
        launcher_cls = _resolve(jobs.launcher, parsl.launchers, Launcher, "launcher")
        provider_cls = _resolve(jobs.provider, parsl.providers, ExecutionProvider, "provider")
        _check_types(launcher_cls, jobs.launcher.kwargs(), "jobs.launcher")
        _check_types(provider_cls, jobs.provider.kwargs(), "jobs.provider")
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
        check_placement(ranks, nodes)
        client = _SUBMIT_COMMAND.get(self._kind)
        if client and shutil.which(client) is None:
            raise DeploymentError(f"{client} not found on PATH: {self._kind} needs the "
                                  "scheduler's client commands here", provider=self._kind)
        try:
            job_id = self._provider_submit(command, ranks, nodes, job_name)
        except Exception as exc:  # Parsl's SubmitException carries the scheduler's stderr
            raise DeploymentError(f"{self._kind} submit failed: {exc}", provider=self._kind,
                                  stderr=str(getattr(exc, "stderr", None) or "")) from None
        if not job_id:
            raise DeploymentError(f"{self._kind} submit returned no job id", provider=self._kind)
        return str(job_id)  # Slurm/PBS job id; LocalProvider: PID of the job's shell

    def render(self, command: str, ranks: int, nodes: int, job_name: str) -> tuple[str, str]:
        """Dry run of ``submit`` (``fabric site check``): ``(batch script, submit command)``
        exactly as ``submit`` would hand them to the scheduler, which is never called. The
        same checks refuse the same plans; a ``LocalProvider`` job has no batch script."""
        check_placement(ranks, nodes)
        if self._kind == "LocalProvider":  # runs its command through a module-level call
            return "(LocalProvider: runs the command directly)", ""
        calls: list[str] = []

        def dry_run(cmd: str, timeout: int | None = None) -> tuple[int, str, str]:
            calls.append(cmd)
            raise _DryRun  # the script is written; stop before parsing a scheduler's reply

        before = set(self.script_dir.iterdir())
        provider: Any = self.provider
        provider.execute_wait = dry_run
        try:
            self._provider_submit(command, ranks, nodes, job_name)
        except _DryRun:
            pass
        finally:
            del provider.execute_wait  # the class's own again
        # The provider's script is the one the submit command names (not our rank wrapper).
        written = [p for p in set(self.script_dir.iterdir()) - before if calls and
                   str(p) in calls[0] and p.suffix not in (".stdout", ".stderr")]
        if not written:
            raise InvalidSiteConfig(f"{self._kind} wrote no submit script", provider=self._kind)
        return min(written, key=lambda p: len(p.name)).read_text(), calls[0]

    def _provider_submit(self, command: str, ranks: int, nodes: int, job_name: str) -> Any:
        """Write ``command``'s rank script and hand it to the provider; its raw job id."""
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
        # exec: the launcher's per-rank wrapper (srun's or mpiexec's cmd_*.sh, a
        # SingleNodeLauncher copy) becomes the script, so no shell that dies of the scheduler's
        # SIGTERM is left between the job and its rank (``server_command``). SimpleLauncher
        # puts the command in the batch script itself, which must go on after it.
        run = "" if type(getattr(provider, "launcher", None)).__name__ == "SimpleLauncher" \
            else "exec "
        job_id = self.provider.submit(f'{run}bash {shlex.quote(str(script))} "${{1:-}}"',
                                      ranks // nodes, safe)
        if job_id:
            self._markers[str(job_id)] = marker
        return job_id

    def status(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """Current status of each job, whoever submitted it: Parsl's record for this launcher's
        own jobs, and the scheduler's view (``schedulers``) for every id."""
        ids = [str(j) for j in job_ids]
        known = [j for j in ids if j in getattr(self.provider, "resources", {})]
        try:
            states = self.provider.status(known) if known else []
        except Exception as exc:
            raise DeploymentError(f"{self._kind} status failed: {exc}") from None
        parsl_status = dict(zip(known, states, strict=True))
        views = self._scheduler.query(ids) if self._scheduler else {}
        return {jid: self._status_of(jid, parsl_status.get(jid), views.get(jid)) for jid in ids}

    def _status_of(self, jid: str, ps: Any, view: JobView | None) -> JobStatus:
        fields: dict[str, Any] = {"walltime": self.walltime if ps is not None else None}
        state = JobState.UNKNOWN
        if ps is not None:
            state = state_of(ps.state.name)
            fields.update(message=ps.message, exit_code=ps.exit_code,
                          stdout_path=ps.stdout_path, stderr_path=ps.stderr_path)
        if view is not None:
            fields.update(reason=view.reason, queue_position=view.position,
                          estimated_start=view.estimated_start, time_left=view.time_left)
            fields["walltime"] = fields["walltime"] or view.limit
            # The scheduler knows better than Parsl's bookkeeping (which misses finished jobs'
            # states), except right after Parsl cancelled the job itself, or when Parsl saw it
            # end while the scheduler still winds it down.
            if state is JobState.UNKNOWN or (
                    view.state is not JobState.UNKNOWN and state is not JobState.CANCELLED
                    and (view.state.terminal or not state.terminal)):
                state = view.state
                fields["exit_code"] = fields.get("exit_code", view.exit_code)
                if ps is None:
                    fields["message"] = view.message
        elif ps is None:
            fields["message"] = "unknown to this launcher and the scheduler; exit status lost"
        marker = self._markers.get(jid)
        if marker is not None and marker.exists() and state is not JobState.COMPLETED:
            state, fields["message"] = JobState.TIMEOUT, f"walltime {self.walltime} reached"
        return JobStatus(jid, state, **fields)

    def cancel(self, job_id: str) -> None:
        """Cancel a job (queued or running), whoever submitted it; cancelling a finished job
        is not an error."""
        job_id = str(job_id)
        if job_id in getattr(self.provider, "resources", {}):
            try:
                ok = all(self.provider.cancel([job_id]))
            except Exception as exc:
                raise DeploymentError(f"{self._kind} cancel of {job_id} failed: {exc}") from None
            if not ok:
                raise DeploymentError(f"{self._kind} could not cancel job {job_id}")
        elif self._scheduler is not None:
            self._scheduler.cancel(job_id)
        else:
            raise DeploymentError(f"{self._kind} cannot cancel job {job_id}: not submitted here "
                                  "and no scheduler client known for it", provider=self._kind)
