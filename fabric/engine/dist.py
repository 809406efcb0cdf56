"""Rank identity and process groups for a pp x tp model server.

Ranks learn who they are from the launcher's environment: the fabric's job script
(``fabric.endpoint.jobs``) exports ``FABRIC_RANK``; otherwise ``srun`` sets ``SLURM_PROCID``,
``mpiexec`` sets ``PMI_RANK`` (``PMIX_RANK``, ``PALS_RANKID``, ``OMPI_COMM_WORLD_RANK`` on other
MPIs), torchrun sets ``RANK``, and Parsl's ``SingleNodeLauncher`` passes the 1-based copy index
as the command's first argument (``--launch-index``). Global rank r maps to stage ``r // tp``
and tensor rank ``r % tp``; rank 0 (stage 0, tp rank 0) is the head.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from fabric import env
from fabric.engine import rendezvous
from fabric.engine.netaddr import resolve
from fabric.errors import InvalidPlan
from fabric.sites import NetworkConfig


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the pp x tp grid."""

    rank: int
    world: int
    pp: int
    tp: int

    @property
    def stage(self) -> int:
        """Pipeline stage of this rank."""
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        """Rank within the stage's tensor-parallel group."""
        return self.rank % self.tp

    @property
    def is_head(self) -> bool:
        """True for the rank that owns the socket and the scheduler."""
        return self.rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True when this rank holds the final norm and the LM head."""
        return self.stage == self.pp - 1

    @property
    def is_stage_leader(self) -> bool:
        """True for tp rank 0 of a stage: it talks to the neighbouring stages."""
        return self.tp_rank == 0

    def leader_of(self, stage: int) -> int:
        """Global rank of ``stage``'s leader."""
        return stage * self.tp


def rank_from_env(pp: int, tp: int, launch_index: int | None = None) -> RankInfo:
    """This process's ``RankInfo`` from the launcher's environment (or the copy index)."""
    world = pp * tp
    rank = env.launcher_rank()
    if rank is None:
        rank = (launch_index - 1) if launch_index else 0
    if not 0 <= rank < world:
        raise RuntimeError(f"rank {rank} outside a pp={pp} x tp={tp} job of {world} ranks")
    return RankInfo(rank=rank, world=world, pp=pp, tp=tp)


@dataclass
class Groups:
    """The process groups one rank takes part in."""

    tp_group: dist.ProcessGroup | None
    wire: dist.ProcessGroup | None = None
    """Group for the pipeline's CPU messages (step plans, hidden states) when the default
    backend is nccl, which sends only GPU tensors; None means the default (gloo) group."""
    tp_wire: dist.ProcessGroup | None = None
    """The stage's tp ranks over gloo, for broadcasting steps, when the default is nccl."""

    def tp_comm(self) -> TPGroup | None:
        """The stage's tensor-parallel collectives, or None when tp = 1."""
        return None if self.tp_group is None else TPGroup(self.tp_group)


class TPGroup:
    """All-reduce and all-gather over one stage's tp ranks (``model.TensorParallel``)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum ``t`` over the group, in place."""
        dist.all_reduce(t, group=self.group)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on all ranks), in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return parts


def resolve_master(addr: str) -> str:
    """The rendezvous host: ``addr`` itself, or for ``auto`` the job's first node (from the
    scheduler's node list). ``auto`` outside a Slurm or PBS job raises ``InvalidPlan``: a job
    spanning nodes with no node list cannot be located, and loopback would be a guess."""
    if addr != "auto":
        return addr
    import subprocess

    nodelist = env.SLURM_JOB_NODELIST.get()
    if nodelist:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                             capture_output=True, text=True, check=True).stdout
        first = out.split()[0]
        # A node's name need not resolve (DNS-less clusters, the tests' namespace hosts):
        # Slurm reaches it at its NodeAddr, and so do the other ranks.
        shown = subprocess.run(["scontrol", "show", "node", "-o", first],
                               capture_output=True, text=True, check=False).stdout
        return node_addr(shown) or first
    nodefile = env.PBS_NODEFILE.get()
    if nodefile:
        with open(nodefile) as fh:
            return fh.readline().strip()
    raise InvalidPlan("master_addr 'auto' (a plan spanning nodes) needs a Slurm or PBS job "
                      "(SLURM_JOB_NODELIST or PBS_NODEFILE); none is set")


def node_addr(scontrol_node: str) -> str | None:
    """The ``NodeAddr`` in one ``scontrol show node -o`` line, if any."""
    for field in scontrol_node.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1] or None
    return None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def socket_interface(master_addr: str, network: NetworkConfig | None) -> str | None:
    """The interface the ranks' gloo (and nccl bootstrap) sockets should use: ``lo`` for a
    loopback rendezvous (gloo otherwise picks the interface of the host name, which may not be
    loopback), else the interface the site's network setting resolves to on this node; None
    (the libraries choose) when that setting is loopback, which says nothing about the nodes."""
    if is_loopback(master_addr):
        return "lo"
    if network is None:
        return None
    chosen = resolve(network.advertise)
    return None if chosen.address.is_loopback else chosen.name


def init_groups(info: RankInfo, master_addr: str, master_port: int, backend: str,
                network: NetworkConfig | None = None, rendezvous_file: Path | None = None,
                token: str = "", timeout: timedelta = timedelta(minutes=30)) -> Groups:
    """Join the job's process group and build one tp group per stage.

    ``master_port`` 0 (what launches use): rank 0 binds the rendezvous store on a free port of
    its own node and publishes it in ``rendezvous_file`` under ``token``; the other ranks read
    it there (``fabric.engine.rendezvous``). A fixed port is used as given. A job on one node
    rendezvouses over loopback. Across nodes the ranks talk over the interface the site's
    ``network`` setting resolves to on each node (``GLOO_SOCKET_IFNAME``, and
    ``NCCL_SOCKET_IFNAME`` for nccl's bootstrap), unless the environment already names one.
    """
    if info.world == 1:
        return Groups(tp_group=None)
    store: dist.Store | None = None
    if master_port == 0:
        if rendezvous_file is None:
            raise ValueError("master_port 0 needs a rendezvous_file to publish the port in")
        if info.rank == 0:
            master_addr = resolve_master(master_addr)
            store = rendezvous.master_store(rendezvous_file, token, master_addr, info.world,
                                            timeout)
        else:  # rank 0's address and port, as rank 0 resolved and bound them
            master_addr, store = rendezvous.client_store(rendezvous_file, token, info.world,
                                                         timeout)
    else:
        master_addr = resolve_master(master_addr)
    interface = socket_interface(master_addr, network)
    if interface is not None:
        env.GLOO_SOCKET_IFNAME.setdefault(interface)
        if interface != "lo":
            env.NCCL_SOCKET_IFNAME.setdefault(interface)
    # torch.distributed directly: deepspeed.comm.init_distributed (0.19.8) hangs on CPU/gloo
    # when given an explicit init_method, so DeepSpeed is used for inference only.
    if store is not None:
        dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                                rank=info.rank, world_size=info.world, timeout=timeout)
    # With nccl (GPUs) the tensor-parallel all-reduces stay on nccl, and the control plane (the
    # pickled step plan and the stage hand-off, CPU tensors) gets gloo groups. Every rank
    # creates every group, in the same order, as torch.distributed requires.
    side = backend != "gloo"
    wire = dist.new_group(list(range(info.world)), backend="gloo") if side else None
    tp_group = tp_wire = None
    for stage in range(info.pp):
        ranks = list(range(stage * info.tp, (stage + 1) * info.tp))
        group = dist.new_group(ranks) if info.tp > 1 else None
        cpu = dist.new_group(ranks, backend="gloo") if info.tp > 1 and side else None
        if stage == info.stage:
            tp_group, tp_wire = group, cpu
    return Groups(tp_group=tp_group, wire=wire, tp_wire=tp_wire)
