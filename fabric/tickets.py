"""Short-lived HMAC tickets: the endpoint authorises, the model server verifies.

The endpoint (which knows who the caller is and what the site's policy allows) signs a ticket
for one request id and model; the model server, which shares the site's ticket key but never
sees Globus identities, serves only requests that carry a valid, unexpired ticket.

A ticket may also be bound to what it authorises: the request kind (``op``), the most new
tokens (``max_tokens``), the most prompt + new tokens (``token_limit``), the exact request
(``digest``: ``protocol.request_digest``), a submit deadline shorter than its life
(``submit_ttl_s``: polls and cancels of its request may go on until ``ttl_s``), and single use
(``single_use``: one accepted submit; the server remembers used ticket ids until they expire).

The server checks in two steps so an unauthenticated peer costs one HMAC and learns nothing:
``authenticate`` (signature, expiry, model) before it reads anything else of a message, then
``check`` / ``check_request`` / ``check_tokens`` once the message is parsed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.errors import Overloaded, TicketInvalid

if TYPE_CHECKING:
    from fabric.protocol import InferenceRequest

ANY_REQUEST = "*"
MAX_TICKET_CHARS = 8192
"""Longer strings are refused before any decoding."""


def load_or_create_key(path: Path) -> bytes:
    """The site's ticket key, created (mode 0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path.read_bytes()


def issue(key: bytes, *, model: str, request_id: str = ANY_REQUEST, subject: str = "",
          ttl_s: float = 300.0, admin: bool = False, op: str | None = None,
          max_tokens: int | None = None, token_limit: int | None = None,
          digest: str | None = None, single_use: bool = False,
          submit_ttl_s: float | None = None, account: bool = False) -> str:
    """A ticket for ``request_id`` (or any request) on ``model``, valid for ``ttl_s`` seconds.

    The optional bindings (``None``/``False``: unbound, as before) narrow what it authorises:
    ``op`` the request kind ("generate", "embed", "hidden_states", "logprobs"), ``max_tokens``
    the most new tokens, ``token_limit`` the most prompt + new tokens, ``digest`` exactly one
    request (``protocol.request_digest``), ``single_use`` one accepted submit, ``submit_ttl_s``
    how long a submit is accepted (polls and cancels go on until ``ttl_s``); ``account`` has
    the server count the tokens it delivers for the request and hand them to the site
    (``fabric.engine.usage_ledger``), for requests whose client the site does not see."""
    now = time.time()
    body: dict[str, Any] = {"rid": request_id, "model": model, "sub": subject,
                            "exp": now + ttl_s, "adm": admin, "jti": secrets.token_hex(12)}
    bound = {"op": op, "mxt": max_tokens, "tkl": token_limit, "dig": digest,
             "one": single_use or None, "acc": account or None,
             "sbx": None if submit_ttl_s is None else now + submit_ttl_s}
    body.update({k: v for k, v in bound.items() if v is not None})
    raw = base64.urlsafe_b64encode(json.dumps(body, sort_keys=True).encode()).decode()
    return f"{raw}.{_sign(key, raw)}"


def issue_for_request(key: bytes, request: InferenceRequest, *, model: str, subject: str,
                      ttl_s: float, submit_ttl_s: float | None = None,
                      account: bool = False) -> str:
    """A single-use ticket for exactly ``request``: its id, kind, ``max_tokens`` and digest.

    The server recomputes the digest on the request it receives, so the submitter must send
    this very request (``validate_request`` of its JSON dump is the same request)."""
    from fabric.protocol import request_digest

    return issue(key, model=model, request_id=request.request_id, subject=subject,
                 ttl_s=ttl_s, op=request.kind, max_tokens=request.sampling.max_tokens,
                 digest=request_digest(request), single_use=True, submit_ttl_s=submit_ttl_s,
                 account=account)


def authenticate(key: bytes, ticket: object, *, model: str) -> dict[str, Any]:
    """The claims of a genuine, unexpired ticket for ``model``; else ``TicketInvalid``.

    Safe on any input (wrong type, non-ASCII, garbage): it never raises anything else."""
    if not isinstance(ticket, str) or "." not in ticket:
        raise TicketInvalid("request has no ticket; get one from the site endpoint")
    if len(ticket) > MAX_TICKET_CHARS or not ticket.isascii():
        raise TicketInvalid("ticket is malformed (not a ticket issued by this site)")
    raw, sig = ticket.rsplit(".", 1)
    if not hmac.compare_digest(sig, _sign(key, raw)):
        raise TicketInvalid("ticket signature is invalid")
    try:
        claims = json.loads(base64.urlsafe_b64decode(raw.encode()))
        expires = float(claims["exp"])
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise TicketInvalid("ticket is malformed (not a ticket issued by this site)") from None
    if not isinstance(claims, dict):
        raise TicketInvalid("ticket is malformed (not a ticket issued by this site)")
    if expires < time.time():
        raise TicketInvalid("ticket has expired; request a new one")
    if claims.get("model") != model:
        raise TicketInvalid(f"ticket is for model {claims.get('model')!r}, not {model!r}")
    return claims


def check(claims: dict[str, Any], *, request_id: str, admin: bool = False) -> None:
    """Refuse (``TicketInvalid``) unless the ticket covers request ``request_id`` (and is an
    operator ticket when ``admin``)."""
    if claims.get("rid") not in (ANY_REQUEST, request_id):
        raise TicketInvalid("ticket is for another request", mismatch="request_id")
    if admin and not claims.get("adm"):
        raise TicketInvalid("operation needs an operator ticket", mismatch="admin")


def check_request(claims: dict[str, Any], *, kind: str, max_tokens: int,
                  digest: str) -> None:
    """Refuse a submit whose request is not what the ticket was issued for (kind, new
    tokens, exact content) or whose submit deadline has passed."""
    deadline = claims.get("sbx")
    if deadline is not None and float(deadline) < time.time():
        raise TicketInvalid("ticket's time to submit has passed; request a new one",
                            mismatch="submit_ttl_s")
    if claims.get("op") not in (None, kind):
        raise TicketInvalid(f"ticket is for {claims['op']!r} requests, not {kind!r}",
                            mismatch="op")
    limit = claims.get("mxt")
    if limit is not None and max_tokens > int(limit):
        raise TicketInvalid(f"ticket allows max_tokens <= {limit}; the request asks "
                            f"{max_tokens}", mismatch="max_tokens")
    if claims.get("dig") not in (None, digest):
        raise TicketInvalid("ticket was issued for another request body (prompt, sampling "
                            "or hooks differ)", mismatch="digest")


def check_tokens(claims: dict[str, Any], tokens: int) -> None:
    """Refuse a request needing ``tokens`` prompt + new tokens beyond the ticket's limit."""
    limit = claims.get("tkl")
    if limit is not None and tokens > int(limit):
        raise TicketInvalid(f"ticket allows {limit} prompt + new tokens; the request needs "
                            f"{tokens}", mismatch="token_limit")


def verify(key: bytes, ticket: object, *, model: str, request_id: str,
           admin: bool = False) -> dict[str, object]:
    """The ticket's claims if it is genuine, unexpired and covers this request; else raise."""
    claims = authenticate(key, ticket, model=model)
    check(claims, request_id=request_id, admin=admin)
    return claims


class UsedTickets:
    """Ids of single-use tickets already spent, each kept until its ticket expires.

    Memory is bounded: at ``capacity`` live entries new single-use submits are refused with
    ``Overloaded`` (retry later) rather than forgetting an id that could then be replayed."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._expires: dict[str, float] = {}

    def check(self, claims: dict[str, Any]) -> None:
        """Refuse a single-use ticket that was used already (or with no room to remember)."""
        if not claims.get("one"):
            return
        jti = claims.get("jti")
        if not isinstance(jti, str):
            raise TicketInvalid("single-use ticket has no id", mismatch="single_use")
        if jti in self._expires:
            raise TicketInvalid("ticket was already used (it is single-use); request a new one",
                                mismatch="single_use")
        if len(self._expires) >= self.capacity:
            self.prune()
        if len(self._expires) >= self.capacity:
            raise Overloaded("model server remembers too many used tickets; retry shortly",
                             retry_after=5.0, reason="tickets")

    def spend(self, claims: dict[str, Any]) -> None:
        """Remember a single-use ticket's id until it expires (after ``check`` passed)."""
        if claims.get("one") and isinstance(claims.get("jti"), str):
            self._expires[claims["jti"]] = float(claims["exp"])

    def prune(self) -> None:
        """Forget ids whose tickets have expired (they cannot be replayed any more)."""
        now = time.time()
        for jti in [j for j, exp in self._expires.items() if exp < now]:
            del self._expires[jti]

    def __len__(self) -> int:
        return len(self._expires)


def _sign(key: bytes, raw: str) -> str:
    return hmac.new(key, raw.encode(), hashlib.sha256).hexdigest()
