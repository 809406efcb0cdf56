"""The pool watch for a site run under the ``globus-compute-endpoint`` daemon: one guard per block.

On the embedded local site the site process runs ``fabric.endpoint.poolwatch`` over its pools. Under
the daemon no fabric process runs beside the engine: the daemon forks a user endpoint whose
``GlobusComputeEngine`` starts the worker pools, and a pool that lost its ``multiprocessing``
helper, or a worker to a signal, took tasks that were never answered (a call waited out its
timeout, or for ever). So every shipped ``user_config_template.yaml.j2`` ends its provider's
``worker_init`` with::

    python3 -m fabric.endpoint.poolguard --shell $$ </dev/null &

``worker_init`` runs in the shell that then runs Parsl's launch command for the block, so the
guard starts with each block and is told that shell. It applies poolwatch's checks once a second
to the ``process_worker_pool`` that shell starts (a descendant of it), and caps the ``*.log``
files under the pool's ``--logdir`` (``interchange.log``, ``manager.log``, ``worker_N.log``). A
pool found broken is killed with its whole process group: the wrapper shells and this guard too,
so no wrapper lives to write an exit code. Parsl's ``LocalProvider`` then reports the block
``CANCELLED`` (killed), not ``FAILED`` (the engine's default error handler gives up on the whole
engine at its first failed block), and its strategy starts a new block, whose ``worker_init``
starts a new guard. The tasks the lost pool held fail with Parsl's ``ManagerLost`` after the
engine's ``heartbeat_threshold``; the client raises them as a retryable ``EndpointError`` with
code ``WorkerPoolLost`` (``fabric.globus.transport``), as it does for the embedded site.

The guard ends with its shell (a block cancelled by Parsl is killed as a process group, the guard
with it). It sees only pools started under its shell: a launcher that starts pools elsewhere
(``SrunLauncher``, ``mpiexec``) leaves them unguarded, and so does a ``worker_init`` whose
``python3`` cannot import the fabric (the guard's error is in the block's ``.err`` file; the
block itself runs on).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from fabric.endpoint.poolwatch import CHECK_PERIOD_S, LOG_CAP_BYTES, PoolWatch, kill_pool
from fabric.procs import proc_args, process_running

log = logging.getLogger("fabric.site.pool")

MAX_DEPTH = 32
"""How many parents up from a pool its shell is looked for (Parsl's launchers nest two or three
shells)."""


class PoolGuard(PoolWatch):
    """``PoolWatch`` over the pools that shell ``shell`` starts (see the module)."""

    def __init__(self, shell: int, log_cap_bytes: int = LOG_CAP_BYTES) -> None:
        super().__init__(Path(os.devnull), log_cap_bytes)
        self.shell = shell
        self.log_dir: Path | None = None
        """The pool's ``--logdir`` (whose logs are capped), once a pool has been seen."""

    def owns(self, pool: int, cmd: str, stats: dict[int, tuple[str, int, int, int]]) -> bool:
        """A pool started under the shell (its parent, or a parent's parent...)."""
        pid = pool
        for _ in range(MAX_DEPTH):
            st = stats.get(pid)
            if st is None or st[1] <= 1:
                return False
            if st[1] == self.shell:
                if self.log_dir is None:
                    self.log_dir = log_dir_of(pool)
                return True
            pid = st[1]
        return False

    def kill(self, pool: int) -> None:
        """The block's whole process group, this guard's own included (only the session is
        spared: the user endpoint's)."""
        log.warning("poolguard: ending worker pool %d with its block (shell %d, this guard "
                    "included)", pool, self.shell)
        kill_pool(pool, spared=(os.getsid(0),))

    def cap_logs(self) -> list[Path]:
        """Cap the logs under the pool's log dir (nothing before a pool is seen)."""
        if self.log_dir is None:
            return []
        self.run_dir = self.log_dir
        return super().cap_logs()

    def guard(self, period_s: float = CHECK_PERIOD_S) -> None:
        """Check every ``period_s`` while the shell runs or a pool of it lives."""
        while True:
            time.sleep(period_s)
            self.check()
            if not process_running(self.shell) and not any(
                    process_running(p) for p in self._live):
                return


def log_dir_of(pool: int) -> Path | None:
    """The ``--logdir`` a worker pool was started with (Parsl names it on the command line)."""
    args = proc_args(pool)
    for i, arg in enumerate(args):
        if arg.startswith("--logdir="):
            value = arg.split("=", 1)[1]
        elif arg == "--logdir" and i + 1 < len(args):
            value = args[i + 1]
        else:
            continue
        return Path(value) if value and value != "None" else None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fabric.endpoint.poolguard",
        description="Watch the Parsl worker pool a block's shell starts; kill the block if the "
                    "pool lost its multiprocessing helper or a worker (see the module doc).")
    parser.add_argument("--shell", type=int, required=True,
                        help="pid of the shell that runs the block's launch command ($$ in "
                             "worker_init)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not process_running(args.shell):
        log.error("poolguard: shell %d is not running", args.shell)
        return 1
    log.info("poolguard: watching the worker pools of shell %d (pid %d)", args.shell,
             os.getpid())
    PoolGuard(args.shell).guard()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
