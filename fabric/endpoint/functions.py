"""The fabric's endpoint functions: what request workers run for the SDK.

The client ships these by reference (Globus Compute's default code serializer pickles a
module-level function as ``module.name``), so this module must import cheaply: heavy modules
(the deployment manager, Parsl, the server client) are imported inside the functions.

Every function is declared with ``fabric.endpoint.registry.endpoint_function(auth)``: it returns
an envelope (``fabric.wire.gcwire.ok``/``error``) instead of raising a ``FabricError`` (a raised
exception reaches the client only as a traceback string, while the envelope lets the transport
re-raise the same typed error), and the registry records how it is authorized. Each function
takes its worker's ``SiteContext`` (``fabric.endpoint.context.current()``: the site named by
``FABRIC_SITE`` / ``FABRIC_STATE_DIR``) once and passes it to what it calls.
"""

from __future__ import annotations

from typing import Any

from fabric.endpoint.context import SiteContext, current
from fabric.endpoint.registry import endpoint_function
from fabric.endpoint.session import token_estimate
from fabric.errors import (
    ModelServerUnavailable,
)

__all__ = [
    "cancel_request", "deploy", "deployment_status", "list_deployments", "list_models",
    "open_stream", "open_streams", "poll_requests", "run_request", "run_requests",
    "run_user_function", "undeploy",
]


def _record_usage(ctx: SiteContext, identity: str, model: str, result: dict[str, Any],
                  request_id: str) -> None:
    usage = result.get("usage") or {}
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    ctx.record_usage(identity, model, prompt + completion, request_id, prompt_tokens=prompt,
                     completion_tokens=completion)


# -- requests ---------------------------------------------------------------------------------

@endpoint_function("model")
def run_request(request: dict[str, Any], auth: Any = None) -> dict[str, Any]:
    """Serve one ``InferenceRequest`` (as a dict) on a warm server; returns its result dict."""
    from fabric.protocol import validate_request

    req = validate_request(request)
    ctx = current()
    identity = ctx.authorize(auth, req.model, token_estimate(req), version=req.version)
    timeout = req.timeout + 30.0 if req.timeout else 24 * 3600.0
    (result,) = _serve(ctx, req.model, req.version, identity, [req], timeout)
    return result


@endpoint_function("model")
def run_requests(requests: list[dict[str, Any]], auth: Any = None) -> list[dict[str, Any]]:
    """Serve several requests for one model in one task: all are in flight on the server at
    once (it batches them), results in order. For bulk work such as embedding a corpus."""
    from fabric.errors import InvalidRequest
    from fabric.protocol import validate_request

    reqs = [validate_request(r) for r in requests]
    if not reqs or len({(r.model, r.version) for r in reqs}) != 1:
        raise InvalidRequest("run_requests needs a non-empty list of requests for one model")
    model, version = reqs[0].model, reqs[0].version
    ctx = current()
    identity = ctx.authorize(auth, model, sum(token_estimate(r) for r in reqs),
                              version=version)
    return _serve(ctx, model, version, identity, reqs, 3600.0)


def _serve(ctx: SiteContext, model: str, version: str | None, identity: str, reqs: list[Any],
           timeout_s: float) -> list[dict[str, Any]]:
    """Results of ``reqs`` in order (or the first input's typed error), usage recorded."""
    from fabric.endpoint.session import ServerSession, raise_first

    session = ServerSession(ctx, ctx.entry(model, version), identity, timeout_s=timeout_s)
    try:
        results = raise_first(session.run(reqs))
    finally:
        session.close()
    for req, result in zip(reqs, results, strict=True):
        _record_usage(ctx, identity, model, result, req.request_id)
    return results


@endpoint_function("model")
def open_stream(request: dict[str, Any], auth: Any = None, mode: str = "direct",
                hold_s: float = 0.0, first_events: bool = False) -> dict[str, Any]:
    """Admit a request and hand it off: a warm server and a ticket for this request id
    (``fabric.endpoint.admission``).

    ``direct``: the client submits to the server itself (address, key, ticket returned).
    ``poll``: the request is submitted here and the server buffers its events for
    ``poll_requests``. ``hold_s`` (poll only, at most ``MAX_HOLD_S``): wait
    that long here for the result, returned inline (``done``) if it came: a lone short request
    then costs one task, not an admission and a poll. ``first_events`` (a stream): hold only
    until its first events and return them inline (``events``), so a remote stream's first
    token costs one task round trip, not an admission's and then a poll's.
    """
    from fabric.endpoint.admission import admit_one

    return admit_one(current(), request, auth, mode, float(hold_s), bool(first_events))


@endpoint_function("model")
def open_streams(items: list[dict[str, Any]], auth: Any = None) -> list[dict[str, Any]]:
    """``open_stream`` for several requests of one client in one task (the SDK queues its
    admissions while the site's workers are busy, and sends what queued together):
    ``items`` are ``{request, mode, hold_s, first_events}``; each answer is ``{"info": ...}``
    or ``{"error": ...}``, so one refused request does not refuse the others."""
    from fabric.endpoint.admission import admit_many

    return admit_many(current(), list(items) if isinstance(items, list) else items, auth)


def _server_for(ctx: SiteContext, model: str) -> Any:
    dep = ctx.manager.find(model)
    if dep is None or not dep.address:
        raise ModelServerUnavailable(f"no live model server for {model}; it may have exited",
                                     model=model)
    return dep


@endpoint_function("model")
def poll_requests(polls: list[dict[str, Any]], wait_s: float,
                  statuses: list[dict[str, Any]] | None = None,
                  auth: Any = None) -> dict[str, Any]:
    """One long-poll for all of a client's open requests and watched cold starts: held here
    up to ``wait_s`` until any has news (``fabric.endpoint.relay``). ``polls``:
    ``{model, request_id, ticket, cursor, events}`` (``events``: a stream wants its tokens,
    a plain request only its result); ``statuses``: ``{model, version, state}``. Only the
    identity that started a request may poll it (its ticket names it): another one's poll
    gets ``AccessDenied`` in that request's reply."""
    from fabric.endpoint.relay import poll_many

    ctx = current()
    identity = ""
    models = {str(p.get("model")) for p in polls} | {str(s.get("model")) for s in statuses or []}
    for model in sorted(models):
        identity = ctx.authorize(auth, model, count=False)  # follow-ups, not new requests
    return poll_many(ctx, identity, list(polls), float(wait_s), statuses)


@endpoint_function("model")
def cancel_request(model: str, request_id: str, ticket: str, auth: Any = None) -> str:
    """Cancel a request at its server; returns what it was (queued/running/done/unknown)."""
    from fabric.serverclient import ServerClient

    ctx = current()
    identity = ctx.authorize(auth, model, count=False)  # a follow-up, not a new request
    dep = _server_for(ctx, model)
    ctx.check_request_owner(identity, dep.model, request_id, ticket, "cancel")
    with ServerClient(dep.address, dep.public_key) as client:
        return client.cancel(request_id, ticket)


# -- deployments and models -------------------------------------------------------------------

@endpoint_function("model")
def deployment_status(model: str, version: str | None = None,
                      plan: dict[str, Any] | None = None, auth: Any = None,
                      deployment: str | None = None) -> dict[str, Any]:
    """Non-blocking: state (absent/queued/loading/ready/dead), queue position, message.
    ``deployment``: that deployment's own state (one ``deploy`` launched), dead included:
    a dead one is no longer live, and the model's state would then read ``absent``."""
    ctx = current()
    ctx.authorize(auth, model, count=False)  # a follow-up, not a new request
    entry = ctx.entry(model, version)
    mgr = ctx.manager
    dep = mgr.db.get(deployment) if deployment else None
    if dep is not None and dep.model == entry.name:
        return dict(mgr.describe(mgr.refresh(dep)))
    return dict(mgr.status(entry, ctx.plan(entry, plan)))


@endpoint_function("admin")
def deploy(model: str, plan: dict[str, Any] | None = None, auth: Any = None,
           version: str | None = None) -> dict[str, Any]:
    """Launch (pre-warm) a deployment; ``plan`` fields (pp, tp...) override the site's."""
    ctx = current()
    ctx.authorize_admin(auth, "deploy")
    entry = ctx.entry(model, version)
    chosen = ctx.plan(entry, plan)
    ctx.check_deploy_size(chosen or ctx.default_plan(entry))
    mgr = ctx.manager
    dep = mgr.deploy(entry, chosen)
    return dict(mgr.describe(mgr.refresh(dep)))


@endpoint_function("admin")
def undeploy(deployment_id: str, auth: Any = None) -> dict[str, Any]:
    """Drain and stop one deployment; returns its final record."""
    ctx = current()
    ctx.authorize_admin(auth, "undeploy")  # before anything about the deployment is said
    mgr = ctx.manager
    dep = mgr.db.get(deployment_id)
    if dep is None:
        from fabric.errors import DeploymentError

        known = [d.id for d in mgr.db.query(states=("queued", "loading", "ready"))]
        raise DeploymentError(f"no deployment {deployment_id!r}; live: {known}",
                              deployment=deployment_id, available=known)
    return dict(mgr.describe(mgr.undeploy(deployment_id)))


@endpoint_function("listing")
def list_deployments(auth: Any = None, include_dead: bool = False) -> list[dict[str, Any]]:
    """Deployments with plan, job id, state, address, idle time and server health."""
    ctx = current()
    ctx.identify(auth)
    return list(ctx.manager.list_all(include_dead=include_dead))


@endpoint_function("listing")
def list_models(auth: Any = None) -> list[dict[str, Any]]:
    """The site's catalog: name, version, family, size, hosted plan and live deployments."""
    ctx = current()
    ctx.identify(auth)
    site, mgr = ctx.site, ctx.manager
    out = []
    for entry in ctx.catalog.entries():
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
            **_identity(entry, mgr),
            "deployments": [{"id": d.id, "state": d.state} for d in deps],
        })
    return out


def _identity(entry: Any, mgr: Any) -> dict[str, Any]:
    """Size on disk and weights hash where already known: registered, or settled by a server
    of this version (the site's record, else the folder's manifest). Never hashes: a
    listing."""
    from pathlib import Path

    from fabric.weights import known_identity

    site = mgr.db.weights_of(entry.name, entry.version)
    if site is not None and not entry.source.sha256:
        return {"size_bytes": site["size_bytes"], "sha256": site["sha256"]}
    known = known_identity(entry, Path(mgr.site.weights_dir).expanduser()
                           if mgr.site.weights_dir else None)
    return {"size_bytes": known.size_bytes if known else None,
            "sha256": known.sha256 if known else None}


def _size(params: int) -> str:
    if params >= 1e9:
        return f"{params / 1e9:.1f}B"
    if params >= 1e6:
        return f"{params / 1e6:.0f}M"
    return f"{params / 1e3:.0f}K" if params else "?"


# -- user functions ---------------------------------------------------------------------------

@endpoint_function("user_function")
def run_user_function(call: str, model: str | None = None, auth: Any = None,
                      version: str | None = None) -> bytes:
    """Run the caller's ``fn(handle, *args, **kwargs)`` (``call``: the SDK's
    ``fabric.wire.usercode.pack_call``, still pickled) in a process of its own
    (``fabric.endpoint.sandbox``), ``handle`` bound to ``model`` by a capability; returns
    the value pickled for the caller (``fabric.wire.usercode.unpack_value``). Nothing of
    the call is unpickled in this worker: a crafted pickle runs, at worst, where a user
    function runs."""
    from fabric.endpoint.sandbox import run_user_call
    from fabric.errors import InvalidRequest

    ctx = current()
    ctx.check_user_function("run_user_function")
    if not isinstance(call, str):
        raise InvalidRequest("run_user_function takes the call as the SDK packs it (a string)")
    identity = ctx.authorize(auth, model or "", version=version)
    if model is not None:
        ctx.entry(model, version)  # unknown models fail before the user's code runs
    return run_user_call(ctx, call, model=model, version=version, identity=identity,
                         auth=auth)
