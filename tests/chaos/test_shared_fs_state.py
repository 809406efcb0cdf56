"""Site state on a shared file system (GPFS, Lustre, NFS) uses a rollback journal, not WAL.

WAL's shared-memory index needs one host and a local file system; ``~/.fabric`` on the login
nodes of Polaris and Perlmutter is neither. The mount table is the test's own (a real mount of
Lustre is not available here); the database and its journal are real.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric import sqlitefs
from fabric.endpoint.state import Deployment, StateDB
from fabric.sqlitefs import filesystem_type, journal_mode
from tests.chaos.common import report


def mounts(tmp_path: Path, kind: str) -> Path:
    table = tmp_path / "mounts"
    spaced = str(tmp_path / "with space").replace(" ", "\\040")  # as the kernel writes it
    table.write_text("/dev/root / ext4 rw,relatime 0 0\n"
                     f"fs1@o2ib:/home {tmp_path / 'shared'} {kind} rw,flock 0 0\n"
                     f"server:/x {spaced} nfs4 rw 0 0\n")
    return table


@pytest.mark.parametrize("kind", ["lustre", "gpfs", "nfs4", "nfs", "fuse.sshfs"])
def test_shared_file_systems_get_a_rollback_journal(tmp_path: Path, kind: str) -> None:
    table = str(mounts(tmp_path, kind))
    db_path = tmp_path / "shared" / "state" / "fabric.sqlite"
    assert filesystem_type(db_path, table) == kind
    assert journal_mode(db_path, table) == "DELETE"
    assert journal_mode(tmp_path / "with space" / "db", table) == "DELETE"
    assert journal_mode(tmp_path / "local" / "db", table) == "WAL"


def test_state_db_on_a_shared_mount_writes_no_wal(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlitefs, "MOUNTS", str(mounts(tmp_path, "lustre")))
    folder = tmp_path / "shared" / "state"
    db = StateDB(folder)
    db.insert(Deployment(id=Deployment.new_id(), model="m", version="1", state="queued"))
    with db.transaction() as tx:
        mode = tx.execute("PRAGMA journal_mode").fetchone()[0]
    files = sorted(p.name for p in folder.iterdir())
    report("shared-fs-state", inputs=1, lost=int(len(list(db.query())) != 1))
    assert mode == "delete" and not any(n.endswith(("-wal", "-shm")) for n in files), files
    local = StateDB(tmp_path / "local")
    with local.transaction() as tx:
        assert tx.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
