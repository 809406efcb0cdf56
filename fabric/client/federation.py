"""A federation of sites behind one ``Fabric``: route each call, fail over before output.

``Fabric(sites=[...])`` holds a ``Federation``: one ordinary single-site ``Fabric`` per member
site (its *member*), the members' cached states (``fabric.client.sitestate.SiteStates``) and the
routing counters (``fabric.client.routing.RoutingStats``). Each call:

1. ranks the sites for its model (``fabric.client.routing.rank_sites``) from a snapshot at most
   ``status_ttl_s`` old, counting the calls this client has in flight at each site;
2. runs on the first; if that site is down, or answers ``Overloaded``,
   ``ModelServerUnavailable``, ``DeploymentError``, ``QuotaExceeded`` or ``UnknownModel``
   (``FAILOVER``) *before any output reached the caller*, the site is marked (skipped for
   ``down_ttl_s``, or as not hosting the model) and the call runs on the next one. Every site is
   tried at most once per call; when all fail, the last error is raised.

A stream fails over only until its first token: ``FailoverSource`` watches the events, and
once one carried text or tokens every later error is the caller's (a retry elsewhere would
duplicate what they already hold). A stream never moves to another site after that.

A non-streaming call produces output only when it returns, so it fails over on the same
errors at any point; ``submit`` (a user function, which may have side effects) fails over
only when it could not be handed to a site at all.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from fabric.client.routing import Ranked, RoutingConfig, RoutingStats, rank_sites
from fabric.client.sitestate import SiteStates, probe
from fabric.client.streaming import cancel_in_background
from fabric.errors import (
    DeploymentError,
    EndpointError,
    FabricError,
    InvalidRequest,
    ModelServerUnavailable,
    Overloaded,
    QuotaExceeded,
    UnknownModel,
)

if TYPE_CHECKING:
    from fabric.client.fabric import Fabric
    from fabric.client.streaming import EventSource

__all__ = ["FAILOVER", "FailoverSource", "Federation", "choose_sites", "routing_config",
           "served_by"]

T = TypeVar("T")

FAILOVER: tuple[type[FabricError], ...] = (
    EndpointError, Overloaded, ModelServerUnavailable, DeploymentError, QuotaExceeded,
    UnknownModel)
"""Errors after which a call that produced no output yet moves to the next site."""


class Federation:
    """The member sites of one ``Fabric`` (one or more), their states and the routing
    counters."""

    def __init__(self, sites: Sequence[str], make_member: Callable[[str], Fabric],
                 config: RoutingConfig, auth: Any = None, *,
                 states: SiteStates | None = None, stats: RoutingStats | None = None,
                 members: dict[str, Fabric] | None = None) -> None:
        self.refs = list(sites)
        """The sites as the user named them (names or definition folders)."""
        self.config = config
        self.auth = auth
        self._make_member = make_member
        self._members: dict[str, Fabric] = members if members is not None else {}
        self._lock = threading.Lock()
        self.names = _site_names(self.refs)
        """Each site's own name (its definition's ``name``), in the user's order."""
        self._ref_of = dict(zip(self.names, self.refs, strict=True))
        self.states = states or SiteStates(self.names, self._probe, config)
        self.stats = stats or RoutingStats()
        self._in_flight: Counter[str] = Counter()
        self._owner = states is None

    def with_auth(self, auth: Any, make_member: Callable[[str], Fabric]) -> Federation:
        """The same sites, states and counters, calling with ``auth`` (the gateway's callers):
        members share their transports with this federation's."""
        shared = {name: make_member(name) for name in self.names}
        return Federation(self.refs, lambda name: shared[name], self.config, auth,
                          states=self.states, stats=self.stats, members=shared)

    # -- members --------------------------------------------------------------------------

    def member(self, name: str) -> Fabric:
        """The single-site ``Fabric`` of site ``name`` (made on first use)."""
        with self._lock:
            fab = self._members.get(name)
            if fab is None:
                fab = self._members[name] = self._make_member(self._ref_of[name])
            return fab

    def transport(self, name: str) -> Any:
        """Site ``name``'s transport, opened without starting the site unless the routing
        config allows it."""
        transport = self.member(name).transport
        if hasattr(transport, "autostart") and not self.config.autostart:
            transport.autostart = False
        return transport

    def _probe(self, name: str) -> Any:
        not_running = "" if self.config.autostart else (
            " and routing.autostart is off, so it is not started on its own: start it with "
            f"`fabric endpoint start --site {self._ref_of[name]}`")
        return probe(self.transport(name), self.auth, self.config.status_timeout_s, not_running)

    # -- routing --------------------------------------------------------------------------

    def ranking(self, model: str, fresh: bool = False) -> list[Ranked]:
        """The healthy sites for ``model``, best first; ``EndpointError`` naming each site's
        problem when none is left (after asking every site once more). ``fresh``: ask every
        site now instead of using the cached states."""
        with self._lock:
            mine = dict(self._in_flight)
        ranked = rank_sites(self.states.snapshot(force=fresh), model, now=time.time(),
                            in_flight=mine)
        if ranked:
            return ranked
        snapshot = self.states.snapshot(force=True)
        ranked = rank_sites(snapshot, model, now=time.time(), in_flight=mine)
        if ranked:
            return ranked
        problems = {s.site: (s.error if not s.healthy else f"does not host {model}")
                    for s in snapshot}
        raise EndpointError(f"no site of the federation can serve {model}: " + "; ".join(
            f"{site}: {why}" for site, why in problems.items()), sites=problems, model=model)

    @contextlib.contextmanager
    def tracking(self, site: str) -> Iterator[None]:
        """Count a call in flight at ``site`` while the block runs."""
        with self._lock:
            self._in_flight[site] += 1
        try:
            yield
        finally:
            self.done(site)

    def started(self, site: str) -> None:
        """Count a call in flight at ``site`` (until ``done``)."""
        with self._lock:
            self._in_flight[site] += 1

    def done(self, site: str) -> None:
        """A call at ``site`` ended."""
        with self._lock:
            self._in_flight[site] -= 1
            if self._in_flight[site] <= 0:
                del self._in_flight[site]

    def failed(self, model: str, site: str, exc: FabricError) -> None:
        """Record what ``exc`` says about ``site`` so that the next calls skip it."""
        self.stats.failed_over(model, site, type(exc).__name__)
        if isinstance(exc, UnknownModel):
            self.states.mark_not_hosted(site, model)
        else:
            self.states.mark_down(site, f"{type(exc).__name__}: {exc.message}")

    def call(self, model: str, fn: Callable[[Fabric], T]) -> tuple[T, str]:
        """``fn(member)`` on the best site for ``model``, failing over on ``FAILOVER``
        errors; returns the value and the name of the site that served it. Each site is
        tried at most once; when every ranked site failed, every site is asked for its state
        once more (the cached states may have left out sites only slow to answer)."""
        ranking = self.ranking(model)
        self.stats.decided(model, ranking[0])
        last: FabricError | None = None
        tried: list[str] = []
        for ranked in self.candidates(model, ranking, tried):
            try:
                with self.tracking(ranked.site):
                    value = fn(self.member(ranked.site))
            except FAILOVER as exc:
                self.failed(model, ranked.site, exc)
                last = exc
                continue
            self.stats.served_by(model, ranked.site)
            return value, ranked.site
        assert last is not None
        raise last

    def candidates(self, model: str, ranking: list[Ranked], tried: list[str]
                     ) -> Iterator[Ranked]:
        """``ranking``'s sites in order, then once the sites a fresh ranking adds (never a
        site twice); ``tried`` collects what was yielded."""
        for ranked in ranking:
            tried.append(ranked.site)
            yield ranked
        with contextlib.suppress(FabricError):
            for ranked in self.ranking(model, fresh=True):
                if ranked.site not in tried:
                    tried.append(ranked.site)
                    yield ranked

    def close(self) -> None:
        """Close every member (their transports) and the status threads."""
        with self._lock:
            members, self._members = list(self._members.values()), {}
        if self._owner:
            self.states.close()
            for fab in members:
                fab.close()


def choose_sites(site: str | None, sites: Sequence[str] | None, has_transport: bool,
                 routing: RoutingConfig | dict[str, Any] | None
                 ) -> tuple[str | None, list[str], RoutingConfig]:
    """A ``Fabric``'s ``site``/``sites``/``routing`` arguments checked and resolved: with
    neither site nor sites nor a transport, the user's config file may name the sites.
    Returns ``(site, sites, routing)``: ``sites`` is ``[]`` for a single site."""
    if site is None and sites is None and not has_transport:
        from fabric.client.userconfig import load_user_config

        user = load_user_config()
        if user.sites:
            sites = user.sites
            routing = routing if routing is not None else user.routing
    if sites is None:
        return site, [], RoutingConfig()
    if site is not None or has_transport:
        raise InvalidRequest("give either site (and transport) or sites, not both",
                             param="sites")
    if isinstance(sites, str) or not isinstance(sites, Sequence) or not sites or \
            not all(isinstance(s, str) and s for s in sites):
        raise InvalidRequest(f"sites must be a non-empty list of site names, got {sites!r}",
                             param="sites")
    return sites[0], list(sites), routing_config(routing)


def routing_config(value: RoutingConfig | dict[str, Any] | None) -> RoutingConfig:
    """``value`` as a ``RoutingConfig`` (``InvalidRequest`` naming the bad field)."""
    if isinstance(value, RoutingConfig):
        return value
    from pydantic import ValidationError

    try:
        return RoutingConfig.model_validate(value or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequest(f"routing: {first['loc']}: {first['msg']}",
                             param="routing") from None


def served_by(out: dict[str, Any], site: str) -> dict[str, Any]:
    """A federated result map with the serving site in ``site`` and in its provenance."""
    out = {**out, "site": site}
    if isinstance(out.get("provenance"), dict):
        out["provenance"] = {**out["provenance"], "site": site}
    return out


def _site_names(refs: Sequence[str]) -> list[str]:
    from fabric.sites import load_site

    names = [load_site(ref).name for ref in refs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidRequest(f"sites lists the same site twice: {', '.join(dupes)}",
                             param="sites")
    return names


class FailoverSource:
    """A stream's events from the best site, moving to the next one only before output.

    ``open_at(member)`` opens the stream at one site (``Fabric._open_source``). Invariant: once
    an event carrying text or tokens has been yielded, no error moves the stream: it is raised
    to the caller as it is. ``site`` names the site serving the stream now.
    """

    def __init__(self, federation: Federation, model: str,
                 open_at: Callable[[Fabric], EventSource]) -> None:
        self._fed = federation
        self._model = model
        self._open_at = open_at
        self._ranking = federation.ranking(model)
        federation.stats.decided(model, self._ranking[0])
        self._closed = False
        self.site = ""
        self._held: str | None = None  # the site counting this stream in flight
        self.request_id = ""
        """The request's id at the serving site."""
        self.tried: list[str] = []
        """Every site the stream was opened at, in order (the last serves it)."""
        self._order = federation.candidates(model, self._ranking, self.tried)
        self._source = self._open_next(None)

    def _open_next(self, last: FabricError | None) -> EventSource:
        for ranked in self._order:
            site = ranked.site
            self._fed.started(site)
            try:
                source = self._open_at(self._fed.member(site))
            except FAILOVER as exc:
                self._fed.done(site)
                self._fed.failed(self._model, site, exc)
                last = exc
                continue
            except BaseException:
                self._fed.done(site)
                raise
            self.site = self._held = site
            self.request_id = source.request_id
            return source
        assert last is not None
        raise last

    def events(self) -> Iterator[dict[str, Any]]:
        """The serving site's events (see the class docstring for when it moves)."""
        produced = False
        while True:
            try:
                for event in self._source.events():
                    if not produced and (event.get("op") == "done" or event.get("token_ids")
                                         or event.get("text")):
                        self._fed.stats.served_by(self._model, self.site)
                        relax = getattr(self._source, "relax", None)
                        if callable(relax):
                            relax()  # it stays here now: the usual patience with silences
                        produced = True
                    yield event
                return
            except FAILOVER as exc:
                if produced or self._closed:
                    raise
                self._abandon()
                self._release()
                self._fed.failed(self._model, self.site, exc)
                self._source = self._open_next(exc)

    def cancel(self) -> str:
        """Cancel at the serving site."""
        return self._source.cancel()

    def _abandon(self) -> None:
        # The old site may still hold the request (its server only seemed gone): cancel it
        # there, off this thread, so it stops generating what nobody reads.
        cancel_in_background(self._source)

    def abandon(self) -> None:
        """The stream was dropped unfinished: cancel at the serving site, without waiting,
        and stop counting it there."""
        if not self._closed:
            self._closed = True
            self._source.abandon()
            self._let_site_go()

    def _release(self) -> None:
        with contextlib.suppress(Exception):
            self._source.close()
        self._let_site_go()

    def _let_site_go(self) -> None:
        if self._held is not None:
            self._fed.done(self._held)
            self._held = None

    def close(self) -> None:
        """Release the connection (once)."""
        if not self._closed:
            self._closed = True
            self._release()

