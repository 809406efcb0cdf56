"""A user function's capability: what its handle may ask of the site, and nothing more.

The request worker mints one per ``fab.submit`` after the caller was authorized: bound to the
caller's identity, one model (and version), limits (``max_requests``, ``max_tokens``) and an
expiry. The user function's process holds only the token (an opaque string) and sends it with
every request; the worker checks it, and the counts it keeps, on every call
(``CapabilityGuard.admit``). The token is signed with a key made for this one function run,
held only by the worker: it is no site secret, and a token is worthless outside its run.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass

from fabric.errors import CapabilityDenied

MAX_TOKEN_CHARS = 4096
"""Longer strings are refused before any decoding."""


@dataclass(frozen=True)
class Capability:
    """What one user function run may do."""

    id: str
    identity: str
    model: str | None
    version: str | None
    max_requests: int
    max_tokens: int
    expires: float
    """Unix time after which nothing is served."""


class CapabilityGuard:
    """Mints one run's capability and checks every request made with it (thread-safe)."""

    def __init__(self, *, identity: str, model: str | None, version: str | None,
                 max_requests: int, max_tokens: int, ttl_s: float) -> None:
        self._key = secrets.token_bytes(32)
        self.capability = Capability(
            id=secrets.token_hex(8), identity=identity, model=model, version=version,
            max_requests=int(max_requests), max_tokens=int(max_tokens),
            expires=time.time() + float(ttl_s))
        self.requests = 0
        """Requests admitted so far."""
        self.tokens = 0
        """Tokens charged so far (admission estimates, replaced by the real counts)."""
        self._lock = threading.Lock()

    def token(self) -> str:
        """The signed token the user function's process holds."""
        cap = self.capability
        body = json.dumps({"id": cap.id, "sub": cap.identity, "model": cap.model,
                           "ver": cap.version, "mxr": cap.max_requests,
                           "mxt": cap.max_tokens, "exp": cap.expires}, sort_keys=True)
        raw = base64.urlsafe_b64encode(body.encode()).decode()
        return f"{raw}.{self._sign(raw)}"

    def _sign(self, raw: str) -> str:
        return hmac.new(self._key, raw.encode(), hashlib.sha256).hexdigest()

    def verify(self, token: object) -> Capability:
        """This run's capability if ``token`` is its genuine, unexpired token."""
        if (not isinstance(token, str) or "." not in token or len(token) > MAX_TOKEN_CHARS
                or not token.isascii()):
            raise CapabilityDenied("request carries no valid capability",
                                   rule="capability.invalid")
        raw, sig = token.rsplit(".", 1)
        if not hmac.compare_digest(sig, self._sign(raw)):
            raise CapabilityDenied("capability signature is invalid (not this run's)",
                                   rule="capability.invalid")
        cap = self.capability
        if time.time() > cap.expires:
            raise CapabilityDenied(
                f"the user function's capability expired at {cap.expires:.0f} (the site's "
                "user_functions.timeout_s)", rule="capability.expired", expires=cap.expires)
        return cap

    def admit(self, token: object, *, model: object, version: object, requests: int,
              tokens: int) -> Capability:
        """Check ``requests`` new requests to ``model`` needing at most ``tokens`` against
        the capability and its counts, and charge them; a typed denial otherwise."""
        cap = self.verify(token)
        if model != cap.model or (version is not None and version != cap.version):
            raise CapabilityDenied(
                f"this user function may use model {cap.model!r} (version {cap.version!r}) "
                f"only, not {model!r} (version {version!r}): submit another function for it",
                rule="capability.model", model=cap.model, asked=str(model))
        with self._lock:
            if self.requests + requests > cap.max_requests:
                raise CapabilityDenied(
                    f"the user function used {self.requests} of its {cap.max_requests} "
                    f"requests (the site's user_functions.max_requests)",
                    rule="capability.requests", limit=cap.max_requests, used=self.requests)
            if self.tokens + tokens > cap.max_tokens:
                raise CapabilityDenied(
                    f"the user function used {self.tokens} of its {cap.max_tokens} tokens; "
                    f"this call may use {tokens} more (the site's user_functions.max_tokens)",
                    rule="capability.tokens", limit=cap.max_tokens, used=self.tokens)
            self.requests += requests
            self.tokens += tokens
        return cap

    def settle(self, estimated: int, used: int) -> None:
        """Replace an admitted call's estimate by what it really used."""
        with self._lock:
            self.tokens += int(used) - int(estimated)
