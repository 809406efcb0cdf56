"""Logging in to Globus: a person with ``UserApp``, an automated workflow with ``ClientApp``.

The fabric keeps its own token file (``~/.fabric/tokens.json``, mode 0600) rather than sharing
Globus Compute's, so ``fabric logout`` never logs a user out of unrelated tools. Which app is
used is decided by the environment the way Globus Compute decides it: ``FABRIC_CLIENT_ID`` and
``FABRIC_CLIENT_SECRET`` together mean a confidential client (client credentials, no browser);
otherwise a person logs in through the native-app flow and refresh tokens keep them logged in.

Scopes requested: Globus Compute's (to submit tasks), and for every site with a ``policy``
section that site's own fabric scope, whose access token is the proof of identity the site's
endpoint introspects (``fabric.endpoint.policy``). That scope is defined by the site operator
with a dependency on the Groups scope, so the endpoint can look up the caller's groups itself.
Tokens are never logged, printed or put into error messages.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import globus_sdk
from globus_sdk.scopes import AuthScopes, ComputeScopes, Scope
from globus_sdk.token_storage import JSONTokenStorage

from fabric import env
from fabric.errors import AuthError
from fabric.sites import SiteConfig, list_sites, load_site

log = logging.getLogger(__name__)

APP_NAME = "tpm-fabric"
DEFAULT_NATIVE_CLIENT_ID = "4cf29807-cf21-49ec-9443-ff9a3fb9f81c"
"""Globus Compute's public native client; ``FABRIC_NATIVE_CLIENT_ID`` selects another."""
COMPUTE_RESOURCE_SERVER = ComputeScopes.resource_server


def token_file() -> Path:
    """Where tokens live: ``$FABRIC_HOME/tokens.json`` (``FABRIC_HOME`` defaults to ~/.fabric)."""
    return env.fabric_home() / "tokens.json"


class PrivateJSONTokenStorage(JSONTokenStorage):
    """``JSONTokenStorage`` that keeps the file at mode 0600 even if it existed before.

    globus-sdk sets a user-only umask when it creates the file; a file copied in or created
    by an older tool could be wider, so every write re-asserts 0600.
    """

    def __init__(self, filepath: Path, **kwargs: Any) -> None:
        filepath.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        super().__init__(filepath, **kwargs)
        self._tighten()

    def _tighten(self) -> None:
        path = Path(self.filepath)
        if path.exists() and path.stat().st_mode & 0o077:
            log.warning("token file %s was readable by others; now mode 0600", path)
            os.chmod(path, 0o600)

    def store_token_data_by_resource_server(self, token_data_by_resource_server: Any) -> None:
        """Store, then make sure nobody else can read the file."""
        super().store_token_data_by_resource_server(token_data_by_resource_server)
        self._tighten()

    def remove_token_data(self, resource_server: str) -> bool:
        """Remove one resource server's tokens (keeping the file private)."""
        out = super().remove_token_data(resource_server)
        self._tighten()
        return out


def site_scopes(sites: Iterable[SiteConfig]) -> dict[str, list[Scope]]:
    """The fabric scope of every site that has a policy whose client id is known."""
    out: dict[str, list[Scope]] = {}
    for site in sites:
        if site.policy and "UNSET-" not in site.policy.client_id:
            out[site.policy.client_id] = [Scope(site.policy.resolved_scope)]
    return out


def scope_requirements(sites: Iterable[SiteConfig] = ()) -> dict[str, list[Scope]]:
    """Globus Compute's scope, OpenID/profile (for ``whoami``) and each site's fabric scope."""
    reqs: dict[str, list[Scope]] = {
        COMPUTE_RESOURCE_SERVER: [ComputeScopes.all],
        AuthScopes.resource_server: [AuthScopes.openid, AuthScopes.profile, AuthScopes.email],
    }
    reqs.update(site_scopes(sites))
    return reqs


def known_sites() -> list[SiteConfig]:
    """Every shipped site definition that loads (placeholders allowed)."""
    out = []
    for name in list_sites():
        try:
            out.append(load_site(name))
        except Exception as exc:  # one broken definition must not block logging in
            log.warning("skipping site %s: %s", name, exc)
    return out


def make_app(sites: Iterable[SiteConfig] | None = None, *, path: Path | None = None,
             login_flow_manager: Any = None,
             id_token_decoder: Any = None) -> globus_sdk.GlobusApp:
    """A ``ClientApp`` (``FABRIC_CLIENT_ID`` + ``FABRIC_CLIENT_SECRET``) or a ``UserApp``.

    ``login_flow_manager`` and ``id_token_decoder`` are globus-sdk's own extension points
    (``GlobusAppConfig``): "local-server" opens a browser, the default asks for a code on the
    command line; tests pass a decoder that accepts their canned ID token.
    """
    storage = PrivateJSONTokenStorage(path or token_file())
    reqs = scope_requirements(known_sites() if sites is None else sites)
    client_id = env.FABRIC_CLIENT_ID.get()
    client_secret = env.FABRIC_CLIENT_SECRET.get()
    extra: dict[str, Any] = {}
    if id_token_decoder is not None:
        extra["id_token_decoder"] = id_token_decoder
    if client_id and client_secret:
        config = globus_sdk.GlobusAppConfig(token_storage=storage, **extra)
        # A client has no OpenID profile of its own to read; its identity is the client id.
        reqs.pop(AuthScopes.resource_server, None)
        return globus_sdk.ClientApp(APP_NAME, client_id=client_id, client_secret=client_secret,
                                    scope_requirements=reqs, config=config)
    if client_id or client_secret:
        raise AuthError("set both FABRIC_CLIENT_ID and FABRIC_CLIENT_SECRET for a client "
                        "login, or neither for a personal login")
    config = globus_sdk.GlobusAppConfig(
        token_storage=storage, request_refresh_tokens=True,
        login_flow_manager=login_flow_manager, **extra)
    native = env.FABRIC_NATIVE_CLIENT_ID.get() or DEFAULT_NATIVE_CLIENT_ID
    return globus_sdk.UserApp(APP_NAME, client_id=native, scope_requirements=reqs, config=config)


def is_client_app(app: globus_sdk.GlobusApp) -> bool:
    """True for a confidential-client (automation) login."""
    return isinstance(app, globus_sdk.ClientApp)


def login(app: globus_sdk.GlobusApp | None = None, *, force: bool = False) -> dict[str, Any]:
    """Log in if needed (or always with ``force``) and return ``whoami``'s answer."""
    app = app or make_app()
    try:
        app.login(force=force)
    except globus_sdk.GlobusAPIError as exc:
        raise AuthError(f"Globus login failed: HTTP {exc.http_status} {exc.code}") from None
    return whoami(app)


def logout(app: globus_sdk.GlobusApp | None = None) -> None:
    """Revoke and forget every stored token (all resource servers, not only current ones)."""
    app = app or make_app()
    try:
        app.logout(sweep=True)
    except globus_sdk.GlobusAPIError as exc:
        # Revocation failing (offline) must not leave tokens on disk.
        log.warning("token revocation failed (HTTP %s); removing local tokens", exc.http_status)
        inner = app.token_storage.token_storage
        for rs in list(inner.get_token_data_by_resource_server()):
            inner.remove_token_data(rs)


def whoami(app: globus_sdk.GlobusApp | None = None) -> dict[str, Any]:
    """Who is logged in, and until when each resource server's token is valid (no tokens)."""
    app = app or make_app()
    stored = app.token_storage.token_storage.get_token_data_by_resource_server()
    if not stored:
        raise AuthError("not logged in: run `fabric login`")
    expiry = {rs: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d.expires_at_seconds))
              for rs, d in sorted(stored.items())}
    if is_client_app(app):
        return {"kind": "client", "username": f"{app.client_id}@clients.auth.globus.org",
                "sub": str(app.client_id), "tokens": expiry}
    info: dict[str, Any] = {"kind": "user", "tokens": expiry,
                            "sub": next((d.identity_id for d in stored.values()
                                         if d.identity_id), None)}
    try:
        userinfo = globus_sdk.AuthClient(app=app).userinfo()
        info.update(username=userinfo["preferred_username"], sub=userinfo["sub"],
                    name=userinfo.get("name"))
    except (globus_sdk.GlobusAPIError, globus_sdk.GlobusError) as exc:
        log.debug("userinfo unavailable: %s", type(exc).__name__)
    return info


def access_token(app: globus_sdk.GlobusApp, resource_server: str) -> str:
    """A valid access token for ``resource_server``, refreshed (or re-requested) if expired."""
    try:
        authorizer = app.get_authorizer(resource_server)
        header = authorizer.get_authorization_header()
    except globus_sdk.GlobusAPIError as exc:
        raise AuthError(f"could not refresh the login: HTTP {exc.http_status} {exc.code}; run "
                        "`fabric login`") from None
    except globus_sdk.token_storage.TokenValidationError as exc:
        raise AuthError(f"login needed ({type(exc).__name__}): run `fabric login`") from None
    if not header or not header.startswith("Bearer "):
        raise AuthError(f"no token for {resource_server}: run `fabric login`")
    return header[len("Bearer "):]


def identity_proof(app: globus_sdk.GlobusApp, site: SiteConfig) -> dict[str, Any] | None:
    """What a call to ``site`` carries as ``auth``: a token for the site's fabric scope.

    ``None`` for a site without a policy (nothing to prove). The scope is added to the app's
    requirements on the fly, so a site missing from the last login gives a clear ``AuthError``
    (run ``fabric login``) instead of a denial at the endpoint.
    """
    if site.policy is None:
        return None
    if "UNSET-" in site.policy.client_id:
        raise AuthError(f"site {site.name!r} does not say which client verifies identities "
                        "(policy.client_id is unset): ask its operator for the site values")
    rs = site.policy.client_id
    if rs not in app.scope_requirements:
        app.add_scope_requirements({rs: [Scope(site.policy.resolved_scope)]})
    return {"scheme": "globus", "token": access_token(app, rs), "site": site.name}
