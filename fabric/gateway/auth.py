"""Who is calling the gateway, and how fast they may call it.

``Authenticator.identify`` turns an ``Authorization: Bearer ...`` header into an ``Identity``:

* a gateway API key (``fab-...``, see ``fabric.gateway.keys``): the key's name is the identity
  and the gateway's own login reaches the site;
* otherwise a Globus access token for the site's fabric scope, introspected exactly as the site
  does it (``fabric.endpoint.policy.verify_identity``); the token is then passed on to the site
  with every call, so the site's own policy (rules, quotas, usage) applies to that identity.

On a loopback bind without ``require_auth`` anyone on this machine may call it (the embedded
site is theirs anyway); a valid key still names the caller there, for rate limiting.

``RateLimiter`` is a token bucket per identity: ``rate`` requests per second on average, up to
``burst`` at once; an empty bucket is a ``QuotaExceeded`` whose ``retry_after`` says when the
next token arrives (the client gets 429 and ``Retry-After``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fabric.errors import AccessDenied, AuthError, QuotaExceeded
from fabric.gateway.keys import KEY_PREFIX, KeyStore

if TYPE_CHECKING:
    from fabric.sitepolicy import PolicyConfig

__all__ = ["LOCAL", "Authenticator", "Identity", "RateLimiter"]


@dataclass(frozen=True)
class Identity:
    """A caller: ``name`` keys rate limits and files; ``auth`` goes to the site with each call
    (``None``: the gateway's own credentials)."""

    name: str
    kind: str  # "local", "key" or "globus"
    auth: dict[str, Any] | None = field(default=None, compare=False, repr=False)


LOCAL = Identity("local", "local")
"""The caller on a loopback bind without authentication."""


class Authenticator:
    """Checks bearer credentials against the key file and (if the site has one) its policy."""

    def __init__(self, *, require: bool, keys: KeyStore, policy: PolicyConfig | None = None,
                 site: str = "local") -> None:
        self.require = require
        self.keys = keys
        self.policy = policy
        self.site = site

    def identify(self, authorization: str | None) -> Identity:
        """The caller behind an ``Authorization`` header value, or ``AuthError`` (401)."""
        token = _bearer(authorization)
        if not self.require:
            # OpenAI clients always send some key ("EMPTY", "unused"): only a real one counts.
            record = self.keys.verify(token) if token else None
            return Identity(record.name, "key") if record else LOCAL
        if not token:
            raise AuthError("this gateway needs an API key: send `Authorization: Bearer "
                            "<key>` (an operator issues keys with `fabric keys create`)")
        if token.startswith(KEY_PREFIX):
            record = self.keys.verify(token)
            if record is None:
                raise AuthError("the API key is not valid (unknown or revoked)")
            return Identity(record.name, "key")
        return self._globus(token)

    def _globus(self, token: str) -> Identity:
        if self.policy is None:
            raise AuthError("the API key is not valid (not a gateway key, and this site has no "
                            "Globus policy to check a Globus token against)")
        from fabric.endpoint.policy import verify_identity

        try:
            caller = verify_identity(self.policy, {"token": token})
        except AccessDenied as exc:  # inactive, expired, wrong audience: not authenticated
            raise AuthError(exc.message, rule=exc.details.get("rule")) from None
        return Identity(caller.identity, "globus",
                        {"scheme": "globus", "token": token, "site": self.site})


def _bearer(value: str | None) -> str:
    if not value:
        return ""
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class RateLimiter:
    """Token buckets, one per identity name (``rate`` <= 0 turns limiting off)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, identity: str) -> None:
        """Spend one request of ``identity``'s budget or raise ``QuotaExceeded``."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(identity, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[identity] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise QuotaExceeded(
                    f"{identity} is over the gateway's rate limit of {self.rate:g} requests/s "
                    f"(bursts of {self.burst}); retry in {wait:.1f} s",
                    rule="gateway.rate", retry_after=round(wait, 3))
            self._buckets[identity] = (tokens - 1.0, now)
