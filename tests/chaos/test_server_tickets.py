"""Tickets bound to what they authorise: a replayed or stretched ticket is refused."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fabric import tickets
from fabric.errors import Overloaded, TicketInvalid
from fabric.protocol import InferenceRequest, request_digest
from tests.plugins.servers import ServerHandle

KEY = b"k" * 32


def _bound(req: InferenceRequest, **extra: Any) -> str:
    return tickets.issue(KEY, model=req.model, request_id=req.request_id, op=req.kind,
                         max_tokens=req.sampling.max_tokens, digest=request_digest(req),
                         single_use=True, **extra)


def test_unbound_tickets_keep_working() -> None:
    claims = tickets.verify(KEY, tickets.issue(KEY, model="m"), model="m", request_id="r1")
    tickets.check_request(claims, kind="embed", max_tokens=10**6, digest="x")
    tickets.check_tokens(claims, 10**9)
    tickets.UsedTickets().check(claims)


@pytest.mark.parametrize("change", [{"prompt": "another prompt"},
                                    {"sampling": {"max_tokens": 300}},
                                    {"kind": "hidden_states"}])
def test_bound_ticket_refuses_another_request(change: dict[str, Any]) -> None:
    req = InferenceRequest(model="m", prompt="hi", sampling={"max_tokens": 10})
    claims = tickets.authenticate(KEY, _bound(req), model="m")
    tickets.check_request(claims, kind=req.kind, max_tokens=10, digest=request_digest(req))
    other = req.model_copy(update={k: (InferenceRequest(model="m", prompt="x", sampling=v)
                                       .sampling if k == "sampling" else v)
                                   for k, v in change.items()})
    with pytest.raises(TicketInvalid) as info:
        tickets.check_request(claims, kind=other.kind, max_tokens=other.sampling.max_tokens,
                              digest=request_digest(other))
    assert info.value.details["mismatch"] in ("digest", "max_tokens", "op")


def test_token_limit_submit_deadline_and_garbage() -> None:
    claims = tickets.authenticate(KEY, tickets.issue(KEY, model="m", token_limit=50,
                                                     submit_ttl_s=-1), model="m")
    with pytest.raises(TicketInvalid, match="prompt \\+ new tokens"):
        tickets.check_tokens(claims, 51)
    with pytest.raises(TicketInvalid, match="time to submit"):
        tickets.check_request(claims, kind="generate", max_tokens=1, digest="d")
    for junk in (None, 7, "", ".", "a.é", "x" * 10_000 + ".y", "!!!." + "0" * 64, b"a.b"):
        with pytest.raises(TicketInvalid):
            tickets.authenticate(KEY, junk, model="m")


def test_used_tickets_are_remembered_until_expiry_within_bounds() -> None:
    used = tickets.UsedTickets(capacity=2)
    live = [tickets.authenticate(KEY, tickets.issue(KEY, model="m", single_use=True),
                                 model="m") for _ in range(3)]
    for claims in live[:2]:
        used.check(claims)
        used.spend(claims)
    with pytest.raises(TicketInvalid, match="already used"):
        used.check(live[0])
    with pytest.raises(Overloaded, match="too many used tickets") as full:
        used.check(live[2])
    assert full.value.retryable and full.value.details["retry_after"] == 5.0
    for claims in live[:2]:
        used._expires[claims["jti"]] = time.time() - 1  # as if they had expired
    used.check(live[2])
    assert len(used) == 0


@pytest.fixture(scope="module")
def server(model_server: Any, tiny_llama_dir: Path) -> ServerHandle:
    return model_server(tiny_llama_dir, name="tiny_llama", max_running=4)


def test_streaming_ticket_replay_is_refused(server: ServerHandle) -> None:
    """The ticket of a streamed request cannot start it again, with another prompt, or with
    max_tokens raised; polling its own request with it still works."""
    req = server.request(prompt="The cell", sampling={"max_tokens": 4})
    ticket = tickets.issue(server.key, model=server.name, request_id=req.request_id,
                           op="generate", max_tokens=4, digest=request_digest(req),
                           single_use=True, ttl_s=60, submit_ttl_s=10)
    client = server.client()
    client.submit(req, ticket, stream=True)
    assert list(client.events(req.request_id, 60))[-1]["op"] == "done"
    replays = [req, req.model_copy(update={"prompt": "Something else entirely"}),
               req.model_copy(update={"sampling": req.sampling.model_copy(
                   update={"max_tokens": 120})})]
    for again, mismatch in zip(replays, ("single_use", "digest", "max_tokens"), strict=True):
        with pytest.raises(TicketInvalid) as info:
            client.submit(again, ticket, stream=True)
        assert info.value.details["mismatch"] == mismatch, info.value
    fresh = server.request(prompt="The cell", sampling={"max_tokens": 4})
    with pytest.raises(TicketInvalid, match="another request"):
        client.submit(fresh, ticket)
