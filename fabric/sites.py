"""Site definitions: the fabric's deployment config for one site, loaded from ``endpoints/<site>/``.

Each site folder holds the Globus Compute 4.x endpoint files an operator renders with
``fabric site check NAME --write DIR`` and starts with ``globus-compute-endpoint start``
(``config.yaml``: the endpoint manager; ``user_config_template.yaml.j2``: the engine of each
user endpoint) and ``fabric.yaml`` (this schema: how model servers are launched, which models
are hosted with which parallel plan). Unknown keys are errors.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from fabric.catalog import CatalogEntry
from fabric.errors import InvalidSiteConfig
from fabric.site_values import (
    TEMPLATE,
    TemplateVar,
    render,
    resolve_values,
    values_file,
)
from fabric.sitepolicy import PolicyConfig, SiteLimits, walltime_seconds

ENDPOINTS_DIR = Path(__file__).resolve().parent.parent / "endpoints"

LOCAL_WORKERS_ADDRESS = "127.0.0.1"
"""Interchange address of the Globus Compute engines whose workers Parsl's ``LocalProvider``
starts on this same host (the site's request-worker pool): loopback is
the right address for them, not a single-host assumption, and keeps the interchange off the
network. Model servers, which run on other nodes, use ``server.network`` instead."""
"""Site definitions shipped with the source tree."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Plan(_Strict):
    """How one model is split over a batch job: ``pp`` stages x ``tp`` ranks per stage."""

    pp: int = Field(1, ge=1, description="Pipeline stages (nodes, usually).")
    tp: int = Field(1, ge=1, description="Tensor-parallel ranks per stage (GPUs per node).")
    ep: int = Field(1, ge=1, description="Expert-parallel groups per stage: a mixture of "
                    "experts' routed experts are split over ep groups of the stage's tp ranks "
                    "(must divide tp; 1 for dense models).")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype."""
    nodes: int = Field(1, ge=1, description="Nodes the job asks the scheduler for.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (0: CPU ranks).")
    device: Literal["cpu", "cuda", "xpu"] = "cpu"
    """Accelerator kind the ranks run on."""
    balance: Literal["params", "compute"] = "params"
    """How layers are spread over the pp stages (``fabric.engine.partition.stage_costs``):
    ``params`` evens out the weights each rank reads and holds; ``compute`` evens out the work
    of a step (a tied LM head on stage 0 then costs a share of its matmul, not its memory), for
    pipeline throughput. Outputs are the same either way."""
    fp8: Literal["auto", "dequantize", "keep"] = "auto"
    """FP8 checkpoints (``fabric.engine.fp8``): ``dequantize`` the weights at load to ``dtype``;
    ``keep`` the decoder layers' FP8 weights resident (half the bytes of bf16) and multiply with
    scaled FP8 matmuls, which needs a CUDA GPU of compute capability 8.9 or newer (checked as
    the server loads: ``Fp8MatmulUnavailable``; CPUs run it with torch's slow reference
    kernel, for tests) and tp splits on the checkpoint's scale blocks
    (``Fp8SplitMisaligned``); ``auto``: ``keep`` on such GPUs, ``dequantize`` elsewhere. No
    effect on checkpoints without FP8 tensors."""

    @model_validator(mode="after")
    def _fp8_device(self) -> Plan:
        if self.fp8 == "keep" and self.device == "xpu":
            raise ValueError("fp8: keep needs scaled FP8 matmuls, which fabric has only for "
                             "cuda devices (compute capability >= 8.9) and cpu; use fp8: "
                             "dequantize on xpu")
        return self

    @property
    def ranks(self) -> int:
        """Processes in the job."""
        return self.pp * self.tp


class NodeShape(_Strict):
    """What one compute node of the site holds, for sizing plans (``fabric plan``,
    ``fabric.plans``). ``gpus: 0`` (the default) means unknown: nothing is planned."""

    gpus: int = Field(0, ge=0, description="Accelerators per node.")
    gpu_kind: str = ""
    """What they are, e.g. ``NVIDIA A100-SXM4-40GB`` (for people; sizing uses the numbers)."""
    gpu_memory_gib: float = Field(0.0, ge=0, description="Memory per accelerator, GiB.")
    interconnect: str = ""
    """Between the accelerators of a node (tp and ep traffic), e.g. ``NVLink 3``."""
    network: str = ""
    """Between nodes (pp traffic), e.g. ``Slingshot 11, 2 NICs per node``."""
    max_nodes: int | None = Field(None, ge=1, description="Most nodes one model-server job "
                                  "may ask for (None: no limit known).")
    memory_fraction: float = Field(0.9, gt=0, le=1, description="Share of each accelerator's "
                                   "memory a model server may use.")
    reserve_gib: float = Field(2.0, ge=0, description="Per accelerator, kept for the runtime, "
                               "communication buffers and activations (not weights, not KV).")


class CapacityPlan(_Strict):
    """A documented plan for a model this site's nodes can hold, as ``fabric plan`` computes it
    (``tests/test_plans.py`` recomputes every shipped entry). A record of what fits, not a
    hosted model: nothing is launched from it."""

    model: str
    """A shipped config (``fabric.plans.known_models()``)."""
    weights: Literal["float32", "bfloat16", "float16", "fp8"] = "bfloat16"
    """Storage of the layers' weights on the GPU (``fp8``: resident FP8, served with
    ``plan.fp8: keep``, ``fabric.engine.fp8``)."""
    pp: int = Field(ge=1)
    tp: int = Field(ge=1)
    ep: int = Field(1, ge=1)
    nodes: int = Field(ge=1)
    kv_tokens: int = Field(ge=0, description="Token budget of the KV cache under this plan.")
    note: str = ""


class HostedModel(_Strict):
    """A catalog model this site serves, with its default plan."""

    name: str
    """Catalog name."""
    version: str | None = None
    """Pinned version; ``None`` serves the catalog's latest."""
    plan: Plan = Field(default_factory=Plan)
    """Default parallel plan (``fabric deploy --pp/--tp`` overrides it)."""
    shard_dir: str | None = None
    """Folder written by ``fabric shard`` for this plan: each rank then reads only its own
    file. Used when a deployment runs exactly this plan."""


class TypedSpec(BaseModel):
    """A ``type:`` name resolved to a real class (Parsl provider or launcher) plus its kwargs."""

    model_config = ConfigDict(extra="allow")
    type: str
    """Class name, e.g. ``LocalProvider``, ``SlurmProvider``, ``SrunLauncher``."""

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the class."""
        return dict(self.model_extra or {})


class JobsConfig(_Strict):
    """How model servers are launched as batch jobs (Parsl provider + launcher)."""

    provider: TypedSpec = Field(default_factory=lambda: TypedSpec(type="LocalProvider"))
    """Parsl provider (``LocalProvider``, ``SlurmProvider``, ``PBSProProvider``)."""
    launcher: TypedSpec = Field(default_factory=lambda: TypedSpec(type="SingleNodeLauncher"))
    """Parsl launcher that starts the ranks (``SingleNodeLauncher``, ``SrunLauncher``,
    ``MpiExecLauncher``)."""
    walltime: str = "01:00:00"
    """Job walltime, HH:MM:SS."""
    worker_init: str = ""
    """Shell lines run before the model server (module loads, venv activation)."""

    @field_validator("walltime")
    @classmethod
    def _hhmmss(cls, value: str) -> str:
        walltime_seconds(value)
        return value


class NetworkConfig(_Strict):
    """Where a model server's front door listens and what address it tells clients
    (``server.network``). Each rank resolves it on its own node when it starts
    (``fabric.engine.netaddr``); a node without a match refuses to start (``AddressNotFound``).
    """

    advertise: str = "127.0.0.1"
    """The network request workers reach model servers on: an interface name (``hsn0``,
    Slingshot on Polaris, Perlmutter and Aurora), a CIDR (``198.18.0.0/15``: the node's address
    inside it) or a literal address. Loopback (the default) serves only this machine. For
    multi-node plans the ranks' gloo/nccl traffic uses the same interface."""
    bind: Literal["advertised", "all"] = "advertised"
    """``advertised``: listen on the advertised address only; ``all``: listen on every
    interface (0.0.0.0) and advertise the chosen address (for nodes reached through NAT or
    several networks). Either way clients authenticate with CURVE."""

    @field_validator("advertise")
    @classmethod
    def _known_form(cls, value: str) -> str:
        network_kind(value)
        return value


def network_kind(setting: str) -> Literal["address", "cidr", "interface"]:
    """Which form a ``server.network.advertise`` value has; raises ``ValueError`` for none."""
    if "/" in setting:
        try:
            ipaddress.IPv4Network(setting, strict=False)
        except ValueError:
            raise ValueError(f"{setting!r} is not an IPv4 CIDR such as 198.18.0.0/15") from None
        return "cidr"
    try:
        ipaddress.IPv4Address(setting)
        return "address"
    except ValueError:
        pass
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,14}", setting):
        return "interface"
    raise ValueError(f"{setting!r} is neither an interface name (hsn0), an IPv4 CIDR "
                     "(198.18.0.0/15) nor an IPv4 address")


class UserFunctionLimits(_Strict):
    """What one user function (``fab.submit``) may do at a site: its capability's limits."""

    max_requests: int = Field(10_000, ge=1)
    """Most requests its handle may send (each ``generate``, each batch of ``embed``)."""
    max_tokens: int = Field(10_000_000, ge=1)
    """Most tokens (prompt + new, as admitted) its handle may use in all."""
    timeout_s: float = Field(3600.0, gt=0, le=7 * 86400)
    """Its capability expires (and its process is killed) this long after it starts."""
    run_as: str | None = None
    """Unix user its process runs as (the site must run as root to switch). Set it, or run
    the site in a container, where callers are not trusted with the site account's files."""


class ServerConfig(_Strict):
    """Model-server behaviour at this site."""

    idle_timeout_s: float = Field(600.0, gt=0, description="Exit after this long without work.")
    ready_timeout_s: float = Field(900.0, gt=0, description="Give up waiting for readiness.")
    kv_budget_tokens: int = Field(65536, gt=0, description="KV-cache tokens across requests.")
    max_batch_tokens: int = Field(512, gt=0, description="Tokens per forward step (chunking).")
    max_message_bytes: int = Field(64 << 20, gt=0, description="Largest message the server's "
                                   "socket reads (ZMQ MAXMSGSIZE): a bigger one is dropped "
                                   "before it is read into memory. 64 MiB holds the largest "
                                   "valid request (a 4096-text embed batch, 16 steer vectors "
                                   "of a wide model) many times over.")
    encoder_batch_tokens: int = Field(8192, gt=0, description="Tokens per step for embedding "
                                      "models (nothing decodes between their steps, so big "
                                      "steps only amortise per-step cost).")
    max_running: int = Field(64, gt=0, description="Requests in the running batch at most.")
    max_queue_requests: int = Field(256, ge=0, description="Requests waiting beyond the free "
                                    "places of the running batch at most (0: admit only what "
                                    "can start now).")
    max_queue_tokens: int = Field(262144, ge=0, description="Prompt tokens waiting at most.")
    max_prefill_tokens: int | None = Field(None, gt=0, description="Prompt tokens not yet "
                                           "prefilled (waiting, or admitted with their "
                                           "prefill unfinished) at most; bounds the time to "
                                           "first token of admitted requests to about "
                                           "max_prefill_tokens / max_batch_tokens steps. "
                                           "None: no bound.")
    stream_buffer_s: float = Field(60.0, gt=0, description="Keep streamed events this long.")
    threads_per_rank: int = Field(0, ge=0, description="OMP threads per rank (0: cores/ranks).")
    micro_batches: int = Field(0, ge=0, description="Steps in flight through the pipeline "
                               "(0: one per stage; 1 turns micro-batching off).")
    decode_graphs: Literal["auto", "on", "off"] = "auto"
    """Decode fast path of single-rank (pp=1, tp=1) servers: a static slot KV cache and
    batched decode steps, compiled and captured as CUDA graphs on a GPU. ``auto``: on CUDA
    ranks only; ``on``: also on CPU ranks (the same code without compile or capture, which is
    how it is tested); ``off``: every step runs the eager path."""
    graph_slots: int = Field(32, gt=0, description="Sequences the fast path's slot cache holds "
                             "(others run the eager path; at most max_running are used).")
    graph_slot_tokens: int = Field(2048, ge=2, description="KV positions per slot (a sequence "
                                   "whose prompt + max_tokens exceeds it runs eagerly). The "
                                   "cache, graph_slots x graph_slot_tokens positions, is "
                                   "allocated when the server starts.")
    graph_compile: bool = Field(True, description="torch.compile the fast path's layer "
                                "functions (CUDA only; the first step of each batch size "
                                "compiles, tens of seconds for an 8B model).")
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    """Bind and advertise address of the model servers (default: loopback, this machine)."""


def plan_size(plan: Plan) -> dict[str, int]:
    """What one deployment of ``plan`` holds: nodes and accelerators."""
    gpus = 0 if plan.device == "cpu" else max(plan.nodes * plan.gpus_per_node, plan.ranks)
    return {"nodes": plan.nodes, "gpus": gpus}


def limit_exceeded(limits: SiteLimits, plan: Plan, walltime: str
                   ) -> tuple[str, int | str, int | str] | None:
    """The first of ``limits`` a deployment of ``plan`` for ``walltime`` exceeds, as
    ``(limit name, limit, requested)``; None when it fits."""
    size = plan_size(plan)
    if size["nodes"] > limits.max_nodes:
        return "limits.max_nodes", limits.max_nodes, size["nodes"]
    if size["gpus"] > limits.max_gpus:
        return "limits.max_gpus", limits.max_gpus, size["gpus"]
    if walltime_seconds(walltime) > walltime_seconds(limits.max_walltime):
        return "limits.max_walltime", limits.max_walltime, walltime
    return None


class MetricsConfig(_Strict):
    """The site's Prometheus ``/metrics`` listener (``fabric.endpoint.site_metrics``)."""

    enabled: bool = False
    """Off unless the operator turns it on."""
    host: str = "127.0.0.1"
    """Address to listen on: loopback by default (a Prometheus on the same host, or a tunnel);
    the series carry model names and load, no identities or prompts."""
    port: int = Field(9464, ge=0, le=65535, description="TCP port (0: any free one; the one "
                      "taken is written to <state_dir>/metrics.json).")


class SiteConfig(_Strict):
    """One site's fabric deployment config (``endpoints/<site>/fabric.yaml``)."""

    name: str
    """Site name (``Fabric(site=...)``)."""
    description: str = ""
    """One line for ``fabric sites``."""
    endpoint_id: str | None = None
    """Globus Compute endpoint UUID (remote sites)."""
    state_dir: str = "{home}/{name}"
    """Site state (SQLite, keys, logs); on a cluster, a shared filesystem path. ``{name}``
    is the site's name, ``{home}`` the user's ``$FABRIC_HOME`` (default ``~/.fabric``)."""
    weights_dir: str | None = None
    """Where converted/sharded weights live (default: the user's cache dir)."""
    max_request_workers: int = Field(4, ge=1, description="Request workers (local site).")
    allow_user_functions: bool = False
    """Allow ``fab.submit`` user functions: a caller's code running at the site. Off unless the
    operator opts in (the shipped local sites do: there the caller is the site's own user)."""
    user_functions: UserFunctionLimits = Field(default_factory=UserFunctionLimits)
    """Limits of each user function's capability, and the Unix user it runs as."""
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    node: NodeShape = Field(default_factory=NodeShape)
    """The compute nodes model servers run on (for ``fabric plan``)."""
    capacity: list[CapacityPlan] = Field(default_factory=list)
    """Plans for large models on this site's nodes (documentation; see ``CapacityPlan``)."""
    models: list[HostedModel] = Field(default_factory=list)
    """Models this site hosts and their default plans."""
    extra_models: list[CatalogEntry] = Field(default_factory=list)
    """Catalog entries only this site has (local paths)."""
    policy: PolicyConfig | None = None
    """Access policy; ``None`` (the local site) lets the endpoint's OS user in."""
    limits: SiteLimits = Field(default_factory=SiteLimits)
    """Largest deployment (nodes, GPUs, walltime) and usage retention."""
    template: dict[str, TemplateVar] = Field(default_factory=dict)
    """Operator-supplied values (account, queue) substituted as ``{{ name }}`` before load."""
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    """The Prometheus scrape endpoint of the site process (off by default)."""
    function_ids: dict[str, str] = Field(default_factory=dict)
    """Globus Compute function UUIDs of the fabric's endpoint functions, by function name,
    registered once by the operator; they fill ``allowed_functions`` in ``config.yaml``."""
    _unset: list[str] = PrivateAttr(default_factory=list)
    _values: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("function_ids")
    @classmethod
    def _uuids(cls, ids: dict[str, str]) -> dict[str, str]:
        for name, value in ids.items():
            try:
                uuid.UUID(str(value))
            except ValueError:
                raise ValueError(f"function_ids.{name} = {value!r} is not a UUID (as "
                                 "`fabric site register-functions` prints them)") from None
        return ids

    @model_validator(mode="after")
    def _within_limits(self) -> SiteConfig:
        # The site's own plans obey its limits: a caller asking for exactly those never fails.
        for hosted in self.models:
            over = limit_exceeded(self.limits, hosted.plan, self.jobs.walltime)
            if over:
                raise ValueError(f"models[{hosted.name}].plan (with jobs.walltime) exceeds "
                                 f"{over[0]} = {over[1]}: it asks for {over[2]}")
        over = limit_exceeded(self.limits, Plan(), self.jobs.walltime)
        if over:
            raise ValueError(f"jobs.walltime {self.jobs.walltime} exceeds {over[0]} = {over[1]}")
        return self

    @property
    def unset_values(self) -> list[str]:
        """Template values left as placeholders (loaded with ``strict=False``)."""
        return list(self._unset)

    def require_values(self) -> None:
        """``InvalidSiteConfig`` naming every required template value left unset: a site acted
        on (started, stopped, its state read) with placeholders would put its state under
        paths such as ``/lus/eagle/projects/UNSET-account``."""
        if self._unset:
            raise InvalidSiteConfig(
                f"site {self.name!r} has required values unset: {self._unset}; give them in "
                "the site folder's values.yaml (`fabric site check FOLDER` checks it) and "
                "use that folder as the site", unset=list(self._unset))

    def resolved_state_dir(self) -> Path:
        """The state dir with ``~``, ``{name}`` and ``{home}`` expanded."""
        from fabric import env

        return Path(self.state_dir.format(name=self.name, home=env.fabric_home())).expanduser()

    def hosted(self, name: str) -> HostedModel | None:
        """The hosted-model entry for ``name``, if this site lists it."""
        return next((m for m in self.models if m.name == name), None)


def site_dir(name_or_path: str | Path) -> Path:
    """The folder of a site definition given by name (``endpoints/<name>``) or path."""
    path = Path(name_or_path)
    if not path.exists():
        path = ENDPOINTS_DIR / str(name_or_path)
    return path.parent if path.is_file() else path


def load_site(name_or_path: str | Path, values: dict[str, str] | None = None, *,
              strict: bool = False) -> SiteConfig:
    """Load and validate a site definition by name (``endpoints/<name>``) or folder/file path.

    ``{{ name }}`` template values come from ``values``, then the operator's ``values.yaml``
    next to ``fabric.yaml``, then each variable's default. With ``strict`` a missing required
    value is an error (``fabric site check``, starting an endpoint); without it a placeholder
    ``UNSET-<name>`` stands in, so a client can read a site's endpoint id and policy scope
    without knowing the operator's account.
    """
    path = Path(name_or_path)
    if not path.exists():
        path = ENDPOINTS_DIR / str(name_or_path)
    if path.is_dir():
        path = path / "fabric.yaml"
    if not path.exists():
        raise InvalidSiteConfig(f"no site definition at {path}; known sites: {list_sites()}")
    try:
        raw = path.read_text()
        # First pass: templated values sit inside quoted strings, so the raw file parses and
        # its `template:` section can be read before anything is substituted.
        first = yaml.safe_load(raw) or {}
        declared = TEMPLATE.validate_python(first.get("template") or {}
                                             if isinstance(first, dict) else {})
        merged = resolve_values(declared, {**values_file(path.parent), **(values or {})},
                                strict=strict, where=str(path))
        site = SiteConfig.model_validate(yaml.safe_load(render(raw, merged, str(path))) or {})
    except (ValidationError, yaml.YAMLError) as exc:
        raise InvalidSiteConfig(f"{path}: {exc}", path=str(path)) from None
    site._unset = [k for k, v in merged.items() if v == f"UNSET-{k}"]
    site._values = merged
    return site


def resolve_site(site: str = "local", state_dir: str | Path | None = None
                 ) -> tuple[SiteConfig, str, Path]:
    """``(SiteConfig, reference for the site process, state dir)`` for a site name or path,
    for acting on the site (start, stop, status, metrics, usage): a site with required template
    values unset is refused (``SiteConfig.require_values``)."""
    ref = str(Path(site).resolve()) if Path(site).exists() else site
    cfg = load_site(ref)
    cfg.require_values()
    folder = Path(state_dir).expanduser() if state_dir else cfg.resolved_state_dir()
    return cfg, ref, folder.resolve()


def list_sites() -> list[str]:
    """Names of the site definitions shipped in ``endpoints/``."""
    if not ENDPOINTS_DIR.is_dir():
        return []
    return sorted(p.parent.name for p in ENDPOINTS_DIR.glob("*/fabric.yaml"))
