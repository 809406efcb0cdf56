"""Messages on the local site's Unix socket: length-prefixed lists of byte frames.

The SDK and the local site run on one machine as one OS user, so they talk over a Unix stream
socket in the site's private state dir rather than ZMQ over TCP: a ZMQ hop wakes a sender I/O
thread, the kernel and a receiver I/O thread (~250 us a round trip on 2 cores), a Unix socket
only the kernel (~30 us). Access is the file system's: the socket is mode 0600 in a 0700 dir,
and the site also checks each peer's uid (``SO_PEERCRED``).

A message is ``!I`` (body length) + ``msgpack([frame, ...])``; the first frame is its kind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import struct
import tempfile
import time
from pathlib import Path

import msgpack

TASK, RESULT, CONTROL = b"T", b"R", b"C"
"""First frame of each message kind: a Globus Compute task, its result, a control message."""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest message either side accepts (a result is at most ~10 MiB; see RESULT_LIMIT_BYTES)."""
SOCKET_NAME = "site.sock"
_HEADER = struct.Struct("!I")
HEADER_BYTES = _HEADER.size
"""The length prefix before each message's body."""
_MAX_PATH = 100
"""AF_UNIX paths must fit in 108 bytes; a longer state dir gets a short path elsewhere."""
_READ_BYTES = 64 * 1024
"""Bytes asked of the kernel per read: ``recv(n)`` allocates n first, and above ~128 KiB
that allocation is an mmap (tens of microseconds) even for a 300-byte reply."""


class FramingError(Exception):
    """The peer sent something that is not a message of this protocol."""


def encode(frames: list[bytes]) -> bytes:
    """One message (header and body) for ``frames``."""
    body = msgpack.packb(frames, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


class Reader:
    """Reassembles messages from the byte stream of one connection."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[list[bytes]]:
        """The whole messages completed by ``data`` (a partial one waits for more)."""
        self._buf += data
        out: list[list[bytes]] = []
        start = 0
        while len(self._buf) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buf, start)
            if size > MAX_MESSAGE_BYTES:
                raise FramingError(f"message of {size} bytes (limit {MAX_MESSAGE_BYTES})")
            end = start + _HEADER.size + size
            if len(self._buf) < end:
                break
            try:
                frames = msgpack.unpackb(memoryview(self._buf)[start + _HEADER.size:end])
            except (ValueError, TypeError) as exc:  # msgpack's errors are ValueErrors
                raise FramingError(f"a message body is not msgpack: {exc}") from None
            if not isinstance(frames, list) or not all(isinstance(f, bytes) for f in frames):
                raise FramingError("a message must be a list of byte frames")
            out.append(frames)
            start = end
        del self._buf[:start]
        return out


def socket_path(state_dir: Path) -> Path:
    """Where the site for ``state_dir`` listens: in the state dir when the path is short
    enough, else in a private per-user dir under the temp dir, named by the state dir."""
    path = Path(state_dir) / SOCKET_NAME
    if len(os.fsencode(path)) <= _MAX_PATH:
        return path
    folder = Path(tempfile.gettempdir()) / f"fabric-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise PermissionError(f"{folder} must be a private dir of this user (mode 0700)")
    digest = hashlib.sha256(os.fsencode(Path(state_dir).resolve())).hexdigest()[:24]
    return folder / f"{digest}.sock"


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end (None where the OS cannot say)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def send_all(sock: socket.socket, data: bytes, timeout_s: float) -> None:
    """Write all of ``data`` to a non-blocking socket, waiting up to ``timeout_s`` for room."""
    view = memoryview(data)
    deadline = time.monotonic() + timeout_s
    while view:
        try:
            view = view[sock.send(view):]
            continue
        except BlockingIOError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the peer took no data for {timeout_s:.0f} s")
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        poller.poll(int(left * 1000) or 1)


def recv_ready(sock: socket.socket, reader: Reader) -> list[list[bytes]] | None:
    """The messages that can be read from non-blocking ``sock`` now ([] if none); None once
    the peer has closed the connection."""
    out: list[list[bytes]] = []
    while True:
        try:
            data = sock.recv(_READ_BYTES)
        except BlockingIOError:
            return out
        except OSError:
            return out or None
        if not data:
            return out or None
        out.extend(reader.feed(data))
        if len(data) < _READ_BYTES:
            return out  # a short read: the kernel buffer is empty


def connect(path: str | Path) -> socket.socket:
    """A non-blocking connection to the site listening at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(path))
    except OSError:
        with contextlib.suppress(OSError):
            sock.close()
        raise
    sock.setblocking(False)
    return sock
