"""Who may use a site and how much: the ``policy`` and ``limits`` sections of ``fabric.yaml``.

The endpoint enforces ``PolicyConfig`` per call (``fabric.endpoint.policy``) and ``SiteLimits``
at ``deploy`` (``fabric.endpoint.deployments``); ``fabric.sites.SiteConfig`` holds both.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRule(_Strict):
    """Who may use one model at this site, and how much (``policy.models.<name>``).

    A caller is allowed when ``anyone`` is true or it matches any listed identity (UUID or
    username), group (Globus group UUID) or identity domain (``uchicago.edu``). Quotas are per
    identity; ``None`` means unlimited.
    """

    anyone: bool = False
    identities: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    domains: list[str] = Field(default_factory=list)
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_day: int | None = Field(default=None, gt=0)


class AdminRule(_Strict):
    """Who may run the site's admin operations (``deploy``, ``undeploy``: every endpoint
    function of auth kind ``admin``), ``policy.admins``. A caller is an admin when it matches
    any listed identity (UUID or username), group (Globus group UUID) or identity domain. The
    default lists nobody: on a site with a policy only the operator's named admins deploy and
    undeploy (deployments the site starts by itself for a request are not admin operations)."""

    identities: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    domains: list[str] = Field(default_factory=list)


class PolicyConfig(_Strict):
    """Access policy enforced at the endpoint (``fabric.endpoint.policy``).

    Callers prove who they are with an access token issued for ``scope``, a scope of the
    endpoint's own confidential client ``client_id``; the endpoint introspects it with that
    client (its secret comes from the environment variable ``client_secret_env``, never YAML).
    """

    client_id: str
    """The endpoint's confidential Globus client (resource server of ``scope``)."""
    scope: str | None = None
    """Scope users consent to; default ``https://auth.globus.org/scopes/<client_id>/fabric``."""
    client_secret_env: str = "FABRIC_ENDPOINT_CLIENT_SECRET"
    """Environment variable holding the confidential client's secret at the endpoint."""
    introspection_cache_s: float = Field(default=60.0, ge=0, description="Reuse an "
                                         "introspection this long at most (never beyond the "
                                         "token's own expiry).")
    introspection_cache_size: int = Field(default=4096, ge=0, description="Introspections "
                                          "kept at most per request worker (the least "
                                          "recently used go first; 0: none kept).")
    identity: Literal["token", "asserted"] = "token"
    """Where a caller's identity comes from. ``token``: an access token for ``scope`` sent
    with every call, introspected here (the Globus cloud stores it with the task).
    ``asserted``: the Globus identity Globus Compute asserted when it started the caller's
    user endpoint (a multi-user endpoint with an identity mapping renders it into the workers'
    environment, ``FABRIC_GLOBUS_IDENTITY``); no token travels, except that a site with group
    rules needs one for the Groups lookup (``fabric.endpoint.asserted``)."""
    admins: AdminRule = Field(default_factory=AdminRule)
    """Who may deploy and undeploy (see ``AdminRule``; default: nobody)."""
    default: ModelRule = Field(default_factory=ModelRule)
    """Rule for models without their own entry (the default denies everyone)."""
    models: dict[str, ModelRule] = Field(default_factory=dict)
    """Per-model rules, by catalog name."""

    @property
    def resolved_scope(self) -> str:
        """The scope string clients request."""
        return self.scope or f"https://auth.globus.org/scopes/{self.client_id}/fabric"

    @property
    def has_group_rules(self) -> bool:
        """Whether any rule (a model's, the default, the admins') names Globus groups."""
        return bool(self.default.groups or self.admins.groups
                    or any(r.groups for r in self.models.values()))

    def rule_for(self, model: str) -> tuple[str, ModelRule]:
        """The rule that governs ``model`` and its dotted name (for denial messages)."""
        if model in self.models:
            return f"policy.models.{model}", self.models[model]
        return "policy.default", self.default


def walltime_seconds(walltime: str) -> int:
    """Seconds of an ``HH:MM:SS`` walltime (``ValueError`` for another form)."""
    if not re.fullmatch(r"\d+:[0-5]\d:[0-5]\d", walltime):
        raise ValueError(f"walltime {walltime!r} is not HH:MM:SS (minutes and seconds 00-59)")
    hours, minutes, secs = (int(p) for p in walltime.split(":"))
    return hours * 3600 + minutes * 60 + secs


class SiteLimits(_Strict):
    """How big one deployment may be and how long usage is kept (``limits``).

    ``deploy`` refuses a plan beyond these (``DeployLimitExceeded``, naming the limit and the
    size asked for), whoever asks; the site's own hosted plans must fit them too."""

    max_nodes: int = Field(8, ge=1, description="Nodes one deployment may ask for.")
    max_gpus: int = Field(32, ge=0, description="Accelerators one deployment may hold "
                          "(nodes x gpus_per_node).")
    max_walltime: str = "24:00:00"
    """Longest walltime of one deployment's job, HH:MM:SS (``jobs.walltime`` must fit)."""
    usage_retention_days: float = Field(31.0, gt=0, description="Raw usage rows (one per "
                                        "request and per finished request's tokens) older "
                                        "than this are deleted; quota counters are kept only "
                                        "as long as their window (a day).")

    @field_validator("max_walltime")
    @classmethod
    def _hhmmss(cls, value: str) -> str:
        walltime_seconds(value)
        return value
