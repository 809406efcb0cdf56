"""Connect to a Unix socket as another user, as root: the kernel records that user as the
peer (``SO_PEERCRED``), while the socket's private folder and mode still let us reach it."""

from __future__ import annotations

import ctypes
import os
import socket

NOBODY = 65534
"""The uid the connection claims."""
OTHER_GID = 12345
"""Its gid: not the uid, so reading the gid for the uid shows."""
HUNG_UP, ANSWERED, FAILED, STILL_OPEN = 0, 1, 2, 3
"""What the connection saw (the child's exit status)."""


def connect_as_nobody(path: str, wait_s: float = 10.0) -> int:
    """Connect to ``path`` from a forked child whose effective uid is ``NOBODY`` (its
    filesystem uid stays root, so 0700 folders and 0600 sockets do not stop it) and wait up
    to ``wait_s`` for the peer's first byte; what it saw: ``HUNG_UP``, ``ANSWERED``,
    ``FAILED`` (could not connect) or ``STILL_OPEN``. Needs root."""
    pid = os.fork()
    if pid == 0:  # the child makes syscalls only, then leaves without running any cleanup
        code = FAILED
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            os.setegid(OTHER_GID)
            os.seteuid(NOBODY)
            if libc.setfsuid(0) < 0 or libc.setfsgid(0) < 0:
                os._exit(FAILED)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                sock.settimeout(wait_s)
                try:
                    code = HUNG_UP if sock.recv(1) == b"" else ANSWERED
                except ConnectionResetError:
                    code = HUNG_UP
                except TimeoutError:
                    code = STILL_OPEN
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
