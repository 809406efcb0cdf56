"""Composition root of the site process: ``python -m fabric.siteproc --site local``.

The site process is assembled here and nowhere else: a ``SiteProcess`` (``fabric.endpoint.site``:
engine, Unix socket, state dir; it knows nothing of campaigns) with the campaign scheduler
(``fabric.campaign.site_scheduler.site_task``) wired in as a background task. ``fabric endpoint
start`` and the SDK's auto-start (``fabric.client.local.start_site``) run this module.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import signal
import sys
from pathlib import Path

from fabric.campaign.site_scheduler import site_task
from fabric.endpoint.site import BackgroundTask, SiteProcess
from fabric.endpoint.site_metrics import metrics_task
from fabric.sites import load_site

BACKGROUND_TASKS: tuple[BackgroundTask, ...] = (site_task, metrics_task)
"""What the site process runs beside serving tasks: the campaign scheduler and the
Prometheus ``/metrics`` listener (where the site config turns it on)."""
SITE_LOG_BYTES = 10 * 2**20
"""``<state_dir>/logs/site.log`` rotates at this size ..."""
SITE_LOG_BACKUPS = 3
"""... keeping this many old ones (``site.log.1`` newest): at most 40 MiB in all."""
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SiteLogHandler(logging.handlers.RotatingFileHandler):
    """``site.log``, rotated; the process's stdout/stderr, which ``start_site`` points at the
    same file (a traceback, a library's print), follow it to the new file on each rollover
    instead of growing the renamed one forever."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, maxBytes=SITE_LOG_BYTES, backupCount=SITE_LOG_BACKUPS)
        here = os.stat(path)
        self.follow_fds = tuple(fd for fd in (1, 2) if _same_file(fd, here))

    def doRollover(self) -> None:
        """Rotate, then point the followed descriptors at the new file."""
        super().doRollover()
        if self.stream is not None:
            for fd in self.follow_fds:
                os.dup2(self.stream.fileno(), fd)


def _same_file(fd: int, st: os.stat_result) -> bool:
    try:
        mine = os.fstat(fd)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def setup_logging(state_dir: Path) -> None:
    """Log to the rotating ``site.log`` in ``state_dir/logs``, and to stderr unless stderr is
    that file already (the site started in the background)."""
    Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    path = Path(state_dir) / "logs" / "site.log"
    path.parent.mkdir(exist_ok=True)
    handler = SiteLogHandler(path)
    handlers: list[logging.Handler] = [handler]
    if 2 not in handler.follow_fds:
        handlers.append(logging.StreamHandler())
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=handlers, force=True)
    for noisy in ("parsl", "globus_compute_endpoint", "globus_compute_sdk"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build(site_ref: str, state_dir: str | Path | None = None) -> SiteProcess:
    """The site process for ``site_ref`` (a site name or definition path), wired, not started."""
    ref = site_ref
    if Path(ref).exists():
        ref = str(Path(ref).resolve())  # workers run in another cwd
    site = load_site(ref)
    folder = Path(state_dir).expanduser() if state_dir else site.resolved_state_dir()
    proc = SiteProcess(site, ref, folder)
    proc.background_tasks.extend(BACKGROUND_TASKS)
    return proc


def main(argv: list[str] | None = None) -> int:
    """Entry point of the site process."""
    parser = argparse.ArgumentParser(prog="python -m fabric.siteproc",
                                     description="Run a fabric site (the local endpoint).")
    parser.add_argument("--site", default="local", help="site name or definition path")
    parser.add_argument("--state-dir", default=None, help="override the site's state dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)  # until the state dir is known
    proc = build(args.site, args.state_dir)
    setup_logging(proc.state_dir)
    signal.signal(signal.SIGTERM, lambda *_: proc.request_stop())
    signal.signal(signal.SIGINT, lambda *_: proc.request_stop())
    try:
        proc.start()
        proc.serve_forever()
    finally:
        proc.shutdown()
    if not proc.engine_stopped:
        # Its stuck threads (and the atexit hooks joining them) would keep the process alive
        # for ever; the watchdog reaps what the engine left once this pid is gone.
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
