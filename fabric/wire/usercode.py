"""A user function's call and value as they travel: opaque strings to the site's workers.

``fab.submit(fn, *args, **kwargs)`` sends ``pack_call(fn, args, kwargs)``: the SDK's default
serializer (dill) applied to ``(fn, args, kwargs)``, a string. The site's workers pass it on
without opening it (``run_user_function`` takes only JSON data, like every fabric function);
only the user function's own process unpickles it. Its value comes back pickled by that
process, bytes that ``unpack_value`` opens in the SDK, the caller's own process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


def pack_call(fn: Callable[..., Any], args: tuple[Any, ...] = (),
              kwargs: dict[str, Any] | None = None) -> str:
    """``(fn, args, kwargs)`` serialised for ``run_user_function``."""
    from fabric.wire.gcwire import default_serializer

    return str(default_serializer().serialize((fn, tuple(args), dict(kwargs or {}))))


def unpack_value(packed: Any) -> Any:
    """The value a user function returned, from what ``run_user_function`` answered (its
    pickle, made by the user function's process)."""
    import dill

    from fabric.errors import EndpointError

    if not isinstance(packed, bytes):
        raise EndpointError(f"the site answered a user function with a {type(packed).__name__}"
                            ", not its pickled value (an older site?)")
    return dill.loads(packed)


class ValueFuture(Future[Any]):
    """The future ``fab.submit`` returns: the transport's, its value unpacked once."""

    def __init__(self, inner: Future[Any]) -> None:
        super().__init__()
        self._inner = inner
        self._lock = threading.Lock()
        inner.add_done_callback(self._transfer)

    def _transfer(self, inner: Future[Any]) -> None:
        with self._lock:
            if self.done():
                return
            if inner.cancelled():
                super().cancel()
                return
            try:
                value = unpack_value(inner.result(0))
            except Exception as exc:  # the site's typed error, or unpickling failing
                self.set_exception(exc)
            else:
                self.set_result(value)

    def _pull(self, timeout: float | None) -> None:
        """Read the transport's future in this thread (some transports receive in the
        waiting thread), then take its outcome."""
        if self.done():
            return
        try:
            self._inner.result(timeout)
        except TimeoutError:
            if not self._inner.done():
                raise
        except Exception:  # its outcome is taken just below
            pass
        self._transfer(self._inner)

    def result(self, timeout: float | None = None) -> Any:
        """The function's value."""
        self._pull(timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception, read as ``result`` reads the value."""
        self._pull(timeout)
        return super().exception(0)

    def cancel(self) -> bool:
        """Cancel the transport's future (a task already running goes on)."""
        return self._inner.cancel()
