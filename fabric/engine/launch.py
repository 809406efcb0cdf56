"""What the endpoint hands a model server when it launches one (``ServerLaunchConfig``).

The deployment manager writes this as JSON next to the job; every rank of the job reads the
same file (``python -m fabric.engine.server CONFIG_JSON``). Nothing else configures a server:
no hidden environment variables beyond the launcher's own rank variables (``fabric.env``). The
plan's device decides DeepSpeed's accelerator (``select_accelerator``).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fabric import env
from fabric.catalog import CatalogEntry
from fabric.errors import AcceleratorUnavailable
from fabric.sites import Plan, ServerConfig
from fabric.weights import HashClaim, LocatedWeights, PreparedWeights


class ServerLaunchConfig(BaseModel):
    """Everything a model server's ranks need to start."""

    model_config = ConfigDict(extra="forbid")
    deployment_id: str
    """Deployment record id (names the info file and logs)."""
    model: CatalogEntry
    """Catalog entry being served."""
    weights_path: str
    """Folder with config.json, tokenizer and safetensors (for a GGUF entry, its conversion
    cache, filled by the server on its node: ``fabric.weights.materialize``)."""
    sha256: str | None = None
    """The weights hash as far as the site knows it (``None``: not known yet). The server
    settles the hash on its node (``fabric.weights.HashJob``: trusted while ``weights_claim``'s
    stamp matches, else computed there) and reports it with every result and in its info
    file; the launching request worker never reads the weight files."""
    weights_claim: HashClaim = Field(default_factory=HashClaim)
    """How far the server may trust ``sha256`` (stamp, registered, verify once)."""
    shard_dir: str | None = None
    """Pre-sharded checkpoint (``fabric shard``) matching ``plan``; ``None`` reads slices from
    ``weights_path`` directly."""
    plan: Plan = Field(default_factory=Plan)
    """pp x tp plan."""
    server: ServerConfig = Field(default_factory=ServerConfig)
    """Scheduler, queue and idle settings."""
    state_dir: str
    """Site state dir (keys, logs)."""
    ticket_key_path: str
    """HMAC key shared with the endpoint (mode 0600)."""
    curve_dir: str
    """Folder holding the server's CURVE key pair (created if missing, mode 0600)."""
    master_addr: str = "127.0.0.1"
    """torch.distributed rendezvous host. Loopback (the default) is right for a job on one
    node: every rank shares the head's host. ``auto``: the job's first node (from
    ``SLURM_JOB_NODELIST`` or ``PBS_NODEFILE``), for jobs spanning nodes. Where the head's
    front door listens and what it advertises is ``server.network``, resolved on the head's
    node (``fabric.engine.netaddr``)."""
    master_port: int = Field(default=0, ge=0, le=65535)
    """torch.distributed rendezvous port. 0 (the default): rank 0 binds a free port on its own
    node and publishes it in ``rendezvous_path`` (``fabric.engine.rendezvous``); a port picked
    on the submitting host could be taken on the node that runs rank 0."""
    info_path: str
    """JSON file the head writes once bound: address, public_key, pid, state."""
    rendezvous_token: str = Field(default_factory=lambda: secrets.token_hex(8))
    """Names this launch in the rendezvous file, so a file from another launch is never used."""

    @property
    def rendezvous_path(self) -> Path:
        """Where rank 0 publishes the rendezvous port: next to the info file, in the job's run
        folder, which every rank reads ``launch.json`` from."""
        return Path(self.info_path).with_name("rendezvous.json")

    def write(self, path: Path) -> None:
        """Save as JSON (mode 0600: it names key paths)."""
        path.write_text(self.model_dump_json(indent=2))
        path.chmod(0o600)

    @classmethod
    def read(cls, path: Path) -> ServerLaunchConfig:
        """Load from JSON."""
        return cls.model_validate(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class ServerLaunch:
    """A model server's launch, written to disk and ready to submit as a job."""

    config: ServerLaunchConfig
    config_path: Path
    """The ``launch.json`` every rank reads."""
    command: str
    """The shell command every rank runs (``server_command``)."""

    def submit(self, launcher: Any, job_name: str) -> str:
        """Submit the job (``plan.ranks`` copies over ``plan.nodes``) through ``launcher`` (a
        ``fabric.endpoint.jobs.JobLauncher``); returns its job id."""
        plan = self.config.plan
        return str(launcher.submit(self.command, ranks=plan.ranks, nodes=plan.nodes,
                                   job_name=job_name))


def prepare_server_launch(deployment_id: str, entry: CatalogEntry,
                          weights: PreparedWeights | LocatedWeights,
                          plan: Plan, server: ServerConfig, state_dir: Path, folder: Path,
                          shard_dir: str | None = None) -> ServerLaunch:
    """Write ``folder/launch.json`` for a model server and return the command its ranks run.

    The one place a launch is assembled (the deployment manager, the test fixtures and the
    benchmarks all call it): keys live in ``state_dir`` (``ticket.key``, ``curve/``), the head
    writes ``folder/info.json``, the rendezvous host is loopback for one node and the job's first
    node (``auto``) for more, its port is chosen by rank 0 where it runs (``master_port`` 0,
    published in ``folder/rendezvous.json``), and each rank gets ``server.threads_per_rank``
    threads, or its node's cores split between the ranks sharing it. ``weights`` is either
    hashed already (``fabric.weights.prepare``: trusted as is) or located
    (``fabric.weights.locate``: the server settles the hash on its node).
    """
    claim = weights.claim if isinstance(weights, LocatedWeights) else HashClaim()
    config = ServerLaunchConfig(
        deployment_id=deployment_id, model=entry, weights_path=str(weights.path),
        sha256=weights.sha256, weights_claim=claim, shard_dir=shard_dir, plan=plan, server=server,
        state_dir=str(state_dir), ticket_key_path=str(state_dir / "ticket.key"),
        curve_dir=str(state_dir / "curve"), master_port=0,
        master_addr="auto" if plan.nodes > 1 else "127.0.0.1",
        info_path=str(folder / "info.json"))
    config_path = folder / "launch.json"
    config.rendezvous_path.unlink(missing_ok=True)
    config.write(config_path)
    per_node = -(-plan.ranks // plan.nodes)
    threads = threads_per_rank(server.threads_per_rank, per_node)
    return ServerLaunch(config, config_path, server_command(config_path, threads))


def server_command(config_path: Path, threads_per_rank: int, python: str | None = None) -> str:
    """The shell command every rank of a model-server job runs.

    ``OMP_NUM_THREADS`` must be set before torch starts: ranks sharing a node with the default
    thread count oversubscribe the cores and a decode step gets 5-20x slower. Parsl's
    ``SingleNodeLauncher`` passes the copy index as ``$1``; under srun/mpiexec it is empty and
    the rank comes from the launcher's variables.

    ``exec``: the rank replaces the job script's shell, so the scheduler's signals reach it
    (SIGTERM at walltime, then SIGKILL). A shell left in between dies of the SIGTERM, and a
    scheduler that tracks a job's processes by parentage (Slurm's ``proctrack/linuxproc``)
    then loses the orphaned rank, which outlives its job.
    """
    import shlex
    import sys

    exe = shlex.quote(python or sys.executable)
    return (f"{env.OMP_NUM_THREADS.name}={max(1, threads_per_rank)} exec "
            f"{exe} -m fabric.engine.server {shlex.quote(str(config_path))} "
            "--launch-index ${1:-0}")


def accelerator_setting(device: str) -> str | None:
    """``DS_ACCELERATOR`` for a plan's device: ``cpu`` for cpu; ``None`` (unset: DeepSpeed
    detects the GPU) for cuda. Raises ``AcceleratorUnavailable`` for devices not served yet."""
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        return None
    raise AcceleratorUnavailable(f"device {device!r} is not supported by the model server yet; "
                                 "plans may say cpu or cuda", device=device)


def select_accelerator(device: str) -> str:
    """Point DeepSpeed at the plan's device; the server calls this before importing DeepSpeed.

    cpu sets ``DS_ACCELERATOR=cpu``. cuda drops any inherited ``DS_ACCELERATOR`` and lets
    DeepSpeed detect the GPU, then checks it did: with no visible GPU DeepSpeed would quietly
    fall back to the CPU, so this raises ``AcceleratorUnavailable`` instead. Returns the
    accelerator DeepSpeed will use.
    """
    setting = accelerator_setting(device)
    if setting is not None:
        env.DS_ACCELERATOR.set(setting)
        return setting
    env.DS_ACCELERATOR.unset()
    import torch

    if not torch.cuda.is_available():
        raise AcceleratorUnavailable("the plan says device cuda but this node has no usable GPU "
                                     "(torch.cuda.is_available() is False); DeepSpeed would "
                                     "fall back to the CPU", device=device)
    from deepspeed.accelerator import get_accelerator

    chosen = str(get_accelerator().device_name())
    if chosen != "cuda":
        raise AcceleratorUnavailable(f"the plan says device cuda but DeepSpeed picked {chosen!r}",
                                     device=device, accelerator=chosen)
    return chosen


def threads_per_rank(configured: int, ranks_on_node: int) -> int:
    """Threads for each rank: the configured number, else this node's cores split evenly."""
    import os

    if configured:
        return configured
    return max(1, len(os.sched_getaffinity(0)) // max(1, ranks_on_node))
