"""Login, refresh, client credentials and logout against canned Globus Auth responses."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import globus_sdk
import pytest
import responses
from globus_sdk.testing import RegisteredResponse, load_response

from fabric.errors import AuthError
from fabric.globus import auth
from fabric.sites import SiteConfig

ALICE = "a1a1a1a1-0000-4000-8000-000000000001"
SITE_CLIENT = "0b6e5c4a-0f5c-4e5b-9f0d-0000000000ec"
SITE_SCOPE = f"https://auth.globus.org/scopes/{SITE_CLIENT}/fabric"
COMPUTE_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
SECRETS = ("AUTH-AT-1", "COMPUTE-AT-1", "SITE-AT-1", "SITE-AT-2", "RT-SECRET-1",
           "CLIENT-SECRET-XYZ", "CC-SITE-AT")
SITE = SiteConfig.model_validate({"name": "remote", "policy": {"client_id": SITE_CLIENT}})


class CannedDecoder(globus_sdk.IDTokenDecoder):
    """Accepts the canned ID token (real ones are JWTs signed by Globus Auth)."""

    def decode(self, id_token: str, /) -> dict[str, Any]:
        return {"sub": ALICE}


@pytest.fixture(autouse=True)
def mocked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("FABRIC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FABRIC_CLIENT_ID", raising=False)
    monkeypatch.delenv("FABRIC_CLIENT_SECRET", raising=False)
    responses.start()
    yield
    responses.stop()
    responses.reset()


def token(rs: str, scope: str, at: str, expires_in: int = 3600, **extra: Any) -> dict[str, Any]:
    return {"resource_server": rs, "scope": scope, "access_token": at, "token_type": "Bearer",
            "expires_in": expires_in, **extra}


def code_exchange_response(site_expires_in: int = 3600) -> None:
    first = token("auth.globus.org", "openid profile email", "AUTH-AT-1",
                  refresh_token="RT-SECRET-1", id_token="canned.id.token")
    first["other_tokens"] = [
        token("funcx_service", COMPUTE_SCOPE, "COMPUTE-AT-1", refresh_token="RT-SECRET-1"),
        token(SITE_CLIENT, SITE_SCOPE, "SITE-AT-1", site_expires_in, refresh_token="RT-SECRET-1"),
    ]
    load_response(RegisteredResponse(service="auth", path="/v2/oauth2/token", method="POST",
                                     json=first))


def user_app(monkeypatch: pytest.MonkeyPatch) -> globus_sdk.GlobusApp:
    monkeypatch.setattr("builtins.input", lambda prompt="": "THE-AUTH-CODE")
    return auth.make_app([SITE], id_token_decoder=CannedDecoder)


def test_user_login_exchanges_code_and_stores_0600(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    code_exchange_response()
    load_response(RegisteredResponse(service="auth", path="/v2/oauth2/userinfo",
                                     json={"sub": ALICE, "preferred_username": "alice@uchicago.edu",
                                           "name": "Alice"}))
    app = user_app(monkeypatch)
    assert isinstance(app, globus_sdk.UserApp)
    info = auth.login(app)
    assert info["username"] == "alice@uchicago.edu" and info["kind"] == "user"
    assert set(info["tokens"]) == {"auth.globus.org", "funcx_service", SITE_CLIENT}
    exchange = responses.calls[0].request
    assert "grant_type=authorization_code" in str(exchange.body)
    assert "code=THE-AUTH-CODE" in str(exchange.body)
    file = auth.token_file()
    assert file.stat().st_mode & 0o777 == 0o600
    assert "SITE-AT-1" in file.read_text()
    proof = auth.identity_proof(app, SITE)
    assert proof == {"scheme": "globus", "token": "SITE-AT-1", "site": "remote"}
    # The login prompt showed the URL with every scope the fabric needs.
    shown = capsys.readouterr().out
    assert "auth.globus.org/v2/oauth2/authorize" in shown and SITE_CLIENT in shown
    leaked = [s for s in SECRETS if s in caplog.text or s in shown]
    assert leaked == []


def test_refresh_when_expired(monkeypatch: pytest.MonkeyPatch,
                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    code_exchange_response(site_expires_in=-10)  # the site token is already expired
    app = user_app(monkeypatch)
    app.login()
    load_response(RegisteredResponse(
        service="auth", path="/v2/oauth2/token", method="POST",
        json=token(SITE_CLIENT, SITE_SCOPE, "SITE-AT-2", refresh_token="RT-SECRET-1",
                   other_tokens=[])))
    assert auth.access_token(app, SITE_CLIENT) == "SITE-AT-2"
    refresh = responses.calls[-1].request
    assert "grant_type=refresh_token" in str(refresh.body)
    stored = json.loads(auth.token_file().read_text())
    assert "SITE-AT-2" in json.dumps(stored)
    assert auth.token_file().stat().st_mode & 0o777 == 0o600
    assert not [s for s in SECRETS if s in caplog.text]


def test_refresh_refused_is_auth_error(monkeypatch: pytest.MonkeyPatch) -> None:
    code_exchange_response(site_expires_in=-10)
    app = user_app(monkeypatch)
    app.login()
    load_response("auth.oauth2_exchange_code_for_tokens", case="invalid_grant")
    with pytest.raises(AuthError, match="could not refresh the login: HTTP 401"):
        auth.access_token(app, SITE_CLIENT)


def test_client_credentials(monkeypatch: pytest.MonkeyPatch,
                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FABRIC_CLIENT_ID", "c1c1c1c1-0000-4000-8000-00000000c11e")
    monkeypatch.setenv("FABRIC_CLIENT_SECRET", "CLIENT-SECRET-XYZ")
    # A client gets one token per resource server (one client-credentials grant each).
    for body in (token("funcx_service", COMPUTE_SCOPE, "COMPUTE-AT-1", other_tokens=[]),
                 token(SITE_CLIENT, SITE_SCOPE, "CC-SITE-AT", other_tokens=[])):
        load_response(RegisteredResponse(service="auth", path="/v2/oauth2/token",
                                         method="POST", json=body))
    app = auth.make_app([SITE])
    assert isinstance(app, globus_sdk.ClientApp)
    info = auth.login(app)
    assert info == {"kind": "client",
                    "username": "c1c1c1c1-0000-4000-8000-00000000c11e@clients.auth.globus.org",
                    "sub": "c1c1c1c1-0000-4000-8000-00000000c11e",
                    "tokens": info["tokens"]}
    sent = responses.calls[0].request
    assert "grant_type=client_credentials" in str(sent.body)
    assert "Basic " in sent.headers["Authorization"]  # secret in the header, not the body
    assert auth.identity_proof(app, SITE)["token"] == "CC-SITE-AT"  # type: ignore[index]
    assert auth.token_file().stat().st_mode & 0o777 == 0o600
    assert not [s for s in SECRETS if s in caplog.text]


def test_half_configured_client_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIC_CLIENT_ID", "c1c1c1c1-0000-4000-8000-00000000c11e")
    with pytest.raises(AuthError, match="set both FABRIC_CLIENT_ID and FABRIC_CLIENT_SECRET"):
        auth.make_app([SITE])


def test_logout_revokes_and_forgets(monkeypatch: pytest.MonkeyPatch) -> None:
    code_exchange_response()
    app = user_app(monkeypatch)
    app.login()
    load_response("auth.oauth2_revoke_token")
    auth.logout(app)
    revoked = [c for c in responses.calls if str(c.request.url).endswith("/token/revoke")]
    assert len(revoked) >= 3
    assert "SITE-AT-1" not in auth.token_file().read_text()
    with pytest.raises(AuthError, match="not logged in"):
        auth.whoami(app)


def test_existing_wide_token_file_is_tightened(tmp_path: Path) -> None:
    file = tmp_path / "t.json"
    file.write_text("{}")
    file.chmod(0o644)
    auth.PrivateJSONTokenStorage(file)
    assert file.stat().st_mode & 0o777 == 0o600


def test_site_without_client_id_needs_operator_values() -> None:
    site = SiteConfig.model_validate({"name": "x",
                                      "policy": {"client_id": "UNSET-policy_client_id"}})
    assert auth.site_scopes([site]) == {}
    with pytest.raises(AuthError, match=r"policy\.client_id is unset"):
        auth.identity_proof(None, site)  # type: ignore[arg-type]
    assert auth.identity_proof(None, SiteConfig(name="local")) is None  # type: ignore[arg-type]


def test_scopes_cover_compute_and_sites() -> None:
    reqs = auth.scope_requirements([SITE])
    assert str(reqs["funcx_service"][0]) == COMPUTE_SCOPE
    assert str(reqs[SITE_CLIENT][0]) == SITE_SCOPE
    assert time.time() > 0


def test_cli_login_whoami_logout_as_client(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from fabric.cli import auth as cli_auth

    monkeypatch.setenv("FABRIC_CLIENT_ID", "c1c1c1c1-0000-4000-8000-00000000c11e")
    monkeypatch.setenv("FABRIC_CLIENT_SECRET", "CLIENT-SECRET-XYZ")
    monkeypatch.setattr(auth, "known_sites", lambda: [SITE])
    for body in (token("funcx_service", COMPUTE_SCOPE, "COMPUTE-AT-1", other_tokens=[]),
                 token(SITE_CLIENT, SITE_SCOPE, "CC-SITE-AT", other_tokens=[])):
        load_response(RegisteredResponse(service="auth", path="/v2/oauth2/token",
                                         method="POST", json=body))
    load_response("auth.oauth2_revoke_token")
    parser = argparse.ArgumentParser()
    cli_auth.register(parser.add_subparsers())
    for argv in (["login"], ["whoami", "--json"], ["logout"]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "logged in as c1c1c1c1-0000-4000-8000-00000000c11e@clients.auth.globus.org" in out
    assert '"kind": "client"' in out and "logged out" in out
    assert not [s for s in SECRETS if s in out]
    assert "CC-SITE-AT" not in auth.token_file().read_text()
