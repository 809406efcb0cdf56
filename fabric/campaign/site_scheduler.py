"""The campaign scheduler: a background thread of the site process that runs due campaigns.

.. code:: text

    every POLL_S:  for each campaign in <state dir>/campaigns whose runner is "site":
        queued, next_run <= now                -> CampaignRunner in a new thread
        running but no live runner (site died) -> CampaignRunner again (it recovers and resumes)
        recurring, next_run <= now             -> a new campaign "<name>-<UTC stamp>" from the
                                                  template (queued), next_run = next cron match

A campaign run from the CLI (``fabric campaign run``, runner "here") is left alone: its owner
resumes it. At most ``MAX_RUNNING`` campaigns run at once per site process.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from pathlib import Path
from typing import Any

from fabric.campaign import store
from fabric.campaign.ledger import Ledger
from fabric.campaign.manifest import Manifest

log = logging.getLogger("fabric.campaign.site_scheduler")

POLL_S = 2.0
"""How often the scheduler looks for due campaigns."""
MAX_RUNNING = 4
"""Campaigns one site process runs at the same time."""


def site_task(site: Any, stopping: threading.Event) -> None:
    """``SiteProcess`` background hook: schedule ``<site state dir>/campaigns``."""
    CampaignScheduler(Path(site.state_dir) / "campaigns", stopping).loop()


class CampaignScheduler:
    """Finds due campaigns in ``home`` and runs each in its own thread."""

    def __init__(self, home: Path, stopping: threading.Event | None = None,
                 poll_s: float = POLL_S) -> None:
        self.home = Path(home)
        self.stopping = stopping or threading.Event()
        self.poll_s = poll_s
        self.threads: dict[str, threading.Thread] = {}

    def loop(self) -> None:
        """Poll until ``stopping`` is set; then wait briefly for runners to hand back."""
        while not self.stopping.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("campaign scheduler tick failed")
            self.stopping.wait(self.poll_s)
        for thread in self.threads.values():
            thread.join(10.0)

    def tick(self, now: float | None = None) -> list[str]:
        """Start every due campaign; returns the names started."""
        now = time.time() if now is None else now
        self.threads = {n: t for n, t in self.threads.items() if t.is_alive()}
        started = []
        for name in store.list_names(self.home):
            if name in self.threads or len(self.threads) >= MAX_RUNNING:
                continue
            folder = self.home / name
            due = self._due(folder, now)
            if due == "recurring":
                self._fire(folder, now)
            elif due:
                thread = threading.Thread(target=self._run, args=(folder,), daemon=True,
                                          name=f"campaign-{name}")
                self.threads[name] = thread
                thread.start()
                started.append(name)
        return started

    def _due(self, folder: Path, now: float) -> str | None:
        ledger = Ledger(folder / store.LEDGER)
        try:
            if ledger.get("runner") != "site":
                return None
            status, next_run = ledger.get("status"), float(ledger.get("next_run") or 0)
        finally:
            ledger.close()
        if status == "recurring":
            return "recurring" if next_run <= now else None
        if status == "queued" and next_run <= now:
            return "run"
        if status == "scheduled" and next_run <= now:
            return "run"
        if status in ("running", "cancelling") and store.runner_pid(folder) is None:
            return "run"  # its runner died with the previous site process
        return None

    def _run(self, folder: Path) -> None:
        from fabric.campaign.dispatch import CampaignRunner

        try:
            final = CampaignRunner(folder, stop=self.stopping).run()
            log.info("campaign %s: %s", folder.name, final)
        except Exception:
            log.exception("campaign %s failed", folder.name)

    def _fire(self, folder: Path, now: float) -> None:
        """Start one run of a recurring campaign and move its template to the next match."""
        template = store.load(folder)
        stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m%dT%H%M")
        data = template.model_dump()
        data.update(name=f"{template.name}-{stamp}", schedule=None,
                    output=str(Path(template.output) / stamp))
        ledger = Ledger(folder / store.LEDGER)
        try:
            assert template.schedule is not None and template.schedule.every
            ledger.set(next_run=template.schedule.first_run(now), last_fired=now)
            try:
                store.create(Manifest.model_validate(data), self.home, runner="site", now=now)
            except Exception as exc:  # a bad input today must not stop tomorrow's run
                ledger.set(last_error=f"run {stamp}: {exc}")
                log.warning("recurring campaign %s could not start: %s", template.name, exc)
        finally:
            ledger.close()
