"""Routing among the sites of a federation: a snapshot of their state in, ranked sites out.

This module is pure: data classes and functions, no I/O and no clock of its own (``now`` is
an argument), so the ranking is tested as plain unit tests (``tests/test_routing.py``). How a
site's state is fetched and cached is ``fabric.client.sitestate``; how a call walks the ranking
and fails over is ``fabric.client.federation``.

The ranking, for one model (``rank_sites``):

1. **warm**: a ready model server; lightest load first (``running + waiting`` at the server,
   plus the calls this client has in flight there that the snapshot cannot know of yet);
2. **starting**: a server loading (it will be ready soonest), then queued in the batch
   scheduler, earliest estimated start first (an unknown estimate sorts after every known one,
   then by queue position);
3. **cold**: no server; the request launches one.

Unhealthy sites (down, not answering the status call) are left out, as are sites known not to
host the model. Ties keep the order the user listed the sites in, so a ranking is
deterministic: the same snapshot always gives the same order.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fabric import metrics

__all__ = ["ModelState", "RoutingConfig", "RoutingStats", "SiteState", "Tier", "model_state",
           "rank_sites", "site_state_from_records"]

Tier = Literal["warm", "starting", "cold"]
"""How ready a site is for a model, best first."""
TIERS: tuple[Tier, ...] = ("warm", "starting", "cold")


class RoutingConfig(BaseModel):
    """How a federation routes (the ``routing:`` block of the user's config file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status_ttl_s: float = Field(2.0, ge=0.0, le=3600.0)
    """How long one site's status answer is reused before it is asked again."""
    status_timeout_s: float = Field(3.0, gt=0.0, le=120.0)
    """A site that does not answer its status call within this counts as unhealthy."""
    down_ttl_s: float = Field(5.0, ge=0.0, le=3600.0)
    """How long a site found down (or overloaded) is skipped before it is asked again."""
    autostart: bool = False
    """Whether a member site that is an embedded local site may be started on first use.
    Off by default: a federation routes among running sites, and a site that went down is
    skipped rather than restarted in the middle of a request."""


@dataclass(frozen=True)
class ModelState:
    """One model at one site, as its status call reports it."""

    state: Literal["ready", "loading", "queued", "absent"]
    running: int = 0
    """Requests running at the server (ready servers only)."""
    waiting: int = 0
    """Requests queued at the server (ready servers only)."""
    estimated_start: float | None = None
    """The batch scheduler's estimated start (epoch seconds) of a queued server."""
    queue_position: int | None = None

    @property
    def load(self) -> int:
        """Requests the server holds now."""
        return self.running + self.waiting


@dataclass(frozen=True)
class SiteState:
    """One site's state at one moment: healthy or not, and each model's best deployment.

    Invariant: an unhealthy site has no models (nothing it reports can be trusted) and says
    why in ``error``.
    """

    site: str
    healthy: bool
    models: Mapping[str, ModelState] = field(default_factory=dict)
    error: str | None = None
    not_hosted: frozenset[str] = frozenset()
    """Models the site said it does not have (``UnknownModel``): never routed there."""

    def __post_init__(self) -> None:
        if not self.healthy and self.models:
            raise ValueError("an unhealthy site reports no models")

    def model(self, name: str) -> ModelState:
        """The model's state here (``absent`` when the site has no server for it)."""
        return self.models.get(name) or ModelState("absent")


@dataclass(frozen=True)
class Ranked:
    """A site in a ranking, with why it is where it is."""

    site: str
    tier: Tier
    load: int = 0


_STATE_ORDER = {"ready": 0, "loading": 1, "queued": 2, "absent": 3}


def model_state(record: Mapping[str, Any]) -> ModelState | None:
    """A ``ModelState`` from one deployment record (``list_deployments`` / a local site's
    ``status``), or ``None`` for a dead or draining one (it takes no new requests)."""
    state = str(record.get("state") or "")
    if state not in ("ready", "loading", "queued"):
        return None
    health = record.get("health") or {}
    start = record.get("estimated_start")
    position = record.get("queue_position")
    return ModelState(
        state,  # type: ignore[arg-type]
        running=int(health.get("running") or 0),
        waiting=int(health.get("queue_depth") or 0),
        estimated_start=_epoch(start) if start else None,
        queue_position=int(position) if position is not None else None,
    )


def site_state_from_records(site: str, records: Iterable[Mapping[str, Any]],
                            not_hosted: frozenset[str] = frozenset()) -> SiteState:
    """A healthy site's state from its deployment records: for each model the best of its
    live deployments (ready before loading before queued; the lightest ready one)."""
    best: dict[str, ModelState] = {}
    for record in records:
        state = model_state(record)
        name = record.get("model")
        if state is None or not name:
            continue
        old = best.get(str(name))
        if old is None or _better(state, old):
            best[str(name)] = state
    return SiteState(site, True, best, not_hosted=not_hosted)


def _better(a: ModelState, b: ModelState) -> bool:
    if _STATE_ORDER[a.state] != _STATE_ORDER[b.state]:
        return _STATE_ORDER[a.state] < _STATE_ORDER[b.state]
    return a.load < b.load


def _epoch(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value)).timestamp()  # naive: local time, as given
    except ValueError:
        return None


def rank_sites(snapshot: Sequence[SiteState], model: str, *, now: float,
               in_flight: Mapping[str, int] | None = None) -> list[Ranked]:
    """The sites that may serve ``model``, best first (see the module docstring).

    Invariants: every returned site is healthy and hosts the model as far as it has said;
    each site appears at most once; the order depends only on the arguments; sites tied on
    every key keep their order in ``snapshot``. ``now`` (epoch seconds) turns a queued
    server's estimated start into a wait; one estimated in the past counts as starting now.
    """
    in_flight = in_flight or {}
    keyed: list[tuple[tuple[float, ...], int, Ranked]] = []
    seen: set[str] = set()
    for order, state in enumerate(snapshot):
        if not state.healthy or model in state.not_hosted or state.site in seen:
            continue
        seen.add(state.site)
        ms = state.model(model)
        mine = int(in_flight.get(state.site, 0))
        if ms.state == "ready":
            load = ms.load + mine
            key: tuple[float, ...] = (0, load)
            ranked = Ranked(state.site, "warm", load)
        elif ms.state == "loading":
            key = (1, 0.0, 0, mine)
            ranked = Ranked(state.site, "starting", mine)
        elif ms.state == "queued":
            wait = float("inf") if ms.estimated_start is None \
                else max(0.0, ms.estimated_start - now)
            position = ms.queue_position if ms.queue_position is not None else 1 << 30
            key = (1, 1.0 + wait, position, mine)
            ranked = Ranked(state.site, "starting", mine)
        else:
            key = (2, mine)
            ranked = Ranked(state.site, "cold", mine)
        keyed.append((key, order, ranked))
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [ranked for _, _, ranked in keyed]


class RoutingStats:
    """Counters of routing decisions, for ``/metrics`` and for tests (thread-safe).

    ``decisions[(model, site, tier)]``: calls sent to ``site`` as its first choice in
    ``tier``; ``failovers[(model, from_site, reason)]``: calls moved off ``from_site``
    (``reason`` is the error's class name); ``served[(model, site)]``: calls a site served.
    Decisions and failovers also count in the process's ``fabric_routing_decisions_total``
    (``fabric.metrics``, which the gateway's ``/metrics`` renders): ``reason`` is the tier of
    a first choice, or ``failover`` for a call moved off ``site``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.decisions: Counter[tuple[str, str, str]] = Counter()
        self.failovers: Counter[tuple[str, str, str]] = Counter()
        self.served: Counter[tuple[str, str]] = Counter()

    def decided(self, model: str, ranked: Ranked) -> None:
        """Count the first choice of one call."""
        with self._lock:
            self.decisions[(model, ranked.site, ranked.tier)] += 1
        metrics.record_routing(model, ranked.site, ranked.tier)

    def failed_over(self, model: str, site: str, reason: str) -> None:
        """Count one call moved off ``site``."""
        with self._lock:
            self.failovers[(model, site, reason)] += 1
        metrics.record_routing(model, site, "failover")

    def served_by(self, model: str, site: str) -> None:
        """Count one call served by ``site``."""
        with self._lock:
            self.served[(model, site)] += 1

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Every counter as plain rows (what a metrics exporter reads)."""
        with self._lock:
            return {
                "decisions": [{"model": m, "site": s, "tier": t, "count": n}
                              for (m, s, t), n in sorted(self.decisions.items())],
                "failovers": [{"model": m, "site": s, "reason": r, "count": n}
                              for (m, s, r), n in sorted(self.failovers.items())],
                "served": [{"model": m, "site": s, "count": n}
                           for (m, s), n in sorted(self.served.items())],
            }
