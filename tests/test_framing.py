"""The local site's wire format (``fabric.wire.framing``): messages split and joined
anywhere in the byte stream, bad input refused by type, private socket paths."""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
from pathlib import Path

import msgpack
import pytest

from fabric.wire import framing
from tests.plugins.ci import cannot_run
from tests.plugins.peers import HUNG_UP, NOBODY, connect_as_nobody


def test_messages_survive_any_split_of_the_stream() -> None:
    messages = [[b"T", b"x" * 1000, b"id"], [b"C", b""], [b"R", bytes(range(256)) * 300]]
    stream = b"".join(framing.encode(m) for m in messages)
    for chunk in (1, 3, 7, 4096, len(stream)):
        reader = framing.Reader()
        got = []
        for i in range(0, len(stream), chunk):
            got.extend(reader.feed(stream[i:i + chunk]))
        assert got == messages, f"chunk size {chunk}"


@pytest.mark.parametrize("data, says", [
    (struct.pack("!I", framing.MAX_MESSAGE_BYTES + 1), "limit"),
    (struct.pack("!I", 2) + b"\xc1\xc1", "not msgpack"),
    (framing._HEADER.pack(2) + msgpack.packb({}) + b"\x90", "not msgpack"),
    (framing._HEADER.pack(1) + msgpack.packb(7), "list of byte frames"),
    (framing._HEADER.pack(3) + msgpack.packb(["a"]), "list of byte frames"),
])
def test_garbage_is_a_framing_error(data: bytes, says: str) -> None:
    with pytest.raises(framing.FramingError, match=says):
        framing.Reader().feed(data)


def test_recv_ready_reads_what_is_there_and_sees_the_peer_leave() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    reader = framing.Reader()
    assert framing.recv_ready(a, reader) == []  # nothing yet: not a hang, not "closed"
    big = [b"R", b"k", os.urandom(300_000)]  # more than one read, more than the kernel buffer
    framing.send_all(b, framing.encode([b"C", b"1"]), 5.0)
    got = framing.recv_ready(a, reader)
    assert got == [[b"C", b"1"]]
    b.setblocking(False)
    sent = framing.encode(big)
    view = memoryview(sent)
    while view:  # the reader drains while the writer waits for room, as the two processes do
        try:
            view = view[b.send(view):]
        except BlockingIOError:
            got.extend(framing.recv_ready(a, reader) or [])
    b.close()
    while True:
        more = framing.recv_ready(a, reader)
        if more is None:
            break
        got.extend(more)
    assert got[1:] == [big]
    a.close()


def test_send_all_gives_up_when_nobody_reads() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    with pytest.raises(TimeoutError):
        framing.send_all(a, b"x" * 50_000_000, 0.2)
    a.close()
    b.close()


def test_peer_uid_is_the_connecting_user(tmp_path: Path) -> None:
    """``peer_uid`` says which user connected (the site serves its own user only): ours for
    a pair of our sockets, and another user's (uid, not gid) for a connection made as them."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    assert framing.peer_uid(a) == os.getuid()  # Linux always says (SO_PEERCRED)
    a.close()
    b.close()
    if os.geteuid() != 0:
        cannot_run("connecting as another user needs root")
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        seen: list[int | None] = []

        def accept() -> None:
            conn, _ = listener.accept()
            seen.append(framing.peer_uid(conn))
            conn.close()

        thread = threading.Thread(target=accept)
        thread.start()
        assert connect_as_nobody(path) == HUNG_UP
        thread.join(10)
    assert seen == [NOBODY]


def test_socket_path_short_and_long_state_dirs(tmp_path: Path) -> None:
    short = tmp_path / "s"
    assert framing.socket_path(short) == short / framing.SOCKET_NAME
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = framing.socket_path(deep)
    assert len(os.fsencode(path)) <= 108 and path.parent != deep
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert framing.socket_path(deep) == path  # the same state dir, the same socket
    assert framing.socket_path(deep / "other") != path


def test_socket_fallback_folder_is_private_or_refused(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A state dir too deep for a socket path puts the socket in ``<tmp>/fabric-<uid>``: made
    0700, and refused where others could read or write it or another user owns it."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    old = os.umask(0)  # the folder's mode is the code's own, not the umask's
    try:
        path = framing.socket_path(deep)
    finally:
        os.umask(old)
    folder = tmp_path / "tmp" / f"fabric-{os.getuid()}"
    assert path.parent == folder and stat.S_IMODE(folder.stat().st_mode) == 0o700
    for loose in (0o750, 0o705, 0o702, 0o770):
        folder.chmod(loose)
        with pytest.raises(PermissionError, match="must be a private dir"):
            framing.socket_path(deep)
    folder.chmod(0o700)
    assert framing.socket_path(deep) == path
    if os.getuid() == 0:  # another user's folder, private or not, is not ours to use
        os.chown(folder, NOBODY, -1)
        with pytest.raises(PermissionError, match="must be a private dir"):
            framing.socket_path(deep)
