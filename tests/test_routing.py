"""Routing among sites as pure functions: the ranking, the state cache's TTL, the user config.

No site runs here: snapshots are built by hand (``SiteState``) or from deployment records shaped
as a site's ``list_deployments`` returns them. The federation end to end (several real local
sites, failover, a killed site) is ``tests/test_federation.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.client.routing import (
    ModelState,
    RoutingConfig,
    RoutingStats,
    SiteState,
    rank_sites,
    site_state_from_records,
)
from fabric.client.sitestate import SiteStates
from fabric.client.userconfig import load_user_config
from fabric.errors import InvalidRequest

M = "tiny-llama"
NOW = 1_000_000.0


def site(name: str, state: str | None = None, healthy: bool = True, **kw: int | float) -> SiteState:
    if not healthy:
        return SiteState(name, False, error="down")
    models = {M: ModelState(state, **kw)} if state else {}  # type: ignore[arg-type]
    return SiteState(name, True, models)


def order(snapshot: list[SiteState], **kw: object) -> list[str]:
    return [r.site for r in rank_sites(snapshot, M, now=NOW, **kw)]  # type: ignore[arg-type]


def test_warm_before_starting_before_cold() -> None:
    snap = [site("cold", None), site("queued", "queued", estimated_start=NOW + 60),
            site("loading", "loading"), site("warm", "ready", running=9, waiting=9)]
    ranked = rank_sites(snap, M, now=NOW)
    assert [(r.site, r.tier) for r in ranked] == [
        ("warm", "warm"), ("loading", "starting"), ("queued", "starting"), ("cold", "cold")]


def test_lightest_warm_site_first_counting_my_calls_in_flight() -> None:
    snap = [site("a", "ready", running=4, waiting=2), site("b", "ready", running=1),
            site("c", "ready", running=3)]
    assert order(snap) == ["b", "c", "a"]
    # Three calls of ours in flight at b, which its snapshot cannot know of yet: c is lighter.
    assert order(snap, in_flight={"b": 3}) == ["c", "b", "a"]


def test_queued_by_earliest_estimated_start_unknown_last() -> None:
    snap = [site("none", "queued", queue_position=1), site("late", "queued",
                                                           estimated_start=NOW + 600),
            site("soon", "queued", estimated_start=NOW + 30),
            site("past", "queued", estimated_start=NOW - 100)]
    assert order(snap) == ["past", "soon", "late", "none"]


def test_unhealthy_and_not_hosting_sites_are_skipped() -> None:
    snap = [site("down", healthy=False), site("up", "ready"),
            SiteState("nohost", True, {}, not_hosted=frozenset({M}))]
    assert order(snap) == ["up"]
    assert order([site("down", healthy=False)]) == []


def test_ties_keep_the_users_order_and_a_site_appears_once() -> None:
    snap = [site("x", None), site("y", None), site("x", "ready")]
    assert order(snap) == ["x", "y"]
    assert order([site("p", "ready", running=1), site("q", "ready", running=1)]) == ["p", "q"]


def test_other_models_do_not_count() -> None:
    snap = [SiteState("a", True, {"other": ModelState("ready")}), site("b", "loading")]
    assert order(snap) == ["b", "a"]


def test_unhealthy_state_carries_no_models() -> None:
    with pytest.raises(ValueError):
        SiteState("x", False, {M: ModelState("ready")})


def test_state_from_deployment_records_takes_the_best_live_one() -> None:
    records = [
        {"model": M, "state": "dead"},
        {"model": M, "state": "queued", "estimated_start": "2026-12-02T12:00:00",
         "queue_position": 3},
        {"model": M, "state": "ready", "health": {"running": 5, "queue_depth": 2}},
        {"model": M, "state": "ready", "health": {"running": 1, "queue_depth": 0}},
        {"model": "emb", "state": "draining"},
    ]
    state = site_state_from_records("s", records)
    assert state.healthy and state.model(M) == ModelState("ready", running=1, waiting=0)
    assert state.model("emb").state == "absent"  # draining takes nothing new
    queued = site_state_from_records("s", records[:2]).model(M)
    assert queued.state == "queued" and queued.queue_position == 3
    assert queued.estimated_start is not None and queued.estimated_start > NOW


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_state_cache_asks_each_site_once_per_ttl() -> None:
    calls: list[str] = []

    def prober(name: str) -> SiteState:
        calls.append(name)
        return site(name, "ready") if name != "b" else site(name, healthy=False)

    clock = Clock()
    states = SiteStates(["a", "b"], prober, RoutingConfig(status_ttl_s=2, down_ttl_s=5), clock)
    try:
        first = states.snapshot()
        assert [s.site for s in first] == ["a", "b"] and not first[1].healthy
        clock.t = 1.9
        states.snapshot()
        assert sorted(calls) == ["a", "b"]
        clock.t = 2.1  # a's answer expired, b (down) is skipped for down_ttl_s
        assert states.snapshot()[0].healthy  # the stale answer serves while a is asked again
        states.wait_idle()
        assert sorted(calls) == ["a", "a", "b"]
        states.mark_down("a", "EndpointError: refused")
        assert not states.snapshot()[0].healthy and calls.count("a") == 2
        states.mark_not_hosted("a", M)
        clock.t = 7.2  # both expired: asked again in the background
        states.snapshot()
        states.wait_idle()
        snap = states.snapshot()
        assert calls.count("a") == 3 and calls.count("b") == 2
        assert snap[0].healthy and M not in [r.site for r in rank_sites(snap, M, now=NOW)]
        assert states.snapshot(force=True) and calls.count("a") == 4
    finally:
        states.close()


def test_a_failing_prober_makes_the_site_unhealthy() -> None:
    def prober(name: str) -> SiteState:
        raise RuntimeError("bug in a transport")

    states = SiteStates(["a"], prober, RoutingConfig(), Clock())
    try:
        (state,) = states.snapshot()
        assert not state.healthy and "bug in a transport" in str(state.error)
    finally:
        states.close()


def test_routing_stats_count_rows() -> None:
    stats = RoutingStats()
    (first,) = rank_sites([site("a", "ready")], M, now=NOW)
    stats.decided(M, first)
    stats.failed_over(M, "a", "Overloaded")
    stats.served_by(M, "b")
    rows = stats.snapshot()
    assert rows["decisions"] == [{"model": M, "site": "a", "tier": "warm", "count": 1}]
    assert rows["failovers"][0]["reason"] == "Overloaded"
    assert rows["served"] == [{"model": M, "site": "b", "count": 1}]


def test_user_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    assert load_user_config(path).sites == []
    path.write_text("sites: [a, b]\nrouting: {status_ttl_s: 0.5}\n")
    config = load_user_config(path)
    assert config.sites == ["a", "b"] and config.routing.status_ttl_s == 0.5
    path.write_text("sites: [a]\nrouting: {status_ttl: 1}\n")
    with pytest.raises(InvalidRequest, match="status_ttl"):
        load_user_config(path)
    path.write_text("- a\n")
    with pytest.raises(InvalidRequest, match="map"):
        load_user_config(path)


def test_fabric_sites_argument_is_checked(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from fabric.sdk import Fabric

    with pytest.raises(InvalidRequest, match="sites"):
        Fabric(sites="ab")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="not both"):
        Fabric("local", sites=["a", "b"])
    with pytest.raises(InvalidRequest, match="routing"):
        Fabric(sites=["local", "local2"], routing={"status_ttl_s": -1})
    # The config file names the sites of a Fabric() given none.
    monkeypatch.setenv("FABRIC_HOME", str(tmp_path))
    (tmp_path / "config.yaml").write_text("sites: [local]\n")
    assert Fabric().sites == ["local"]
    (tmp_path / "config.yaml").write_text("sites: [local, local]\n")
    with pytest.raises(InvalidRequest, match="twice"):
        Fabric()


def test_with_auth_shares_states_counters_and_transports(tmp_path: Path) -> None:
    from fabric.sdk import Fabric
    from fabric.testing.federation import write_tiny_site

    refs = [str(write_tiny_site(tmp_path / n, n, tmp_path / "model")) for n in ("s1", "s2")]
    with Fabric(sites=refs, on_status=None) as fab:
        assert fab.sites == ["s1", "s2"] and fab.site == "s1"
        assert fab.at("s2").transport.site == "s2"
        with pytest.raises(InvalidRequest, match="no site 's3'"):
            fab.at("s3")
        twin = fab.with_auth({"token": "t"})
        assert isinstance(twin, Fabric) and twin.sites == fab.sites
        assert twin.federation is not None and fab.federation is not None
        assert twin.federation.states is fab.federation.states
        assert twin.federation.stats is fab.federation.stats
        assert twin.at("s2").transport is fab.at("s2").transport
        assert twin.at("s2").auth == {"token": "t"}
        # Neither site runs and the federation never starts one: both are unhealthy.
        snap = fab.federation.states.snapshot()
        assert [s.healthy for s in snap] == [False, False]
        assert "not running" in str(snap[0].error)
        twin.close()  # the twin closes nothing it shares
        assert fab.at("s1").transport is not None


def test_a_stale_estimated_start_does_not_rank_a_queued_site_before_a_loading_one() -> None:
    snap = [site("stale", "queued", estimated_start=NOW - 3600, queue_position=1),
            site("loading", "loading")]
    assert order(snap) == ["loading", "stale"]


def test_an_unknown_queue_position_sorts_after_a_known_one() -> None:
    snap = [site("unknown", "queued", estimated_start=NOW + 60),
            site("third", "queued", estimated_start=NOW + 60, queue_position=3)]
    assert order(snap) == ["third", "unknown"]


def test_my_calls_in_flight_count_among_loading_sites() -> None:
    snap = [site("a", "loading"), site("b", "loading")]
    assert order(snap) == ["a", "b"]
    ranked = rank_sites(snap, M, now=NOW, in_flight={"a": 2})
    assert [(r.site, r.tier, r.load) for r in ranked] == [("b", "starting", 0),
                                                         ("a", "starting", 2)]


def test_a_one_site_list_is_a_federation(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``sites: [one]`` (or ``Fabric(sites=[one])``) routes as the docs say of any federation:
    a stopped local site is not started (``routing.autostart`` off) and the error says so and
    how to start it; routing counters and ``provenance.site`` are there. Before, a list of one
    was silently a plain client: it started the site and had no ``federation``."""
    from fabric.client.local import read_info
    from fabric.errors import EndpointError
    from fabric.provenance import server_record
    from fabric.sdk import Fabric
    from fabric.testing.federation import write_tiny_site

    ref = str(write_tiny_site(tmp_path / "s1", "s1", tmp_path / "model"))
    monkeypatch.setenv("FABRIC_HOME", str(tmp_path))
    (tmp_path / "config.yaml").write_text(f"sites: [{ref}]\nrouting: {{autostart: false}}\n")
    said: list[dict[str, object]] = []
    with Fabric(on_status=said.append) as fab:
        assert fab.federation is not None and fab.sites == ["s1"]
        with pytest.raises(EndpointError, match=r"autostart is off.*fabric endpoint start"):
            fab.generate("x", model=M, max_tokens=1)
        assert read_info(tmp_path / "s1" / "state") is None  # not started
        assert not [s for s in said if s.get("state") == "starting-site"]
        assert fab.federation.stats.snapshot()["served"] == []
    # A warm site serves it: the result names the site, in its provenance too.
    record = {"request_id": "r", "model": {"name": M, "version": "v", "sha256": "0" * 64},
              "text": "a", "token_ids": [1], "finish_reason": "length", "usage": {},
              "timings": {}, "provenance": server_record(M, "v", "0" * 64, {"pp": 1, "tp": 1})}
    with Fabric(sites=[ref], on_status=None) as fab:
        assert fab.federation is not None
        fab.federation.states.close()
        fab.federation.states = SiteStates(
            ["s1"], lambda name: site(name, "ready"), RoutingConfig())
        monkeypatch.setattr(fab.at("s1"), "_run", lambda request: record)
        result = fab.generate("x", model=M, max_tokens=1)
        assert result.site == "s1" and result.provenance is not None
        assert result.provenance.site == "s1"
        assert fab.federation.stats.snapshot()["served"][0]["site"] == "s1"


def test_a_site_whose_status_fails_is_warned_about_once(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    def prober(name: str) -> SiteState:
        raise RuntimeError("endpoint_id is not set")

    states = SiteStates(["a"], prober, RoutingConfig(), Clock())
    try:
        with caplog.at_level("WARNING", logger="fabric.client.routing"):
            for _ in range(3):
                assert not states.snapshot(force=True)[0].healthy
        assert [r.getMessage() for r in caplog.records].count(
            "status of site a failed: endpoint_id is not set") == 1
    finally:
        states.close()
