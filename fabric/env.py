"""Every environment variable the fabric reads or sets, in one place.

Each is an ``EnvVar``: its name, what it means, its default, who sets it and where it is read.
Code reads and writes them only through these objects and the accessor functions below, never
through ``os.environ`` with a literal name (``tests/test_env.py`` scans the package for that), so
``python -m fabric.env`` prints the complete list.

Configuration proper lives in typed objects (site definitions, ``ServerLaunchConfig``); the
environment carries only what a parent process, a batch scheduler or an operator has to hand to
a process it starts. Not read anywhere: ``MASTER_ADDR``/``MASTER_PORT`` and ``WORLD_SIZE`` (a
model server's rendezvous and size come from its ``ServerLaunchConfig``).

A variable set to the empty string counts as unset. This module imports only the standard
library, so every layer may use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENV", "RANK_VARS", "EnvVar", "cache_home", "fabric_home", "launcher_rank",
           "ranks_on_node", "table"]


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: what it means and who sets and reads it."""

    name: str
    doc: str
    """What it means."""
    default: str | None = None
    """Value ``get`` returns when unset (``None``: no value)."""
    default_doc: str = ""
    """The default in words, where code computes it (else ``default`` is shown)."""
    set_by: str = "the user"
    """Who sets it."""
    read_by: str = ""
    """Where it is read (module, or the library that reads it)."""

    def get(self) -> str | None:
        """The value, or ``default`` when unset or empty."""
        return os.environ.get(self.name) or self.default

    def get_int(self) -> int | None:
        """The value as a non-negative int, or ``None`` when unset or not all digits."""
        value = os.environ.get(self.name, "")
        return int(value) if value.isdigit() else None

    def is_set(self) -> bool:
        """True when set to a non-empty value."""
        return bool(os.environ.get(self.name))

    def set(self, value: str) -> None:
        """Set it in this process (and so for every child started afterwards)."""
        os.environ[self.name] = value

    def setdefault(self, value: str) -> str:
        """Set it unless already set; returns the value in effect."""
        return os.environ.setdefault(self.name, value)

    def unset(self) -> None:
        """Remove it from this process's environment."""
        os.environ.pop(self.name, None)


ENV: dict[str, EnvVar] = {}
"""Every declared variable by name."""

# Read through os.environ by a name that is not a constant:
# - fabric/endpoint/policy.py: the site policy's client_secret_env (FABRIC_ENDPOINT_CLIENT_SECRET
#   by default), a name from the site definition, so it stays an os.environ read by name.


def _declare(name: str, doc: str, default: str | None = None, set_by: str = "the user",
             read_by: str = "", default_doc: str = "") -> EnvVar:
    var = EnvVar(name, doc, default=default, default_doc=default_doc, set_by=set_by,
                 read_by=read_by)
    ENV[name] = var
    return var


# --- the user's machine ------------------------------------------------------------------------

FABRIC_HOME = _declare(
    "FABRIC_HOME", "Per-user folder: Globus tokens (tokens.json), function-id and task-group "
    "caches, the user's config file (config.yaml: a federation's sites and routing).",
    "~/.fabric", read_by="fabric.globus.auth, fabric.globus.transport, fabric.client.userconfig")
FABRIC_CLIENT_ID = _declare(
    "FABRIC_CLIENT_ID", "Confidential Globus client id: with FABRIC_CLIENT_SECRET, log in as "
    "that client (automation, no browser); set both or neither.", read_by="fabric.globus.auth")
FABRIC_CLIENT_SECRET = _declare(
    "FABRIC_CLIENT_SECRET", "Secret of FABRIC_CLIENT_ID.", read_by="fabric.globus.auth")
FABRIC_NATIVE_CLIENT_ID = _declare(
    "FABRIC_NATIVE_CLIENT_ID", "Native (public) Globus client for personal logins.",
    read_by="fabric.globus.auth",
    default_doc="Globus Compute's public client (globus.auth.DEFAULT_NATIVE_CLIENT_ID)")
GLOBUS_SDK_ENVIRONMENT = _declare(
    "GLOBUS_SDK_ENVIRONMENT", "Globus environment; names the namespace of cached function ids "
    "(also read by globus-sdk itself).", "production", read_by="fabric.globus.transport")
XDG_CACHE_HOME = _declare(
    "XDG_CACHE_HOME", "Base of the weight cache ($XDG_CACHE_HOME/tpm-fabric).", "~/.cache",
    read_by="fabric.weights")

# --- the site endpoint and its workers ---------------------------------------------------------

FABRIC_SITE = _declare(
    "FABRIC_SITE", "Site name or definition path the endpoint's function workers serve.",
    "local", set_by="fabric endpoint start (endpoint.site), or the operator's worker_init",
    read_by="fabric.endpoint.context")
FABRIC_STATE_DIR = _declare(
    "FABRIC_STATE_DIR", "Site state folder of those workers (deployments, keys, logs).",
    default_doc="the site definition's state_dir", read_by="fabric.endpoint.context",
    set_by="fabric endpoint start (endpoint.site), or the operator's worker_init")
FABRIC_ENDPOINT_CLIENT_SECRET = _declare(
    "FABRIC_ENDPOINT_CLIENT_SECRET", "Secret of the site's confidential client (introspects "
    "callers' tokens); the name is the default of the site policy's client_secret_env.",
    set_by="the operator, in the endpoint's environment", read_by="fabric.endpoint.policy")
FABRIC_GLOBUS_IDENTITY = _declare(
    "FABRIC_GLOBUS_IDENTITY", "The Globus identity id Globus Compute asserted for this user "
    "endpoint (the one the endpoint's identity mapping matched); trusted by a policy with "
    "identity: asserted. Empty where no identity mapping ran.",
    set_by="the site's user_config_template.yaml.j2 (worker_init, from "
    "_GC.mapped_identity.globus.id)", read_by="fabric.endpoint.asserted")
PATH = _declare(
    "PATH", "Gets this interpreter's bin folder prepended, so workers find "
    "globus-compute-endpoint.", "", set_by="the shell; prepended by endpoint.site",
    read_by="fabric.endpoint.site, fabric.testing.gc_endpoint, fabric.endpoint.sandbox")
PYTHONPATH = _declare(
    "PYTHONPATH", "Module search path; handed on to the user endpoints of the offline Globus "
    "Compute test endpoint (a root endpoint clears their environment).", "",
    set_by="the shell", read_by="fabric.testing.gc_endpoint, fabric.endpoint.sandbox (a user "
    "function's process gets it and PATH, nothing else of the worker's environment)")

# --- model-server jobs -------------------------------------------------------------------------

FABRIC_RANK = _declare(
    "FABRIC_RANK", "0-based rank of one copy of a job's command.",
    set_by="the job script (endpoint.jobs)", read_by="fabric.engine.dist")
FABRIC_WORLD_SIZE = _declare(
    "FABRIC_WORLD_SIZE", "Number of ranks of the job (for the job's own commands).",
    set_by="the job script (endpoint.jobs)", read_by="nothing in the fabric")
FABRIC_JOB_NAME = _declare(
    "FABRIC_JOB_NAME", "Name of the job (for the job's own commands).",
    set_by="the job script (endpoint.jobs)", read_by="nothing in the fabric")
_LAUNCHER_RANKS = (
    ("RANK", "torchrun"), ("SLURM_PROCID", "srun"), ("PMI_RANK", "mpiexec (MPICH, Cray PMI)"),
    ("PMIX_RANK", "PMIx launchers"), ("PALS_RANKID", "mpiexec (PALS)"),
    ("OMPI_COMM_WORLD_RANK", "mpirun (Open MPI)"))
RANK_VARS: tuple[EnvVar, ...] = (FABRIC_RANK, *(
    _declare(name, "0-based global rank of this process, when FABRIC_RANK is unset.",
             set_by=who, read_by="fabric.engine.dist") for name, who in _LAUNCHER_RANKS))
"""Where a model-server rank learns its rank, first set wins."""
SLURM_JOB_NODELIST = _declare(
    "SLURM_JOB_NODELIST", "Nodes of a Slurm job; the first is the rendezvous host when "
    "master_addr is auto.", set_by="Slurm", read_by="fabric.engine.dist")
PBS_NODEFILE = _declare(
    "PBS_NODEFILE", "File listing the nodes of a PBS job; its first line is the rendezvous host "
    "when master_addr is auto.", set_by="PBS", read_by="fabric.engine.dist")
LOCAL_SIZE = _declare(
    "LOCAL_SIZE", "Ranks sharing this node (splits the cores into threads per rank).",
    set_by="the operator or a wrapper script", read_by="fabric.engine.server")
SLURM_NTASKS_PER_NODE = _declare(
    "SLURM_NTASKS_PER_NODE", "Ranks per node under srun, when LOCAL_SIZE is unset.",
    set_by="Slurm", read_by="fabric.engine.server")
OMP_NUM_THREADS = _declare(
    "OMP_NUM_THREADS", "Threads of one model-server rank (torch and OpenMP); set before torch "
    "starts so ranks sharing a node do not oversubscribe it.",
    set_by="the rank's command (engine.launch.server_command); benchmarks",
    read_by="fabric.engine.server, OpenMP")
DS_ACCELERATOR = _declare(
    "DS_ACCELERATOR", "DeepSpeed's accelerator: cpu for a plan with device cpu; unset for cuda "
    "(DeepSpeed detects CUDA, and the server refuses to start if it would fall back to CPU).",
    set_by="engine.launch.select_accelerator (from the plan's device); tests and benchmarks",
    read_by="DeepSpeed")
GLOO_SOCKET_IFNAME = _declare(
    "GLOO_SOCKET_IFNAME", "Network interface gloo uses; lo when the rendezvous host is loopback "
    "(gloo otherwise takes the interface of the host name), else the interface of the site's "
    "server.network setting.",
    default_doc="lo when the rendezvous host is loopback, else server.network's interface",
    set_by="engine.dist.init_groups, unless already set", read_by="torch.distributed (gloo)")
NCCL_SOCKET_IFNAME = _declare(
    "NCCL_SOCKET_IFNAME", "Network interface nccl bootstraps over, for jobs spanning nodes.",
    default_doc="the interface of the site's server.network setting, for multi-node jobs",
    set_by="engine.dist.init_groups, unless already set", read_by="NCCL")

# --- tests and benchmarks ----------------------------------------------------------------------

TOKENIZERS_PARALLELISM = _declare(
    "TOKENIZERS_PARALLELISM", "false keeps HF tokenizers from starting threads that fork badly.",
    set_by="tests/conftest.py, benchmarks/common.py", read_by="tokenizers")
FABRIC_TEST_STAGE_FAULT = _declare(
    "FABRIC_TEST_STAGE_FAULT", "Tests only: STAGE:MARKER makes pipeline stage STAGE (not the "
    "head's stage 0) raise on every step that holds a request whose id contains MARKER, to "
    "show that such a failure fails only that request. Never set it in production.",
    set_by="tests/chaos/test_stage_failure.py", read_by="fabric.engine.pipeline")
CI = _declare(
    "CI", "true: the test suite runs everything, the Slurm tests included.",
    set_by="the CI runner", read_by="tests/plugins/slurm.py")


# --- accessors ---------------------------------------------------------------------------------

def fabric_home() -> Path:
    """``$FABRIC_HOME`` (default ``~/.fabric``), user-expanded."""
    return Path(FABRIC_HOME.get() or "~/.fabric").expanduser()


def cache_home() -> Path:
    """``$XDG_CACHE_HOME`` (default ``~/.cache``), user-expanded."""
    return Path(XDG_CACHE_HOME.get() or "~/.cache").expanduser()


def launcher_rank() -> int | None:
    """This process's rank as its launcher exported it (``RANK_VARS``, first set wins)."""
    for var in RANK_VARS:
        rank = var.get_int()
        if rank is not None:
            return rank
    return None


def ranks_on_node() -> int | None:
    """Ranks sharing this node (``LOCAL_SIZE``, else ``SLURM_NTASKS_PER_NODE``), if known."""
    return LOCAL_SIZE.get_int() or SLURM_NTASKS_PER_NODE.get_int()


def table() -> str:
    """Every variable as a Markdown table (for the docs)."""
    rows = ["| variable | meaning | default | set by | read by |",
            "| --- | --- | --- | --- | --- |"]
    for v in ENV.values():
        default = v.default_doc or v.default or "-"
        rows.append(f"| `{v.name}` | {v.doc} | {default} | {v.set_by} | "
                    f"{v.read_by or '-'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
