"""Short-lived HMAC tickets: the endpoint authorises, the model server verifies.

The endpoint (which knows who the caller is and what the site's policy allows) signs a ticket
for one request id and model; the model server, which shares the site's ticket key but never
sees Globus identities, serves only requests that carry a valid, unexpired ticket.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

from fabric.errors import TicketInvalid

ANY_REQUEST = "*"


def load_or_create_key(path: Path) -> bytes:
    """The site's ticket key, created (mode 0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path.read_bytes()


def issue(key: bytes, *, model: str, request_id: str = ANY_REQUEST, subject: str = "",
          ttl_s: float = 300.0, admin: bool = False) -> str:
    """A ticket for ``request_id`` (or any request) on ``model``, valid for ``ttl_s`` seconds."""
    body = {"rid": request_id, "model": model, "sub": subject, "exp": time.time() + ttl_s,
            "adm": admin}
    raw = base64.urlsafe_b64encode(json.dumps(body, sort_keys=True).encode()).decode()
    return f"{raw}.{_sign(key, raw)}"


def verify(key: bytes, ticket: object, *, model: str, request_id: str,
           admin: bool = False) -> dict[str, object]:
    """The ticket's claims if it is genuine, unexpired and covers this request; else raise."""
    if not isinstance(ticket, str) or "." not in ticket:
        raise TicketInvalid("request has no ticket; get one from the site endpoint")
    raw, sig = ticket.rsplit(".", 1)
    if not hmac.compare_digest(sig, _sign(key, raw)):
        raise TicketInvalid("ticket signature is invalid")
    claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(raw.encode()))
    if float(claims["exp"]) < time.time():  # type: ignore[arg-type]
        raise TicketInvalid("ticket has expired; request a new one")
    if claims["model"] != model:
        raise TicketInvalid(f"ticket is for model {claims['model']!r}, not {model!r}")
    if claims["rid"] not in (ANY_REQUEST, request_id):
        raise TicketInvalid("ticket is for another request")
    if admin and not claims.get("adm"):
        raise TicketInvalid("operation needs an operator ticket")
    return claims


def _sign(key: bytes, raw: str) -> str:
    return hmac.new(key, raw.encode(), hashlib.sha256).hexdigest()
