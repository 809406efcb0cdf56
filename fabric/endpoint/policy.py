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

import atexit
import contextlib
import functools
import getpass
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabric.endpoint import registry
from fabric.errors import AccessDenied, EndpointError, FunctionNotAllowed, QuotaExceeded
from fabric.sites import ModelRule, PolicyConfig, SiteConfig
from fabric.sqlitefs import journal_mode

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


_cache: dict[str, tuple[float, Caller]] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every cached introspection (tests; a policy reload)."""
    with _cache_lock:
        _cache.clear()


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
    """Introspect the caller's token with the endpoint's client; a ``Caller`` or a denial."""
    token = (auth or {}).get("token") if isinstance(auth, dict) else None
    if not isinstance(token, str) or not token:
        raise AccessDenied(
            "this site requires proof of identity: log in with `fabric login` and call it "
            "through the fabric SDK (no Globus token came with the request)",
            rule="identity-proof.missing",
        )
    key = hashlib.sha256(f"{policy.client_id}:{token}".encode()).hexdigest()
    now = time.time()
    with _cache_lock:
        hit = _cache.get(key)
    if hit and hit[0] > now:
        return hit[1]
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
    ttl = min(policy.introspection_cache_s, (exp - now) if exp else policy.introspection_cache_s)
    if ttl > 0:
        with _cache_lock:
            _cache[key] = (now + ttl, caller)
    return caller


def caller_groups(policy: PolicyConfig, caller: Caller) -> set[str]:
    """The caller's active Globus group ids, fetched once per cached caller."""
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


def _check_rule(site: SiteConfig, rule_name: str, rule: ModelRule, caller: Caller,
                model: str) -> None:
    if rule.anyone:
        return
    wanted = {i.lower() for i in rule.identities}
    if wanted & {i.lower() for i in caller.ids | caller.usernames}:
        return
    if caller.domains & {d.lower() for d in rule.domains}:
        return
    if rule.groups and site.policy and caller_groups(site.policy, caller) & set(rule.groups):
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


_CONNECTIONS: dict[Path, sqlite3.Connection] = {}
_CONNECTIONS_LOCK = threading.Lock()


@contextmanager
def _db(state_dir: Path) -> Iterator[sqlite3.Connection]:
    """This process's connection to the usage database (kept open: closing the last
    connection of a WAL database checkpoints it with an fsync, ~10 ms a request)."""
    path = state_dir / "usage.sqlite"
    with _CONNECTIONS_LOCK:
        conn = _CONNECTIONS.get(path)
        if conn is None or not path.exists():
            conn = _open(path)
            _CONNECTIONS[path] = conn
        # One statement sequence at a time per connection (workers may use threads).
        yield conn


@contextmanager
def _transaction(state_dir: Path) -> Iterator[sqlite3.Connection]:
    """An immediate (write-locked) transaction on the usage database."""
    with _db(state_dir) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _open(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists()
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    if fresh:
        os.chmod(path, 0o600)  # who used what is not for other local users to read
    # WAL with synchronous=NORMAL: a commit needs no fsync (benchmarks/overhead.py); a power
    # cut may lose the last few usage rows, never corrupt the file.
    conn.execute(f"PRAGMA journal_mode={journal_mode(path)}")  # no WAL on GPFS/Lustre/NFS
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS usage (ts REAL NOT NULL, identity TEXT NOT NULL,"
                 " model TEXT NOT NULL, requests INTEGER NOT NULL, tokens INTEGER NOT NULL,"
                 " request_id TEXT)")
    conn.execute("CREATE INDEX IF NOT EXISTS usage_by_caller ON usage(identity, model, ts)")
    _add_split_columns(conn)
    return conn


def _add_split_columns(conn: sqlite3.Connection) -> None:
    """Prompt and completion tokens apart (``fabric usage``), added to a table made before
    them; old rows keep only their total (``tokens``)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(usage)")}
    for column in ("prompt_tokens", "completion_tokens"):
        if column not in have:
            with contextlib.suppress(sqlite3.OperationalError):  # another process added it
                conn.execute(f"ALTER TABLE usage ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")


_INSERT = "INSERT INTO usage (ts, identity, model, requests, tokens, request_id)"
"""Columns named: the table has gained columns since (``_add_split_columns``)."""
USAGE_FLUSH_S = 1.0
"""Most seconds a usage row of an admission without quotas waits before it is written. Each
request worker commits its own rows: at 50 ms, 2 workers' commits and wake-ups cost a no-op
``fab.submit`` ~0.3 ms of CPU on 2 cores (benchmarks/overhead.py)."""


class _UsageWriter:
    """Usage rows of admissions that enforce no quota, written in batches by one daemon thread
    per process: the request does not wait for SQLite (a commit is ~0.4 ms in a request
    worker, a fifth of the fabric's whole overhead on a no-op user function). No quota reads
    these rows, so a second's delay changes no decision; quota admissions stay synchronous,
    in one transaction. ``flush`` writes what is pending at once (also at exit; a worker
    killed outright loses its last second of such rows)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # Also after a fork: the child starts with no rows, no thread and fresh locks.
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._rows: dict[Path, list[tuple[Any, ...]]] = {}
        self._thread: threading.Thread | None = None
        self._idle = False

    def add(self, state_dir: Path, row: tuple[Any, ...]) -> None:
        """Queue one row for ``state_dir``'s usage table."""
        with self._cond:
            self._rows.setdefault(state_dir, []).append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                 name="fabric-usage-writer")
                self._thread.start()
            if self._idle:  # under steady traffic the thread polls: no wake-up per request
                self._cond.notify()

    def flush(self) -> None:
        """Write every queued row now (returns once they are committed)."""
        with self._write_lock:  # also waits for a batch the thread is writing
            with self._cond:
                batch, self._rows = self._rows, {}
            for state_dir, rows in batch.items():
                try:
                    with _transaction(state_dir) as conn:
                        conn.executemany(_INSERT + " VALUES (?,?,?,?,?,?)", rows)
                except Exception:
                    log.exception("lost %d usage rows for %s", len(rows), state_dir)

    def _run(self) -> None:
        quiet = 0
        while True:
            with self._cond:
                if not self._rows and quiet >= 2:  # two periods without requests: sleep
                    self._idle = True
                    while not self._rows:
                        self._cond.wait()
                    self._idle = False
            time.sleep(USAGE_FLUSH_S)  # one transaction for the rows of a burst
            quiet = 0 if self._rows else quiet + 1
            self.flush()


_WRITER = _UsageWriter()
os.register_at_fork(after_in_child=_WRITER._reset)
atexit.register(_WRITER.flush)


def flush_usage() -> None:
    """Write this process's queued usage rows now."""
    _WRITER.flush()


def _admit(state_dir: Path, identity: str, model: str, rule_name: str, rule: ModelRule,
           tokens: int) -> None:
    """Check the quotas and record the request in one transaction (workers race otherwise);
    without quotas there is nothing to check and the row is queued (``_UsageWriter``)."""
    now = time.time()
    if not rule.requests_per_minute and not rule.tokens_per_day:
        _WRITER.add(state_dir, (now, identity, model, 1, 0, None))
        return
    _WRITER.flush()  # the quota counts this process's own queued rows too
    with _transaction(state_dir) as conn:
        if rule.requests_per_minute:
            rows = conn.execute(
                "SELECT ts FROM usage WHERE identity=? AND model=? AND requests>0 AND ts>?"
                " ORDER BY ts", (identity, model, now - 60)).fetchall()
            if len(rows) >= rule.requests_per_minute:
                wait = rows[len(rows) - rule.requests_per_minute][0] + 60 - now
                raise QuotaExceeded(
                    f"{identity} used {len(rows)} of {rule.requests_per_minute} requests per "
                    f"minute for {model!r}; retry in {wait:.0f} s",
                    rule=f"{rule_name}.requests_per_minute", retry_after=round(wait, 3),
                    limit=rule.requests_per_minute, used=len(rows))
        if rule.tokens_per_day:
            _check_tokens(conn, identity, model, rule_name, rule.tokens_per_day, tokens, now)
        conn.execute(_INSERT + " VALUES (?,?,?,?,?,NULL)",
                     (now, identity, model, 1, 0))


def _check_tokens(conn: sqlite3.Connection, identity: str, model: str, rule_name: str,
                  limit: int, tokens: int, now: float) -> None:
    if tokens > limit:
        raise AccessDenied(f"the request may use {tokens} tokens, more than the daily quota "
                           f"of {limit} for {model!r}", rule=f"{rule_name}.tokens_per_day")
    rows = conn.execute("SELECT ts, tokens FROM usage WHERE identity=? AND model=? AND tokens>0"
                        " AND ts>? ORDER BY ts", (identity, model, now - 86400)).fetchall()
    used = sum(t for _, t in rows)
    if used + tokens <= limit:
        return
    # The window is rolling: room appears as the oldest usage ages past 24 h.
    excess, wait = used + tokens - limit, 0.0
    for ts, amount in rows:
        excess -= amount
        wait = ts + 86400 - now
        if excess <= 0:
            break
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
    and it is recorded. Follow-up calls about a request already admitted (``poll_stream``,
    ``cancel_request``, ``deployment_status`` while waiting) pass ``count=False``: identity and
    model rules still apply, quotas do not, so a long stream never uses up requests per minute.
    A site without a policy section (the local site) admits the endpoint's OS user.
    """
    if site.policy is None:
        identity = _os_user()
        if count:
            _admit(Path(state_dir), identity, model, "none", _OPEN_RULE, 0)
        return identity
    caller = verify_identity(site.policy, auth)
    rule_name, rule = site.policy.rule_for(model)
    _check_rule(site, rule_name, rule, caller, model)
    if count:
        _admit(Path(state_dir), caller.identity, model, rule_name, rule, tokens)
        log.info("admitted %s to %s at %s (%s)", caller.identity, model, site.name, rule_name)
    return caller.identity


def identify(site: SiteConfig, auth: dict[str, Any] | None) -> str:
    """The caller's verified identity, for calls about no one model (listings): a site with a
    policy hands its catalog and deployments (server addresses, public keys) only to callers
    with a valid token for it; a site without one (the local site) to its OS user."""
    if site.policy is None:
        return _os_user()
    return verify_identity(site.policy, auth).identity


def record_usage(state_dir: Path, identity: str, model: str, tokens: int,
                 request_id: str | None = None, *, prompt_tokens: int = 0,
                 completion_tokens: int = 0) -> None:
    """Add the tokens a finished request consumed (prompt + completion) to its caller's usage;
    ``prompt_tokens``/``completion_tokens`` split them where the caller knows (``fabric usage``
    reports both)."""
    with _db(Path(state_dir)) as conn:
        conn.execute("INSERT INTO usage (ts, identity, model, requests, tokens, request_id,"
                     " prompt_tokens, completion_tokens) VALUES (?,?,?,?,?,?,?,?)",
                     (time.time(), identity, model, 0, int(tokens), request_id,
                      int(prompt_tokens), int(completion_tokens)))


def usage(state_dir: Path, since_s: float = 86400.0) -> list[dict[str, Any]]:
    """Requests and tokens per identity and model over the last ``since_s`` seconds."""
    _WRITER.flush()
    with _db(Path(state_dir)) as conn:
        rows = conn.execute(
            "SELECT identity, model, SUM(requests), SUM(tokens) FROM usage WHERE ts>?"
            " GROUP BY identity, model ORDER BY identity, model",
            (time.time() - since_s,)).fetchall()
    return [{"identity": i, "model": m, "requests": r, "tokens": t} for i, m, r, t in rows]


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

