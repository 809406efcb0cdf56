"""Each member site's state for routing: one cheap status call per site, cached briefly.

``probe`` asks one site: an embedded local site answers a control ``status`` from its own
process (no request worker: those may all be busy with the very requests being routed), after
a look at its info file (a site that is not running is down without a round trip); any other
site answers ``list_deployments``. Either way the reply is the site's deployments with their
servers' health (running and waiting requests), turned into a ``SiteState``.

``SiteStates`` keeps the last answer per site for ``status_ttl_s`` and asks the expired ones in
parallel in the background (the stale answer serves meanwhile), one call in flight per site;
what the router learns between calls (a site refused a connection, answered ``Overloaded``,
does not host a model) is written in with ``mark_down`` / ``mark_not_hosted`` and holds for
``down_ttl_s``.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from fabric.client.routing import RoutingConfig, SiteState, site_state_from_records
from fabric.errors import FabricError

__all__ = ["SiteStates", "probe"]

log = logging.getLogger("fabric.client.routing")


def probe(transport: Any, auth: Any, timeout_s: float, not_running: str = "") -> SiteState:
    """The state of the site behind ``transport`` (unhealthy, with the reason, if it does not
    answer within ``timeout_s``); ``not_running`` adds to the reason of an embedded site that
    is not running (what to do about it)."""
    site = str(transport.site)
    try:
        state_dir = getattr(transport, "state_dir", None)
        if callable(getattr(transport, "control", None)) and state_dir is not None:
            from fabric.client.local import read_info

            if read_info(state_dir) is None and not getattr(transport, "autostart", False):
                return SiteState(site, False, error="site is not running" + not_running)
            reply = transport.control("status", timeout_s=timeout_s, health=True)
            records = reply.get("deployments") or []
        else:
            from fabric.wire.functions import list_deployments

            records = transport.submit(list_deployments, auth).result(timeout=timeout_s)
        return site_state_from_records(site, records)
    except FabricError as exc:
        return SiteState(site, False, error=f"{type(exc).__name__}: {exc.message}")
    except cf.TimeoutError:
        return SiteState(site, False, error=f"no status answer within {timeout_s:g} s")


class SiteStates:
    """The latest ``SiteState`` of each site, refreshed when older than the TTL."""

    def __init__(self, sites: Sequence[str], prober: Callable[[str], SiteState],
                 config: RoutingConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.sites = list(sites)
        self.config = config
        self._prober = prober
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, tuple[float, SiteState]] = {}
        """site -> (when it expires, state)."""
        self._not_hosted: dict[str, dict[str, float]] = {s: {} for s in self.sites}
        """site -> model -> until when it is known not to be hosted there."""
        self._probing: dict[str, cf.Future[SiteState]] = {}
        self._pool = cf.ThreadPoolExecutor(max(1, len(self.sites)),
                                           thread_name_prefix="fabric-site-status")

    def snapshot(self, force: bool = False) -> list[SiteState]:
        """Every site's state in the user's order.

        A site never asked yet (or every site, with ``force``) is asked now and waited for;
        one whose answer has expired is asked again in the background while its last answer
        is used (a remote site's status is a task that takes seconds: calls must not wait on
        it every ``status_ttl_s``). What a failed call teaches (``mark_down``) applies at once.
        """
        now = self._clock()
        waits: list[cf.Future[SiteState]] = []
        with self._lock:
            for site in self.sites:
                cached = self._states.get(site)
                if not force and cached is not None and cached[0] > now:
                    continue
                fut = self._probing.get(site)
                if fut is None:
                    fut = self._probing[site] = self._pool.submit(self._probe, site)
                if force or cached is None:
                    waits.append(fut)
        for fut in waits:
            fut.result()  # _probe never raises
        with self._lock:
            return [self._with_hosting(self._states[s][1], now) for s in self.sites]

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Wait for the status calls in flight (tests)."""
        with self._lock:
            pending = list(self._probing.values())
        cf.wait(pending, timeout=timeout_s)

    def _probe(self, site: str) -> SiteState:
        try:
            state = self._prober(site)
        except Exception as exc:  # a bug in a transport must not take routing down
            state = SiteState(site, False, error=f"{type(exc).__name__}: {exc}")
            with self._lock:
                before = self._states.get(site)
            if before is None or before[1].error != state.error:  # once, not every probe
                log.warning("status of site %s failed: %s", site, exc)
        ttl = self.config.status_ttl_s if state.healthy else self.config.down_ttl_s
        with self._lock:
            self._states[site] = (self._clock() + ttl, state)
            self._probing.pop(site, None)
        if not state.healthy:
            log.info("site %s unhealthy: %s", site, state.error)
        return state

    def _with_hosting(self, state: SiteState, now: float) -> SiteState:
        gone = frozenset(m for m, until in self._not_hosted.get(state.site, {}).items()
                         if until > now)
        if not gone or not state.healthy:
            return state
        return SiteState(state.site, True, state.models, not_hosted=gone)

    def mark_down(self, site: str, error: str) -> None:
        """Record that ``site`` failed a call: skipped until ``down_ttl_s`` has passed."""
        with self._lock:
            self._states[site] = (self._clock() + self.config.down_ttl_s,
                                  SiteState(site, False, error=error))

    def mark_not_hosted(self, site: str, model: str) -> None:
        """Record that ``site`` does not have ``model`` (for ``down_ttl_s``)."""
        with self._lock:
            self._not_hosted.setdefault(site, {})[model] = self._clock() + self.config.down_ttl_s

    def close(self) -> None:
        """Stop the status threads (a probe in flight finishes on its own)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
