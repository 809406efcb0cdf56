"""``GlobusTransport``: the SDK's way to a site behind a Globus Compute endpoint.

Same ``Transport`` surface as the local site; what differs is the hop:

    Fabric.generate --submit(run_request, request, auth=None)--> GlobusTransport
        1. fills ``auth`` with the caller's identity proof (a token for the site's scope)
        2. finds the function id: the operator's registered id (``function_ids``, the ones
           the endpoint's ``allowed_functions`` lists), else a cached registration by hash
        3. executor.submit_to_registered_function  (globus_compute_sdk.Executor batches
           submissions and keeps one task group, persisted so a restarted client can
           ``recover()`` results)
        4. unwraps the endpoint envelope: the value, or the same typed ``FabricError``

The client cannot reach a remote site's model servers, so ``can_reach_servers`` is False and
results and streams come through the client's one long-poll (``fabric.client.poller``:
``poll_requests`` tasks serving every open request and stream, held at the site). The tests
run it with its own real Executor against a local fake of the web service, a real broker and the
real endpoint daemon (``fabric.testing.globus_offline``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fabric import env
from fabric.errors import (
    AccessDenied,
    AuthError,
    EndpointError,
    FabricError,
    FunctionNotAllowed,
    ResultTooLarge,
    UserFunctionError,
)
from fabric.sites import SiteConfig
from fabric.wire import functions, gcwire

log = logging.getLogger(__name__)


class _JSONFile:
    """A small JSON map on disk, updated under a lock, written atomically (mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        return self.read().get(key)

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            data = self.read()
            if data.get(key) == value:
                return
            data[key] = value
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)


class GlobusTransport:
    """Runs the fabric's endpoint functions at a remote site through Globus Compute."""

    can_reach_servers = False
    poll_interval_s = 0.6
    """Least time between two long-poll tasks of one client (``fabric.client.poller``): the
    Executor lets 8 submissions through in 4 s and sleeps 0.5-1.5 s before each one past
    that, so polls at most every 0.6 s stay under its limit and leave room for the
    client's other calls (every open stream's tokens ride in the same poll)."""

    poll_lost_after_s = 60.0
    """How long past a long-poll's hold the site may answer nothing before its open requests
    fail with ``EndpointError`` (``fabric.client.poller``): Globus Compute keeps accepting
    tasks for an endpoint that died, so without a bound its streams would wait for ever."""

    offline_check_s = 30.0
    """How long a call waits on the site before it asks Globus Compute whether the endpoint
    is up, and how often after (``fabric.client.liveness``): its heartbeat comes every 30 s by
    default, and the service says ``offline`` once it stops."""

    admission_window_s = 0.02
    """How long a client's first queued admission waits for others (``fabric.client.admission``):
    a burst of streams opened together goes as one task (one submission, one request worker
    holding them all until each has its first events) for 2 % of a task's round trip."""

    def __init__(self, site: SiteConfig, executor: Any = None, *, app: Any = None,
                 client: Any = None,
                 proof: Callable[[], dict[str, Any] | None] | None = None,
                 home: Path | None = None, batch_size: int = 128,
                 burst: tuple[int, int] = (8, 4)) -> None:
        """``executor``: a ``globus_compute_sdk.Executor``; built on first use
        from the site's ``endpoint_id`` and ``client`` (default: a ``Client`` on the login
        ``app``) otherwise. ``proof``: returns the ``auth`` dict each call carries (default: a
        token for the site's scope from ``app``, the ``fabric login`` app). ``burst``: the
        Executor's client-side rate limit, ``(api_burst_limit, api_burst_window_s)``: each
        submission is one web-service call that carries every task queued meanwhile (up to
        ``batch_size``); 8 calls per 4 s (then one per 0.5 s) is the most the Executor allows
        in a burst (it clamps the limit to 8), and a steady two calls a second stays within
        the service's documented request limits. The default (4 per 16 s, then one per 4 s)
        would make every fabric call past the fourth wait seconds."""
        self.site: str = site.name
        self.config = site
        self.admission_slots = site.max_request_workers
        """Admission tasks a client keeps in flight: the request workers the site starts."""
        # A site whose operator registered the functions before ``open_streams`` existed
        # allows only those: admit one request per task there.
        self.admission_batches = not site.function_ids or "open_streams" in site.function_ids
        self.batch_size = batch_size
        self.burst = burst
        self._executor = executor
        self._owns_executor = executor is None
        self._client = client
        self._app = app
        self._proof = proof
        home = home or env.fabric_home()
        self._functions = _JSONFile(home / "functions.json")
        self._groups = _JSONFile(home / "task_groups.json")
        self._ids: dict[Any, str] = {}
        self._lock = threading.Lock()
        if executor is not None and getattr(executor, "task_group_id", None) is None:
            saved = self._groups.get(self.site)
            if saved:
                executor.task_group_id = saved

    # -- lazily built pieces ------------------------------------------------------------------

    @property
    def app(self) -> Any:
        """The Globus login (``fabric.globus.auth.make_app``), built on first use."""
        if self._app is None:
            from fabric.globus import auth

            self._app = auth.make_app([self.config])
        return self._app

    @property
    def executor(self) -> Any:
        """The Globus Compute executor for the site's endpoint."""
        with self._lock:
            if self._executor is None:
                if not self.config.endpoint_id:
                    raise EndpointError(
                        f"site {self.site!r} has no endpoint_id: its operator publishes it "
                        "(endpoint_id in the site values)", site=self.site)
                from globus_compute_sdk import Client, Executor

                client = self._client or Client(app=self.app, do_version_check=False)
                # The fabric's serializer: plain-data arguments (all the fabric's functions
                # take) travel as JSON, which an endpoint that unpickles no caller data
                # (``allowed_serializers`` without DillDataBase64) accepts.
                self._executor = Executor(
                    endpoint_id=self.config.endpoint_id, client=client,
                    task_group_id=self._groups.get(self.site), batch_size=self.batch_size,
                    serializer=gcwire.data_serializer(), api_burst_limit=self.burst[0],
                    api_burst_window_s=self.burst[1])
            return self._executor

    def identity_proof(self) -> dict[str, Any] | None:
        """What this caller sends as ``auth`` (``None`` where the site has no policy)."""
        if self._proof is not None:
            return self._proof()
        if self.config.policy is None:
            return None
        if self.config.policy.identity == "asserted" and not self.config.policy.has_group_rules:
            # The site trusts the identity Globus Compute asserts for the caller's user
            # endpoint: no token needs to travel with (and be stored alongside) the task.
            return None
        from fabric.globus import auth

        return auth.identity_proof(self.app, self.config)

    # -- Transport ----------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` at the site; a ``None`` ``auth`` gets the login's proof."""
        args, kwargs = self._with_auth(fn, args, kwargs)
        outer: Future[Any] = Future()
        try:
            function_id = self.function_id(fn)
            inner = self._submit_registered(function_id, args, kwargs)
        except FabricError as exc:
            outer.set_exception(exc)
            return outer
        except Exception as exc:
            outer.set_exception(_translate(exc))
            return outer
        inner.add_done_callback(lambda f: self._settle(outer, f))
        return outer

    def _submit_registered(self, function_id: str, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> Future[Any]:
        """Submit through the executor; one the transport built is replaced if it stopped.

        The real Executor shuts itself down when a submission fails (any HTTP error from the
        service: a refused function, 429, 5xx), failing that batch's futures; every later
        call would then fail too. The transport owns the executor it built, so it builds a
        new one (same task group) and the failure stays with the calls it belonged to."""
        executor = self.executor
        try:
            return executor.submit_to_registered_function(function_id, args, kwargs)
        except RuntimeError as exc:
            if not self._owns_executor or "is shutdown" not in str(exc):
                raise
        with self._lock:
            if self._executor is executor:
                self._remember_group()
                self._executor = None
        return self.executor.submit_to_registered_function(function_id, args, kwargs)

    def endpoint_status(self) -> str | None:
        """What Globus Compute says of the site's endpoint from its heartbeats (``online``,
        ``offline``), or None when it could not be asked (the call's wait goes on)."""
        try:
            answer = self.executor.client.get_endpoint_status(self.config.endpoint_id)
            return str(answer.get("status") or "") or None
        except Exception as exc:  # a status is advice: no answer must not fail the call
            log.debug("endpoint status of %s: %s", self.site, exc)
            return None

    def recover(self) -> list[Future[Any]]:
        """Results of every task in this site's saved task group (after a client restart)."""
        group = self._groups.get(self.site)
        if not group:
            return []
        outs = []
        for inner in self.executor.reload_tasks(group):
            outer: Future[Any] = Future()
            outer.task_id = getattr(inner, "task_id", None)  # type: ignore[attr-defined]
            inner.add_done_callback(lambda f, o=outer: self._settle(o, f))
            outs.append(outer)
        return outs

    def close(self) -> None:
        """Stop submitting (results already promised still arrive); remember the task group."""
        if self._executor is not None:
            self._remember_group()
            self._executor.shutdown(wait=False)

    # -- pieces ---------------------------------------------------------------------------------

    def function_id(self, fn: Callable[..., Any]) -> str:
        """The id to run ``fn`` by: operator-registered, cached by code hash, or new.

        ``fn`` is one of the fabric's endpoint functions (a ``fabric.wire.functions``
        reference, or the real function: the same bytes) or a caller's function."""
        name = getattr(fn, "__name__", "")
        ref = functions.reference(fn)
        if ref is not None and ref.name in self.config.function_ids:
            return self.config.function_ids[ref.name]
        if fn in self._ids:
            return self._ids[fn]
        functions.install_reducer()  # a reference serialises as the real function
        executor = self.executor
        serializer = getattr(executor, "serializer", None)
        if serializer is None:
            from globus_compute_sdk.serialize import ComputeSerializer

            serializer = ComputeSerializer()
        namespace = getattr(executor, "registry_namespace", None) or \
            f"globus-{env.GLOBUS_SDK_ENVIRONMENT.get()}"
        digest = hashlib.sha256(serializer.serialize(fn).encode()).hexdigest()
        key = f"{namespace}:{digest}"
        function_id = self._functions.get(key)
        if function_id is None:
            function_id = str(executor.register_function(fn))
            self._functions.put(key, function_id)
            log.info("registered %s as Globus Compute function %s", name or fn, function_id)
        self._ids[fn] = function_id
        return function_id

    def _with_auth(self, fn: Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return args, kwargs
        if "auth" not in sig.parameters:
            return args, kwargs
        bound = sig.bind_partial(*args, **kwargs)
        if bound.arguments.get("auth") is not None:
            return args, kwargs  # the caller brought their own credentials
        proof = self.identity_proof()
        if proof is None:
            return args, kwargs
        bound.arguments["auth"] = proof
        return tuple(bound.args), dict(bound.kwargs)

    def _settle(self, outer: Future[Any], inner: Future[Any]) -> None:
        self._remember_group()
        try:
            outer.set_result(gcwire.unwrap(inner.result()))
        except FabricError as exc:
            outer.set_exception(exc)
        except Exception as exc:
            outer.set_exception(_translate(exc))

    def _remember_group(self) -> None:
        group = getattr(self._executor, "task_group_id", None)
        if group:
            self._groups.put(self.site, str(group))


def _translate(exc: BaseException) -> FabricError:
    """A typed fabric error for what Globus Compute raised (never carrying a token)."""
    from globus_compute_sdk.errors import TaskExecutionFailed

    if isinstance(exc, TaskExecutionFailed):
        data = str(exc.remote_data)
        last = next((ln.strip() for ln in reversed(data.strip().splitlines()) if ln.strip()),
                    "(no traceback)")
        if "not permitted on endpoint" in data:
            return FunctionNotAllowed(f"the endpoint refused the function: {last}",
                                      rule="allowed_functions")
        if "disabled by current configuration" in data:
            # The endpoint's allowed_serializers: it opened nothing (e.g. no pickled data
            # where user functions are off).
            return AccessDenied(f"the endpoint refused how the call was serialised: {last}",
                                rule="allowed_serializers")
        if "MaxResultSizeExceeded" in data:
            return ResultTooLarge(f"result is larger than one message may carry: {last}")
        from fabric.wire.lost import lost_failure

        if (lost := lost_failure(data)) is not None:
            # The engine's own machinery failed under the task (a daemon-run endpoint's pool
            # was lost: its poolguard killed it): what the embedded site re-codes.
            code, message = lost
            return EndpointError(f"the site could not run the task ({code}): {message}",
                                 traceback=data, code=code)
        return UserFunctionError(f"remote function raised: {last}", traceback=data)
    import globus_sdk

    if isinstance(exc, globus_sdk.GlobusAPIError):
        text = f"Globus Compute answered HTTP {exc.http_status} {exc.code}: {exc.message}"
        if exc.http_status == 401:
            return AuthError(f"{text}; run `fabric login`")
        if exc.http_status == 403 and exc.code == "FUNCTION_NOT_ALLOWED":
            # The service refused a function outside the endpoint's allowed_functions.
            return FunctionNotAllowed(f"the endpoint refused the function: {text}",
                                      rule="allowed_functions")
        if exc.http_status == 403:
            return AccessDenied(text, rule="globus-compute")
        return EndpointError(text, status=exc.http_status)
    return EndpointError(f"Globus Compute: {type(exc).__name__}: {exc}")


def register_functions(site: SiteConfig, executor: Any, *, public: bool = True) -> dict[str, str]:
    """Register the fabric's endpoint functions once (operator); their ids by name.

    The ids go into the site's ``function_ids`` (so clients use them) and, rendered, into the
    endpoint's ``allowed_functions`` (so nothing else runs there).
    """
    functions.install_reducer()
    return {ref.name: str(executor.register_function(ref, public=public))
            for ref in functions.FABRIC_FUNCTIONS}
