"""A multi-host Slurm site in a box: network namespaces as hosts, a real Slurm across them.

Four hosts, each a network namespace (and its own hostname, through a UTS namespace):

- ``login`` (198.18.16.2 on ``hsn0``): ``munged`` and ``slurmctld``; where a site endpoint runs;
- ``compute1`` / ``compute2`` (198.18.16.11 / .12 on ``hsn0``): one ``slurmd -N <name>`` each,
  so a job's ranks run in the namespace (and at the address) of the node Slurm gave them;
- ``laptop`` (198.18.17.2 on ``eth0``): a veth to ``login``'s ``lan0`` (198.18.17.1) and
  nothing else: no route to the compute nodes (``login`` does not forward).

The ``hsn0`` ends (named after Slingshot) hang off a bridge ``fabcl-br0`` in the host namespace,
which has 198.18.16.1: the test process itself stands on the compute network, like a second
login node, so Slurm's client commands and the deployment manager work from it unchanged.
Only 198.18.0.0/15 (the benchmarking range) is used.

The file system is shared, so munge works across hosts through one socket and key, and every
host sees the same ``slurm.conf``, spool and logs under the cluster's folder.

``start`` removes whatever a crashed earlier run left (namespaces named ``fabcl-*``: every
process in them is killed first; the bridge), then builds the cluster and waits until both
nodes are idle. ``stop`` kills every process in the namespaces and deletes them: nothing
survives it, whatever state the cluster was in. Needs root, ``ip`` and ``unshare``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fabric import env
from fabric.errors import FabricError

PREFIX = "fabcl-"
"""Every namespace and host-side link of the cluster starts with this (leftover cleanup)."""
BRIDGE = f"{PREFIX}br0"
SUBNET = "198.18.16.0/24"
"""The compute network: login, the compute nodes and the host (bridge) are on it."""
LAN = "198.18.17.0/24"
"""The laptop's only link, to the login node."""
HOST_ADDR = "198.18.16.1"
LOGIN_ADDR = "198.18.16.2"
LOGIN_LAN_ADDR = "198.18.17.1"
LAPTOP_ADDR = "198.18.17.2"
COMPUTE_ADDRS = {"compute1": "198.18.16.11", "compute2": "198.18.16.12"}
SLURMCTLD_PORT = 6817
SLURMD_PORT = 6818
PARTITION = "debug"
SBIN = ("/usr/sbin", "/sbin")
NEEDED = ("ip", "nsenter", "unshare", "munged", "mungekey", "slurmctld", "slurmd", "sbatch",
          "squeue", "scontrol", "sinfo")


class ClusterUnavailable(FabricError):
    """The namespace cluster cannot be built here (not root, a tool missing, a daemon that
    did not start); the message says which. Retrying does not help until that is fixed."""


@dataclass(frozen=True)
class Host:
    """One host of the cluster: a network namespace with its own hostname."""

    name: str
    netns: str
    address: str
    """Its address on the network it is known by (``hsn0``, or the laptop's ``eth0``)."""

    def prefix(self) -> list[str]:
        """argv prefix that runs a command on this host (its namespace and hostname)."""
        # nsenter, not `ip netns exec`: that remounts /sys, which hides /sys/fs/cgroup from
        # slurmd (it then refuses to start)
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--uts", "sh", "-c",
                f'hostname {shlex.quote(self.name)} && exec "$@"', "sh"]

    def run(self, argv: Sequence[str], timeout: float = 60.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on this host to completion (output captured, never raises on rc)."""
        return subprocess.run([*self.prefix(), *argv], capture_output=True, text=True,
                              timeout=timeout, check=False, env=env)

    def pids(self) -> list[int]:
        """Every process in this host's namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                             text=True, check=False).stdout
        return [int(p) for p in out.split()]


@dataclass
class NetnsCluster:
    """A running namespace cluster (see the module docstring)."""

    dir: Path
    conf: Path
    hosts: dict[str, Host] = field(default_factory=dict)
    cpus: int = 4
    """CPUs each compute node advertises."""
    partition: str = PARTITION

    @property
    def login(self) -> Host:
        return self.hosts["login"]

    @property
    def laptop(self) -> Host:
        return self.hosts["laptop"]

    @property
    def computes(self) -> list[Host]:
        return [self.hosts[n] for n in COMPUTE_ADDRS]

    def env(self) -> dict[str, str]:
        """This process's environment pointed at the cluster (``SLURM_CONF``, sbin on PATH)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": _path()}

    def slurm(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster, from the host namespace."""
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              check=False, env=self.env())

    def node_states(self) -> dict[str, str]:
        """Slurm's state of each compute node (``idle``, ``alloc``, ``down*``, ...)."""
        out = self.slurm("sinfo", "-h", "-N", "-o", "%N %T").stdout
        return dict(line.split(None, 1) for line in out.splitlines() if line.strip())

    def start_slurmd(self, node: str) -> None:
        """(Re)start ``slurmd -N node`` on its host."""
        host = self.hosts[node]
        _spawn(host, ["slurmd", "-D", "-N", node, "-f", str(self.conf)],
               self.dir / "log" / f"slurmd-{node}.out")

    def kill_host(self, node: str) -> list[int]:
        """SIGKILL every process on ``node`` (its slurmd and any rank there): a node crash.
        Returns the pids killed."""
        pids = self.hosts[node].pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids


def _path() -> str:
    parts = (env.PATH.get() or "").split(os.pathsep)
    return os.pathsep.join([*parts, *(p for p in SBIN if p not in parts)])


def missing_tools() -> list[str]:
    """What this machine lacks for the cluster (root counts as a tool)."""
    missing = [t for t in NEEDED if shutil.which(t, path=_path()) is None]
    if os.geteuid() != 0:
        missing.insert(0, "root")
    return missing


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise ClusterUnavailable(f"{' '.join(argv)}: {proc.stderr.strip()}")


def _spawn(host: Host, argv: list[str], log: Path) -> int:
    with log.open("ab") as fh:
        proc = subprocess.Popen([*host.prefix(), *argv], stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PATH": _path()})
    return proc.pid


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def clean(wait_s: float = 10.0) -> list[str]:
    """Kill every process in any ``fabcl-*`` namespace, delete those namespaces and the
    bridge. Safe to call at any time (a crashed run's leftovers, or after ``start``).
    Returns the namespaces removed."""
    names = namespaces()
    hosts = [Host(n.removeprefix(PREFIX), n, "") for n in names]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for h in hosts for p in h.pids()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (wait_s if sig == signal.SIGTERM else 5.0)
        while pids and time.monotonic() < deadline:
            pids = [p for h in hosts for p in h.pids()]
            time.sleep(0.1)
        if not pids:
            break
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=False).stdout
    for line in out.splitlines():
        link = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if link.startswith(PREFIX):
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
    return names


def _build_network() -> dict[str, Host]:
    hosts = {"login": Host("login", f"{PREFIX}login", LOGIN_ADDR),
             "laptop": Host("laptop", f"{PREFIX}laptop", LAPTOP_ADDR)}
    for name, addr in COMPUTE_ADDRS.items():
        hosts[name] = Host(name, f"{PREFIX}{name}", addr)
    for host in hosts.values():
        _ip("netns", "add", host.netns)
        _ip("link", "set", "lo", "up", netns=host.netns)
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{HOST_ADDR}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for name in ("login", *COMPUTE_ADDRS):
        host, tmp, peer = hosts[name], f"{PREFIX}{name[:1]}{name[-1]}n", f"{PREFIX}{name}"[:15]
        # host side keeps a fabcl- name (cleanup finds it); the node side becomes hsn0 inside
        _ip("link", "add", peer, "type", "veth", "peer", "name", tmp)
        _ip("link", "set", tmp, "netns", host.netns)
        _ip("link", "set", tmp, "name", "hsn0", netns=host.netns)
        _ip("addr", "add", f"{host.address}/24", "dev", "hsn0", netns=host.netns)
        _ip("link", "set", "hsn0", "up", netns=host.netns)
        _ip("link", "set", peer, "master", BRIDGE)
        _ip("link", "set", peer, "up")
    # laptop <-> login: a private link; login does not forward, so that is all the laptop sees
    login, laptop = hosts["login"], hosts["laptop"]
    _ip("link", "add", "lan0", "netns", login.netns, "type", "veth", "peer", "name", "eth0",
        "netns", laptop.netns)
    _ip("addr", "add", f"{LOGIN_LAN_ADDR}/24", "dev", "lan0", netns=login.netns)
    _ip("link", "set", "lan0", "up", netns=login.netns)
    _ip("addr", "add", f"{LAPTOP_ADDR}/24", "dev", "eth0", netns=laptop.netns)
    _ip("link", "set", "eth0", "up", netns=laptop.netns)
    return hosts


def _write_conf(folder: Path, cpus: int) -> Path:
    sock = folder / "munge" / "sock" / "munge.socket.2"
    nodes = "\n".join(f"NodeName={n} NodeAddr={a} NodeHostname={n} CPUs={cpus} State=UNKNOWN"
                      for n, a in COMPUTE_ADDRS.items())
    conf = folder / "slurm.conf"
    conf.write_text(f"""# Namespace cluster written by fabric.testing.netns_cluster
ClusterName=fabric-hosts
SlurmctldHost=login({LOGIN_ADDR})
SlurmUser={pwd.getpwuid(os.geteuid()).pw_name}
SlurmctldPort={SLURMCTLD_PORT}
SlurmdPort={SLURMD_PORT}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/run/slurmctld.pid
SlurmdPidFile={folder}/run/slurmd-%n.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/log/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=5
SlurmdTimeout=10
ReturnToService=2
JobRequeue=0
{nodes}
PartitionName={PARTITION} Nodes={",".join(COMPUTE_ADDRS)} Default=YES MaxTime=INFINITE \
OverSubscribe=YES State=UP
""")
    return conf


def _wait(what: str, check: object, timeout: float, folder: Path) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    logs = []
    for log in sorted((folder / "log").glob("*")):
        with contextlib.suppress(OSError):
            logs.append(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:]))
    raise ClusterUnavailable(f"{what} not reached after {timeout:.0f} s\n" + "\n".join(logs))


def start(folder: Path, cpus: int = 4, wait_s: float = 60.0) -> NetnsCluster:
    """Build the cluster with its state under ``folder``; returns once both compute nodes are
    idle. On any failure everything built so far is removed before the error propagates."""
    missing = missing_tools()
    if missing:
        raise ClusterUnavailable(f"missing {', '.join(missing)}")
    clean()
    folder = folder.resolve()
    for sub in ("munge/sock", "state", "log", "run", *(f"spool/{n}" for n in COMPUTE_ADDRS)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "munge").chmod(0o700)
    (folder / "munge" / "sock").chmod(0o755)
    try:
        hosts = _build_network()
        conf = _write_conf(folder, cpus)
        cluster = NetnsCluster(folder, conf, hosts, cpus)
        key = folder / "munge" / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True,
                           env=cluster.env(), capture_output=True)
        key.chmod(0o400)
        sock = folder / "munge" / "sock" / "munge.socket.2"
        login = hosts["login"]
        _spawn(login, ["munged", "--foreground", "--force", f"--socket={sock}",
                       f"--key-file={key}", f"--pid-file={folder}/run/munged.pid",
                       f"--log-file={folder}/log/munged.log",
                       f"--seed-file={folder}/munge/munged.seed"], folder / "log" / "munged.out")
        _wait("munge socket", sock.exists, 10, folder)
        _spawn(login, ["slurmctld", "-D", "-i", "-f", str(conf)],
               folder / "log" / "slurmctld.out")
        for node in COMPUTE_ADDRS:
            cluster.start_slurmd(node)

        def idle() -> bool:
            states = cluster.node_states()
            return len(states) == len(COMPUTE_ADDRS) and all(
                s.startswith("idle") for s in states.values())

        _wait("both compute nodes idle", idle, wait_s, folder)
        return cluster
    except BaseException:
        clean()
        raise


def stop(cluster: NetnsCluster | None = None) -> list[str]:
    """Cancel the cluster's jobs (best effort), then kill everything in its namespaces and
    delete them; returns the namespaces removed. Never leaves a daemon running."""
    if cluster is not None:
        with contextlib.suppress(Exception):
            ids = cluster.slurm("squeue", "-h", "-o", "%i", timeout=10).stdout.split()
            if ids:
                cluster.slurm("scancel", *ids, timeout=10)
    return clean()
