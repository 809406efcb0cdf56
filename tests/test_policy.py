"""Endpoint access policy against canned Globus Auth / Groups responses (offline)."""

from __future__ import annotations

import getpass
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import responses
from globus_sdk.testing import RegisteredResponse, get_last_request, load_response

from fabric.endpoint import policy
from fabric.errors import AccessDenied, EndpointError, FunctionNotAllowed, QuotaExceeded
from fabric.sites import SiteConfig, load_site

ENDPOINT_CLIENT = "0b6e5c4a-0f5c-4e5b-9f0d-0000000000ec"
SCOPE = f"https://auth.globus.org/scopes/{ENDPOINT_CLIENT}/fabric"
ALICE = "a1a1a1a1-0000-4000-8000-000000000001"
GROUP = "d3974728-6458-11e4-b72d-123139141556"  # a group in globus_sdk's canned get_my_groups
OTHER_GROUP = "0b6e5c4a-0f5c-4e5b-9f0d-00000000beef"
TOKEN = "ALICE-SECRET-ACCESS-TOKEN-abc123"


def make_site(models: dict[str, Any], default: dict[str, Any] | None = None) -> SiteConfig:
    return SiteConfig.model_validate({
        "name": "testsite",
        "policy": {"client_id": ENDPOINT_CLIENT, "default": default or {}, "models": models},
    })


@pytest.fixture(autouse=True)
def mocked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("FABRIC_ENDPOINT_CLIENT_SECRET", "endpoint-secret")
    policy.clear_cache()
    responses.start()
    yield
    responses.stop()
    responses.reset()
    policy.clear_cache()


def introspect(active: bool = True, exp_in: float = 3600, username: str = "alice@uchicago.edu",
               aud: str = ENDPOINT_CLIENT, scope: str = SCOPE) -> None:
    body: dict[str, Any] = {"active": False}
    if active:
        body = {
            "active": True, "token_type": "Bearer", "scope": f"{scope} openid",
            "client_id": "some-native-app", "username": username, "sub": ALICE,
            "exp": time.time() + exp_in, "aud": [aud, "auth.globus.org"],
            "identity_set_detail": [
                {"sub": ALICE, "username": username},
                {"sub": "a1a1a1a1-0000-4000-8000-000000000002", "username": "alice@orcid.org"},
            ],
        }
    load_response(RegisteredResponse(service="auth", path="/v2/oauth2/token/introspect",
                                     method="POST", json=body))


def auth() -> dict[str, str]:
    return {"scheme": "globus", "token": TOKEN}


def test_anyone_rule_allows_and_records(tmp_path: Path) -> None:
    introspect()
    site = make_site({"m": {"anyone": True}})
    assert policy.authorize(site, auth(), "m", tmp_path) == "alice@uchicago.edu"
    sent = get_last_request()
    assert sent is not None and "identity_set_detail" in str(sent.body)
    policy.record_usage(tmp_path, "alice@uchicago.edu", "m", 42, request_id="r1")
    assert policy.usage(tmp_path) == [
        {"identity": "alice@uchicago.edu", "model": "m", "requests": 1, "tokens": 42}]
    assert (tmp_path / "usage.sqlite").stat().st_mode & 0o777 == 0o600


def test_allowed_by_identity_uuid_or_linked_username(tmp_path: Path) -> None:
    introspect()
    assert policy.authorize(make_site({"m": {"identities": [ALICE]}}), auth(), "m", tmp_path)
    policy.clear_cache()
    introspect()
    site = make_site({"m": {"identities": ["ALICE@orcid.org"]}})
    assert policy.authorize(site, auth(), "m", tmp_path) == "alice@uchicago.edu"


def test_denied_by_identity(tmp_path: Path) -> None:
    introspect()
    site = make_site({"m": {"identities": ["bob@anl.gov"]}})
    with pytest.raises(AccessDenied) as err:
        policy.authorize(site, auth(), "m", tmp_path)
    assert str(err.value) == ("alice@uchicago.edu may not use model 'm' at site 'testsite': "
                              "not listed in policy.models.m.identities")
    assert err.value.details == {"rule": "policy.models.m", "identity": "alice@uchicago.edu",
                                 "model": "m", "failed": ["identities"]}


def test_allowed_and_denied_by_domain(tmp_path: Path) -> None:
    introspect()
    assert policy.authorize(make_site({"m": {"domains": ["UChicago.edu"]}}), auth(), "m",
                            tmp_path)
    policy.clear_cache()
    introspect()
    with pytest.raises(AccessDenied) as err:
        policy.authorize(make_site({"m": {"domains": ["anl.gov"]}}), auth(), "m", tmp_path)
    assert str(err.value) == (
        "alice@uchicago.edu may not use model 'm' at site 'testsite': identity domain "
        "(orcid.org, uchicago.edu) not in policy.models.m.domains")
    assert err.value.details["rule"] == "policy.models.m"


def test_allowed_by_group_via_dependent_token(tmp_path: Path) -> None:
    introspect()
    load_response("auth.oauth2_get_dependent_tokens", case="groups")
    load_response("groups.get_my_groups")
    site = make_site({"m": {"groups": [GROUP]}})
    assert policy.authorize(site, auth(), "m", tmp_path) == "alice@uchicago.edu"
    last = get_last_request()
    assert last is not None and last.headers["Authorization"] == "Bearer groupsToken"
    dependent = [c.request for c in responses.calls if str(c.request.url).endswith("/oauth2/token")]
    assert "dependent_token" in str(dependent[0].body) and "view_my_groups" in str(
        dependent[0].body)


def test_denied_by_group(tmp_path: Path) -> None:
    introspect()
    load_response("auth.oauth2_get_dependent_tokens", case="groups")
    load_response("groups.get_my_groups")
    with pytest.raises(AccessDenied) as err:
        policy.authorize(make_site({"m": {"groups": [OTHER_GROUP]}}), auth(), "m", tmp_path)
    assert str(err.value) == ("alice@uchicago.edu may not use model 'm' at site 'testsite': "
                              "not a member of any group in policy.models.m.groups")
    assert err.value.details["failed"] == ["groups"]


def test_group_lookup_failure_fails_closed(tmp_path: Path) -> None:
    introspect()
    load_response(RegisteredResponse(service="auth", path="/v2/oauth2/token", method="POST",
                                     status=400, json={"error": "invalid_grant"}))
    with pytest.raises(AccessDenied, match=r"groups: group lookup failed \(400\)"):
        policy.authorize(make_site({"m": {"groups": [GROUP]}}), auth(), "m", tmp_path)


def test_default_rule_denies_unlisted_models(tmp_path: Path) -> None:
    introspect()
    with pytest.raises(AccessDenied) as err:
        policy.authorize(make_site({"m": {"anyone": True}}), auth(), "other", tmp_path)
    assert str(err.value) == ("alice@uchicago.edu may not use model 'other' at site "
                              "'testsite': policy.default allows nobody")
    assert err.value.details["rule"] == "policy.default"


def test_requests_per_minute_quota(tmp_path: Path) -> None:
    introspect()
    site = make_site({"m": {"anyone": True, "requests_per_minute": 2}})
    policy.authorize(site, auth(), "m", tmp_path)
    policy.authorize(site, auth(), "m", tmp_path)  # cached introspection: one HTTP call
    assert len(responses.calls) == 1
    with pytest.raises(QuotaExceeded) as err:
        policy.authorize(site, auth(), "m", tmp_path)
    assert err.value.retryable
    assert err.value.details["rule"] == "policy.models.m.requests_per_minute"
    assert 55 < err.value.details["retry_after"] <= 60
    assert err.value.details["used"] == 2 and err.value.details["limit"] == 2
    assert str(err.value).startswith("alice@uchicago.edu used 2 of 2 requests per minute for 'm'")


def test_a_token_quota_counts_the_streams_its_process_is_collecting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An admission leaves its servers' stream usage to the collector thread and answers;
    the next token quota check of the process waits for that collection, so it counts those
    tokens as it did when admissions collected before answering. A request quota does not
    wait."""
    import threading

    from fabric.endpoint import collector

    class Manager:
        def __init__(self) -> None:
            self.release = threading.Event()

        def collect_usage(self, dep: object) -> int:
            assert self.release.wait(10)
            policy.record_usage(tmp_path, "alice@uchicago.edu", "m", 60)
            return 1

    class Dep:
        id = "d1"

    introspect()
    monkeypatch.setattr(collector, "COLLECTOR", collector._Collector())
    site = make_site({"m": {"anyone": True, "tokens_per_day": 100},
                      "r": {"anyone": True, "requests_per_minute": 100}})
    manager = Manager()
    collector.COLLECTOR.soon(manager, [Dep()])
    t0 = time.monotonic()
    policy.authorize(site, auth(), "r", tmp_path)  # a request quota does not wait for it
    assert time.monotonic() - t0 < collector.JOIN_TIMEOUT_S / 2
    threading.Timer(0.3, manager.release.set).start()
    with pytest.raises(QuotaExceeded) as err:  # 60 collected + 50 asked > 100
        policy.authorize(site, auth(), "m", tmp_path, tokens=50)
    assert err.value.details["used"] == 60


def test_tokens_per_day_quota(tmp_path: Path) -> None:
    introspect()
    site = make_site({"m": {"anyone": True, "tokens_per_day": 100}})
    policy.authorize(site, auth(), "m", tmp_path, tokens=60)
    policy.record_usage(tmp_path, "alice@uchicago.edu", "m", 60)
    with pytest.raises(QuotaExceeded) as err:
        policy.authorize(site, auth(), "m", tmp_path, tokens=50)
    assert err.value.details["rule"] == "policy.models.m.tokens_per_day"
    assert 86400 - 300 < err.value.details["retry_after"] <= 86400  # 5 min buckets
    assert policy.authorize(site, auth(), "m", tmp_path, tokens=40)  # still fits
    with pytest.raises(AccessDenied, match="more than the daily quota of 100"):
        policy.authorize(site, auth(), "m", tmp_path, tokens=101)


@pytest.mark.parametrize(("kwargs", "rule"), [
    ({"active": False}, "identity-proof.inactive"),  # revoked (Auth reports inactive)
    ({"exp_in": -5}, "identity-proof.expired"),
    ({"aud": "0b6e5c4a-0f5c-4e5b-9f0d-000000000bad"}, "identity-proof.audience"),
    ({"scope": "urn:globus:auth:scope:transfer.api.globus.org:all"}, "identity-proof.scope"),
])
def test_bad_tokens(tmp_path: Path, kwargs: dict[str, Any], rule: str) -> None:
    introspect(**kwargs)
    with pytest.raises(AccessDenied) as err:
        policy.authorize(make_site({"m": {"anyone": True}}), auth(), "m", tmp_path)
    assert err.value.details == {"rule": rule}
    assert TOKEN not in str(err.value)


def test_missing_proof(tmp_path: Path) -> None:
    with pytest.raises(AccessDenied) as err:
        policy.authorize(make_site({"m": {"anyone": True}}), None, "m", tmp_path)
    assert err.value.details == {"rule": "identity-proof.missing"}


def test_introspection_http_error_and_missing_secret(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    load_response(RegisteredResponse(service="auth", path="/v2/oauth2/token/introspect",
                                     method="POST", status=401,
                                     json={"errors": [{"code": "UNAUTHORIZED"}]}))
    with pytest.raises(EndpointError, match="token introspection failed: HTTP 401") as err:
        policy.authorize(make_site({"m": {"anyone": True}}), auth(), "m", tmp_path)
    assert TOKEN not in str(err.value)
    monkeypatch.delenv("FABRIC_ENDPOINT_CLIENT_SECRET")
    with pytest.raises(EndpointError, match=r"\$FABRIC_ENDPOINT_CLIENT_SECRET"):
        policy.authorize(make_site({"m": {"anyone": True}}), auth(), "m", tmp_path)


def test_no_token_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    introspect()
    load_response("auth.oauth2_get_dependent_tokens", case="groups")
    load_response("groups.get_my_groups")
    policy.authorize(make_site({"m": {"groups": [GROUP]}}), auth(), "m", tmp_path)
    assert "admitted alice@uchicago.edu" in caplog.text
    assert TOKEN not in caplog.text and "groupsToken" not in caplog.text


def test_local_site_allows_os_user(tmp_path: Path) -> None:
    site = load_site("local")
    assert site.policy is None
    assert policy.authorize(site, None, "smollm2-135m", tmp_path) == getpass.getuser()
    assert policy.usage(tmp_path)[0]["requests"] == 1


def _rows_seen_by_another_connection(state_dir: Path) -> int:
    import sqlite3

    path = state_dir / "usage.sqlite"
    if not path.exists():
        return 0
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT COALESCE(SUM(requests), 0) FROM usage").fetchone()[0])
    except sqlite3.OperationalError:  # the writer has created the file, not yet the table
        return 0
    finally:
        db.close()


def test_usage_without_quota_is_written_in_the_background(tmp_path: Path) -> None:
    site = load_site("local")
    for _ in range(3):
        policy.authorize(site, None, "smollm2-135m", tmp_path)
    deadline = time.monotonic() + 10.0
    while _rows_seen_by_another_connection(tmp_path) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer thread commits within USAGE_FLUSH_S
    assert _rows_seen_by_another_connection(tmp_path) == 3
    policy.authorize(site, None, "smollm2-135m", tmp_path)
    policy.flush_usage()
    assert _rows_seen_by_another_connection(tmp_path) == 4


def test_quota_admission_is_recorded_before_it_returns(tmp_path: Path) -> None:
    introspect()
    site = make_site({"m": {"anyone": True, "requests_per_minute": 5}})
    policy.authorize(site, auth(), "m", tmp_path)
    # Other workers count it at once: written in the admitting transaction, not queued.
    assert _rows_seen_by_another_connection(tmp_path) == 1


def test_function_allow_list() -> None:
    remote = make_site({}).model_copy(update={"allow_user_functions": False})
    policy.check_function(remote, "run_request")
    with pytest.raises(FunctionNotAllowed) as err:
        policy.check_function(remote, "my_analysis", user_function=True)
    assert err.value.details == {"rule": "allow_user_functions", "function": "my_analysis"}
    with pytest.raises(FunctionNotAllowed) as err:
        policy.check_function(remote, "os_system")
    assert err.value.details["rule"] == "function-allow-list"
    policy.check_function(load_site("local"), "my_analysis", user_function=True)


def test_follow_up_calls_do_not_count(tmp_path: Path) -> None:
    introspect()
    site = make_site({"m": {"anyone": True, "requests_per_minute": 1}})
    policy.authorize(site, auth(), "m", tmp_path)
    for _ in range(5):  # polls of the admitted request: still verified, never counted
        assert policy.authorize(site, auth(), "m", tmp_path, count=False)
    assert policy.usage(tmp_path)[0]["requests"] == 1
    with pytest.raises(QuotaExceeded):
        policy.authorize(site, auth(), "m", tmp_path)
    with pytest.raises(AccessDenied):  # the model rule still applies to follow-ups
        policy.authorize(site, auth(), "other", tmp_path, count=False)


def test_stream_polls_and_cancels_are_not_new_requests(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the endpoint functions: with 2 requests a minute, one request then 10 polls,
    cancels and status queries leave the second request admissible."""
    from fabric.endpoint import functions
    from fabric.endpoint.context import SiteContext
    from fabric.errors import ModelServerUnavailable
    from fabric.wire.gcwire import unwrap

    introspect()
    model = "smollm2-135m"  # in the built-in catalog (deployment_status looks it up)
    ctx = SiteContext(make_site({model: {"anyone": True, "requests_per_minute": 2}}), tmp_path)
    monkeypatch.setattr(functions, "current", lambda: ctx)
    ctx.authorize(auth(), model)
    poll = {"model": model, "request_id": "r1", "ticket": "t", "cursor": 0}
    for _ in range(10):  # no server is running: each is checked, then finds none
        polled = unwrap(functions.poll_requests([poll], 0.0, None, auth()))
        assert polled["replies"]["r1"]["error"]["kind"] == "ModelServerUnavailable"
        with pytest.raises(ModelServerUnavailable):
            unwrap(functions.cancel_request(model, "r1", "t", auth()))
        assert unwrap(functions.deployment_status(model, None, None, auth()))["state"] == "absent"
    assert policy.usage(tmp_path)[0]["requests"] == 1
    ctx.authorize(auth(), model)  # the second request of the minute
    with pytest.raises(QuotaExceeded):
        ctx.authorize(auth(), model)
    with pytest.raises(AccessDenied):  # polls are still authorized
        unwrap(functions.poll_requests([{**poll, "model": "other"}], 0.0, None, auth()))


def test_listings_need_a_verified_identity(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A site with a policy hands its catalog and deployments (addresses, keys) only to a
    caller with a valid token; the local site (no policy) to its OS user."""
    from fabric.endpoint import functions
    from fabric.endpoint.context import SiteContext
    from fabric.wire.gcwire import unwrap

    ctx = SiteContext(make_site({"m": {"anyone": True}}), tmp_path)
    monkeypatch.setattr(functions, "current", lambda: ctx)
    for call in (functions.list_models, functions.list_deployments):
        with pytest.raises(AccessDenied, match="proof of identity"):
            unwrap(call(None))
    introspect()
    assert unwrap(functions.list_deployments(auth())) == []
    assert any(m["name"] == "smollm2-135m" for m in unwrap(functions.list_models(auth())))
    open_site = SiteContext(SiteConfig.model_validate({"name": "local"}), tmp_path / "local")
    monkeypatch.setattr(functions, "current", lambda: open_site)
    assert unwrap(functions.list_deployments(None)) == []


def test_a_call_for_a_model_the_site_does_not_serve_is_not_counted(tmp_path: Path) -> None:
    """The caller is checked, the call refused (``UnknownModel``), and nothing recorded: a
    caller could otherwise fill the usage records with model names of its choosing."""
    from fabric.endpoint.context import SiteContext
    from fabric.errors import UnknownModel

    ctx = SiteContext(load_site("local"), tmp_path)
    assert ctx.authorize(None, "smollm2-135m") == getpass.getuser()
    assert ctx.authorize(None, "no-such-model") == getpass.getuser()
    with pytest.raises(UnknownModel):
        ctx.entry("no-such-model")
    policy.flush_usage()
    assert [(r["model"], r["requests"]) for r in policy.usage(tmp_path)] == [("smollm2-135m", 1)]


def test_a_call_for_a_version_the_site_does_not_have_is_not_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fabric usage`` counts admitted requests: a call pinning a version the site does not
    have is refused (``UnknownModel``) and not counted, whichever function it came through.
    Before, only the model name was looked up, so each such refusal added a request."""
    from fabric.client.checks import build_request, sampling
    from fabric.endpoint import functions
    from fabric.endpoint.context import SiteContext
    from fabric.errors import UnknownModel
    from fabric.wire.gcwire import unwrap

    ctx = SiteContext(load_site("local"), tmp_path)
    monkeypatch.setattr(functions, "current", lambda: ctx)
    request = build_request("generate", model="smollm2-135m", version="7", prompt="x",
                            sampling=sampling(2, 0.0, 1.0, 0, None, (), False, 0))
    body = request.model_dump(mode="json")
    for call in (lambda: functions.run_request(body),
                 lambda: functions.run_requests([body]),
                 lambda: functions.open_stream(body, None, "direct")):
        with pytest.raises(UnknownModel, match="no version '7'"):
            unwrap(call())
    assert ctx.authorize(None, "smollm2-135m", version="7") == getpass.getuser()
    policy.flush_usage()
    assert policy.usage(tmp_path) == []


def test_only_active_group_memberships_count(tmp_path: Path) -> None:
    """An invited (or pending) member of a group is not admitted by a group rule."""
    introspect()
    load_response("auth.oauth2_get_dependent_tokens", case="groups")
    load_response(RegisteredResponse(service="groups", path="/v2/groups/my_groups", json=[
        {"id": OTHER_GROUP, "name": "invited", "my_memberships": [
            {"group_id": OTHER_GROUP, "identity_id": ALICE, "role": "member",
             "status": "invited"}]},
        {"id": GROUP, "name": "joined", "my_memberships": [
            {"group_id": GROUP, "identity_id": ALICE, "role": "member", "status": "active"}]},
    ]))
    with pytest.raises(AccessDenied, match="not a member of any group"):
        policy.authorize(make_site({"m": {"groups": [OTHER_GROUP]}}), auth(), "m", tmp_path)
    # the same (cached) caller is admitted by the group it is an active member of
    assert policy.authorize(make_site({"m": {"groups": [GROUP]}}), auth(), "m",
                            tmp_path) == "alice@uchicago.edu"


def test_scope_must_be_a_whole_word_of_the_tokens_scopes(tmp_path: Path) -> None:
    introspect(scope=f"{SCOPE}_other")
    with pytest.raises(AccessDenied) as err:
        policy.authorize(make_site({"m": {"anyone": True}}), auth(), "m", tmp_path)
    assert err.value.details == {"rule": "identity-proof.scope"}
