"""Tickets and quotas cannot be bypassed, and the policy's bookkeeping stays bounded.

Through the real endpoint functions and the real usage database (SQLite), with canned Globus
Auth introspection responses (``tests/test_policy.py``'s helpers):

* admin operations (``deploy``, ``undeploy``) only for identities the site's
  ``policy.admins`` names; deploy plans within the site's ``limits`` (typed refusal naming the
  limit and the size asked for);
* another identity cannot poll or cancel a request it did not start;
* a quota admission reads the same bounded number of rows whatever the history, and old usage
  is pruned;
* the introspection cache is bounded and forgets entries by their token's expiry;
* the site's catalog is built once per change of the model registry.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fabric import tickets
from fabric.endpoint import functions, policy
from fabric.endpoint import usage as usage_db
from fabric.endpoint.context import SiteContext
from fabric.endpoint.state import Deployment
from fabric.errors import (
    AccessDenied,
    AdminOnly,
    DeployLimitExceeded,
    FabricError,
    QuotaExceeded,
    TicketInvalid,
)
from fabric.sites import SiteConfig
from fabric.wire.gcwire import unwrap
from tests.chaos.common import report
from tests.test_policy import ENDPOINT_CLIENT, auth, introspect, mocked  # noqa: F401

MODEL = "smollm2-135m"  # in the built-in catalog


class Launched(FabricError):
    """Raised by the guard manager: the call got past every check to a launch."""


class GuardManager:
    """Stands where the deployment manager would launch a job: records what got through."""

    def __init__(self) -> None:
        self.launched: list[Any] = []

    def deploy(self, entry: Any, plan: Any) -> Any:
        self.launched.append((entry.name, plan))
        raise Launched("launch reached")


def site(admins: dict[str, Any] | None = None, limits: dict[str, Any] | None = None,
         **extra: Any) -> SiteConfig:
    return SiteConfig.model_validate({
        "name": "testsite", "limits": limits or {},
        "policy": {"client_id": ENDPOINT_CLIENT, "models": {MODEL: {"anyone": True}},
                   "admins": admins or {}}, **extra})


def context(monkeypatch: pytest.MonkeyPatch, cfg: SiteConfig, state: Path,
            guard: GuardManager | None = None) -> SiteContext:
    ctx = SiteContext(cfg, state)
    if guard is not None:
        ctx.__dict__["manager"] = guard  # the cached_property's slot
    monkeypatch.setattr(functions, "current", lambda: ctx)
    return ctx


# -- admin operations and deploy limits ------------------------------------------------------

def test_deploy_and_undeploy_need_a_named_admin(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A user allowed to use the model is not an admin: deploy and undeploy are refused,
    typed, before any job or deployment is touched (undeploy does not even say which
    deployments exist)."""
    guard = GuardManager()
    introspect()
    context(monkeypatch, site(), tmp_path, guard)
    with pytest.raises(AdminOnly) as err:
        unwrap(functions.deploy(MODEL, None, auth()))
    assert err.value.details["rule"] == "policy.admins"
    assert err.value.details["identity"] == "alice@uchicago.edu"
    assert "names nobody" in str(err.value)
    with pytest.raises(AdminOnly):
        unwrap(functions.undeploy("d-0123456789", auth()))
    with pytest.raises(AccessDenied, match="proof of identity"):
        unwrap(functions.deploy(MODEL, None, None))
    assert guard.launched == []
    # Listed by another identity or domain: still refused, and the message names the lists.
    policy.clear_cache()
    introspect()
    context(monkeypatch, site({"identities": ["bob@anl.gov"], "domains": ["anl.gov"]}),
            tmp_path, guard)
    with pytest.raises(AdminOnly, match=r"policy\.admins\.identities, policy\.admins\.domains"):
        unwrap(functions.deploy(MODEL, None, auth()))
    assert guard.launched == []
    report("admin-ops", inputs=4, typed_errors=4, crashes=0)


@pytest.mark.parametrize("admins", [{"identities": ["ALICE@uchicago.edu"]},
                                    {"domains": ["uchicago.edu"]}], ids=["identity", "domain"])
def test_a_named_admin_deploys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               admins: dict[str, Any]) -> None:
    guard = GuardManager()
    introspect()
    context(monkeypatch, site(admins), tmp_path, guard)
    with pytest.raises(FabricError, match="launch reached"):
        unwrap(functions.deploy(MODEL, {"pp": 2}, auth()))
    assert guard.launched[0][0] == MODEL and guard.launched[0][1].pp == 2
    assert policy.usage(tmp_path) == []  # an admin operation is not a request


def test_the_local_site_operator_deploys(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    guard = GuardManager()
    context(monkeypatch, SiteConfig.model_validate({"name": "local"}), tmp_path, guard)
    with pytest.raises(FabricError, match="launch reached"):
        unwrap(functions.deploy(MODEL, None, None))


@pytest.mark.parametrize(("plan", "rule", "limit", "requested"), [
    ({"nodes": 3, "pp": 3}, "limits.max_nodes", 2, 3),
    ({"pp": 2, "tp": 8, "nodes": 2, "gpus_per_node": 8, "device": "cuda"},
     "limits.max_gpus", 8, 16),
    ({"pp": 1, "tp": 12, "nodes": 1, "gpus_per_node": 4, "device": "cuda"},
     "limits.max_gpus", 8, 12),  # more ranks than the node's GPUs still count as GPUs
], ids=["nodes", "gpus", "ranks"])
def test_deploy_plans_within_the_site_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             plan: dict[str, Any], rule: str, limit: int,
                                             requested: int) -> None:
    guard = GuardManager()
    introspect()
    context(monkeypatch, site({"identities": ["alice@uchicago.edu"]},
                              {"max_nodes": 2, "max_gpus": 8}), tmp_path, guard)
    with pytest.raises(DeployLimitExceeded) as err:
        unwrap(functions.deploy(MODEL, plan, auth()))
    assert err.value.details == {"rule": rule, "limit": limit, "requested": requested}
    assert f"at most {limit}" in str(err.value) and f"asks for {requested}" in str(err.value)
    assert not err.value.retryable
    assert guard.launched == []
    # The largest plan that fits goes through.
    with pytest.raises(FabricError, match="launch reached"):
        unwrap(functions.deploy(MODEL, {"pp": 2, "tp": 4, "nodes": 2, "gpus_per_node": 4,
                                        "device": "cuda"}, auth()))


def test_site_limits_are_typed_and_hold_for_the_sites_own_plans() -> None:
    with pytest.raises(ValidationError, match="max_walltime"):
        site(limits={"max_walltime": "two hours"})
    with pytest.raises(ValidationError, match=r"jobs.walltime 04:00:00 exceeds "
                                              r"limits.max_walltime = 02:00:00"):
        site(limits={"max_walltime": "02:00:00"}, jobs={"walltime": "04:00:00"})
    with pytest.raises(ValidationError, match=r"models\[big\].plan .* limits.max_nodes = 1"):
        site(limits={"max_nodes": 1}, models=[{"name": "big", "plan": {"nodes": 2, "pp": 2}}])
    with pytest.raises(ValidationError, match="max_nodes"):
        site(limits={"max_nodes": 0})


def test_shipped_sites_fit_their_limits() -> None:
    from fabric.sites import limit_exceeded, list_sites, load_site

    for name in list_sites():
        cfg = load_site(name)
        for hosted in cfg.models:
            assert limit_exceeded(cfg.limits, hosted.plan, cfg.jobs.walltime) is None, name


# -- poll and cancel: only the identity that started the request ------------------------------

def test_only_the_starter_polls_or_cancels(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Bob may use the model and holds Alice's stream ticket (say it leaked): polling or
    cancelling her request is refused before any server is contacted."""
    ctx = context(monkeypatch, site(), tmp_path)
    dep = Deployment(id=Deployment.new_id(), model=MODEL, version="v", state="ready",
                     address="tcp://127.0.0.1:9", public_key="k", created=time.time(),
                     last_used=time.time())
    ctx.manager.db.insert(dep)
    alices = tickets.issue(ctx.ticket_key(), model=MODEL, request_id="r-alice",
                           subject="alice@uchicago.edu", ttl_s=600)
    introspect(username="bob@anl.gov")
    typed = 0

    def polled(ticket: str) -> Any:
        """Bob's poll of Alice's request: its own typed error in its reply (the poll task
        itself succeeds: other requests in it are unaffected)."""
        poll = {"model": MODEL, "request_id": "r-alice", "ticket": ticket, "cursor": 0}
        reply = unwrap(functions.poll_requests([poll], 0.0, None, auth()))["replies"]["r-alice"]
        assert reply["done"] and reply["error"], reply
        return FabricError.from_dict(reply["error"])

    with pytest.raises(AccessDenied) as cancelled:
        unwrap(functions.cancel_request(MODEL, "r-alice", alices, auth()))
    for err in (polled(alices), cancelled.value):
        assert type(err) is AccessDenied, err
        assert err.details == {"rule": "request-owner", "identity": "bob@anl.gov",
                               "request_id": "r-alice"}
        typed += 1
    # A ticket for another request, or none at all, is refused too.
    for bad in (tickets.issue(ctx.ticket_key(), model=MODEL, request_id="r-other",
                              subject="bob@anl.gov", ttl_s=600), "forged.ticket"):
        with pytest.raises(TicketInvalid):
            unwrap(functions.cancel_request(MODEL, "r-alice", bad, auth()))
        assert type(polled(bad)) is TicketInvalid
        typed += 2
    report("poll-cancel-owner", inputs=6, typed_errors=typed, crashes=0)


# -- quota counters: O(1) per admission, pruned ------------------------------------------------

def _admission_cost(cfg: SiteConfig, state: Path, tokens: int) -> int:
    """SQLite virtual-machine steps of one quota admission (grows with every row a statement
    reads, unlike wall time, which is noisy)."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    with usage_db.db(state) as conn:
        conn.set_progress_handler(tick, 1)
    try:
        policy.authorize(cfg, auth(), MODEL, state, tokens=tokens)
    finally:
        with usage_db.db(state) as conn:
            conn.set_progress_handler(None, 1)
    return steps[0]


def _history(state: Path, monkeypatch: pytest.MonkeyPatch, n: int, now: float) -> None:
    """``n`` finished requests of Alice's, spread over the last day (as a busy caller
    leaves them), recorded through the real API."""
    for i in range(n):
        monkeypatch.setattr(usage_db, "clock", lambda i=i: now - 86000 + i * 86000 / n)
        policy.record_usage(state, "alice@uchicago.edu", MODEL, 1, f"r{i}")
    monkeypatch.setattr(usage_db, "clock", lambda: now)


def test_quota_admission_cost_does_not_grow_with_history(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    introspect()
    cfg = SiteConfig.model_validate({
        "name": "testsite", "policy": {"client_id": ENDPOINT_CLIENT, "models": {
            MODEL: {"anyone": True, "requests_per_minute": 10**6, "tokens_per_day": 10**9}}}})
    now = time.time()
    small, large = tmp_path / "small", tmp_path / "large"
    _history(small, monkeypatch, 1000, now)  # already one row in every 5 min bucket of a day
    _history(large, monkeypatch, 8000, now)
    policy.authorize(cfg, auth(), MODEL, small, tokens=10)  # warm: prune, prepared statements
    policy.authorize(cfg, auth(), MODEL, large, tokens=10)
    cost_small = _admission_cost(cfg, small, 10)
    cost_large = _admission_cost(cfg, large, 10)
    report("quota-admission", inputs=9000, crashes=0)
    print(f"quota admission VM steps: 1000 rows of history {cost_small}, 8000 {cost_large}")
    # 8x the history, the same work (scanning the raw rows would cost 8x).
    assert cost_large <= cost_small * 1.1 + 50, (cost_small, cost_large)
    # The counters still count all of it: the day's 8000 tokens are there.
    with pytest.raises(QuotaExceeded) as err:
        cfg.policy.models[MODEL].tokens_per_day = 8010  # type: ignore[union-attr]
        policy.authorize(cfg, auth(), MODEL, large, tokens=11)
    assert err.value.details["used"] == 8000


def test_old_usage_is_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    introspect()
    cfg = site(limits={"usage_retention_days": 2})
    now = time.time()
    monkeypatch.setattr(usage_db, "clock", lambda: now - 5 * 86400)  # five days ago
    for _ in range(20):
        policy.authorize(cfg, auth(), MODEL, tmp_path)
        policy.record_usage(tmp_path, "alice@uchicago.edu", MODEL, 7)
    policy.flush_usage()
    monkeypatch.setattr(usage_db, "clock", lambda: now - 3600)  # an hour ago: kept
    policy.record_usage(tmp_path, "alice@uchicago.edu", MODEL, 3)

    def counts() -> tuple[int, int]:
        with usage_db.db(tmp_path) as conn:
            raw = conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
            buckets = conn.execute("SELECT COUNT(*) FROM quota_counts").fetchone()[0]
        return int(raw), int(buckets)

    assert counts()[0] == 41
    monkeypatch.setattr(usage_db, "clock", lambda: now)
    monkeypatch.setattr(usage_db, "_LAST_PRUNE", {})
    policy.authorize(cfg, auth(), MODEL, tmp_path)  # admissions prune, once a minute at most
    policy.flush_usage()
    raw, buckets = counts()
    assert raw == 2  # the hour-old tokens and this request; the five-day-old ones are gone
    assert buckets == 2  # one token bucket (an hour old) and this minute's request bucket
    assert policy.usage(tmp_path) == [
        {"identity": "alice@uchicago.edu", "model": MODEL, "requests": 1, "tokens": 3}]


# -- the introspection cache -------------------------------------------------------------------

def test_introspection_cache_is_bounded_and_expires(tmp_path: Path) -> None:
    cfg = SiteConfig.model_validate({
        "name": "testsite", "policy": {"client_id": ENDPOINT_CLIENT,
                                       "models": {MODEL: {"anyone": True}},
                                       "introspection_cache_s": 600,
                                       "introspection_cache_size": 8}})
    assert cfg.policy is not None
    introspect(exp_in=3600)
    for i in range(50):  # 50 different tokens: the cache keeps the 8 most recent
        policy.verify_identity(cfg.policy, {"token": f"token-{i}"})
        assert policy.cache_size() <= 8
    assert policy.cache_size() == 8
    calls = len(policy_calls())
    policy.verify_identity(cfg.policy, {"token": "token-49"})  # kept: no new introspection
    policy.verify_identity(cfg.policy, {"token": "token-0"})  # evicted: introspected again
    assert len(policy_calls()) == calls + 1
    # A token that expires in 2 s is cached no longer than that, though the policy says 600 s.
    policy.clear_cache()
    introspect(exp_in=2)
    policy.verify_identity(cfg.policy, {"token": "short"})
    expires = next(iter(policy._cache.values()))[0]
    assert expires <= time.time() + 2.5
    # Once expired, it is dropped on its next use (and introspected again).
    policy._cache.update({k: (time.time() - 1, c) for k, (_, c) in policy._cache.items()})
    introspect(exp_in=3600)
    calls = len(policy_calls())
    policy.verify_identity(cfg.policy, {"token": "short"})
    assert len(policy_calls()) == calls + 1 and policy.cache_size() == 1


def policy_calls() -> list[Any]:
    import responses

    return [c for c in responses.calls if "introspect" in c.request.url]


# -- the catalog --------------------------------------------------------------------------------

def test_catalog_is_cached_until_a_model_is_added(tmp_path: Path, tiny_llama_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from fabric.models_registry import ModelRegistry

    reads = [0]
    original = ModelRegistry.models

    def counted(self: ModelRegistry) -> Any:
        reads[0] += 1
        return original(self)

    monkeypatch.setattr(ModelRegistry, "models", counted)
    ctx = SiteContext(SiteConfig.model_validate({"name": "local"}), tmp_path)
    first = ctx.catalog
    for _ in range(20):
        assert ctx.catalog is first
        ctx.entry(MODEL)
    assert reads[0] == 1
    ModelRegistry(tmp_path).add(tiny_llama_dir, "mine", "v1")  # what `fabric models add` does
    reads[0] = 0
    assert ctx.entry("mine").version == "v1"  # the next request sees it
    assert ctx.catalog is ctx.catalog and reads[0] == 1
    ModelRegistry(tmp_path).remove("mine")
    assert "mine" not in ctx.catalog.names()
