"""``GatewayConfig``: what ``fabric serve`` was asked for, validated on construction.

The one rule that matters most lives here: a gateway bound anywhere but loopback must
authenticate its callers (``check_bind``), or it refuses to start.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from fabric.errors import AuthError

__all__ = ["GatewayConfig", "is_loopback"]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class GatewayConfig(BaseModel):
    """Options of ``fabric serve``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str = "local"
    """Site behind the gateway (name or definition folder)."""
    sites: list[str] | None = None
    """Several sites to route among (a federation, ``fabric.client.federation``); when set,
    ``site`` is ignored and the first of them gives the Globus policy callers are checked
    against."""
    host: str = "127.0.0.1"
    """Address to bind: loopback by default (the gateway serves this machine, no key needed);
    any other address requires authentication."""
    port: int = Field(8000, ge=0, le=65535)
    home: Path | None = None
    """Folder for keys, uploaded files and batches (default ``$FABRIC_HOME/gateway``)."""
    require_auth: bool | None = None
    """``None``: required exactly when the bind is not loopback."""
    rate: float = Field(20.0, ge=0, description="Requests per second per identity (0: off).")
    burst: int = Field(100, ge=1, description="Requests an identity may make at once.")
    max_concurrency: int = Field(256, ge=1, description="SDK calls in flight at once.")
    max_body_bytes: int = Field(100 * 2**20, ge=1024, description="Largest request or upload.")
    callers_kept: int = Field(10_000, ge=1, description=(
        "Globus callers whose site clients the gateway keeps; the least recently seen go "
        "first (a new token then makes a new one)."))

    @property
    def auth_required(self) -> bool:
        """Whether callers must authenticate."""
        return not is_loopback(self.host) if self.require_auth is None else self.require_auth

    def check_bind(self, active_keys: int, has_policy: bool) -> None:
        """Refuse to serve beyond this machine with nothing to check callers against."""
        if not is_loopback(self.host) and not self.auth_required:
            raise AuthError(f"refusing to serve on {self.host} without authentication: any "
                            "bind other than 127.0.0.1 needs it")
        if self.auth_required and active_keys == 0 and not has_policy:
            raise AuthError(
                f"refusing to serve on {self.host}: callers must authenticate there, but no API "
                "key is issued (create one with `fabric keys create NAME`) and the site has no "
                "Globus policy to check tokens against")
