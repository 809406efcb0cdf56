"""The Python API of campaigns: ``Campaign`` and ``campaign(fab, manifest)``.

>>> from fabric import Fabric
>>> from fabric.campaign.api import campaign
>>> c = campaign(Fabric(), "examples/campaign/manifest.yaml")   # validated, then started
>>> c.wait()["status"]
'done'
>>> for record in c.results(): print(record["custom_id"], record["response"]["text"])

``run="here"`` runs the campaign in a background thread of this process (it stops with the
process; ``resume`` continues it); ``run="site"`` hands it to the site process's scheduler,
which keeps going after this process exits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from fabric.campaign import store
from fabric.campaign.manifest import Manifest
from fabric.errors import DeadlineExceeded, InvalidRequest


class Campaign:
    """A handle on one campaign folder (it needs no live runner to answer)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.name = self.folder.name
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None

    @classmethod
    def create(cls, manifest: Manifest | str | Path, *, home: Path | None = None,
               site: str = "local", run: Literal["here", "site"] = "here",
               schedule: dict[str, str] | None = None) -> Campaign:
        """Validate the manifest and its inputs and write the ledger (nothing runs yet)."""
        home = Path(home) if home is not None else store.default_home(site)
        return cls(store.create(manifest, home, runner=run, schedule=schedule))

    def start(self, *, transports: dict[str, Any] | None = None, auth: Any = None) -> Campaign:
        """Run the campaign in a background thread of this process."""
        from fabric.campaign.dispatch import CampaignRunner

        runner = CampaignRunner(self.folder, transports=transports, auth=auth, stop=self._stop)

        def target() -> None:
            try:
                runner.run()
            except BaseException as exc:  # surfaced by wait()
                self._error = exc

        self._thread = threading.Thread(target=target, daemon=True,
                                        name=f"campaign-{self.name}")
        self._thread.start()
        return self

    def status(self) -> dict[str, Any]:
        """Counts, throughput, ETA, per-site progress, errors by kind (see ``store.status``)."""
        return store.status(self.folder)

    def wait(self, timeout: float | None = None, poll_s: float = 0.5) -> dict[str, Any]:
        """Block until the campaign is done, cancelled or failed; returns its status.

        Raises the runner's error if this process's runner failed, ``DeadlineExceeded`` after
        ``timeout`` seconds. A campaign waiting for its schedule is waited for too.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.status()
            # Asked after the status is read: a runner that failed while it was read is seen
            # stopped, and its error wins over the status it left ("interrupted").
            here_stopped = self._thread is not None and not self._thread.is_alive()
            if here_stopped and self._error:
                raise self._error
            if store.is_final(state) or (here_stopped and state["status"] != "running"):
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded(f"campaign {self.name} not finished after {timeout} s "
                                       f"({state['done']}/{state['total']} done)", status=state)
            time.sleep(poll_s)

    def results(self) -> Iterator[dict[str, Any]]:
        """The committed result records (``results.jsonl``), in completion order."""
        return store.read_records(self.folder)

    def errors(self) -> Iterator[dict[str, Any]]:
        """The committed error records (``errors.jsonl``)."""
        return store.read_records(self.folder, errors=True)

    def cancel(self) -> str:
        """Stop the campaign (in-flight shards are abandoned); returns the new status."""
        return store.cancel(self.folder)

    def stop(self) -> None:
        """Stop this process's runner, leaving the campaign resumable (status ``queued``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30.0)


def campaign(fab: Any, manifest: Manifest | str | Path | dict[str, Any], *,
             run: Literal["here", "site"] = "here", home: Path | None = None,
             schedule: dict[str, str] | None = None) -> Campaign:
    """What ``Fabric.campaign(manifest)`` does: create the campaign and start it.

    With ``run="here"`` the shards go through ``fab``'s own transport when the manifest names
    ``fab``'s site (so a test or a custom transport is honoured); other sites are opened by
    the runner. With ``run="site"`` the site's scheduler runs it (at its ``schedule``).
    """
    from fabric.campaign.manifest import load_manifest

    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    site = getattr(fab, "site", "local")
    control = None
    if run == "site":
        # The site process's scheduler runs it: the site must be up. Contact through ``fab``'s
        # own transport starts an embedded site, as any first call does; a site behind Globus
        # Compute has no scheduler of this machine's campaigns.
        control = getattr(fab.transport, "control", None)
        if not callable(control):
            raise InvalidRequest(
                f"run='site' hands the campaign to an embedded site's scheduler, and site "
                f"{site!r} is reached through Globus Compute; use run='here'", site=site)
    c = Campaign.create(m, home=home, site=site, run=run, schedule=schedule)
    if control is not None:
        control("ping")
    else:
        transports = {s.name: fab.transport for s in m.sites if s.name == fab.site}
        c.start(transports=transports, auth=getattr(fab, "auth", None))
    return c
