"""``tickets.authenticate``: expiry and model binding, before anything else is read; the
site's ticket key file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fabric import tickets
from fabric.errors import TicketInvalid

KEY = b"t" * 32


def test_expired_ticket_is_refused() -> None:
    ticket = tickets.issue(KEY, model="m", ttl_s=-1.0)
    with pytest.raises(TicketInvalid, match="expired"):
        tickets.authenticate(KEY, ticket, model="m")
    live = tickets.issue(KEY, model="m", ttl_s=60.0)
    assert tickets.authenticate(KEY, live, model="m")["model"] == "m"


def test_ticket_for_one_model_is_refused_for_another() -> None:
    ticket = tickets.issue(KEY, model="model-a")
    assert tickets.authenticate(KEY, ticket, model="model-a")["model"] == "model-a"
    with pytest.raises(TicketInvalid, match="model-a"):
        tickets.authenticate(KEY, ticket, model="model-b")
    with pytest.raises(TicketInvalid):
        tickets.verify(KEY, ticket, model="model-b", request_id="r1")


def test_ticket_key_file_is_made_0600_once(tmp_path: Path) -> None:
    """Anyone who reads the key can issue tickets: its file is the owner's alone, whatever
    the umask, and later calls read the same key."""
    path = tmp_path / "state" / "ticket.key"
    old = os.umask(0)
    try:
        key = tickets.load_or_create_key(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) == 32 and tickets.load_or_create_key(path) == key
    assert tickets.load_or_create_key(tmp_path / "other.key") != key
