"""``tickets.authenticate``: expiry and model binding, before anything else is read."""

from __future__ import annotations

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
