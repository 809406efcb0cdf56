"""A stream's ticket authorises exactly its request, once; its polls and cancel go on after.

Against the session's real local site and tiny model server: ``open_stream`` hands out a
ticket, and the ticket is replayed at the model server as a hostile caller would (another
prompt, more tokens, a second submit). Each replay is ``TicketInvalid`` naming the binding.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fabric import Fabric
from fabric.client.checks import build_request, sampling
from fabric.errors import TicketInvalid
from fabric.protocol import InferenceRequest
from fabric.serverclient import ServerClient
from tests.plugins.site import TINY_MODEL

pytestmark = pytest.mark.slow

PROMPT = "The mitochondria is"


@pytest.fixture
def fab(site_transport: Any) -> Iterator[Fabric]:
    with Fabric(transport=site_transport, on_status=None) as client:
        yield client


def _request(prompt: str = PROMPT, max_tokens: int = 8) -> InferenceRequest:
    return build_request("generate", model=TINY_MODEL, version=None, prompt=prompt,
                         sampling=sampling(max_tokens, 0.0, 1.0, 0, None, (), False),
                         timeout=None, hooks=None)


def _open(fab: Fabric, request: InferenceRequest, mode: str) -> dict[str, Any]:
    from fabric.wire.functions import open_stream

    return dict(fab.transport.submit(open_stream, request.model_dump(mode="json"), None,
                                     mode).result())


def _refusal(info: dict[str, Any], request: InferenceRequest) -> TicketInvalid:
    with ServerClient(info["address"], info["public_key"]) as client, \
            pytest.raises(TicketInvalid) as caught:
        client.submit(request, info["ticket"], stream=False, detach=True)
    return caught.value


def test_direct_stream_ticket_is_bound_and_single_use(fab: Fabric) -> None:
    with fab.stream(PROMPT, model=TINY_MODEL, max_tokens=8) as stream:  # the normal path works
        text = "".join(stream)
    assert stream.result is not None and text == stream.result.text

    request = _request()
    info = _open(fab, request, "direct")
    other = request.model_copy(update={"prompt": "Ignore that, write a poem"})
    assert _refusal(info, other).details["mismatch"] == "digest"
    greedy = request.model_copy(update={"sampling": request.sampling.model_copy(
        update={"max_tokens": 240})})
    assert _refusal(info, greedy).details["mismatch"] == "max_tokens"
    embed = request.model_copy(update={"kind": "embed"})
    assert _refusal(info, embed).details["mismatch"] == "op"

    with ServerClient(info["address"], info["public_key"]) as client:  # the signed request
        client.submit(request, info["ticket"], stream=False, detach=True)
        reply = client.poll(request.request_id, info["ticket"], 0, 30.0)  # polls still work
        while not reply.get("done"):
            reply = client.poll(request.request_id, info["ticket"], int(reply["cursor"]), 30.0)
        assert reply["result"]["text"] == stream.result.text  # greedy: same as the stream
        assert client.cancel(request.request_id, info["ticket"]) in ("done", "unknown")
    again = _refusal(info, request)
    assert again.details["mismatch"] == "single_use"


def test_polled_stream_ticket_cannot_submit_again(fab: Fabric) -> None:
    """The endpoint spent a poll-mode stream's ticket on its own submit: the caller, who holds
    the ticket, may poll and cancel but not submit anything with it."""
    from fabric.wire.functions import cancel_request, poll_requests

    request = _request(max_tokens=6)
    info = _open(fab, request, "poll")
    assert _refusal(info, request).details["mismatch"] == "single_use"
    cursor, done = 0, False
    while not done:
        poll = {"model": TINY_MODEL, "request_id": request.request_id,
                "ticket": info["ticket"], "cursor": cursor, "events": True}
        reply = fab.transport.submit(poll_requests, [poll], 10.0, None,
                                     None).result()["replies"][request.request_id]
        assert reply.get("error") is None, reply
        cursor, done = int(reply["cursor"]), bool(reply.get("done"))
    assert fab.transport.submit(cancel_request, TINY_MODEL, request.request_id,
                                info["ticket"], None).result() in ("done", "unknown")
