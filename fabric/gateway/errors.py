"""The fabric's typed errors as OpenAI error responses.

An OpenAI client reads ``{"error": {"message", "type", "param", "code"}}`` and decides from the
HTTP status whether to retry (429 and 5xx, honouring ``Retry-After``). Each ``FabricError``
subclass maps to the status that says the same thing; the most specific class wins.
"""

from __future__ import annotations

import math
from typing import Any

from fabric.errors import (
    AccessDenied,
    AuthError,
    ContextLengthExceeded,
    DeadlineExceeded,
    DeploymentError,
    EndpointError,
    FabricError,
    InvalidRequest,
    ModelServerUnavailable,
    Overloaded,
    QuotaExceeded,
    RequestTooLarge,
    ResultTooLarge,
    UnknownModel,
)

__all__ = ["GatewayStopping", "NotFound", "PayloadTooLarge", "error_body", "retry_after",
           "status_of"]


class GatewayStopping(FabricError):
    """The gateway is shutting down (``fabric serve`` interrupted): a stream still open ends
    with this error event (503); the request may be sent again to a gateway that runs."""

    retryable = True


class NotFound(InvalidRequest):
    """A file or batch id the caller does not have (404)."""


class PayloadTooLarge(RequestTooLarge):
    """A request body or upload over the gateway's limit (413)."""


# (class, HTTP status, OpenAI error type, code): checked in order, so subclasses come first.
_MAP: tuple[tuple[type[FabricError], int, str, str | None], ...] = (
    (AuthError, 401, "authentication_error", "invalid_api_key"),
    (QuotaExceeded, 429, "rate_limit_error", "rate_limit_exceeded"),
    (AccessDenied, 403, "permission_error", "access_denied"),
    (UnknownModel, 404, "invalid_request_error", "model_not_found"),
    (NotFound, 404, "invalid_request_error", "not_found"),
    (RequestTooLarge, 413, "invalid_request_error", "payload_too_large"),
    (ResultTooLarge, 413, "invalid_request_error", "result_too_large"),
    (ContextLengthExceeded, 400, "invalid_request_error", "context_length_exceeded"),
    (InvalidRequest, 400, "invalid_request_error", None),
    (Overloaded, 429, "rate_limit_error", "overloaded"),
    (ModelServerUnavailable, 503, "server_error", "model_server_unavailable"),
    (DeploymentError, 503, "server_error", "deployment_failed"),
    (EndpointError, 503, "server_error", "site_unavailable"),
    (GatewayStopping, 503, "server_error", "gateway_stopping"),
    (DeadlineExceeded, 504, "server_error", "timeout"),
)


def status_of(exc: FabricError) -> tuple[int, str, str | None]:
    """``(HTTP status, OpenAI error type, code)`` for a fabric error."""
    for cls, status, kind, code in _MAP:
        if isinstance(exc, cls):
            return status, kind, code
    return 500, "server_error", type(exc).__name__


def retry_after(exc: FabricError) -> int | None:
    """Whole seconds for a ``Retry-After`` header (at least 1), or None if not retryable."""
    if not exc.retryable:
        return None
    value = exc.details.get("retry_after")
    try:
        seconds = float(value) if value is not None else 1.0
    except (TypeError, ValueError):
        seconds = 1.0
    return max(1, math.ceil(seconds))


def error_body(exc: FabricError) -> dict[str, Any]:
    """The OpenAI error object for ``exc`` (``param`` names the bad argument when known)."""
    _, kind, code = status_of(exc)
    param = exc.details.get("param") or exc.details.get("field")
    return {"error": {"message": exc.message, "type": kind,
                      "param": param if isinstance(param, str) else None,
                      "code": code or type(exc).__name__}}
