"""``run_shard``: the endpoint function that runs one campaign shard in a site's request worker.

It lives in the endpoint package (not ``fabric.campaign``) because it is site code: the campaign
runner never imports it, it ships it by reference (``fabric.functionref``), so the campaign
package does not depend on the endpoint.

.. code:: text

    runner --transport.submit(run_shard, shard, auth)--> request worker at the site
                 authorize once (the shard's token estimate) -> warm server (deployments)
                 keep ``concurrency`` requests in flight on one ServerClient socket
                 (the server's continuous batching interleaves them)
                 per input: result or typed error, and a fresh nonce per execution
    <-- {"shard_id", "nonce", "site", "pid", "results": [{custom_id, ok, nonce, ...}]}

A poison input fails alone: its error is recorded and the rest of the shard carries on. If the
model server dies mid-shard, the inputs without a result are resubmitted to a relaunched server
(their lost executions never produced a line). Like every endpoint function this module imports
cheaply and returns an envelope, never a raised ``FabricError``.
"""

from __future__ import annotations

import collections
import os
import time
import uuid
from typing import Any

from fabric.endpoint.context import current
from fabric.endpoint.registry import endpoint_function
from fabric.errors import FabricError, ModelServerUnavailable, Overloaded

SERVER_RESTARTS = 2
"""Relaunches of a dead model server one shard attempts before giving its rest back."""


@endpoint_function("model")
def run_shard(shard: dict[str, Any], auth: Any = None) -> dict[str, Any]:
    """Serve every input of ``shard``; returns per-input results and errors (see module doc)."""
    ctx = current()
    model, version = str(shard["model"]), shard.get("version")
    entry = ctx.entry(model, version)
    items = list(shard["items"])
    estimate = sum(_estimate(it["request"]) for it in items)
    identity = ctx.authorize(auth, model, estimate)
    mgr = ctx.manager
    deadline = time.monotonic() + float(shard.get("timeout_s") or 3600.0)
    todo = collections.OrderedDict((it["custom_id"], it) for it in items)
    out: dict[str, dict[str, Any]] = {}
    last_error: FabricError | None = None
    identity_of: dict[str, Any] = {"name": entry.name, "version": entry.version, "sha256": None}
    for _ in range(SERVER_RESTARTS + 1):
        dep = mgr.ensure(entry)
        identity_of["sha256"] = dep.sha256
        try:
            _drive(mgr, dep, identity, todo, out, shard, deadline)
            last_error = None
            break
        except ModelServerUnavailable as exc:
            # The server died under us: what already came back is kept; the rest is resubmitted
            # to a relaunched server (``ensure`` launches one once this one is marked dead).
            last_error = exc
            mgr.refresh(dep)
    for cid in list(todo):
        err = last_error or ModelServerUnavailable("shard ended before this input ran")
        out[cid] = _error(cid, err, uuid.uuid4().hex)
    tokens = sum(_tokens(r) for r in out.values() if r["ok"])
    ctx.record_usage(identity, model, tokens, str(shard.get("shard_id")))
    return {"shard_id": shard.get("shard_id"), "nonce": uuid.uuid4().hex, "site": ctx.site.name,
            "pid": os.getpid(), "model": identity_of,
            "results": [out[it["custom_id"]] for it in items]}


def _drive(mgr: Any, dep: Any, identity: str, todo: collections.OrderedDict[str, Any],
           out: dict[str, dict[str, Any]], shard: dict[str, Any], deadline: float) -> None:
    """Submit ``todo``'s inputs with a bounded window and collect results into ``out``."""
    from fabric import tickets
    from fabric.protocol import validate_request
    from fabric.serverclient import ServerClient

    window = max(1, int(shard.get("concurrency") or 64))
    audit = shard.get("audit_log")
    ttl = max(60.0, deadline - time.monotonic() + 60.0)
    # One ticket for any request id of this model: the endpoint authorised the whole shard.
    ticket = tickets.issue(mgr.ticket_key(), model=dep.model, subject=identity, ttl_s=ttl)
    flight: collections.deque[tuple[str, str]] = collections.deque()
    queue = collections.deque(todo)
    with ServerClient(dep.address, dep.public_key, timeout_s=30.0) as client:
        while queue or flight:
            while queue and len(flight) < window:
                cid = queue.popleft()
                nonce = uuid.uuid4().hex  # this execution's id: request id and output nonce
                try:
                    req = validate_request({**todo[cid]["request"], "request_id": nonce})
                    client.submit(req, ticket, stream=False)
                except Overloaded as exc:
                    queue.appendleft(cid)
                    if not flight:  # nothing of ours to wait on: back off, then try again
                        time.sleep(float(exc.details.get("retry_after") or 0.5))
                    break
                except ModelServerUnavailable:
                    raise
                except FabricError as exc:  # this input alone is bad (too long, bad hook...)
                    out[cid] = _error(cid, exc, nonce)
                    del todo[cid]
                    continue
                flight.append((cid, nonce))
            if not flight:
                continue
            cid, nonce = flight.popleft()
            try:
                result = _wait(mgr, dep, client, nonce, deadline)
            except ModelServerUnavailable:
                raise
            except FabricError as exc:
                out[cid] = _error(cid, exc, nonce)
                del todo[cid]
                continue
            out[cid] = {"custom_id": cid, "ok": True, "nonce": nonce, "result": jsonable(result)}
            del todo[cid]
            if audit:
                _audit(str(audit), cid, nonce)
    mgr.db.touch(dep.id)


def _wait(mgr: Any, dep: Any, client: Any, rid: str, deadline: float) -> dict[str, Any]:
    while True:
        try:
            return dict(client.result(rid, timeout_s=10.0))
        except ModelServerUnavailable:
            # Silence is fine while the server is alive and busy with our other inputs.
            if time.monotonic() > deadline or mgr.health(dep) is None:
                raise


def _error(cid: str, err: FabricError, nonce: str) -> dict[str, Any]:
    return {"custom_id": cid, "ok": False, "nonce": nonce, "error": err.to_dict(),
            "retryable": bool(err.retryable)}


def _estimate(req: dict[str, Any]) -> int:
    text = str(req.get("prompt") or "") + "".join(
        str(m.get("content", "")) for m in req.get("messages") or [])
    new = int((req.get("sampling") or {}).get("max_tokens", 0)) if req.get("kind") == "generate" \
        else 0
    return len(text) // 4 + 1 + new


def _tokens(record: dict[str, Any]) -> int:
    usage = (record.get("result") or {}).get("usage") or {}
    return int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))


def _audit(path: str, cid: str, nonce: str) -> None:
    # O_APPEND with one small write per line: concurrent workers never interleave a line.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{cid} {nonce}\n".encode())
    finally:
        os.close(fd)


def jsonable(value: Any) -> Any:
    """``value`` with wire-encoded arrays turned into nested lists (results go to JSONL)."""
    if isinstance(value, dict):
        if set(value) == {"dtype", "shape", "data"} and isinstance(value["data"], bytes):
            from fabric.protocol import decode_array

            return decode_array(value).tolist()
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value
