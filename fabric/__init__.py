"""tpm-fabric: a federated, function-as-a-service inference fabric for very large models.

``from fabric import Fabric`` is the SDK; every error it raises is a ``FabricError``.
``Fabric`` is loaded on first access so that the model server and endpoint workers, which import
``fabric.protocol`` and friends, do not pay for the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fabric.errors import (
    AccessDenied,
    AuthError,
    Cancelled,
    ContextLengthExceeded,
    DeadlineExceeded,
    DeploymentError,
    EndpointError,
    FabricError,
    FunctionNotAllowed,
    InvalidHook,
    InvalidManifest,
    InvalidRequest,
    InvalidSiteConfig,
    ModelServerUnavailable,
    Overloaded,
    QuotaExceeded,
    ResultTooLarge,
    TicketInvalid,
    UnknownModel,
    UserFunctionError,
)

if TYPE_CHECKING:
    from fabric.client.streaming import Stream
    from fabric.protocol import GenerationResult
    from fabric.sdk import Fabric

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AsyncFabric",
    "AuthError",
    "Cancelled",
    "ContextLengthExceeded",
    "DeadlineExceeded",
    "DeploymentError",
    "EndpointError",
    "Fabric",
    "FabricError",
    "FunctionNotAllowed",
    "GenerationResult",
    "InvalidHook",
    "InvalidManifest",
    "InvalidRequest",
    "InvalidSiteConfig",
    "ModelServerUnavailable",
    "Overloaded",
    "QuotaExceeded",
    "ResultTooLarge",
    "Stream",
    "TicketInvalid",
    "UnknownModel",
    "UserFunctionError",
]

_LAZY = {
    "AsyncFabric": "fabric.aio",
    "Fabric": "fabric.sdk",
    "Stream": "fabric.client.streaming",
    "GenerationResult": "fabric.protocol",
}


def __getattr__(name: str) -> Any:
    """Load the SDK classes on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fabric' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
