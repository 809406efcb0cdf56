"""SQLite on the file system it lives on: WAL where that is safe, the rollback journal elsewhere.

WAL keeps its index in shared memory (``-shm``, mmap'd), which works only when every process is
on one host and the file system is local. Site state (deployments, usage, campaign ledgers) lives
under the site's state dir, which on HPC login nodes is often a shared file system (GPFS on
Polaris, Lustre and NFS on Perlmutter); there ``journal_mode`` picks ``DELETE`` (POSIX locks,
which those file systems implement across nodes). A leaf module: every package may use it.
"""

from __future__ import annotations

import functools
from pathlib import Path

SHARED_FS_TYPES = frozenset({"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3",
                             "ceph", "glusterfs", "panfs", "wekafs", "9p", "afs"})
"""File systems (``/proc/mounts`` types) where SQLite's WAL mode is unsafe or fails."""
MOUNTS = "/proc/mounts"
"""Where the mount table is read (tests point it at a table of their own)."""


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the file system holding ``path`` (its longest mount point prefix in
    ``mounts``), e.g. ``ext4``, ``nfs4``, ``lustre``, ``gpfs``; ``""`` if unknown."""
    target = Path(path).resolve()  # symlinks of the part that exists are followed
    best, kind = -1, ""
    try:
        lines = Path(mounts or MOUNTS).read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == Path(point) or Path(point) in target.parents) and len(point) > best:
            best, kind = len(point), fields[2]
    return kind


def journal_mode(path: Path, mounts: str | None = None) -> str:
    """SQLite journal mode for a database at ``path``: ``WAL`` on a local file system,
    ``DELETE`` on a shared one (``SHARED_FS_TYPES``, or any ``fuse.*`` mount). Kept per path
    and mount table for the life of the process: every connection asks (a site's request
    workers open several per admission), and reading the mount table each time cost more
    than the query."""
    return _journal_mode(str(path), mounts or MOUNTS)


@functools.lru_cache(maxsize=1024)
def _journal_mode(path: str, mounts: str) -> str:
    kind = filesystem_type(Path(path), mounts)
    if kind in SHARED_FS_TYPES or kind.startswith("fuse."):
        return "DELETE"
    return "WAL"
