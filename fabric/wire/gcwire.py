"""Globus Compute's own task and result messages, built and read exactly as its SDK does.

A call ``fn(*args, **kwargs)`` travels as a ``globus_compute_common.messagepack`` ``Task`` whose
``task_buffer`` is ``ComputeSerializer.pack_buffers([fn, args, kwargs])`` (what the web service
hands an endpoint: the registered function's buffer followed by the batch's args/kwargs
buffers). A finished task comes back as a packed ``Result``: ``data`` is the serialised return
value, or the remote traceback when ``error_details`` is set.

The fabric's endpoint functions never let a ``FabricError`` escape as a Python exception (its
type would be lost in the traceback string): they return ``{ERROR: err.to_dict()}``, or the
value (``ok``); ``unwrap`` turns that back into the same typed error, or the value.

Arguments that are plain JSON data travel as ``JSONData`` (no pickle), and those of the fabric's
own functions always do: a site refuses a task for one of them whose arguments would need
unpickling (``admission_refusal``), before anything is deserialised, and a remote endpoint's
``allowed_serializers`` refuses pickled data where user functions are off.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fabric.errors import (
    AccessDenied,
    EndpointError,
    FabricError,
    FunctionNotAllowed,
    ResultTooLarge,
    UserFunctionError,
)
from fabric.wire.functions import FABRIC_FUNCTIONS, EndpointFunction, install_reducer, reference

if TYPE_CHECKING:
    from globus_compute_sdk.serialize import ComputeSerializer

# Globus Compute's packages are imported on first use: importing ``globus_compute_sdk`` loads
# its whole client (~0.5 s), and endpoint workers import this module only for the envelopes.

OK = "__fabric_ok__"
"""Envelope key of a successful endpoint-function result."""
ERROR = "__fabric_error__"
"""Envelope key of a typed error (``FabricError.to_dict()``)."""


JSON_DATA = "11\n"
"""``JSONData``'s identifier: the first line of a buffer of plain JSON data."""
_PLAIN = (str, int, float, bool, type(None))


@functools.cache
def default_serializer() -> ComputeSerializer:
    """The SDK's default ``ComputeSerializer`` (DillCode for functions, DillDataBase64 data)."""
    from globus_compute_sdk.serialize import ComputeSerializer

    install_reducer()
    return ComputeSerializer()


@functools.cache
def data_serializer() -> ComputeSerializer:
    """``default_serializer``, except that data which is plain JSON (``is_plain_data``) travels
    as ``JSONData``: it needs no unpickling at the site and comes out as the same value (a
    top-level tuple of arguments as a list, which ``fn(*args)`` does not mind). The fabric's
    own functions take only such data; a site refuses them pickled (``admission_refusal``)."""
    from globus_compute_sdk.serialize import ComputeSerializer, JSONData

    install_reducer()

    class DataAsJSON(ComputeSerializer):
        """``ComputeSerializer`` that writes plain data as JSON."""

        _json = JSONData()

        def serialize(self, data: Any) -> str:
            if not callable(data) and is_plain_data(data):
                return self._json.serialize(list(data) if type(data) is tuple else data)
            return str(super().serialize(data))

    return DataAsJSON()


def is_plain_data(value: Any, top: bool = True) -> bool:
    """True if JSON gives back exactly ``value``: str, int, float, bool and None in lists and
    str-keyed dicts (no subclasses: they would come back as their base type); the top level may
    be a tuple (of arguments)."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    if kind is list or (top and kind is tuple):
        return all(is_plain_data(v, False) for v in value)
    if kind is dict:
        return all(type(k) is str and is_plain_data(v, False) for k, v in value.items())
    return False


def pack_task(
    fn: Callable[..., Any],
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    task_id: uuid.UUID | None = None,
    serializer: ComputeSerializer | None = None,
) -> tuple[uuid.UUID, bytes]:
    """``(task_id, packed Task)`` for ``fn(*args, **kwargs)``, as Globus Compute packs it."""
    from globus_compute_common import messagepack
    from globus_compute_common.messagepack.message_types import Task

    install_reducer()  # before anything serialises a reference (a caller's serializer too)
    ref = reference(fn)
    serde = serializer or (data_serializer() if ref is not None and ref.data_only
                           else default_serializer())
    task_id = task_id or uuid.uuid4()
    # Client.register_function packs the function alone; Batch.add packs (args, kwargs);
    # the endpoint receives the two concatenated, which is one three-buffer pack.
    if serializer is None and _by_reference(fn):
        function_code = _function_code(fn)
    else:
        function_code = serde.pack_buffers([serde.serialize(fn)])
    payload = serde.pack_buffers([serde.serialize(tuple(args)), serde.serialize(kwargs or {})])
    task = Task(task_id=task_id, task_buffer=function_code + payload)
    return task_id, messagepack.pack(task)


def _by_reference(fn: Callable[..., Any]) -> bool:
    """True for the fabric's own module-level functions and their references
    (``fabric.wire.functions``): the code serializer writes them as ``module.name``, the same
    bytes every time."""
    module = getattr(fn, "__module__", None) or ""
    return (module.startswith("fabric.") and getattr(fn, "__qualname__", None)
            == getattr(fn, "__name__", None) and "<" not in fn.__qualname__)


@functools.lru_cache(maxsize=64)
def _function_code(fn: Callable[..., Any]) -> str:
    # Every submit ships one of a dozen endpoint functions: pack each once (~30 us a call).
    serde = default_serializer()
    return serde.pack_buffers([serde.serialize(fn)])


def unpack_result(packed_result: bytes, serializer: ComputeSerializer | None = None) -> Any:
    """The value of a packed ``Result``, envelope unwrapped; raise the typed error it carries."""
    from globus_compute_common import messagepack
    from globus_compute_common.messagepack.message_types import Result

    result = messagepack.unpack(packed_result)
    if not isinstance(result, Result):
        raise EndpointError(f"expected a Result message, got {type(result).__name__}")
    if result.is_error:
        details = result.error_details
        code = details.code if details else "RemoteExecutionError"
        if code == "MaxResultSizeExceeded":
            raise ResultTooLarge(
                f"result is larger than one message may carry: {details.user_message}"
                if details else "result is too large",
                code=code,
            )
        if code == "RemoteExecutionError":
            # The function itself raised (not the fabric's own code: that returns envelopes).
            raise UserFunctionError(
                f"remote function raised: {_last_line(result.data)}",
                traceback=result.data, code=code,
            )
        raise EndpointError(
            f"the site could not run the task ({code}): {_last_line(result.data)}",
            traceback=result.data, code=code,
        )
    return unwrap((serializer or default_serializer()).deserialize(result.data))


@functools.cache
def _fabric_code() -> dict[str, EndpointFunction]:
    """The code buffer of each of the fabric's functions (what its reference packs to)."""
    serde = default_serializer()
    return {serde.serialize(f): f for f in FABRIC_FUNCTIONS}


def admission_refusal(packed_task: bytes, *, user_functions: bool) -> FabricError | None:
    """Why a site must not hand ``packed_task`` to a worker, or None; read before anything
    in it is deserialised (only the messagepack envelope and the buffers' first lines).

    - A task for one of the fabric's data-only functions (its function buffer is byte for byte
      that function's reference) whose argument buffers are not ``JSONData``: ``AccessDenied``
      (rule ``data-serializers``): the site unpickles no caller data for its own functions.
    - Where ``user_functions`` is off, any other task (``run_user_function``, a function of the
      caller's own): ``FunctionNotAllowed`` (rule ``allow_user_functions``), before its pickled
      code or arguments are opened.

    A task this check cannot read is left to the engine, which answers it as before.
    """
    from globus_compute_sdk.serialize import ComputeSerializer

    try:
        buffers = ComputeSerializer.unpack_buffers(_task_buffer(packed_task))
    except Exception:
        return None
    if not buffers:
        return None
    ref = _fabric_code().get(buffers[0])
    if ref is not None and ref.runs_code and not user_functions:
        return FunctionNotAllowed(
            f"this site does not run user functions ({ref.name}); its operator must set "
            "allow_user_functions: true", rule="allow_user_functions", function=ref.name)
    if ref is not None and ref.data_only:
        if all(b.startswith(JSON_DATA) for b in buffers[1:]):
            return None
        return AccessDenied(
            f"the arguments of {ref.name} must be plain JSON data (globus_compute_sdk "
            "JSONData); this site unpickles no caller data for the fabric's own functions",
            function=ref.name, rule="data-serializers", accepted="JSONData")
    if user_functions:
        return None
    name = ref.name if ref is not None else "a function of the caller's own"
    return FunctionNotAllowed(
        f"this site does not run user functions ({name}); its operator must set "
        "allow_user_functions: true", rule="allow_user_functions", function=name)


def _task_buffer(packed_task: bytes) -> str:
    """The ``task_buffer`` of a packed ``Task``. Version 1 of messagepack is a version byte
    and JSON: read directly (~3x faster than building the pydantic message, and this runs in
    the site's main loop for every task); other versions through messagepack itself."""
    if packed_task[:1] == b"\x01":
        message = json.loads(packed_task[1:])
        if message.get("message_type") == "task":
            return str(message["data"]["task_buffer"])
    from globus_compute_common import messagepack
    from globus_compute_common.messagepack.message_types import Task

    task = messagepack.unpack(packed_task)
    if not isinstance(task, Task):
        raise ValueError(f"not a task: {type(task).__name__}")
    return task.task_buffer


def pack_refusal(task_id: uuid.UUID, err: FabricError) -> bytes:
    """A packed ``Result`` carrying ``err`` as the fabric's error envelope, in JSON (the
    caller reads it as the same typed error, unpickling nothing)."""
    from globus_compute_common import messagepack
    from globus_compute_common.messagepack.message_types import Result

    return messagepack.pack(Result(task_id=task_id, data=JSON_DATA + json.dumps(error(err))))


def pack_error_result(task_id: uuid.UUID, code: str, message: str) -> bytes:
    """A packed error ``Result`` (for a task the site could not even hand to its engine)."""
    from globus_compute_common import messagepack
    from globus_compute_common.messagepack.message_types import Result, ResultErrorDetails

    result = Result(task_id=task_id, data=message,
                    error_details=ResultErrorDetails(code=code, user_message=message))
    return messagepack.pack(result)


def unwrap(value: Any) -> Any:
    """The value inside an endpoint envelope, or raise its typed error; other values pass."""
    if isinstance(value, dict) and len(value) == 1:
        if OK in value:
            return value[OK]
        if ERROR in value:
            raise FabricError.from_dict(value[ERROR])
    return value


def ok(value: Any) -> Any:
    """Envelope for a successful result: the value itself, which ``unwrap`` passes through,
    unless it could pass for an envelope (a one-key dict under ``OK`` or ``ERROR``); only that
    is wrapped. Serialising a wrapper dict would cost every call (~25 us, more in a cold
    worker) for the rare value that needs it."""
    if isinstance(value, dict) and len(value) == 1 and (OK in value or ERROR in value):
        return {OK: value}
    return value


def error(err: FabricError) -> dict[str, Any]:
    """Envelope for a typed error."""
    return {ERROR: err.to_dict()}


def _last_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(no traceback)"
