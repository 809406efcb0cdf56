"""The process a user function runs in: ``python -m fabric.endpoint.userproc FD PARENT``.

The request worker (``fabric.endpoint.userchild``) starts it with a clean environment, a private
temporary working directory, umask 077, no inherited file descriptors but ``FD`` (one end of a
Unix socket pair), a session of its own and, where the site names one, another Unix user. This
process never loads the site's context: it holds no ticket key, no CURVE key, no state database
and no caller token, only the caller's code (still pickled until it gets here), a capability
token and the socket. Everything it asks of a model goes through the worker, which checks the
capability. It serves one call and exits.

It is started before its call (the worker keeps one spare): it imports what a call needs, says
``ready`` and blocks reading its socket. If the worker (``PARENT``) goes first, the socket's end
of stream or a changed parent pid ends it, its process group and its home folder: nothing is
left behind a killed worker.

Messages on the socket, both ways: ``!I`` length + one msgpack map (``send``/``receive``).
here -> worker: ``{"op": "ready"}`` first. worker -> here: ``{"op": "call", "call",
"capability", "model", "version", "identity"}``, then one ``{"op": "results"}`` or ``{"op":
"error"}`` per request. here -> worker: ``{"op": "request", "capability", "model", "version",
"requests"}`` any number of times, then one ``{"op": "return", "value"}`` (the value serialised
for the caller) or ``{"op": "raised", "error"}``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from typing import Any

import msgpack

from fabric.errors import FabricError, InvalidRequest, ResultTooLarge, UserFunctionError

RESULT_LIMIT_BYTES = 10 * 1024 * 1024 - 4096
"""Globus Compute refuses results over 10 MiB; leave room for the envelope."""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest message either side accepts (a request batch, a result, a returned value)."""
_HEADER = struct.Struct("!I")
HOME_PREFIX = "fabric-userfn-"
"""Name prefix of a user function's private home (a temporary folder the worker makes)."""
PARENT_CHECK_S = 1.0
"""How often the process checks that its worker is still alive."""


class ChannelClosed(Exception):
    """The other end of a user function's socket went away (internal to the sandbox)."""


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    """Write one message."""
    body = msgpack.packb(message, use_bin_type=True)
    sock.sendall(_HEADER.pack(len(body)) + body)


def receive(sock: socket.socket) -> dict[str, Any]:
    """Read one message (``ChannelClosed`` at end of stream; ``InvalidRequest`` if it is not a
    map or larger than ``MAX_MESSAGE_BYTES``). Blocks: the caller sets the socket's timeout."""
    (size,) = _HEADER.unpack(_read(sock, _HEADER.size))
    if size > MAX_MESSAGE_BYTES:
        raise InvalidRequest(f"message of {size} bytes; at most {MAX_MESSAGE_BYTES}")
    try:
        out = msgpack.unpackb(_read(sock, size), raw=False, strict_map_key=False)
    except Exception as exc:
        raise InvalidRequest(f"undecodable message ({type(exc).__name__})") from None
    if not isinstance(out, dict):
        raise InvalidRequest("a message must be a map")
    return out


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ChannelClosed("the other end closed the user function's channel")
        buf += chunk
    return bytes(buf)


class SocketChannel:
    """A handle's way to the worker: each call one request message and one answer."""

    def __init__(self, sock: socket.socket, capability: str) -> None:
        self._sock = sock
        self._capability = capability

    def request_many(self, model: str, version: str | None,
                     requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Results in order, or the worker's typed refusal or the first input's error."""
        send(self._sock, {"op": "request", "capability": self._capability, "model": model,
                          "version": version, "requests": requests})
        reply = receive(self._sock)
        if reply.get("op") == "error":
            raise FabricError.from_dict(dict(reply.get("error") or {}))
        return [dict(r) for r in reply.get("results") or []]

    def close(self) -> None:
        """Nothing to release per handle: the socket lives as long as the process."""


def run(sock: socket.socket) -> None:
    """Serve one call on ``sock``: import what it needs, say ``ready``, wait for the call (a
    spare waits here), run the caller's function, send back its value or error."""
    from fabric.endpoint.handle import ModelHandle
    from fabric.wire.gcwire import default_serializer

    serde = default_serializer()
    _preload()
    send(sock, {"op": "ready"})
    msg = receive(sock)
    if msg.get("op") != "call":
        raise InvalidRequest(f"expected a call, got {msg.get('op')!r}")
    channel = SocketChannel(sock, str(msg["capability"]))
    handle = ModelHandle(channel, msg.get("model"), msg.get("version"),
                         identity=str(msg.get("identity") or ""))
    try:
        value = _call(serde, str(msg["call"]), handle)
        answer: dict[str, Any] = {"op": "return", "value": _packed(value)}
    except FabricError as err:
        answer = {"op": "raised", "error": err.to_dict()}
    send(sock, answer)


def _preload() -> None:
    """Import what a call uses beyond the handle before the call comes (a spare does this
    while it waits): the handle's own lazy imports, dill for the value."""
    import dill  # noqa: F401

    from fabric.endpoint.handle import preload

    preload()


def _call(serde: Any, call: str, handle: Any) -> Any:
    """Unpickle the caller's ``(fn, args, kwargs)`` (only here, never in the worker) and run
    ``fn(handle, *args, **kwargs)``; a raising function becomes ``UserFunctionError``."""
    name = "the function"
    try:
        fn, args, kwargs = serde.deserialize(call)
        name = getattr(fn, "__name__", type(fn).__name__)
        return fn(handle, *tuple(args), **dict(kwargs or {}))
    except FabricError:
        raise  # a typed error from the handle (e.g. ContextLengthExceeded) stays typed
    except Exception as exc:
        raise UserFunctionError(
            f"{name} raised {type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(), exception_type=type(exc).__name__) from None


def _packed(value: Any) -> bytes:
    """``value`` pickled for the caller (it is unpickled only by the SDK, never at the site);
    typed errors for what cannot travel. Bytes, not text: the site's engine encodes a result
    once (base64, 4/3), which is what the limit counts."""
    import dill

    try:
        packed = bytes(dill.dumps(value))
    except Exception as exc:
        raise UserFunctionError(
            f"the function returned a {type(value).__name__}, which cannot be serialised to "
            f"send back: {exc}", reason="unserialisable", type=type(value).__name__) from None
    size = (len(packed) + 2) // 3 * 4 + 64  # as the engine will send it
    if size > RESULT_LIMIT_BYTES:
        raise ResultTooLarge(
            f"the function returned {size} bytes serialised; one result may carry at most "
            f"{RESULT_LIMIT_BYTES}: write large outputs to the site's filesystem",
            size=size, limit=RESULT_LIMIT_BYTES)
    return packed


def _own_home() -> str | None:
    """This process's private home (its working directory at the start, where the worker
    starts it), if the worker made it: never anything else to remove."""
    try:
        home = os.getcwd()
        if not os.path.basename(home).startswith(HOME_PREFIX):
            return None
        return home if os.stat(home).st_uid == os.getuid() else None
    except OSError:
        return None


def _end_orphaned(home: str | None) -> None:
    """The worker is gone: remove the home it would have removed, end this process group (a
    function may have started others; only when this process leads it, as the worker starts
    it) and this process."""
    if home:
        shutil.rmtree(home, ignore_errors=True)
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(4)


def _watch_parent(parent: int, home: str | None) -> None:
    """End everything once ``parent`` (the worker) is gone: the function may be busy and never
    read the socket that would tell it. A daemon thread; checks every ``PARENT_CHECK_S``."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        _end_orphaned(home)

    threading.Thread(target=watch, daemon=True, name="userproc-parent").start()


def main(argv: list[str]) -> int:
    """Entry point: ``argv[1]`` is the inherited socket's file descriptor, ``argv[2]`` the pid
    of the worker that started this process."""
    sock = socket.socket(fileno=int(argv[1]))
    home = _own_home()  # read before any user code runs (it may change directory)
    if len(argv) > 2:
        _watch_parent(int(argv[2]), home)
    try:
        run(sock)
    except ChannelClosed:
        # The worker went away (it killed us, or died; a spare's worker gave it no call):
        # nothing to answer, and the worker may not be there to remove the home.
        if home:
            shutil.rmtree(home, ignore_errors=True)
        return 3
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
