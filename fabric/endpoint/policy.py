"""Who may use which model at a site, how much, and which functions may run there.

Every endpoint function calls ``authorize`` before touching a model server and
``check_function`` before running anything. The caller proves who they are with a Globus access
token issued for the site's own scope (``policy.scope``); the endpoint verifies it by token
introspection with its confidential client, the pattern ALCF's FIRST gateway uses, because the
Globus Compute worker cannot otherwise know who sent a task. Group rules need the caller's
groups, which the endpoint fetches with a dependent token (the site scope depends on the Groups
scope), so the caller never has to send a Groups token of their own.

Denials are typed: ``AccessDenied`` (``details['rule']`` names the rule), ``QuotaExceeded``
(``details['retry_after']`` in seconds) and ``FunctionNotAllowed``. Usage is recorded per
identity and model in ``<state_dir>/usage.sqlite``; tokens are never logged or stored (the
introspection cache is keyed by a hash).
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabric.endpoint import registry
from fabric.endpoint import usage as usage_db
from fabric.errors import (
    AccessDenied,
    AdminOnly,
    DeployLimitExceeded,
    EndpointError,
    FunctionNotAllowed,
    QuotaExceeded,
)
from fabric.sitepolicy import AdminRule, ModelRule, PolicyConfig
from fabric.sites import Plan, SiteConfig, limit_exceeded

log = logging.getLogger(__name__)

GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
GROUPS_RESOURCE_SERVER = "groups.api.globus.org"



@dataclass
class Caller:
    """A verified caller. ``identity`` (username, else identity UUID) keys usage and quotas."""

    identity: str
    ids: set[str] = field(default_factory=set)
    usernames: set[str] = field(default_factory=set)
    groups: set[str] | None = None
    groups_error: str = ""
    token: str = field(default="", repr=False)  # kept only for the dependent-token call

    @property
    def domains(self) -> set[str]:
        """Identity domains of every linked identity (``alice@uchicago.edu`` -> uchicago.edu)."""
        return {u.rsplit("@", 1)[1].lower() for u in self.usernames if "@" in u}


_cache: OrderedDict[str, tuple[float, Caller]] = OrderedDict()
"""Introspections by token hash, least recently used first: ``(expires, caller)``."""
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every cached introspection and identity record (tests; a policy reload)."""
    from fabric.endpoint import asserted

    with _cache_lock:
        _cache.clear()
    asserted.clear_cache()


def _cached(key: str, now: float) -> Caller | None:
    """A live cached introspection (an expired one is dropped)."""
    with _cache_lock:
        hit = _cache.get(key)
        if hit is None:
            return None
        if hit[0] <= now:
            del _cache[key]
            return None
        _cache.move_to_end(key)
        return hit[1]


def _remember(key: str, expires: float, caller: Caller, size: int, now: float) -> None:
    """Cache an introspection until ``expires``, keeping at most ``size`` entries: expired
    ones go first, then the least recently used (one token a call would otherwise grow the
    cache without bound)."""
    if size <= 0:
        return
    with _cache_lock:
        _cache[key] = (expires, caller)
        _cache.move_to_end(key)
        if len(_cache) > size:
            for stale in [k for k, (exp, _) in _cache.items() if exp <= now]:
                del _cache[stale]
        while len(_cache) > size:
            _cache.popitem(last=False)


def cache_size() -> int:
    """Introspections cached in this process (tests, health)."""
    with _cache_lock:
        return len(_cache)


def _confidential_client(policy: PolicyConfig) -> Any:
    import globus_sdk

    secret = os.environ.get(policy.client_secret_env)
    if not secret:
        raise EndpointError(
            f"site policy is misconfigured: ${policy.client_secret_env} (the endpoint's "
            "confidential client secret) is not set in the endpoint's environment"
        )
    return globus_sdk.ConfidentialAppAuthClient(policy.client_id, secret)


def verify_identity(policy: PolicyConfig, auth: dict[str, Any] | None) -> Caller:
    """The verified caller or a denial: the identity Globus Compute asserted for this user
    endpoint (``policy.identity == "asserted"``, ``fabric.endpoint.asserted``), else the
    caller's token introspected with the endpoint's client."""
    if policy.identity == "asserted":
        from fabric.endpoint.asserted import asserted_caller

        return asserted_caller(policy, auth, _confidential_client, _verify_token)
    return _verify_token(policy, auth)


def _verify_token(policy: PolicyConfig, auth: dict[str, Any] | None) -> Caller:
    """Introspect the caller's token with the endpoint's client; a ``Caller`` or a denial."""
    token = (auth or {}).get("token") if isinstance(auth, dict) else None
    if not isinstance(token, str) or not token:
        raise AccessDenied(
            "this site requires proof of identity: log in with `fabric login` and call it "
            "through the fabric SDK (no Globus token came with the request)",
            rule="identity-proof.missing",
        )
    key = hashlib.sha256(f"{policy.client_id}:{token}".encode()).hexdigest()
    now = usage_db.clock()
    hit = _cached(key, now)
    if hit is not None:
        return hit
    import globus_sdk

    try:
        data = _confidential_client(policy).oauth2_token_introspect(
            token, include="identity_set,identity_set_detail").data
    except globus_sdk.GlobusAPIError as exc:
        # The status and code say what failed; the token itself never reaches a log or error.
        raise EndpointError(
            f"token introspection failed: HTTP {exc.http_status} {exc.code}") from None
    if not data.get("active"):
        raise AccessDenied("your Globus token is not active (revoked, expired or issued for "
                           "another site): run `fabric login` again",
                           rule="identity-proof.inactive")
    exp = float(data.get("exp") or 0)
    if exp and exp <= now:
        raise AccessDenied("your Globus token has expired: run `fabric login` again",
                           rule="identity-proof.expired")
    aud = data.get("aud") or []
    if policy.client_id not in (aud if isinstance(aud, list) else [aud]):
        raise AccessDenied("the token was not issued for this site's fabric scope",
                           rule="identity-proof.audience")
    if policy.resolved_scope not in str(data.get("scope", "")).split():
        raise AccessDenied(f"the token lacks this site's scope {policy.resolved_scope}: run "
                           "`fabric login` again", rule="identity-proof.scope")
    caller = Caller(identity=str(data.get("username") or data.get("sub")), token=token)
    caller.ids.add(str(data.get("sub")))
    if data.get("username"):
        caller.usernames.add(str(data["username"]))
    caller.ids.update(str(i) for i in data.get("identity_set") or [])
    for linked in data.get("identity_set_detail") or []:
        caller.ids.add(str(linked.get("sub") or linked.get("id")))
        if linked.get("username"):
            caller.usernames.add(str(linked["username"]))
    # Never beyond the token's own expiry: a cached caller would outlive its token.
    ttl = min(policy.introspection_cache_s, (exp - now) if exp else policy.introspection_cache_s)
    if ttl > 0:
        _remember(key, now + ttl, caller, policy.introspection_cache_size, now)
    return caller


def caller_groups(policy: PolicyConfig, caller: Caller) -> set[str]:
    """The caller's active Globus group ids, fetched once per cached caller (none, with the
    reason in ``groups_error``, for an asserted identity without a token)."""
    if caller.groups is not None:
        return caller.groups
    import globus_sdk

    try:
        client = _confidential_client(policy)
        dep = client.oauth2_get_dependent_tokens(caller.token, scope=GROUPS_SCOPE)
        groups_token = dep.by_resource_server[GROUPS_RESOURCE_SERVER]["access_token"]
        groups = globus_sdk.GroupsClient(
            authorizer=globus_sdk.AccessTokenAuthorizer(groups_token)).get_my_groups()
        caller.groups = {
            str(g["id"]) for g in groups
            if any(m.get("status") == "active" for m in g.get("my_memberships") or [])
        }
    except (globus_sdk.GlobusAPIError, KeyError) as exc:
        # Without the dependent Groups consent there is nothing to match against: the group
        # rule fails closed and the denial says why.
        status = getattr(exc, "http_status", "")
        caller.groups, caller.groups_error = set(), f"group lookup failed ({status or exc})"
    return caller.groups


def _matches(site: SiteConfig, rule: ModelRule | AdminRule, caller: Caller) -> bool:
    """Whether ``caller`` is one of the identities, domains or groups ``rule`` lists."""
    if getattr(rule, "anyone", False):
        return True
    wanted = {i.lower() for i in rule.identities}
    if wanted & {i.lower() for i in caller.ids | caller.usernames}:
        return True
    if caller.domains & {d.lower() for d in rule.domains}:
        return True
    return bool(rule.groups and site.policy
                and caller_groups(site.policy, caller) & set(rule.groups))


def _check_rule(site: SiteConfig, rule_name: str, rule: ModelRule, caller: Caller,
                model: str) -> None:
    if _matches(site, rule, caller):
        return
    reasons = []
    if rule.identities:
        reasons.append(f"not listed in {rule_name}.identities")
    if rule.domains:
        got = ", ".join(sorted(caller.domains)) or "none"
        reasons.append(f"identity domain ({got}) not in {rule_name}.domains")
    if rule.groups:
        reasons.append(f"not a member of any group in {rule_name}.groups"
                       + (f": {caller.groups_error}" if caller.groups_error else ""))
    failed = [k for k in ("identities", "domains", "groups") if getattr(rule, k)]
    raise AccessDenied(
        f"{caller.identity} may not use model {model!r} at site {site.name!r}: "
        + ("; ".join(reasons) or f"{rule_name} allows nobody"),
        rule=rule_name, identity=caller.identity, model=model, failed=failed)


def flush_usage() -> None:
    """Write this process's queued usage rows now."""
    usage_db.WRITER.flush()


def _admit(site: SiteConfig, state_dir: Path, identity: str, model: str, rule_name: str,
           rule: ModelRule, tokens: int) -> None:
    """Check the quotas and record the request in one transaction (workers race otherwise);
    without quotas there is nothing to check and the row is queued (``usage.WRITER``).

    The quotas read per-window counters (``fabric.endpoint.usage``): a bounded number of rows
    whatever the history, so the transaction every worker waits on stays short."""
    now = usage_db.clock()
    usage_db.maybe_prune(state_dir, site.limits.usage_retention_days * 86400.0)
    if not rule.requests_per_minute and not rule.tokens_per_day:
        usage_db.WRITER.add(state_dir, (now, identity, model))
        return
    usage_db.WRITER.flush()  # the quota counts this process's own queued rows too
    if rule.tokens_per_day:  # and the streams' tokens its last admissions asked to collect
        from fabric.endpoint.collector import COLLECTOR

        COLLECTOR.join()
    with usage_db.transaction(state_dir) as conn:
        if rule.requests_per_minute:
            limit = rule.requests_per_minute
            buckets = usage_db.window_usage(conn, identity, model, usage_db.REQUESTS, now)
            used = sum(a for _, a in buckets)
            if used >= limit:
                wait = usage_db.wait_for(buckets, usage_db.REQUESTS, used - limit + 1, now)
                raise QuotaExceeded(
                    f"{identity} used {used} of {limit} requests per minute for {model!r}; "
                    f"retry in {wait:.0f} s", rule=f"{rule_name}.requests_per_minute",
                    retry_after=round(wait, 3), limit=limit, used=used)
        if rule.tokens_per_day:
            _check_tokens(conn, identity, model, rule_name, rule.tokens_per_day, tokens, now)
        usage_db.add_request(conn, identity, model, now)


def _check_tokens(conn: sqlite3.Connection, identity: str, model: str, rule_name: str,
                  limit: int, tokens: int, now: float) -> None:
    if tokens > limit:
        raise AccessDenied(f"the request may use {tokens} tokens, more than the daily quota "
                           f"of {limit} for {model!r}", rule=f"{rule_name}.tokens_per_day")
    buckets = usage_db.window_usage(conn, identity, model, usage_db.TOKENS, now)
    used = sum(a for _, a in buckets)
    if used + tokens <= limit:
        return
    # The window slides: room appears as the oldest buckets age past a day.
    wait = usage_db.wait_for(buckets, usage_db.TOKENS, used + tokens - limit, now)
    raise QuotaExceeded(
        f"{identity} used {used} of {limit} tokens per day for {model!r}; retry in {wait:.0f} s",
        rule=f"{rule_name}.tokens_per_day", retry_after=round(wait, 3), limit=limit, used=used)


_OPEN_RULE = ModelRule(anyone=True)
"""The rule of a site without a policy section: anyone (its OS user), no quota."""


def authorize(site: SiteConfig, auth: dict[str, Any] | None, model: str, state_dir: Path,
              tokens: int = 0, *, count: bool = True) -> str:
    """The verified identity allowed to use ``model`` now, or a typed denial.

    ``tokens`` is the most the request may consume (prompt + max new tokens, or 0 to check
    only what was already used). With ``count`` the call is a new request: quotas are checked
    and it is recorded. Follow-up calls about a request already admitted (``poll_requests``,
    ``cancel_request``, ``deployment_status`` while waiting) pass ``count=False``: identity and
    model rules still apply, quotas do not, so a long stream never uses up requests per minute.
    A site without a policy section (the local site) admits the endpoint's OS user.
    """
    if site.policy is None:
        identity = _os_user()
        if count:
            _admit(site, Path(state_dir), identity, model, "none", _OPEN_RULE, 0)
        return identity
    caller = verify_identity(site.policy, auth)
    rule_name, rule = site.policy.rule_for(model)
    _check_rule(site, rule_name, rule, caller, model)
    if count:
        _admit(site, Path(state_dir), caller.identity, model, rule_name, rule, tokens)
        log.info("admitted %s to %s at %s (%s)", caller.identity, model, site.name, rule_name)
    return caller.identity


def authorize_admin(site: SiteConfig, auth: dict[str, Any] | None, operation: str) -> str:
    """The verified identity if it may run the admin ``operation`` (deploy, undeploy), else
    ``AdminOnly``: the caller must match ``policy.admins`` (no model rule is needed: an admin
    manages every deployment; no quota counts). A site without a policy (the local site)
    admits its OS user, the operator."""
    if site.policy is None:
        return _os_user()
    caller = verify_identity(site.policy, auth)
    admins = site.policy.admins
    if _matches(site, admins, caller):
        log.info("admin %s: %s at %s", operation, caller.identity, site.name)
        return caller.identity
    listed = [k for k in ("identities", "domains", "groups") if getattr(admins, k)]
    raise AdminOnly(
        f"{caller.identity} may not {operation} at site {site.name!r}: only the site's admins "
        + (f"(policy.admins.{', policy.admins.'.join(listed)})" if listed
           else "may, and policy.admins names nobody")
        + (f"; {caller.groups_error}" if caller.groups_error else ""),
        rule="policy.admins", identity=caller.identity, operation=operation)


def check_deploy_size(site: SiteConfig, plan: Plan) -> None:
    """``DeployLimitExceeded`` unless one deployment of ``plan`` fits the site's ``limits``
    (nodes, accelerators, and the site's job walltime), whoever asks."""
    over = limit_exceeded(site.limits, plan, site.jobs.walltime)
    if over is None:
        return
    rule, limit, requested = over
    what = rule.split(".", 1)[1].removeprefix("max_")
    raise DeployLimitExceeded(
        f"the deployment asks for {requested} {what} (pp={plan.pp}, tp={plan.tp}, "
        f"nodes={plan.nodes}, gpus_per_node={plan.gpus_per_node}, walltime "
        f"{site.jobs.walltime}); site {site.name!r} allows at most {limit} ({rule})",
        rule=rule, limit=limit, requested=requested)


def identify(site: SiteConfig, auth: dict[str, Any] | None) -> str:
    """The caller's verified identity, for calls about no one model (listings): a site with a
    policy hands its catalog and deployments (server addresses, public keys) only to callers
    with a valid token for it; a site without one (the local site) to its OS user."""
    if site.policy is None:
        return _os_user()
    return verify_identity(site.policy, auth).identity


def record_usage(state_dir: Path, identity: str, model: str, tokens: int,
                 request_id: str | None = None, *, prompt_tokens: int = 0,
                 completion_tokens: int = 0, ts: float | None = None) -> None:
    """Add the tokens a finished request consumed (prompt + completion) to its caller's usage;
    ``prompt_tokens``/``completion_tokens`` split them where the caller knows (``fabric usage``
    reports both); ``ts``: when the request finished, if not now."""
    usage_db.record_tokens(Path(state_dir), identity, model, tokens, request_id,
                           prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           ts=ts)


def usage(state_dir: Path, since_s: float = 86400.0) -> list[dict[str, Any]]:
    """Requests and tokens per identity and model over the last ``since_s`` seconds."""
    return usage_db.report(Path(state_dir), since_s)


@functools.cache
def _os_user() -> str:
    # A process's OS user does not change; getuser reads four environment variables a call.
    return getpass.getuser()


def check_function(site: SiteConfig, fn_name: str, *, user_function: bool = False) -> None:
    """Raise ``FunctionNotAllowed`` unless ``fn_name`` may run at ``site``.

    The fabric's own endpoint functions (``fabric.endpoint.registry``) always may; a user's
    function (``fab.submit``, ``user_function=True``) only where the operator set
    ``allow_user_functions``. This mirrors Globus Compute's ``allowed_functions``, which in the
    rendered endpoint config lists only the fabric's registered functions, so user code reaches
    a site only through ``run_user_function`` and this check.
    """
    if user_function:
        if not site.allow_user_functions:
            raise FunctionNotAllowed(
                f"site {site.name!r} does not run user functions ({fn_name}); its operator "
                "must set allow_user_functions: true", rule="allow_user_functions",
                function=fn_name)
        return
    if fn_name in registry.names():
        return
    raise FunctionNotAllowed(f"{fn_name!r} is not one of the fabric's endpoint functions",
                             rule="function-allow-list", function=fn_name)

