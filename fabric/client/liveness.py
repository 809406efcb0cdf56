"""``EndpointLiveness``: whether a remote site's endpoint is up while a call waits on it.

Globus Compute keeps accepting tasks for an endpoint that has died, so an admission sent to a
dead site would wait for ever; and silence alone cannot tell a dead site from a busy one
(a cold start holds every request worker for as long as the batch queue takes, and nothing
else the site runs answers meanwhile). What can tell them apart is the endpoint's heartbeat:
the endpoint manager publishes one every ``heartbeat_period`` whatever its workers do, and the
web service reports the endpoint ``online`` or ``offline`` from them
(``Client.get_endpoint_status``). So a call that has waited ``every_s`` asks, and asks again
every ``every_s``; an endpoint reported ``offline`` by ``OFFLINE_CHECKS`` checks in a row
fails the call with a retryable ``EndpointError``. An answer that is not ``offline`` (online,
a status the client does not know, or no answer at all) resets the count: only the service's
own word that the endpoint stopped beating ends a wait.

.. code:: text

    wait(admission) --every_s--> status?  online / ? --> keep waiting
                                          offline   --> once more ... offline --> EndpointError
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fabric.errors import EndpointError

OFFLINE_CHECKS = 2
"""``offline`` answers in a row that end a wait: one missed heartbeat is not a dead site."""


class EndpointLiveness:
    """Asks ``status()`` (``"online"``, ``"offline"``, or None when it could not be asked)
    now and then while a call waits, and raises once the endpoint is offline for good."""

    def __init__(self, status: Callable[[], str | None], every_s: float, site: str) -> None:
        self.status = status
        self.every_s = max(0.05, float(every_s))
        self.site = site
        self.next_at = time.monotonic() + self.every_s
        """When the next check is due (``time.monotonic()``)."""
        self.offline = 0
        """``offline`` answers in a row so far."""

    def check_due(self) -> None:
        """Ask if a check is due; raise ``EndpointError`` once the endpoint has been reported
        offline ``OFFLINE_CHECKS`` times in a row."""
        if time.monotonic() < self.next_at:
            return
        state = self.status()
        self.next_at = time.monotonic() + self.every_s
        self.offline = self.offline + 1 if state == "offline" else 0
        if self.offline >= OFFLINE_CHECKS:
            raise EndpointError(
                f"site {self.site!r}: Globus Compute reports its endpoint offline (no "
                f"heartbeat) at {self.offline} checks {self.every_s:.0f} s apart, so nothing "
                "there will run this call; retry later or at another site", site=self.site)
