"""Site definitions: the fabric's deployment config for one site, loaded from ``endpoints/<site>/``.

Each site folder holds ``config.yaml`` (the Globus Compute endpoint config an operator passes to
``globus-compute-endpoint``) and ``fabric.yaml`` (this schema: how model servers are launched,
which models are hosted with which parallel plan). Unknown keys are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fabric.catalog import CatalogEntry
from fabric.errors import InvalidSiteConfig

ENDPOINTS_DIR = Path(__file__).resolve().parent.parent / "endpoints"
"""Site definitions shipped with the source tree."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Plan(_Strict):
    """How one model is split over a batch job: ``pp`` stages x ``tp`` ranks per stage."""

    pp: int = Field(1, ge=1, description="Pipeline stages (nodes, usually).")
    tp: int = Field(1, ge=1, description="Tensor-parallel ranks per stage (GPUs per node).")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype."""
    nodes: int = Field(1, ge=1, description="Nodes the job asks the scheduler for.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (0: CPU ranks).")
    device: Literal["cpu", "cuda", "xpu"] = "cpu"
    """Accelerator kind the ranks run on."""

    @property
    def ranks(self) -> int:
        """Processes in the job."""
        return self.pp * self.tp


class HostedModel(_Strict):
    """A catalog model this site serves, with its default plan."""

    name: str
    """Catalog name."""
    version: str | None = None
    """Pinned version; ``None`` serves the catalog's latest."""
    plan: Plan = Field(default_factory=Plan)  # type: ignore[arg-type]
    """Default parallel plan (``fabric deploy --pp/--tp`` overrides it)."""


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


class ServerConfig(_Strict):
    """Model-server behaviour at this site."""

    idle_timeout_s: float = Field(600.0, gt=0, description="Exit after this long without work.")
    ready_timeout_s: float = Field(900.0, gt=0, description="Give up waiting for readiness.")
    kv_budget_tokens: int = Field(65536, gt=0, description="KV-cache tokens across requests.")
    max_batch_tokens: int = Field(512, gt=0, description="Tokens per forward step (chunking).")
    max_running: int = Field(64, gt=0, description="Requests in the running batch at most.")
    max_queue_requests: int = Field(256, ge=0, description="Waiting requests at most.")
    max_queue_tokens: int = Field(262144, ge=0, description="Prompt tokens waiting at most.")
    stream_buffer_s: float = Field(60.0, gt=0, description="Keep streamed events this long.")
    threads_per_rank: int = Field(0, ge=0, description="OMP threads per rank (0: cores/ranks).")


class SiteConfig(_Strict):
    """One site's fabric deployment config (``endpoints/<site>/fabric.yaml``)."""

    name: str
    """Site name (``Fabric(site=...)``)."""
    description: str = ""
    """One line for ``fabric sites``."""
    endpoint_id: str | None = None
    """Globus Compute endpoint UUID (remote sites)."""
    state_dir: str = "~/.fabric/{name}"
    """Site state (SQLite, keys, logs); on a cluster, a shared filesystem path."""
    weights_dir: str | None = None
    """Where converted/sharded weights live (default: the user's cache dir)."""
    max_request_workers: int = Field(4, ge=1, description="Request workers (local site).")
    allow_user_functions: bool = True
    """Allow ``fab.submit`` user functions (remote sites should opt in explicitly)."""
    jobs: JobsConfig = Field(default_factory=JobsConfig)  # type: ignore[arg-type]
    server: ServerConfig = Field(default_factory=ServerConfig)  # type: ignore[arg-type]
    models: list[HostedModel] = Field(default_factory=list)
    """Models this site hosts and their default plans."""
    extra_models: list[CatalogEntry] = Field(default_factory=list)
    """Catalog entries only this site has (local paths)."""

    def resolved_state_dir(self) -> Path:
        """The state dir with ``~`` and ``{name}`` expanded."""
        return Path(self.state_dir.format(name=self.name)).expanduser()

    def hosted(self, name: str) -> HostedModel | None:
        """The hosted-model entry for ``name``, if this site lists it."""
        return next((m for m in self.models if m.name == name), None)


def load_site(name_or_path: str | Path) -> SiteConfig:
    """Load and validate a site definition by name (``endpoints/<name>``) or folder/file path."""
    path = Path(name_or_path)
    if not path.exists():
        path = ENDPOINTS_DIR / str(name_or_path)
    if path.is_dir():
        path = path / "fabric.yaml"
    if not path.exists():
        raise InvalidSiteConfig(f"no site definition at {path}; known sites: {list_sites()}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return SiteConfig.model_validate(data)
    except (ValidationError, yaml.YAMLError) as exc:
        raise InvalidSiteConfig(f"{path}: {exc}", path=str(path)) from None


def list_sites() -> list[str]:
    """Names of the site definitions shipped in ``endpoints/``."""
    if not ENDPOINTS_DIR.is_dir():
        return []
    return sorted(p.parent.name for p in ENDPOINTS_DIR.glob("*/fabric.yaml"))
