"""API keys an operator issues for the gateway (``fabric keys create|list|revoke``).

Keys are stored hashed (SHA-256 of the whole key: a key is 256 random bits, so a slow hash
adds nothing) in ``<gateway home>/keys.json``, mode 0600, written atomically under an exclusive
lock. The server re-reads the file when it changes, so a revoked key stops working at once,
without a restart. The key itself is shown once, at creation, and never stored.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric import env
from fabric.errors import InvalidRequest

__all__ = ["KEY_PREFIX", "ApiKey", "KeyStore", "default_home"]

KEY_PREFIX = "fab-"
"""Every gateway key starts with this (so a Globus token is never mistaken for one)."""
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")


def default_home() -> Path:
    """``$FABRIC_HOME/gateway`` (``FABRIC_HOME`` defaults to ``~/.fabric``)."""
    return env.fabric_home() / "gateway"


@dataclass(frozen=True)
class ApiKey:
    """One issued key (without the secret): who it is for and whether it still works."""

    id: str
    name: str
    sha256: str
    created: float
    revoked: float | None = None

    def public(self) -> dict[str, Any]:
        """What ``fabric keys list`` shows (never the hash)."""
        return {"id": self.id, "name": self.name, "created": self.created,
                "revoked": self.revoked}


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The gateway's key file."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.path = self.home / "keys.json"
        self._seen: tuple[float, int] | None = None
        self._by_hash: dict[str, ApiKey] = {}

    # -- operator commands ------------------------------------------------------------------

    def create(self, name: str) -> tuple[str, ApiKey]:
        """Issue a key for identity ``name``; returns ``(the key, its record)``."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InvalidRequest(f"key name must be 1-100 letters, digits or ._@- starting with "
                                 f"a letter or digit, got {name!r}", param="name")
        key_id = secrets.token_hex(4)
        key = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
        record = ApiKey(id=key_id, name=name, sha256=_digest(key), created=round(time.time(), 3))
        with self._locked() as keys:
            keys.append(record)
        return key, record

    def all(self) -> list[ApiKey]:
        """Every key ever issued, revoked ones included."""
        return self._read()

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke the key with id ``key_id`` (or every key of the name ``key_id``)."""
        revoked: list[ApiKey] = []
        with self._locked() as keys:
            for i, k in enumerate(keys):
                if k.revoked is None and key_id in (k.id, k.name):
                    keys[i] = ApiKey(k.id, k.name, k.sha256, k.created, round(time.time(), 3))
                    revoked.append(keys[i])
        if not revoked:
            raise InvalidRequest(f"no active key with id or name {key_id!r} (see `fabric keys "
                                 "list`)", param="key_id")
        return revoked[0]

    # -- the server ---------------------------------------------------------------------------

    def active(self) -> int:
        """How many keys still work."""
        return sum(1 for k in self._read() if k.revoked is None)

    def verify(self, key: str) -> ApiKey | None:
        """The active record of ``key``, or None (unknown, revoked, malformed)."""
        if not key.startswith(KEY_PREFIX):
            return None
        self._refresh()
        record = self._by_hash.get(_digest(key))
        if record is None or record.revoked is not None:
            return None
        # The lookup is by hash already; compare again in constant time for good measure.
        return record if hmac.compare_digest(record.sha256, _digest(key)) else None

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
            seen: tuple[float, int] | None = (st.st_mtime, st.st_size)
        except FileNotFoundError:
            seen = None
        if seen != self._seen or seen is None:
            self._by_hash = {k.sha256: k for k in self._read()}
            self._seen = seen

    # -- file ---------------------------------------------------------------------------------

    def _read(self) -> list[ApiKey]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"the gateway key file {self.path} is unreadable: {exc}") from None
        return [ApiKey(**k) for k in data.get("keys", [])]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[ApiKey]]:
        """The key list, written back (atomically, 0600) when the block ends without error."""
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        with (self.home / "keys.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keys = self._read()
            yield keys
            tmp = self.path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump({"keys": [k.__dict__ for k in keys]}, out, indent=1)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
