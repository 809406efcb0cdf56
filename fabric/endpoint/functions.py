"""The fabric's endpoint functions: what request workers run for the SDK.

The client ships these by reference (Globus Compute's default code serializer pickles a
module-level function as ``module.name``), so this module must import cheaply: heavy modules
(the deployment manager, Parsl, the server client) are imported inside the functions.

Every function returns an envelope (``fabric.wire.gcwire.ok``/``error``) instead of raising a
``FabricError``: a raised exception reaches the client only as a traceback string, while the
envelope lets the transport re-raise the same typed error. Workers learn their site from
``FABRIC_SITE`` (a site name or definition path) and ``FABRIC_STATE_DIR``, set by the site
process (``fabric.siteproc``) or, at a remote endpoint, by the operator's ``worker_init``.
"""

from __future__ import annotations

import functools
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fabric.errors import (
    FabricError,
    ModelServerUnavailable,
    ResultTooLarge,
    UserFunctionError,
)
from fabric.wire.gcwire import error, ok

SITE_ENV = "FABRIC_SITE"
"""Environment variable naming the worker's site (name or definition path)."""
STATE_DIR_ENV = "FABRIC_STATE_DIR"
"""Environment variable overriding the site's state dir."""
RESULT_LIMIT_BYTES = 10 * 1024 * 1024 - 4096
"""Globus Compute refuses results over 10 MiB; leave room for the envelope."""

__all__ = [
    "cancel_request", "deploy", "deployment_status", "list_deployments", "list_models",
    "open_stream", "poll_stream", "run_request", "run_requests", "run_user_function", "undeploy",
]

F = TypeVar("F", bound=Callable[..., Any])
_CACHE: dict[str, Any] = {}


def endpoint_function(fn: F) -> F:
    """Return ``ok(value)``, or ``error(err)`` for a ``FabricError`` (others get a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return ok(fn(*args, **kwargs))
        except FabricError as err:
            return error(err)
        except Exception as exc:  # a bug at the site: say so, with where it happened
            return error(FabricError(f"internal error at the site: {type(exc).__name__}: {exc}",
                                     traceback=traceback.format_exc()))

    return wrapper  # type: ignore[return-value]


# -- site context (per worker process) ------------------------------------------------------

def current_site() -> tuple[Any, Path]:
    """This worker's ``(SiteConfig, state_dir)`` (loaded once per process)."""
    key = f"{os.environ.get(SITE_ENV, 'local')}|{os.environ.get(STATE_DIR_ENV, '')}"
    if _CACHE.get("site_key") != key:
        from fabric.sites import load_site

        site = load_site(os.environ.get(SITE_ENV, "local"))
        state = os.environ.get(STATE_DIR_ENV) or str(site.resolved_state_dir())
        _CACHE.clear()
        _CACHE.update(site_key=key, site=site, state_dir=Path(state).expanduser())
    return _CACHE["site"], _CACHE["state_dir"]


def catalog(site: Any) -> Any:
    """The built-in catalog plus the site's own models (its ``extra_models`` and registered)."""
    from fabric.models_registry import site_catalog

    return site_catalog(site, current_site()[1])


def manager() -> Any:
    """This worker's ``DeploymentManager``."""
    site, state_dir = current_site()
    if "manager" not in _CACHE:
        from fabric.endpoint.deployments import DeploymentManager

        _CACHE["manager"] = DeploymentManager(site, state_dir)
    return _CACHE["manager"]


def _authorize(auth: Any, model: str, tokens: int = 0) -> str:
    """The caller's identity if the site's policy lets it use ``model`` (else a typed denial)."""
    from fabric.endpoint.policy import authorize

    site, state_dir = current_site()
    return str(authorize(site, auth, model, state_dir, tokens=tokens))


def _token_estimate(req: Any) -> int:
    """Most tokens a request may use, for quota admission (~4 characters per token)."""
    text = (req.prompt or "") + "".join(m.get("content", "") for m in req.messages or [])
    text += "".join(req.prompts or [])
    new = req.sampling.max_tokens if req.kind == "generate" else 0
    return len(text) // 4 + req.batch_size + new


def _record_usage(identity: str, model: str, result: dict[str, Any], request_id: str) -> None:
    from fabric.endpoint.policy import record_usage

    usage = result.get("usage") or {}
    tokens = int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
    if tokens:
        record_usage(current_site()[1], identity, model, tokens, request_id)


def _plan(entry: Any, plan: dict[str, Any] | None) -> Any:
    """The site's default plan for ``entry`` with ``plan``'s fields overriding it."""
    if not plan:
        return None
    from fabric.sites import Plan

    site, _ = current_site()
    hosted = site.hosted(entry.name)
    base = hosted.plan.model_dump() if hosted else {"dtype": entry.dtype}
    return Plan.model_validate({**base, **plan})


# -- requests ---------------------------------------------------------------------------------

@endpoint_function
def run_request(request: dict[str, Any], auth: Any = None) -> dict[str, Any]:
    """Serve one ``InferenceRequest`` (as a dict) on a warm server; returns its result dict."""
    from fabric.protocol import validate_request

    req = validate_request(request)
    site, _ = current_site()
    identity = _authorize(auth, req.model, _token_estimate(req))
    entry = catalog(site).get(req.model, req.version)
    mgr = manager()
    for attempt in range(2):
        dep = mgr.ensure(entry)
        try:
            result = _serve(mgr, dep, req, identity)
            _record_usage(identity, req.model, result, req.request_id)
            return result
        except ModelServerUnavailable:
            # Died between the health check and the request? Relaunch once; if it is still
            # alive (just slow), the error stands.
            if attempt or mgr.refresh(dep).state != "dead":
                raise
    raise AssertionError("unreachable")  # pragma: no cover


@endpoint_function
def run_requests(requests: list[dict[str, Any]], auth: Any = None) -> list[dict[str, Any]]:
    """Serve several requests for one model in one task: all are in flight on the server at
    once (it batches them), results in order. For bulk work such as embedding a corpus."""
    from fabric.endpoint.handle import ModelHandle
    from fabric.errors import InvalidRequest
    from fabric.protocol import validate_request

    reqs = [validate_request(r) for r in requests]
    if not reqs or len({(r.model, r.version) for r in reqs}) != 1:
        raise InvalidRequest("run_requests needs a non-empty list of requests for one model")
    model, version = reqs[0].model, reqs[0].version
    identity = _authorize(auth, model, sum(_token_estimate(r) for r in reqs))
    handle = ModelHandle(model, version, identity=identity, timeout_s=3600.0)
    try:
        results = handle.request_many([r.model_dump(mode="json") for r in reqs])
    finally:
        handle.close()
    for req, result in zip(reqs, results, strict=True):
        _record_usage(identity, model, result, req.request_id)
    return results


def _serve(mgr: Any, dep: Any, req: Any, identity: str) -> dict[str, Any]:
    from fabric import tickets
    from fabric.serverclient import ServerClient

    ticket = tickets.issue(mgr.ticket_key(), model=dep.model, request_id=req.request_id,
                           subject=identity, ttl_s=300.0)
    with ServerClient(dep.address, dep.public_key, timeout_s=30.0) as client:
        client.submit(req, ticket, stream=False)
        deadline = time.monotonic() + (req.timeout + 30.0 if req.timeout else 24 * 3600.0)
        while True:
            try:
                result = client.result(req.request_id, timeout_s=10.0)
                break
            except ModelServerUnavailable:
                # No answer for a while is fine while the server is alive and busy.
                if time.monotonic() > deadline or mgr.health(dep) is None:
                    raise
    mgr.db.touch(dep.id)
    return result


@endpoint_function
def open_stream(request: dict[str, Any], auth: Any = None,
                mode: str = "direct") -> dict[str, Any]:
    """Prepare a stream: a warm server and a ticket for this request id.

    ``direct``: the client submits to the server itself (address, key, ticket returned).
    ``poll``: the request is submitted here and the server buffers its events for
    ``poll_stream``.
    """
    from fabric import tickets
    from fabric.protocol import validate_request

    req = validate_request(request)
    site, _ = current_site()
    identity = _authorize(auth, req.model, _token_estimate(req))
    entry = catalog(site).get(req.model, req.version)
    mgr = manager()
    dep = mgr.ensure(entry)
    ticket = tickets.issue(mgr.ticket_key(), model=dep.model, request_id=req.request_id,
                           subject=identity, ttl_s=3600.0)
    info = {"request_id": req.request_id, "address": dep.address, "public_key": dep.public_key,
            "ticket": ticket, "deployment_id": dep.id, "model": dep.model,
            "version": dep.version, "sha256": dep.sha256, "cursor": 0, "mode": mode}
    if mode == "poll":
        from fabric.serverclient import ServerClient

        with ServerClient(dep.address, dep.public_key) as client:
            # Detached: the server buffers the events for poll_stream after we disconnect.
            client.submit(req, ticket, stream=False, detach=True)
    return info


def _server_for(model: str) -> Any:
    dep = manager().find(model)
    if dep is None or not dep.address:
        raise ModelServerUnavailable(f"no live model server for {model}; it may have exited",
                                     model=model)
    return dep


@endpoint_function
def poll_stream(model: str, request_id: str, ticket: str, cursor: int, wait_s: float,
                auth: Any = None) -> dict[str, Any]:
    """Events of a polled stream after ``cursor`` (long-poll up to ``wait_s`` seconds)."""
    from fabric.serverclient import ServerClient

    _authorize(auth, model)
    dep = _server_for(model)
    with ServerClient(dep.address, dep.public_key) as client:
        reply = client.poll(request_id, ticket, int(cursor), float(wait_s))
    manager().db.touch(dep.id)
    return reply


@endpoint_function
def cancel_request(model: str, request_id: str, ticket: str, auth: Any = None) -> str:
    """Cancel a request at its server; returns what it was (queued/running/done/unknown)."""
    from fabric.serverclient import ServerClient

    _authorize(auth, model)
    dep = _server_for(model)
    with ServerClient(dep.address, dep.public_key) as client:
        return client.cancel(request_id, ticket)


# -- deployments and models -------------------------------------------------------------------

@endpoint_function
def deployment_status(model: str, version: str | None = None,
                      plan: dict[str, Any] | None = None, auth: Any = None) -> dict[str, Any]:
    """Non-blocking: state (absent/queued/loading/ready/dead), queue position, message."""
    site, _ = current_site()
    _authorize(auth, model)
    entry = catalog(site).get(model, version)
    return dict(manager().status(entry, _plan(entry, plan)))


@endpoint_function
def deploy(model: str, plan: dict[str, Any] | None = None, auth: Any = None,
           version: str | None = None) -> dict[str, Any]:
    """Launch (pre-warm) a deployment; ``plan`` fields (pp, tp...) override the site's."""
    site, _ = current_site()
    _authorize(auth, model)
    entry = catalog(site).get(model, version)
    mgr = manager()
    dep = mgr.deploy(entry, _plan(entry, plan))
    return dict(mgr.describe(mgr.refresh(dep)))


@endpoint_function
def undeploy(deployment_id: str, auth: Any = None) -> dict[str, Any]:
    """Drain and stop one deployment; returns its final record."""
    mgr = manager()
    dep = mgr.db.get(deployment_id)
    if dep is None:
        from fabric.errors import DeploymentError

        known = [d.id for d in mgr.db.query(states=("queued", "loading", "ready"))]
        raise DeploymentError(f"no deployment {deployment_id!r}; live: {known}",
                              deployment=deployment_id, available=known)
    _authorize(auth, dep.model)
    return dict(mgr.describe(mgr.undeploy(deployment_id)))


@endpoint_function
def list_deployments(auth: Any = None, include_dead: bool = False) -> list[dict[str, Any]]:
    """Deployments with plan, job id, state, address, idle time and server health."""
    return list(manager().list_all(include_dead=include_dead))


@endpoint_function
def list_models(auth: Any = None) -> list[dict[str, Any]]:
    """The site's catalog: name, version, family, size, hosted plan and live deployments."""
    site, _ = current_site()
    mgr = manager()
    out = []
    for entry in catalog(site).entries():
        hosted = site.hosted(entry.name)
        deps = mgr.db.query(model=entry.name, version=entry.version,
                           states=("queued", "loading", "ready", "draining"))
        out.append({
            "name": entry.name, "version": entry.version, "family": entry.family,
            "params": entry.params, "size": _size(entry.params),
            "description": entry.description, "site": site.name,
            "hosted": hosted is not None or entry in site.extra_models
            or entry.source.sha256 is not None,
            "plan": (hosted.plan.model_dump() if hosted else None),
            **_identity(entry),
            "deployments": [{"id": d.id, "state": d.state} for d in deps],
        })
    return out


def _identity(entry: Any) -> dict[str, Any]:
    """Size on disk and weights hash where already known (never hashes: a listing)."""
    from fabric.weights import known_identity

    known = known_identity(entry)
    return {"size_bytes": known.size_bytes if known else None,
            "sha256": known.sha256 if known else None}


def _size(params: int) -> str:
    if params >= 1e9:
        return f"{params / 1e9:.1f}B"
    if params >= 1e6:
        return f"{params / 1e6:.0f}M"
    return f"{params / 1e3:.0f}K" if params else "?"


# -- user functions ---------------------------------------------------------------------------

@endpoint_function
def run_user_function(fn: Callable[..., Any], args: tuple[Any, ...] = (),
                      kwargs: dict[str, Any] | None = None, model: str | None = None,
                      auth: Any = None, version: str | None = None) -> Any:
    """Run ``fn(handle, *args, **kwargs)`` here, ``handle`` bound to ``model``'s warm server."""
    from fabric.endpoint.handle import ModelHandle
    from fabric.endpoint.policy import check_function

    site, _ = current_site()
    name = getattr(fn, "__name__", type(fn).__name__)
    check_function(site, name, user_function=True)
    identity = _authorize(auth, model or "")
    if model is not None:
        catalog(site).get(model, version)  # unknown models fail before the user's code runs
    handle = ModelHandle(model, version, identity=identity)
    try:
        value = fn(handle, *tuple(args), **dict(kwargs or {}))
    except FabricError:
        raise  # a typed error from the handle (e.g. ContextLengthExceeded) stays typed
    except Exception as exc:
        raise UserFunctionError(
            f"{name} raised {type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(), exception_type=type(exc).__name__) from None
    finally:
        handle.close()
    _check_returnable(name, value)
    return value


def _check_returnable(name: str, value: Any) -> None:
    """Fail here, typed, rather than as an opaque serialization error in the engine."""
    from fabric.wire.gcwire import default_serializer

    if _surely_returnable(value):
        return  # serialising it twice (here and in the engine) would only cost time
    try:
        size = len(default_serializer().serialize(ok(value)))
    except Exception as exc:
        raise UserFunctionError(
            f"{name} returned a {type(value).__name__}, which cannot be serialised to send "
            f"back: {exc}", reason="unserialisable", type=type(value).__name__) from None
    if size > RESULT_LIMIT_BYTES:
        raise ResultTooLarge(
            f"{name} returned {size} bytes serialised; one result may carry at most "
            f"{RESULT_LIMIT_BYTES}: write large outputs to the site's filesystem",
            size=size, limit=RESULT_LIMIT_BYTES)


def _surely_returnable(value: Any) -> bool:
    """True for small values of built-in scalar types: they always serialise well within the
    result limit (base64 of UTF-8 is at most ~5.4 bytes a character, hence the // 8)."""
    kind = type(value)
    if value is None or kind is bool or kind is float:
        return True
    if kind is int:
        return bool(value.bit_length() <= 4096)
    return (kind is str or kind is bytes) and len(value) <= RESULT_LIMIT_BYTES // 8
