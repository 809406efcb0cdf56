"""Composition root of the site process: ``python -m fabric.siteproc --site local``.

The site process is assembled here and nowhere else: a ``SiteProcess`` (``fabric.endpoint.site``:
engine, Unix socket, state dir; it knows nothing of campaigns) with the campaign scheduler
(``fabric.campaign.scheduler.site_task``) wired in as a background task. ``fabric endpoint
start`` and the SDK's auto-start (``fabric.client.local.start_site``) run this module.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from fabric.campaign.scheduler import site_task
from fabric.endpoint.site import BackgroundTask, SiteProcess
from fabric.sites import load_site

BACKGROUND_TASKS: tuple[BackgroundTask, ...] = (site_task,)
"""What the site process runs beside serving tasks: the campaign scheduler."""


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
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("parsl", "globus_compute_endpoint", "globus_compute_sdk"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    proc = build(args.site, args.state_dir)
    signal.signal(signal.SIGTERM, lambda *_: proc.request_stop())
    signal.signal(signal.SIGINT, lambda *_: proc.request_stop())
    try:
        proc.start()
        proc.serve_forever()
    finally:
        proc.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
