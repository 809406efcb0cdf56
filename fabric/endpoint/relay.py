"""One long-poll for all of a client's open requests: the site side of ``poll_requests``.

A client behind Globus Compute cannot reach the model servers, and every Globus Compute task
costs a web-service submission that the ``Executor`` rate-limits. So the client does not send a
task per stream per poll: it sends one ``poll_requests`` task naming every request it has open
(streams and plain requests handed off by ``open_stream``) plus the models whose cold start it
is waiting on, and this module holds that task at the site until there is news:

.. code:: text

    poll_many(polls, wait_s, statuses)
        one ServerClient per model server; a ``poll`` op per request, all on it at once
        a stream's reply with new events       -> news
        a plain request                        -> polled with ``final``: the server answers
                                                  it at its end only, not at each token
        any request done or failed             -> news
        a watched model's state changed        -> news (checked every STATUS_EVERY_S)
        after the first news, LINGER_S more to gather what the same decode step produced
    <-- {"replies": {request_id: events/cursor/done/result/error}, "statuses": {model: ...}}

A request whose server is gone gets its own ``ModelServerUnavailable`` in its reply, one whose
ticket is not the caller's (``AccessDenied``, rule ``request-owner``: only the identity that
started a request polls it) or not that request's (``TicketInvalid``) its own error, before any
server is asked; the other requests in the same poll are unaffected. Tokens are not recorded
here: the server tallies every accounted (``open_stream``) ticket and the site collects that
(``collect_usage``), so a result is counted once, however it reached the client.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fabric.errors import FabricError, InvalidRequest, ModelServerUnavailable

if TYPE_CHECKING:
    from fabric.endpoint.context import SiteContext
    from fabric.serverclient import ServerClient

MAX_WAIT_S = 30.0
"""Longest a poll task is held at the site (the model server caps one poll at 60 s)."""
MAX_POLLS = 1024
"""Most requests one poll task may name."""
LINGER_S = 0.05
"""After the first news, how long to gather more (the other sequences of the same step)."""
STATUS_EVERY_S = 0.5
"""How often a watched cold start's state is read while the poll is held."""


def poll_many(ctx: SiteContext, identity: str, polls: list[dict[str, Any]], wait_s: float,
              statuses: list[dict[str, Any]] | None = None,
              linger_s: float = LINGER_S) -> dict[str, Any]:
    """Replies for ``polls`` (``{model, request_id, ticket, cursor, events}``) and the state of
    the cold starts in ``statuses`` (``{model, version, state}``: ``state`` as last seen),
    returned at the first news or after ``wait_s`` (see the module doc)."""
    if len(polls) > MAX_POLLS:
        raise InvalidRequest(f"one poll may name at most {MAX_POLLS} requests, got {len(polls)}")
    wait_s = min(max(0.0, float(wait_s)), MAX_WAIT_S)
    deadline = time.monotonic() + wait_s
    replies: dict[str, dict[str, Any]] = {}
    clients: dict[str, tuple[ServerClient, list[dict[str, Any]]]] = {}
    try:
        key = ctx.ticket_key() if polls else b""  # read once for every request's ticket
        for poll in polls:
            _start(ctx, identity, key, poll, clients, replies, deadline)
        watched = list(statuses or [])
        changed = _statuses(ctx, watched)
        news_at: float | None = time.monotonic() if replies or changed else None
        next_status = time.monotonic() + STATUS_EVERY_S
        while clients:
            now = time.monotonic()
            until = deadline if news_at is None else min(deadline, news_at + linger_s)
            if now >= until:
                break
            if watched and news_at is None:
                until = min(until, next_status)
            got = _read(clients, replies, until)
            if got and news_at is None:
                news_at = time.monotonic()
            if watched and news_at is None and time.monotonic() >= next_status:
                changed = _statuses(ctx, watched)
                if changed:
                    news_at = time.monotonic()
                next_status = time.monotonic() + STATUS_EVERY_S
        if not clients and watched and news_at is None:
            # Nothing open: a status watch alone, held until the state moves.
            while not changed and time.monotonic() < deadline:
                time.sleep(min(STATUS_EVERY_S, max(0.0, deadline - time.monotonic())))
                changed = _statuses(ctx, watched)
        status_map = {s["model"]: s for s in changed or _statuses(ctx, watched, every=True)}
    finally:
        for client, _ in clients.values():
            client.close()
    for reply in replies.values():
        reply.pop("model", None)
    return {"replies": replies, "statuses": status_map}


def _start(ctx: SiteContext, identity: str, key: bytes, poll: dict[str, Any],
           clients: dict[str, Any], replies: dict[str, dict[str, Any]], deadline: float) -> None:
    """Send ``poll``'s first ``poll`` op (on its server's connection, opened once), if it is
    ``identity``'s request."""
    from fabric.serverclient import ServerClient

    rid = str(poll["request_id"])
    dep = ctx.manager.find(str(poll["model"]))
    if dep is None or not dep.address or not dep.public_key:
        replies[rid] = _failed(ModelServerUnavailable(
            f"no live model server for {poll['model']}; it may have exited",
            model=str(poll["model"])))
        return
    try:
        ctx.check_request_owner(identity, dep.model, rid, poll.get("ticket"), "poll", key=key)
    except FabricError as err:
        replies[rid] = _failed(err)
        return
    if dep.address not in clients:
        clients[dep.address] = (ServerClient(dep.address, dep.public_key), [])
        ctx.manager.db.touch(dep.id)
    client, pending = clients[dep.address]
    entry = {**poll, "request_id": rid, "cursor": int(poll.get("cursor") or 0),
             "events": bool(poll.get("events", True)), "model": str(poll["model"])}
    _send_poll(client, entry, deadline)
    pending.append(entry)


def _send_poll(client: ServerClient, entry: dict[str, Any], deadline: float) -> None:
    client.send_poll(entry["request_id"], entry["ticket"], entry["cursor"],
                     deadline - time.monotonic(), final=not entry["events"])


def _read(clients: dict[str, tuple[ServerClient, list[dict[str, Any]]]],
          replies: dict[str, dict[str, Any]], until: float) -> bool:
    """Read what the servers answer until ``until``; True if any of it is news. A server
    that is silent past the deadline (plus a margin) fails its requests."""
    import zmq

    poller = zmq.Poller()
    by_sock = {}
    for address, (client, _) in clients.items():
        poller.register(client.socket, zmq.POLLIN)
        by_sock[client.socket] = address
    timeout_ms = max(0, int((until - time.monotonic()) * 1000))
    news = False
    for sock, _ in poller.poll(timeout_ms):
        address = by_sock[sock]
        client, pending = clients[address]
        for msg in client.recv_now():
            news |= _absorb(client, pending, replies, msg, until)
        if not pending:
            client.close()
            del clients[address]
    return news


def _absorb(client: ServerClient, pending: list[dict[str, Any]],
            replies: dict[str, dict[str, Any]], msg: dict[str, Any], until: float) -> bool:
    rid = msg.get("request_id")
    entry = next((e for e in pending if e["request_id"] == rid), None)
    if entry is None or msg.get("op") not in ("events", "error"):
        return False  # a reply to an older poll, or a health reply: not ours
    if msg["op"] == "error" and "events" not in msg:
        pending.remove(entry)
        replies[entry["request_id"]] = _failed(FabricError.from_dict(msg["error"]))
        return True
    final = bool(msg.get("done"))
    events = list(msg.get("events") or [])
    cursor = int(msg.get("cursor", entry["cursor"]))
    if not final and not (entry["events"] and events):
        # A poll that timed out with nothing for its caller: ask again at the new cursor
        # (a plain request's final result carries everything).
        entry["cursor"] = cursor
        if time.monotonic() < until:
            _send_poll(client, entry, until)
            return False
    pending.remove(entry)
    replies[entry["request_id"]] = {
        "events": events if entry["events"] else [], "cursor": cursor, "done": final,
        "result": msg.get("result"), "error": msg.get("error"), "model": entry["model"]}
    return final or bool(entry["events"] and events)


def _statuses(ctx: SiteContext, watched: list[dict[str, Any]],
              every: bool = False) -> list[dict[str, Any]]:
    """The watched models' states that differ from what the client saw (all with ``every``)."""
    out = []
    for watch in watched:
        try:
            entry = ctx.entry(str(watch["model"]), watch.get("version"))
            status = {"model": entry.name, **dict(ctx.manager.status(entry))}
        except FabricError as exc:
            status = {"model": str(watch["model"]), "state": "error", "error": exc.to_dict()}
        if every or status.get("state") != watch.get("state"):
            out.append(status)
    return out


def _failed(err: FabricError) -> dict[str, Any]:
    return {"events": [], "cursor": 0, "done": True, "result": None, "error": err.to_dict()}
