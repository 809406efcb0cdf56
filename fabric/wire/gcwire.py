"""Globus Compute's own task and result messages, built and read exactly as its SDK does.

A call ``fn(*args, **kwargs)`` travels as a ``globus_compute_common.messagepack`` ``Task`` whose
``task_buffer`` is ``ComputeSerializer.pack_buffers([fn, args, kwargs])`` (what the web service
hands an endpoint: the registered function's buffer followed by the batch's args/kwargs
buffers). A finished task comes back as a packed ``Result``: ``data`` is the serialised return
value, or the remote traceback when ``error_details`` is set.

The fabric's endpoint functions never let a ``FabricError`` escape as a Python exception (its
type would be lost in the traceback string): they return ``{ERROR: err.to_dict()}``, or the
value (``ok``); ``unwrap`` turns that back into the same typed error, or the value.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fabric.errors import EndpointError, FabricError, ResultTooLarge, UserFunctionError
from fabric.wire.functions import install_reducer

if TYPE_CHECKING:
    from globus_compute_sdk.serialize import ComputeSerializer

# Globus Compute's packages are imported on first use: importing ``globus_compute_sdk`` loads
# its whole client (~0.5 s), and endpoint workers import this module only for the envelopes.

OK = "__fabric_ok__"
"""Envelope key of a successful endpoint-function result."""
ERROR = "__fabric_error__"
"""Envelope key of a typed error (``FabricError.to_dict()``)."""


@functools.cache
def default_serializer() -> ComputeSerializer:
    """The SDK's default ``ComputeSerializer`` (DillCode for functions, DillDataBase64 data)."""
    from globus_compute_sdk.serialize import ComputeSerializer

    install_reducer()
    return ComputeSerializer()


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
    serde = serializer or default_serializer()
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
