"""``identity: asserted``: the site trusts the Globus identity Globus Compute asserted for the
user endpoint (``FABRIC_GLOBUS_IDENTITY``), resolved to a username by Globus Auth's identity
lookup; group rules need a token of the same identity (canned Auth / Groups responses)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import responses
from globus_sdk.testing import RegisteredResponse, load_response

from fabric import env
from fabric.endpoint import asserted, policy
from fabric.errors import AccessDenied, EndpointError
from fabric.sites import SiteConfig

ENDPOINT_CLIENT = "0b6e5c4a-0f5c-4e5b-9f0d-0000000000ec"
SCOPE = f"https://auth.globus.org/scopes/{ENDPOINT_CLIENT}/fabric"
ALICE = "a1a1a1a1-0000-4000-8000-000000000001"
MALLORY = "a1a1a1a1-0000-4000-8000-0000000000ff"
GROUP = "d3974728-6458-11e4-b72d-123139141556"  # a group in globus_sdk's canned get_my_groups


def make_site(models: dict[str, Any], **extra: Any) -> SiteConfig:
    return SiteConfig.model_validate({
        "name": "testsite",
        "policy": {"client_id": ENDPOINT_CLIENT, "identity": "asserted", "models": models,
                   **extra}})


@pytest.fixture(autouse=True)
def mocked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("FABRIC_ENDPOINT_CLIENT_SECRET", "endpoint-secret")
    monkeypatch.setenv(env.FABRIC_GLOBUS_IDENTITY.name, ALICE)
    policy.clear_cache()
    responses.start()
    yield
    responses.stop()
    responses.reset()
    policy.clear_cache()


def identities(*records: tuple[str, str]) -> None:
    load_response(RegisteredResponse(
        service="auth", path="/v2/api/identities", method="GET",
        json={"identities": [{"id": i, "username": u, "status": "used"} for i, u in records]}))


def introspect(sub: str, username: str) -> None:
    load_response(RegisteredResponse(
        service="auth", path="/v2/oauth2/token/introspect", method="POST", json={
            "active": True, "scope": SCOPE, "sub": sub, "username": username,
            "exp": time.time() + 3600, "aud": [ENDPOINT_CLIENT],
            "identity_set_detail": [{"sub": sub, "username": username}]}))


def test_the_asserted_identity_is_the_caller_without_a_token(tmp_path: Path) -> None:
    identities((ALICE, "alice@uchicago.edu"))
    site = make_site({"m": {"identities": ["alice@uchicago.edu"]}})
    assert policy.authorize(site, None, "m", tmp_path) == "alice@uchicago.edu"
    policy.flush_usage()
    assert policy.usage(tmp_path) == [
        {"identity": "alice@uchicago.edu", "model": "m", "requests": 1, "tokens": 0}]
    # Domain rules match the looked-up username; the lookup is cached (one call).
    assert policy.authorize(make_site({"m": {"domains": ["uchicago.edu"]}}), None, "m",
                            tmp_path, count=False) == "alice@uchicago.edu"
    assert len([c for c in responses.calls if "/v2/api/identities" in c.request.url]) == 1
    assert f"ids={ALICE}" in responses.calls[0].request.url


def test_another_asserted_identity_is_denied(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env.FABRIC_GLOBUS_IDENTITY.name, MALLORY)
    identities((MALLORY, "mallory@evil.example"))
    site = make_site({"m": {"identities": ["alice@uchicago.edu"]}})
    with pytest.raises(AccessDenied) as err:
        policy.authorize(site, None, "m", tmp_path)
    assert err.value.details["identity"] == "mallory@evil.example"
    assert err.value.details["rule"] == "policy.models.m"


@pytest.mark.parametrize(("value", "rule"), [("", "identity-asserted.missing"),
                                             ("None", "identity-asserted.missing"),
                                             ("x; rm -rf /", "identity-asserted.invalid")])
def test_no_or_bad_asserted_identity_fails_closed(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  value: str, rule: str) -> None:
    """A worker started without an identity mapping (the template renders an empty value) is
    refused even with a token: the policy says whom it trusts."""
    monkeypatch.setenv(env.FABRIC_GLOBUS_IDENTITY.name, value)
    site = make_site({"m": {"anyone": True}})
    with pytest.raises(AccessDenied) as err:
        policy.authorize(site, {"token": "tok"}, "m", tmp_path)
    assert err.value.details["rule"] == rule


def test_unknown_identity_and_lookup_failure(tmp_path: Path) -> None:
    identities()
    with pytest.raises(AccessDenied) as err:
        policy.identify(make_site({}), None)
    assert err.value.details["rule"] == "identity-asserted.unknown"
    policy.clear_cache()
    load_response(RegisteredResponse(service="auth", path="/v2/api/identities", method="GET",
                                     status=500, json={"code": "oops"}))
    with pytest.raises(EndpointError, match="identity lookup failed: HTTP 500"):
        policy.identify(make_site({}), None)


def test_group_rule_without_a_token_is_refused_typed(tmp_path: Path) -> None:
    identities((ALICE, "alice@uchicago.edu"))
    with pytest.raises(AccessDenied) as err:
        policy.authorize(make_site({"m": {"groups": [GROUP]}}), None, "m", tmp_path)
    assert err.value.details["failed"] == ["groups"]
    assert asserted.NO_GROUP_PROOF in str(err.value)
    assert not [c for c in responses.calls if "groups" in c.request.url]


def test_group_rule_with_a_token_of_the_same_identity(tmp_path: Path) -> None:
    identities((ALICE, "alice@uchicago.edu"))
    introspect(ALICE, "alice@uchicago.edu")
    load_response("auth.oauth2_get_dependent_tokens", case="groups")
    load_response("groups.get_my_groups")
    site = make_site({"m": {"groups": [GROUP]}})
    assert policy.authorize(site, {"token": "alice-token"}, "m", tmp_path) == \
        "alice@uchicago.edu"


def test_a_token_of_another_identity_lends_no_groups(tmp_path: Path) -> None:
    identities((ALICE, "alice@uchicago.edu"))
    introspect(MALLORY, "mallory@evil.example")
    site = make_site({"m": {"groups": [GROUP]}})
    with pytest.raises(AccessDenied) as err:
        policy.authorize(site, {"token": "mallory-token"}, "m", tmp_path)
    assert err.value.details["rule"] == "identity-proof.mismatch"


def test_the_client_sends_no_token_unless_a_group_rule_needs_one(tmp_path: Path) -> None:
    from fabric.globus.transport import GlobusTransport

    class App:
        scope_requirements: dict[str, Any] = {}

    no_groups = GlobusTransport(make_site({"m": {"anyone": True}}), app=App(), home=tmp_path)
    assert no_groups.identity_proof() is None
    token_site = SiteConfig.model_validate({"name": "t", "policy": {
        "client_id": ENDPOINT_CLIENT, "models": {"m": {"anyone": True}}}})
    assert token_site.policy is not None and token_site.policy.identity == "token"
    assert make_site({"m": {"groups": [GROUP]}}).policy.has_group_rules  # type: ignore[union-attr]
    assert make_site({}, admins={"groups": [GROUP]}).policy.has_group_rules  # type: ignore[union-attr]
    assert not make_site({"m": {"anyone": True}}).policy.has_group_rules  # type: ignore[union-attr]


@pytest.mark.parametrize("site_name", ["local", "polaris"])
def test_every_shipped_template_exports_the_mapped_identity(tmp_path: Path,
                                                           site_name: str) -> None:
    """globus-compute-endpoint's own renderer, given the identity its mapper matched, puts it
    in the workers' environment (worker_init); without a mapping the value is empty."""
    import os
    import pwd
    import shlex

    import yaml
    from globus_compute_endpoint.endpoint.config.utils import (
        get_config,
        load_user_config_template,
        render_config_user_template,
    )
    from globus_compute_endpoint.endpoint.identity_mapper import MappedPosixIdentity

    from fabric.cli.main import main

    values = {"polaris": ["account=p", "venv=/v", "policy_client_id=" + ENDPOINT_CLIENT,
                          "users_group=" + GROUP, "contact_email=a@b.org"]}
    sets = [a for v in values.get(site_name, []) for a in ("--set", v)]
    assert main(["site", "check", site_name, *sets, "--write", str(tmp_path / "ep")]) == 0
    template = tmp_path / "ep" / "user_config_template.yaml.j2"
    for matched, expected in ((ALICE, ALICE), (None, "")):
        ident = MappedPosixIdentity(local_user_record=pwd.getpwuid(os.getuid()),
                                    matched_identity=matched, globus_identity_candidates=[])
        rendered = yaml.safe_load(render_config_user_template(
            get_config(tmp_path / "ep"), load_user_config_template(template), template, ident))
        init = rendered["engine"]["provider"]["worker_init"]
        exports = dict(w.split("=", 1) for w in shlex.split(init.replace(";", " "))
                       if "=" in w)
        assert exports[env.FABRIC_GLOBUS_IDENTITY.name] == expected


def test_the_offline_fixtures_identity_mapping_maps_the_fakes_identity_set(
        tmp_path: Path) -> None:
    """The mapping ``globus_asserted`` gives the endpoint, read by the endpoint's own mapper,
    maps the identity set the fake's start command carries (and nothing else)."""
    import json

    from globus_compute_endpoint.endpoint.identity_mapper import PosixIdentityMapper

    from fabric.testing import compute_fake
    from tests.plugins.globus_offline import MAPPED_USER, identity_mapping

    path = tmp_path / "map.json"
    path.write_text(json.dumps(identity_mapping(compute_fake.IDENTITY)))
    mapper = PosixIdentityMapper(path, "endpoint-id")
    try:
        fake = compute_fake.FakeComputeService("amqp://unused")
        found = mapper.map_identities([fake.identity_record(compute_fake.IDENTITY)])
        assert found == [[{compute_fake.IDENTITY: [MAPPED_USER]}]]
        assert mapper.map_identities(
            [fake.identity_record(compute_fake.OTHER_IDENTITY)]) == [[]]
    finally:
        mapper.stop_watching()


@pytest.mark.parametrize("status", ["closed", "deleted", "pending"])
def test_an_identity_record_with_an_unusable_status_is_refused(tmp_path: Path,
                                                               status: str) -> None:
    load_response(RegisteredResponse(
        service="auth", path="/v2/api/identities", method="GET", json={"identities": [
            {"id": ALICE, "username": "alice@uchicago.edu", "status": status}]}))
    with pytest.raises(AccessDenied) as err:
        policy.identify(make_site({"m": {"anyone": True}}), None)
    assert err.value.details["rule"] == "identity-asserted.unknown"


def test_cached_identity_records_expire_after_the_cache_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    clock = [1000.0]
    monkeypatch.setattr(asserted, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    site = make_site({}, introspection_cache_s=30)
    identities((ALICE, "alice@uchicago.edu"))

    def lookups() -> int:
        return len([c for c in responses.calls
                    if "/v2/api/identities" in str(c.request.url)])

    assert policy.identify(site, None) == "alice@uchicago.edu"
    clock[0] += 29
    assert policy.identify(site, None) == "alice@uchicago.edu"
    assert lookups() == 1  # still cached
    clock[0] += 2
    assert policy.identify(site, None) == "alice@uchicago.edu"
    assert lookups() == 2  # expired: looked up again


def test_a_token_of_the_asserted_identity_adds_its_linked_usernames(tmp_path: Path) -> None:
    """A domain rule matches a linked identity the caller's token proves (x@anl.gov)."""
    identities((ALICE, "alice@uchicago.edu"))
    load_response(RegisteredResponse(
        service="auth", path="/v2/oauth2/token/introspect", method="POST", json={
            "active": True, "scope": SCOPE, "sub": ALICE, "username": "alice@uchicago.edu",
            "exp": time.time() + 3600, "aud": [ENDPOINT_CLIENT],
            "identity_set_detail": [
                {"sub": ALICE, "username": "alice@uchicago.edu"},
                {"sub": "a1a1a1a1-0000-4000-8000-000000000002", "username": "alice@anl.gov"}]}))
    site = make_site({"m": {"domains": ["anl.gov"]}})
    with pytest.raises(AccessDenied):  # the asserted identity alone is not at anl.gov
        policy.authorize(site, None, "m", tmp_path, count=False)
    assert policy.authorize(site, {"token": "alice-token"}, "m", tmp_path,
                            count=False) == "alice@uchicago.edu"
