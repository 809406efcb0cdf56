"""An in-process stand-in for the Globus Compute web service, with a real engine behind it.

The Globus cloud cannot be reached from the machines that test the fabric, so the remote path
is exercised against this stand-in. Only the cloud hop is replaced; everything either side of
it is the real thing:

    GlobusTransport --submit_to_registered_function--> StandinExecutor  (client side: the same
        |                                                 surface as globus_compute_sdk.Executor,
        |                                                 batching, task groups, reload_tasks)
        v  ComputeSerializer buffers, as Batch.add / Client.register_function make them
    StandinService  (the web service: function registry, allowed_functions, task groups,
        |             results kept for reload)
        v  messagepack Task(task_id, function buffer + args/kwargs buffer)
    GlobusComputeEngine (Parsl HTEX + LocalProvider; workers run execute_task)
        v  messagepack Result (data, or error_details + traceback)

What it does not reproduce: HTTP, AMQP, Globus Auth on the service side, rate limits, the
10 MB payload limit enforced by the service (the engine's own result limit still applies),
and the service's handling of endpoint restarts.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Result, ResultErrorDetails, Task
from globus_compute_sdk.errors import TaskExecutionFailed
from globus_compute_sdk.sdk.asynchronous.compute_future import ComputeFuture
from globus_compute_sdk.serialize import ComputeSerializer

from fabric import env
from fabric.sites import LOCAL_WORKERS_ADDRESS


class StandinService:
    """The web service and one endpoint, in this process. Start it, share it, shut it down."""

    def __init__(self, run_dir: Path, *, endpoint_id: str | None = None, workers: int = 2,
                 allowed_functions: Iterable[str] | None = None,
                 env: dict[str, str] | None = None,
                 allowed_serializers: list[str] | None = None) -> None:
        self.endpoint_id = endpoint_id or str(uuid.uuid4())
        self.run_dir = Path(run_dir)
        self.workers = workers
        self.allowed_functions = None if allowed_functions is None else set(allowed_functions)
        self.allowed_serializers = allowed_serializers
        """The engine's deserializer allow-list, as an endpoint config's ``allowed_serializers``."""
        self.env = dict(env or {})
        self.functions: dict[str, str] = {}
        self.groups: dict[str, list[str]] = {}
        self.results: dict[str, bytes] = {}
        self.batches: list[int] = []
        """Size of every submission batch received (tests check the client batches)."""
        self._listeners: dict[str, list[Callable[[str, bytes], None]]] = {}
        self._lock = threading.Lock()
        self.engine: Any = None

    def start(self) -> StandinService:
        """Start the real GlobusComputeEngine (first task takes a few seconds)."""
        from globus_compute_endpoint.engines import GlobusComputeEngine
        from parsl.providers import LocalProvider

        # Workers are spawned from this process's environment: `globus-compute-endpoint
        # python-exec` must be on PATH, and the fabric's endpoint functions read their site
        # from FABRIC_SITE / FABRIC_STATE_DIR, as an operator's worker_init would set them.
        bin_dir = str(Path(sys.executable).parent)
        changed = {env.PATH.name: bin_dir + os.pathsep + (env.PATH.get() or ""), **self.env}
        # Remembered so shutdown() gives the process its environment back.
        self._saved_env = {k: os.environ.get(k) for k in changed}
        os.environ.update(changed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.engine = GlobusComputeEngine(
            label="fabric-standin", address=LOCAL_WORKERS_ADDRESS,
            max_workers_per_node=self.workers,
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
            job_status_kwargs={"strategy_period": 0.5, "max_idletime": 3600.0},
            allowed_serializers=self.allowed_serializers,
        )
        self.engine.start(endpoint_id=uuid.UUID(self.endpoint_id), run_dir=str(self.run_dir))
        return self

    def shutdown(self) -> None:
        """Stop the engine and its workers."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        for key, value in getattr(self, "_saved_env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    def __enter__(self) -> StandinService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- the web API ----------------------------------------------------------------------------

    def register_function(self, function_buffer: str) -> str:
        """Store a serialised function (``Client.register_function``); returns its UUID."""
        function_id = str(uuid.uuid4())
        with self._lock:
            self.functions[function_id] = function_buffer
        return function_id

    def submit_batch(self, endpoint_id: str, task_group_id: str | None,
                     tasks: list[tuple[str, str]]) -> tuple[str, list[str]]:
        """Queue ``(function_id, args/kwargs buffer)`` tasks; ``(task_group_id, task_ids)``.

        As the service does, the task buffer the endpoint receives is the registered
        function's buffer followed by the batch's payload; unknown endpoints and functions,
        and functions outside ``allowed_functions``, are refused.
        """
        if str(endpoint_id) != self.endpoint_id:
            raise ValueError(f"endpoint {endpoint_id} not found (stand-in serves "
                             f"{self.endpoint_id})")
        if self.engine is None:
            raise RuntimeError("the stand-in service is not started")
        from globus_compute_endpoint.engines.base import GCFuture

        with self._lock:
            self.batches.append(len(tasks))
            group = str(task_group_id or uuid.uuid4())
            self.groups.setdefault(group, [])
        ids = []
        for function_id, payload in tasks:
            task_id = str(uuid.uuid4())
            ids.append(task_id)
            with self._lock:
                self.groups[group].append(task_id)
            if function_id not in self.functions:
                self._finish(task_id, _error_result(task_id, f"function {function_id} not found"))
                continue
            if self.allowed_functions is not None and function_id not in self.allowed_functions:
                self._finish(task_id, _error_result(
                    task_id, f"Function {function_id} not permitted on endpoint "
                             f"{self.endpoint_id} (allowed_functions)"))
                continue
            packed = messagepack.pack(Task(task_id=uuid.UUID(task_id),
                                           task_buffer=self.functions[function_id] + payload))
            fut = GCFuture(uuid.UUID(task_id), function_id=uuid.UUID(function_id))
            fut.add_done_callback(lambda f, tid=task_id: self._finish(tid, _packed(tid, f)))
            self.engine.submit(fut, packed, resource_specification={})
        return group, ids

    def task_group(self, task_group_id: str) -> list[str]:
        """Task ids submitted under a task group (``get_task_group``)."""
        with self._lock:
            return list(self.groups.get(str(task_group_id), []))

    def watch(self, task_id: str, on_result: Callable[[str, bytes], None]) -> None:
        """Call ``on_result`` when the task finishes (at once if it already has)."""
        with self._lock:
            done = self.results.get(task_id)
            if done is None:
                self._listeners.setdefault(task_id, []).append(on_result)
        if done is not None:
            on_result(task_id, done)

    def _finish(self, task_id: str, packed_result: bytes) -> None:
        with self._lock:
            self.results[task_id] = packed_result
            listeners = self._listeners.pop(task_id, [])
        for listener in listeners:
            listener(task_id, packed_result)


def _packed(task_id: str, fut: Future[Any]) -> bytes:
    exc = fut.exception()
    if exc is None:
        return bytes(fut.result())
    # The engine lost the task (worker died): the service reports that as an error result.
    return _error_result(task_id, f"{type(exc).__name__}: {exc}")


def _error_result(task_id: str, message: str) -> bytes:
    return messagepack.pack(Result(
        task_id=uuid.UUID(task_id), data=message,
        error_details=ResultErrorDetails(code="RemoteExecutionError", user_message=message)))


class StandinExecutor(Executor):
    """Client side: the ``globus_compute_sdk.Executor`` surface the fabric uses.

    ``register_function``, ``submit``, ``submit_to_registered_function``, ``task_group_id``,
    ``reload_tasks``, ``batch_size`` and ``shutdown`` behave as the real Executor's; the
    futures are real ``ComputeFuture``s (with ``task_id``) that fail with the real
    ``TaskExecutionFailed`` when the remote function raised.
    """

    def __init__(self, service: StandinService, endpoint_id: str | None = None,
                 task_group_id: str | None = None, batch_size: int = 128,
                 serializer: ComputeSerializer | None = None) -> None:
        self.service = service
        self.registry_namespace = f"standin-{id(service)}"
        """Function ids belong to this service (the transport keys its cache by it)."""
        self.endpoint_id = endpoint_id or service.endpoint_id
        self.task_group_id = task_group_id
        self.batch_size = max(1, batch_size)
        self.serializer = serializer or ComputeSerializer()
        self._registry: dict[Any, str] = {}
        self._futures: dict[str, ComputeFuture] = {}
        self._queue: queue.Queue[tuple[ComputeFuture, str, str] | None] = queue.Queue()
        self._stopped = False
        self._settle_lock = threading.Lock()
        self._thread = threading.Thread(target=self._submitter, daemon=True,
                                        name="standin-submitter")
        self._thread.start()

    def register_function(self, fn: Callable[..., Any], function_id: str | None = None,
                          **_: Any) -> str:
        """Register ``fn`` with the service (or adopt a known ``function_id``)."""
        if function_id is None:
            function_id = self.service.register_function(
                self.serializer.pack_buffers([self.serializer.serialize(fn)]))
        self._registry[fn] = function_id
        return function_id

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> ComputeFuture:
        """Register ``fn`` on first use, then submit it."""
        if fn not in self._registry:
            self.register_function(fn)
        return self.submit_to_registered_function(self._registry[fn], args, kwargs)

    def submit_to_registered_function(self, function_id: str, args: tuple[Any, ...] | None = None,
                                      kwargs: dict[str, Any] | None = None) -> ComputeFuture:
        """Queue one task; serialised now, sent with the next batch."""
        if self._stopped:
            raise RuntimeError("executor is shut down; no new functions may be executed")
        payload = self.serializer.pack_buffers([
            self.serializer.serialize(tuple(args or ())), self.serializer.serialize(kwargs or {})])
        fut = ComputeFuture()
        self._queue.put((fut, str(function_id), payload))
        return fut

    def _submitter(self) -> None:
        """Coalesce queued tasks into batches of at most ``batch_size`` (one API call each)."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            time.sleep(0.01)  # let a burst of submissions join this batch, as the SDK does
            while len(batch) < self.batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                group, ids = self.service.submit_batch(
                    self.endpoint_id, self.task_group_id, [(f, p) for _, f, p in batch])
            except Exception as exc:
                for fut, _, _ in batch:
                    fut.set_exception(exc)
                continue
            self.task_group_id = group
            for (fut, _, _), task_id in zip(batch, ids, strict=True):
                fut.task_id = task_id
                self._futures[task_id] = fut
            for task_id in ids:  # called at once for results that raced ahead
                self.service.watch(task_id, self._on_result)

    def _on_result(self, task_id: str, packed_result: bytes) -> None:
        with self._settle_lock:  # the engine's thread and a reload may both deliver
            fut = self._futures.get(task_id)
            if fut is not None and not fut.done():
                self._settle(fut, packed_result)

    def _settle(self, fut: ComputeFuture, packed_result: bytes) -> None:
        result = messagepack.unpack(packed_result)
        if not isinstance(result, Result):
            fut.set_exception(TaskExecutionFailed(f"unexpected message {type(result).__name__}"))
        elif result.is_error:
            fut.set_exception(TaskExecutionFailed(result.data, str(time.time())))
        else:
            fut.set_result(self.serializer.deserialize(result.data))

    def reload_tasks(self, task_group_id: str | None = None) -> list[ComputeFuture]:
        """Futures for every task of the task group, finished ones already set."""
        if task_group_id is not None:
            self.task_group_id = task_group_id
        if self.task_group_id is None:
            raise ValueError("must specify a task_group_id in order to reload tasks")
        out = []
        for task_id in self.service.task_group(self.task_group_id):
            fut = ComputeFuture(task_id)
            self._futures[task_id] = fut
            self.service.watch(task_id, self._on_result)
            out.append(fut)
        return out

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop submitting; the service (and its engine) stays up for other executors."""
        if self._stopped:
            return
        self._stopped = True
        self._queue.put(None)
        if wait:
            self._thread.join(timeout=10)
        if cancel_futures:
            for fut in self._futures.values():
                fut.cancel()
