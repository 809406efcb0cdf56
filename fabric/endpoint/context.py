"""``SiteContext``: everything an endpoint function needs to know about its site.

A request worker serves one site. Its context (site config, state dir, catalog, deployment
manager, ticket key, policy access) is built once per worker process, from ``FABRIC_SITE`` (a
site name or definition path) and ``FABRIC_STATE_DIR``, which the site process
(``fabric.endpoint.site``) or, at a remote endpoint, the operator's ``worker_init`` sets. Each
endpoint function fetches it once (``current()``) and passes it explicitly to what it calls
(``ServerSession``, ``ModelHandle``, the campaign shard): nothing else reads process globals.

Imports stay cheap (the manager, catalog and policy load on first use): workers import this
before every task.
"""

from __future__ import annotations

import threading
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric import env

if TYPE_CHECKING:
    from fabric.catalog import Catalog, CatalogEntry
    from fabric.endpoint.deployments import DeploymentManager
    from fabric.sites import Plan, SiteConfig

class SiteContext:
    """One site as a request worker sees it (built once per worker process)."""

    def __init__(self, site: SiteConfig, state_dir: Path) -> None:
        self.site = site
        self.state_dir = Path(state_dir).expanduser()
        self._catalog: tuple[tuple[int, ...] | None, Catalog] | None = None
        self._catalog_lock = threading.Lock()

    @classmethod
    def from_env(cls) -> SiteContext:
        """The context ``FABRIC_SITE`` / ``FABRIC_STATE_DIR`` name (default: the local site)."""
        from fabric.sites import load_site

        site = load_site(env.FABRIC_SITE.get() or "local")
        state = env.FABRIC_STATE_DIR.get() or str(site.resolved_state_dir())
        return cls(site, Path(state))

    @property
    def catalog(self) -> Catalog:
        """The built-in catalog plus the site's own models: its ``extra_models`` and those an
        operator registered (``fabric models add``). Built once and kept while the registry
        file (``models.json``) is unchanged: each use costs one ``stat``, and a model
        registered while the site runs (``fabric models add`` replaces the file: a new inode,
        size and mtime) is served by its next request. The site definition is this context's,
        loaded once per worker."""
        from fabric.models_registry import REGISTRY_FILE, site_catalog

        stamp = _stamp(self.state_dir / REGISTRY_FILE)
        with self._catalog_lock:
            if self._catalog is None or self._catalog[0] != stamp:
                self._catalog = (stamp, site_catalog(self.site, self.state_dir))
            return self._catalog[1]

    @cached_property
    def manager(self) -> DeploymentManager:
        """This worker's deployment manager."""
        from fabric.endpoint.deployments import DeploymentManager

        return DeploymentManager(self.site, self.state_dir)

    def entry(self, model: str, version: str | None = None) -> CatalogEntry:
        """The catalog entry of ``model`` (``UnknownModel`` if the site has none)."""
        return self.catalog.get(model, version)

    def ticket_key(self) -> bytes:
        """The site's HMAC ticket key (what model servers verify tickets with)."""
        return self.manager.ticket_key()

    def default_plan(self, entry: CatalogEntry) -> Plan:
        """The plan a deployment of ``entry`` gets when the caller names none."""
        from fabric.sites import Plan

        hosted = self.site.hosted(entry.name)
        return hosted.plan if hosted else Plan.model_validate({"dtype": entry.dtype})

    def plan(self, entry: CatalogEntry, plan: dict[str, Any] | None) -> Plan | None:
        """The site's default plan for ``entry`` with ``plan``'s fields overriding it."""
        if not plan:
            return None
        from fabric.sites import Plan

        hosted = self.site.hosted(entry.name)
        base = hosted.plan.model_dump() if hosted else {"dtype": entry.dtype}
        out = Plan.model_validate({**base, **plan})
        if out.tp % out.ep:  # a dense model with ep > 1: weights.check_plan_fits, at launch
            from fabric.errors import InvalidPlan

            raise InvalidPlan(f"ep={out.ep} must divide tp={out.tp} (expert groups are made "
                              "of a stage's tp ranks)", ep=out.ep, tp=out.tp)
        return out

    # -- policy ---------------------------------------------------------------------------

    def identify(self, auth: Any) -> str:
        """The caller's verified identity (listings: calls about no one model)."""
        from fabric.endpoint.policy import identify

        return identify(self.site, auth)

    def authorize(self, auth: Any, model: str, tokens: int = 0, *, count: bool = True,
                  version: str | None = None) -> str:
        """The caller's identity if the site's policy lets it use ``model`` (else a typed
        denial); ``tokens`` is the most the call may consume (quota admission). ``count=False``
        for a follow-up about an admitted request (poll, cancel, status): identity and model
        rule checked, no request counted against the quotas. ``version``: the one the call
        pins (one the site does not have is not counted either)."""
        from fabric.endpoint.policy import authorize

        # A model (or version) the site does not serve is refused next (UnknownModel): its
        # call is checked but not counted, so no caller fills the usage records with names of
        # its choosing, and ``requests`` counts admitted calls only.
        known = count and self._serves(model, version)
        return str(authorize(self.site, auth, model, self.state_dir, tokens=tokens,
                             count=known))

    def _serves(self, model: str, version: str | None) -> bool:
        from fabric.errors import FabricError

        try:
            self.catalog.get(model, version)
        except FabricError:  # UnknownModel, AmbiguousModelVersion
            return False
        return True

    def authorize_admin(self, auth: Any, operation: str) -> str:
        """The caller's identity if the site's ``policy.admins`` names it (else
        ``AdminOnly``): deploy and undeploy."""
        from fabric.endpoint.policy import authorize_admin

        return authorize_admin(self.site, auth, operation)

    def check_deploy_size(self, plan: Plan) -> None:
        """``DeployLimitExceeded`` unless ``plan`` fits the site's ``limits``."""
        from fabric.endpoint.policy import check_deploy_size

        check_deploy_size(self.site, plan)

    def record_usage(self, identity: str, model: str, tokens: int,
                     request_id: str | None = None, *, prompt_tokens: int = 0,
                     completion_tokens: int = 0) -> None:
        """Add consumed tokens to the caller's usage (nothing for 0); the prompt/completion
        split where known."""
        if tokens:
            from fabric.endpoint.policy import record_usage

            record_usage(self.state_dir, identity, model, tokens, request_id,
                         prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    def check_request_owner(self, identity: str, model: str, request_id: str, ticket: Any,
                            what: str, *, key: bytes | None = None) -> None:
        """Only the identity that started a request polls or cancels it: its ticket (signed
        by this site when the request was admitted) names that identity (``sub``) and the
        request. A bad ticket is ``TicketInvalid``; another caller, even one allowed to use the
        model, gets ``AccessDenied`` (rule ``request-owner``). ``key``: the ticket key, where
        the caller read it once for many requests."""
        from fabric import tickets
        from fabric.errors import AccessDenied

        claims = tickets.authenticate(key or self.ticket_key(), ticket, model=model)
        tickets.check(claims, request_id=request_id)
        if claims.get("sub") != identity:
            raise AccessDenied(
                f"{identity} may not {what} request {request_id}: another identity started it",
                rule="request-owner", identity=identity, request_id=request_id)

    def check_user_function(self, name: str) -> None:
        """``FunctionNotAllowed`` unless the site runs user functions."""
        from fabric.endpoint.policy import check_function

        check_function(self.site, name, user_function=True)


def _stamp(path: Path) -> tuple[int, ...] | None:
    """What changes when ``path`` is rewritten or replaced (None: absent)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


_LOCK = threading.Lock()
_CURRENT: tuple[str, SiteContext] | None = None


def current() -> SiteContext:
    """This worker's context, built on first use (and again if the environment names another
    site, as tests that switch sites in one process do). Building it starts the worker's spare
    user function process where the site runs user functions (``fabric.endpoint.userchild``),
    so that not even the worker's first ``fab.submit`` waits for one to start."""
    global _CURRENT
    key = f"{env.FABRIC_SITE.get() or 'local'}|{env.FABRIC_STATE_DIR.get() or ''}"
    with _LOCK:
        if _CURRENT is None or _CURRENT[0] != key:
            _CURRENT = (key, SiteContext.from_env())
            if _CURRENT[1].site.allow_user_functions:
                from fabric.endpoint.userchild import prestart

                prestart(_CURRENT[1].site)
        return _CURRENT[1]
