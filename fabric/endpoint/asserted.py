"""The caller's identity as Globus Compute asserts it, without a token (``identity: asserted``).

A multi-user Globus Compute endpoint starts one user endpoint per submitting identity: the
service's ``cmd_start_endpoint`` command names the submitter's effective identity and identity
set, the endpoint's identity mapping (``identity_mapping_config_path``) maps that set to a local
account, and the matched Globus identity id reaches the site's ``user_config_template.yaml.j2``
as ``{{ _GC.mapped_identity.globus.id }}``. The site's template exports it to the request
workers as ``FABRIC_GLOBUS_IDENTITY``; every task those workers run was submitted by that
identity (the service routes a task only to its submitter's user endpoint), so the site needs
no proof travelling with the task, and the Globus cloud stores none.

What the worker knows is the id alone. Its username (identity and domain rules name usernames)
comes from Globus Auth's identity record, looked up with the endpoint's confidential client and
cached. Group rules need the caller's groups, which Globus Groups reveals only to a token of
that caller: the call must then carry a token for the site's scope, which is introspected and
must belong to the asserted identity (the client sends one only to a site with group rules);
without one a group rule denies, and the denial says why.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fabric import env
from fabric.errors import AccessDenied, EndpointError
from fabric.sitepolicy import PolicyConfig

if TYPE_CHECKING:
    from fabric.endpoint.policy import Caller

NO_GROUP_PROOF = ("group rules need a proof of identity with the call: this site trusts the "
                  "identity Globus Compute asserted, which carries no groups, and no token came")
"""Why a group rule denies a caller without a token (``Caller.groups_error``)."""

_records: dict[str, tuple[float, dict[str, Any]]] = {}
"""Globus Auth identity records by id: ``(expires, record)``; bounded by the identities one
user endpoint ever serves (one, with a token for another refused)."""
_lock = threading.Lock()


def asserted_id() -> str:
    """The identity id this worker's user endpoint was started for, or a typed denial."""
    value = (env.FABRIC_GLOBUS_IDENTITY.get() or "").strip()
    if not value or value == "None":
        raise AccessDenied(
            "this site trusts the identity Globus Compute asserts, but this worker has none: "
            "its operator must run the endpoint as a multi-user endpoint with an identity "
            "mapping and export FABRIC_GLOBUS_IDENTITY from the user endpoint template",
            rule="identity-asserted.missing")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise AccessDenied("the asserted identity is not a Globus identity id",
                           rule="identity-asserted.invalid") from None


def identity_record(policy: PolicyConfig, identity_id: str,
                    client: Callable[[PolicyConfig], Any]) -> dict[str, Any]:
    """Globus Auth's record of ``identity_id`` (username, status), cached for
    ``policy.introspection_cache_s``; ``client`` builds the endpoint's confidential client."""
    now = time.monotonic()
    with _lock:
        hit = _records.get(identity_id)
        if hit is not None and hit[0] > now:
            return hit[1]
    import globus_sdk

    try:
        # Auth's identity lookup, authenticated as the endpoint's confidential client (SDK 4
        # has no get_identities on that client; the route accepts its Basic credentials).
        found = client(policy).get("/v2/api/identities",
                                   query_params={"ids": identity_id}).data.get("identities") \
            or []
    except globus_sdk.GlobusAPIError as exc:
        raise EndpointError(
            f"identity lookup failed: HTTP {exc.http_status} {exc.code}") from None
    record = next((r for r in found if str(r.get("id")) == identity_id), None)
    if record is None or record.get("status") not in (None, "used", "private", "unused"):
        raise AccessDenied(f"Globus Auth does not know the asserted identity {identity_id}",
                           rule="identity-asserted.unknown")
    with _lock:
        _records[identity_id] = (now + policy.introspection_cache_s, record)
    return record


def asserted_caller(policy: PolicyConfig, auth: dict[str, Any] | None,
                    client: Callable[[PolicyConfig], Any],
                    verify_token: Callable[[PolicyConfig, dict[str, Any]], Caller]) -> Caller:
    """The caller of a task in this user endpoint: the asserted identity, with a token's groups
    when the call carries one for the same person (``verify_token`` introspects it)."""
    from fabric.endpoint.policy import Caller

    identity_id = asserted_id()
    record = identity_record(policy, identity_id, client)
    username = str(record.get("username") or "")
    caller = Caller(identity=username or identity_id, ids={identity_id})
    if username:
        caller.usernames.add(username)
    token = (auth or {}).get("token") if isinstance(auth, dict) else None
    if not token:
        caller.groups, caller.groups_error = set(), NO_GROUP_PROOF
        return caller
    proven = verify_token(policy, auth or {})
    if identity_id not in proven.ids:
        # A token of someone else must not lend its groups to this identity.
        raise AccessDenied("the token sent with the call belongs to another identity than the "
                           "one Globus Compute asserted for this user endpoint",
                           rule="identity-proof.mismatch")
    caller.token, caller.ids = proven.token, caller.ids | proven.ids
    caller.usernames |= proven.usernames
    return caller


def clear_cache() -> None:
    """Forget cached identity records (tests)."""
    with _lock:
        _records.clear()
