"""The one registry of endpoint functions: what a site runs for callers, and how each is
authorized.

Every endpoint function is declared with ``@endpoint_function(auth)``. The decorator

* wraps the function so it returns an envelope (``fabric.wire.gcwire.ok``/``error``) instead
  of raising: a raised ``FabricError`` would reach the client only as a traceback string;
* records it here with its authorization kind (``AUTH_KINDS``).

What reads the registry: the policy's allow-list (``policy.check_function``), the operator's
registration with Globus Compute (``fabric.globus.transport.register_functions``, whose ids
fill the endpoint's ``allowed_functions``) and the tests that keep both equal to it.

Functions are shipped by reference (``module.name``), so the module paths in ``MODULES`` are
part of the wire contract. This module imports only the standard library and the envelopes:
workers load it before anything else.
"""

from __future__ import annotations

import functools
import importlib
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from fabric.errors import FabricError
from fabric.wire.gcwire import error, ok

AuthKind = Literal["model", "admin", "listing", "user_function"]
"""How an endpoint function is authorized:

``model``: the caller must be allowed to use the model named in the call (``policy.authorize``;
quotas count new requests). ``admin``: it changes a deployment (deploy, undeploy): only
identities the site's ``policy.admins`` names (``policy.authorize_admin``), and a deploy's plan
must fit the site's ``limits``. ``listing``: it reads the site's catalog or
deployments: the caller's identity is verified where the site has a policy, no model rule
applies. ``user_function``: it runs the caller's code, where the site allows user functions,
after ``model`` authorization."""
AUTH_KINDS: tuple[str, ...] = ("model", "admin", "listing", "user_function")

MODULES: tuple[str, ...] = ("fabric.endpoint.functions", "fabric.endpoint.campaign_shard")
"""The modules that hold the fabric's endpoint functions (the whole surface of a site)."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class EndpointFunction:
    """One registered endpoint function."""

    name: str
    module: str
    auth: str
    fn: Callable[..., Any]


_REGISTRY: dict[str, EndpointFunction] = {}


def endpoint_function(auth: AuthKind) -> Callable[[F], F]:
    """Declare an endpoint function authorized as ``auth`` (see ``AuthKind``); it returns
    ``ok(value)``, or ``error(err)`` for a ``FabricError`` (others get a traceback)."""
    if auth not in AUTH_KINDS:
        raise ValueError(f"unknown authorization kind {auth!r}; one of {AUTH_KINDS}")

    def register(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return ok(fn(*args, **kwargs))
            except FabricError as err:
                _note_refusal(fn, args, kwargs, err)
                return error(err)
            except Exception as exc:  # a bug at the site: say so, with where it happened
                return error(FabricError(
                    f"internal error at the site: {type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc()))

        if fn.__module__ not in MODULES:
            raise ValueError(f"{fn.__module__}.{fn.__name__}: endpoint functions live in "
                             f"{MODULES} (their paths are part of the wire contract)")
        _REGISTRY[fn.__name__] = EndpointFunction(fn.__name__, fn.__module__, auth, wrapper)
        return wrapper  # type: ignore[return-value]

    return register


def _note_refusal(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                  err: FabricError) -> None:
    """Count a refused call for the site's ``/metrics`` (``site_events``), in a worker of a
    site process (which sets ``FABRIC_STATE_DIR``); never fails the call."""
    first = args[0] if args else kwargs.get("request")
    model = first.get("model") if isinstance(first, dict) else kwargs.get("model")
    if model is None and isinstance(first, str) and fn.__code__.co_varnames[:1] == ("model",):
        model = first  # cancel_request, deployment_status, deploy: the model first
    if model is None and isinstance(first, list) and first and isinstance(first[0], dict):
        model = first[0].get("model")  # run_requests
    note_refusal(str(model or ""), err)


def note_refusal(model: str, err: FabricError) -> None:
    """Count one refused request for ``model`` for the site's ``/metrics`` (``site_events``),
    in a worker of a site process (which sets ``FABRIC_STATE_DIR``); never fails the call.
    (``open_streams`` refuses requests one by one, not the whole call.)"""
    from fabric import env

    state_dir = env.FABRIC_STATE_DIR.get()
    if not state_dir:
        return
    try:
        from pathlib import Path

        from fabric.endpoint.site_events import record_refusal

        record_refusal(Path(state_dir), model, err)
    except Exception:  # a metric must not turn a typed refusal into an internal error
        pass


def functions() -> dict[str, EndpointFunction]:
    """Every endpoint function of the fabric, by name (their modules imported first: a
    module's functions register when it is imported)."""
    for module in MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)


def names() -> frozenset[str]:
    """Names of every endpoint function: the allow-list of fabric functions."""
    return frozenset(functions())
