"""The user's config file, ``$FABRIC_HOME/config.yaml`` (default ``~/.fabric/config.yaml``).

.. code:: yaml

    sites: [polaris, aurora, local]     # Fabric() with no site routes among these
    routing:                            # fabric.client.routing.RoutingConfig
      status_ttl_s: 2
      status_timeout_s: 3
      down_ttl_s: 5

A missing file means no federation (``Fabric()`` is the local site); a malformed one is an
``InvalidRequest`` naming the file and the field, never silently ignored.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fabric.client.routing import RoutingConfig
from fabric.env import fabric_home
from fabric.errors import InvalidRequest

__all__ = ["CONFIG_FILE", "UserConfig", "config_path", "load_user_config"]

CONFIG_FILE = "config.yaml"


class UserConfig(BaseModel):
    """What the user's config file may hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sites: list[str] = Field(default_factory=list)
    """Sites (names or definition folders) a ``Fabric()`` without a site routes among."""
    routing: RoutingConfig = Field(default_factory=RoutingConfig)


def config_path() -> Path:
    """Where the user's config file is read from."""
    return fabric_home() / CONFIG_FILE


def load_user_config(path: Path | None = None) -> UserConfig:
    """The user's config (defaults when the file does not exist)."""
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return UserConfig()
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc}", path=str(path)) from None
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InvalidRequest(f"{path} is not valid YAML: {exc}", path=str(path)) from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"{path} must be a map of fields (sites, routing)", path=str(path))
    try:
        return UserConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        raise InvalidRequest(f"{path}: {problems}", path=str(path)) from None
