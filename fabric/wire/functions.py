"""Named references to the fabric's endpoint functions: how a client names what runs at a site.

The fabric's endpoint functions travel by reference: Globus Compute's default code serializer
(``DillCode``) pickles a module-level function as its ``module`` and ``name``, and the worker
imports it. A client therefore needs the *names*, not the code: ``EndpointFunction`` is such a
name. It serialises to exactly the bytes of the real function (same pickle, same code buffer,
same registration hash), so the site's worker unpickles the real function, and the client
never imports the endpoint (``tests/test_layering.py``).

``FABRIC_FUNCTIONS`` is the one list of the fabric's endpoint functions: the site's allow-list,
the operator's registration (``fabric register-functions``) and the SDK read it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FUNCTIONS_MODULE = "fabric.endpoint.functions"
"""Where the request, stream and deployment functions live at the site."""
SHARD_MODULE = "fabric.endpoint.campaign_shard"
"""Where a campaign's shard function lives at the site."""


@dataclass(frozen=True)
class EndpointFunction:
    """``module.name`` of one endpoint function, with its parameter names.

    Calling it (in a process that has the whole fabric) calls the real function; a transport
    ships it as the real function. ``params`` give ``inspect.signature`` what it needs to fill
    in ``auth`` without importing the function.
    """

    module: str
    name: str
    params: tuple[str, ...]
    data_only: bool = True
    """Its arguments are plain JSON data (``fabric.wire.gcwire.is_plain_data``): a site
    refuses them in any other (pickled) form. Every fabric function's are: even
    ``run_user_function`` takes the caller's code as a string (``fabric.wire.usercode``) that
    only the user function's own process unpickles."""
    runs_code: bool = False
    """It runs the caller's code: refused before a worker sees it where the site does not
    allow user functions."""

    def __post_init__(self) -> None:
        # What serializers, registries and error messages read off a function (instance
        # attributes: in the class body these two would rename the class itself).
        object.__setattr__(self, "__name__", self.name)
        object.__setattr__(self, "__qualname__", self.name)

    @property
    def __signature__(self) -> inspect.Signature:
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        return inspect.Signature([inspect.Parameter(p, kind) for p in self.params])

    def resolve(self) -> Callable[..., Any]:
        """The real function (imports its module: only where the endpoint is installed)."""
        return resolve(self.module, self.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # Only reached by a pickler without ``install_reducer``'s hook (e.g. stdlib pickle):
        # a call that resolves to the real function on the far side, in other bytes.
        return (resolve, (self.module, self.name))


def resolve(module: str, name: str) -> Callable[..., Any]:
    """The function ``module.name`` (the far side of ``EndpointFunction.__reduce_ex__``)."""
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise TypeError(f"{module}.{name} is not callable")
    return fn


@functools.cache
def install_reducer() -> None:
    """Make dill (Globus Compute's code serializer) write an ``EndpointFunction`` as the
    global ``module.name``, byte for byte what it writes for the real function.

    ``pickle``'s own ``save_global`` would import the module to check the object is the one
    found there; the reference is not, by design, and this process may not have the module.
    dill is imported here, not with this module: it costs ~50 ms that plain callers never need.
    """
    import dill

    def save(pickler: Any, obj: EndpointFunction) -> None:
        # What pickle._Pickler.save_global writes once its check has passed.
        if pickler.proto >= 4:
            pickler.save(obj.module)
            pickler.save(obj.name)
            pickler.write(pickle.STACK_GLOBAL)
        else:
            pickler.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        pickler.memoize(obj)

    dill.register(EndpointFunction)(save)


def _fn(module: str, name: str, *params: str, runs_code: bool = False) -> EndpointFunction:
    return EndpointFunction(module, name, params, True, runs_code)


run_request = _fn(FUNCTIONS_MODULE, "run_request", "request", "auth")
run_requests = _fn(FUNCTIONS_MODULE, "run_requests", "requests", "auth")
open_stream = _fn(FUNCTIONS_MODULE, "open_stream", "request", "auth", "mode", "hold_s",
                  "first_events")
open_streams = _fn(FUNCTIONS_MODULE, "open_streams", "items", "auth")
poll_requests = _fn(FUNCTIONS_MODULE, "poll_requests", "polls", "wait_s", "statuses", "auth")
cancel_request = _fn(FUNCTIONS_MODULE, "cancel_request", "model", "request_id", "ticket", "auth")
run_user_function = _fn(FUNCTIONS_MODULE, "run_user_function", "call", "model", "auth", "version",
                        runs_code=True)
deployment_status = _fn(FUNCTIONS_MODULE, "deployment_status", "model", "version", "plan",
                        "auth", "deployment")
deploy = _fn(FUNCTIONS_MODULE, "deploy", "model", "plan", "auth", "version")
undeploy = _fn(FUNCTIONS_MODULE, "undeploy", "deployment_id", "auth")
list_deployments = _fn(FUNCTIONS_MODULE, "list_deployments", "auth", "include_dead")
list_models = _fn(FUNCTIONS_MODULE, "list_models", "auth")
run_shard = _fn(SHARD_MODULE, "run_shard", "shard", "auth")

FABRIC_FUNCTIONS: tuple[EndpointFunction, ...] = (
    run_request, run_requests, open_stream, open_streams, poll_requests, cancel_request,
    run_user_function, deployment_status, deploy, undeploy, list_deployments, list_models,
    run_shard,
)
"""Every endpoint function of the fabric (what every site allows)."""
NAMES = frozenset(f.name for f in FABRIC_FUNCTIONS)
"""Their names."""
_BY_NAME = {(f.module, f.name): f for f in FABRIC_FUNCTIONS}


def reference(fn: Any) -> EndpointFunction | None:
    """The reference for ``fn``: itself, or the one naming the real function; else None."""
    if isinstance(fn, EndpointFunction):
        return fn
    return _BY_NAME.get((str(getattr(fn, "__module__", "")), str(getattr(fn, "__name__", ""))))
