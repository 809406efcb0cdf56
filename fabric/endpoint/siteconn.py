"""The local site's client connections: a listening Unix socket and per-client write buffers.

A reply is written from whichever thread has it (the engine's result thread, a control
thread) under the connection's lock; what the kernel does not take at once waits in the
connection's buffer until the site's main loop sees the socket writable.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

from fabric.wire import framing


class Conn:
    """One client's connection. Replies are written from any thread under ``lock``; bytes the
    kernel does not take at once wait in ``out`` for the main loop."""

    __slots__ = ("closed", "lock", "out", "reader", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = framing.Reader()
        self.lock = threading.Lock()
        self.out = bytearray()
        self.closed = False

    def send(self, frames: list[bytes]) -> bool:
        """Write a message now as far as the kernel takes it; True if bytes are left over."""
        data = framing.encode(frames)
        with self.lock:
            if self.closed:
                return False
            if not self.out:
                try:
                    sent = self.sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self.closed = True
                    return False
                if sent == len(data):
                    return False
                data = data[sent:]
            self.out += data
            return True

    def flush(self) -> bool:
        """Write what is left over; True while some is still left."""
        with self.lock:
            try:
                del self.out[:self.sock.send(self.out)]
            except BlockingIOError:
                pass
            except OSError:
                self.closed = True
                self.out.clear()
            return bool(self.out)

    def close(self) -> None:
        """Drop the connection and whatever it still had to send."""
        with self.lock:
            self.closed = True
            self.out.clear()
            self.sock.close()


def listen_unix(path: Path) -> socket.socket:
    """The site's listening socket at ``path`` (mode 0600, replacing a dead site's)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # we hold the state dir's lock: a socket left here is a dead site's
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(path))
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock
