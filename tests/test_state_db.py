"""``StateDB`` keeps one SQLite connection per thread and process: what one writes, another
thread, process or instance reads at once; a thread never gets another's connection, and a
forked child never uses its parent's."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from fabric.endpoint.state import Deployment, StateDB


def _dep(dep_id: str, state: str = "ready") -> Deployment:
    return Deployment(id=dep_id, model="m", version="v", state=state, created=time.time())


def test_connections_are_kept_per_thread_and_process(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    db = StateDB(tmp_path)
    mine = db._connect()
    assert db._connect() is mine
    theirs: list[object] = []
    thread = threading.Thread(target=lambda: theirs.append(db._connect()))
    thread.start()
    thread.join(10)
    assert theirs and theirs[0] is not mine
    real = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real + 1)  # as in a forked child
    assert db._connect() is not mine


def test_a_kept_connection_sees_others_writes_at_once(tmp_path: Path) -> None:
    reader, writer = StateDB(tmp_path), StateDB(tmp_path)
    assert reader.query() == []  # the reader's connection is open from here on
    writer.insert(_dep("d-1"))
    assert [d.id for d in reader.query(states=("ready",))] == ["d-1"]
    writer.update("d-1", state="dead")
    got = reader.get("d-1")
    assert got is not None and got.state == "dead"
    with pytest.raises(RuntimeError), writer.transaction() as tx:  # rolled back, still usable
        tx.execute("UPDATE deployments SET state = 'ready' WHERE id = 'd-1'")
        raise RuntimeError("the launch decision failed")
    got = reader.get("d-1")
    assert got is not None and got.state == "dead"
    writer.insert(_dep("d-2"))
    assert [d.id for d in reader.query()] == ["d-2", "d-1"]
