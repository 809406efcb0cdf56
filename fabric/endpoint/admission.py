"""Admitting requests at the site: what ``open_stream`` and ``open_streams`` do.

An admission is the only work a request worker does for a request (the hand-off path):

.. code:: text

    admit(request, mode)      policy (counted against the caller's quotas), a ready server
                              (``ensure``: may wait for a cold start), a single-use accounted
                              ticket bound to the request id
        direct  -> info: address, key, ticket        the client submits to the server itself
        poll    -> the request is submitted here, detached (the server buffers its events)
                   and, with ``hold_s``, the task waits a little for its first events
                   (``first_events``) or its result, returned inline

``admit_many`` admits a client's queued requests (one model) in one task: every request gets
its own info or its own typed error (one refused request does not refuse the others), the
poll-mode ones are all submitted before any is waited on, and the hold is one long-poll over
all of them (``fabric.endpoint.relay.poll_many``) that ends once every one has news (its
first events, or its end) or the hold is over; what has not come by then is left to the
client's long-poll.
"""

from __future__ import annotations

import time
from typing import Any

from fabric.endpoint.collector import COLLECTOR
from fabric.endpoint.context import SiteContext
from fabric.endpoint.session import token_estimate
from fabric.errors import FabricError, InvalidRequest

STREAM_SUBMIT_TTL_S = 120.0
"""How long a stream's ticket accepts its one submit: the client submits as soon as
``open_stream`` answers (the margin covers a slow transport, not a replay)."""
MAX_HOLD_S = 5.0
"""Longest ``open_stream`` holds its worker waiting for a result (``hold_s``)."""
STREAM_TICKET_TTL_S = 3600.0
"""Life of a stream's ticket: its polls and cancel, after the submit."""
MAX_BATCH = 64
"""Most requests one ``open_streams`` task may admit."""
MODES = ("direct", "poll")


def admit(ctx: SiteContext, request: dict[str, Any], auth: Any, mode: str,
          clients: dict[str, Any] | None = None,
          ready: dict[tuple[str, str | None], Any] | None = None
          ) -> tuple[dict[str, Any], str, Any]:
    """Admit one request (see the module doc): its info, the caller's identity and the
    deployment. In ``poll`` mode the request is already submitted to the server, over a
    connection kept in ``clients`` (by address; the caller closes them) when given.
    ``ready``: the servers this task has already ensured, by (model, version); one ensure
    (a health ping, a state write) serves all of a batch's requests for a model."""
    from fabric import tickets
    from fabric.protocol import validate_request

    if mode not in MODES:
        raise InvalidRequest(f"mode must be one of {MODES}, got {mode!r}", param="mode")
    req = validate_request(request)
    identity = ctx.authorize(auth, req.model, token_estimate(req), version=req.version)
    dep = None if ready is None else ready.get((req.model, req.version))
    if dep is None:
        dep = ctx.manager.ensure(ctx.entry(req.model, req.version))
        if ready is not None:
            ready[(req.model, req.version)] = dep
    # Bound to exactly this request and spent on its submit (the client submits at once);
    # its life covers the stream's polls and cancel. ``account``: the server counts the
    # tokens it delivers (the client may stream them directly and disconnect at any time)
    # and the site collects them (collect_usage).
    ticket = tickets.issue_for_request(ctx.ticket_key(), req, model=dep.model,
                                       subject=identity, ttl_s=STREAM_TICKET_TTL_S,
                                       submit_ttl_s=STREAM_SUBMIT_TTL_S, account=True)
    info: dict[str, Any] = {
        "request_id": req.request_id, "address": dep.address, "public_key": dep.public_key,
        "ticket": ticket, "deployment_id": dep.id, "model": dep.model,
        "version": dep.version, "sha256": dep.sha256, "cursor": 0, "mode": mode}
    if mode == "poll":
        from fabric.serverclient import ServerClient

        # A ready deployment has both (``ensure`` returns only ready ones). Detached: the
        # server buffers the events for poll_requests after we disconnect.
        if clients is None:
            with ServerClient(str(dep.address), str(dep.public_key)) as client:
                client.submit(req, ticket, stream=False, detach=True)
        else:
            address = str(dep.address)
            if address not in clients:
                clients[address] = ServerClient(address, str(dep.public_key))
            clients[address].submit(req, ticket, stream=False, detach=True)
    return info, identity, dep


def admit_one(ctx: SiteContext, request: dict[str, Any], auth: Any, mode: str,
              hold_s: float, first_events: bool) -> dict[str, Any]:
    """``open_stream``: one admission, held (poll mode) up to ``hold_s``."""
    clients: dict[str, Any] = {}
    try:
        info, _, dep = admit(ctx, request, auth, mode, clients)
        if mode == "poll" and hold_s > 0:
            # Alone: on the connection that submitted it (no second handshake, no lookup).
            _hold_on(clients[str(dep.address)], info, min(hold_s, MAX_HOLD_S), first_events)
    finally:
        for client in clients.values():
            client.close()
    _collect(ctx, [dep])
    return info


def admit_many(ctx: SiteContext, items: list[dict[str, Any]], auth: Any) -> list[dict[str, Any]]:
    """``open_streams``: ``items`` (``{request, mode, hold_s, first_events}``) admitted in
    order; each answer is ``{"info": ...}`` or ``{"error": <typed error>}``."""
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
        raise InvalidRequest(f"open_streams takes a list of 1 to {MAX_BATCH} admissions",
                             param="items")
    out: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    identity, deps = "", []
    hold_s, first_events = 0.0, False
    clients: dict[str, Any] = {}  # one connection per server for every submit
    ready: dict[tuple[str, str | None], Any] = {}
    try:
        for item in items:
            info, who, dep, mode = _admit_item(ctx, item, auth, clients, ready, out)
            if info is None:
                continue
            identity = who
            deps.append(dep)
            if mode == "poll" and float(item.get("hold_s") or 0) > 0:
                held.append(info)
                hold_s = max(hold_s, float(item["hold_s"]))
                first_events = first_events or bool(item.get("first_events"))
    finally:
        for client in clients.values():
            client.close()
    if held:
        _hold(ctx, identity, held, hold_s, first_events)
    _collect(ctx, deps)
    return out


def _admit_item(ctx: SiteContext, item: Any, auth: Any, clients: dict[str, Any],
                ready: dict[tuple[str, str | None], Any], out: list[dict[str, Any]]
                ) -> tuple[dict[str, Any] | None, str, Any, str]:
    """Admit one entry of ``open_streams`` and append its answer to ``out``: (info,
    identity, deployment, mode), info None when it was refused."""
    from fabric.endpoint.registry import note_refusal

    try:
        if not isinstance(item, dict) or not isinstance(item.get("request"), dict):
            raise InvalidRequest("an admission is {request: {...}, mode, hold_s, "
                                 "first_events}", param="items")
        mode = str(item.get("mode", "direct"))
        info, identity, dep = admit(ctx, item["request"], auth, mode, clients, ready)
    except FabricError as err:
        request = item.get("request") if isinstance(item, dict) else None
        note_refusal(str(request.get("model") or "") if isinstance(request, dict) else "", err)
        out.append({"error": err.to_dict()})
        return None, "", None, ""
    out.append({"info": info})
    return info, identity, dep, mode


def _hold(ctx: SiteContext, identity: str, infos: list[dict[str, Any]], hold_s: float,
          first_events: bool) -> None:
    """Wait up to ``hold_s`` for the first events (``first_events``) or the result of the
    admitted poll-mode requests ``infos``, and put what came into each info: ``events`` and
    ``cursor``, and ``done``/``result``/``error`` for one that ended."""
    from fabric.endpoint.relay import poll_many

    deadline = time.monotonic() + min(hold_s, MAX_HOLD_S)
    waiting = list(infos)
    # Until every one has news (as each would alone: a stream's first token then never costs
    # a poll's round trip more because another request of the batch came first) or the time
    # is up; each request is asked again from the cursor its last answer reached.
    while waiting and (left := deadline - time.monotonic()) > 0:
        polls = [{"model": i["model"], "request_id": i["request_id"], "ticket": i["ticket"],
                  "cursor": int(i.get("cursor") or 0), "events": first_events}
                 for i in waiting]
        replies = poll_many(ctx, identity, polls, left, None, linger_s=0.0)["replies"]
        for info in waiting:
            got = replies.get(info["request_id"])
            if got is not None:
                info["cursor"] = int(got.get("cursor") or 0)
                info["events"] = [*info.get("events", []), *(got.get("events") or [])]
                if got.get("done"):
                    info.update(done=True, result=got.get("result"), error=got.get("error"))
        waiting = [i for i in waiting if not (i.get("events") or i.get("done"))]


def _hold_on(client: Any, info: dict[str, Any], hold_s: float, first_events: bool) -> None:
    """``_hold`` for one request, polling on ``client``."""
    deadline = time.monotonic() + hold_s
    rid, ticket = info["request_id"], info["ticket"]
    events: list[dict[str, Any]] = []
    while (left := deadline - time.monotonic()) > 0:
        reply = client.poll(rid, ticket, int(info["cursor"]), left, final=not first_events)
        info["cursor"] = int(reply.get("cursor", info["cursor"]))
        if first_events:
            events.extend(reply.get("events") or [])
        if reply.get("done"):
            info.update(done=True, result=reply.get("result"), error=reply.get("error"))
            break
        if events:
            break
    info["events"] = events


def _collect(ctx: SiteContext, deps: list[Any]) -> None:
    # Tokens are recorded from the server's own tally of each accounted ticket (however the
    # client reads them: direct, long-poll or held here), never from a result passing by;
    # after the task answers, not before (fabric.endpoint.collector).
    COLLECTOR.soon(ctx.manager, deps)
