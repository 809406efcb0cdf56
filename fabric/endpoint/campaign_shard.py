"""``run_shard``: the endpoint function that runs one campaign shard in a site's request worker.

It lives in the endpoint package (not ``fabric.campaign``) because it is site code: the campaign
runner never imports it, it ships it by reference (``fabric.wire.functions``), so the campaign
package does not depend on the endpoint.

.. code:: text

    runner --transport.submit(run_shard, shard, auth)--> request worker at the site
                 validate each input (a bad one fails alone), authorize once (the shard's
                 token estimate), then one ServerSession (fabric.endpoint.session):
                 ``concurrency`` requests in flight on one socket (the server's continuous
                 batching interleaves them), a full queue waited out, a fresh request id
                 (the output nonce) per execution
    <-- {"shard_id", "nonce", "site", "pid", "results": [{custom_id, ok, nonce, ...}]}

With ``audit`` set, each execution is appended to the site's own audit file
(``audit_path``: ``<state dir>/campaigns/audit/<campaign>.jsonl``), one JSON line each.

Exactly one output or error line per input. A poison input fails alone: its error is recorded
and the rest of the shard carries on. If the model server dies mid-shard, the inputs it had
accepted come back as ``ModelServerUnavailable`` (retryable: the runner gives them to a later
shard; one of them may be what killed the server, so none is resent to its successor here);
the inputs not yet sent go to a server relaunched once. Like every endpoint function this
module imports cheaply and returns an envelope, never a raised ``FabricError``.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from fabric.endpoint.context import current
from fabric.endpoint.registry import endpoint_function
from fabric.endpoint.session import Outcome, ServerSession, token_estimate
from fabric.errors import FabricError, InvalidRequest

AUDIT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
"""A campaign name that is safe as a file name (the manifest's rule for names)."""


def _in_shard(request: Any, model: str, nonce: str) -> dict[str, Any]:
    """An item's request as the shard serves it: the shard's model (a flow's items leave it
    out; one naming another model is refused, since the shard was authorized for its own)."""
    if not isinstance(request, dict):
        raise InvalidRequest("a shard item's request must be an object")
    named = request.get("model", model)
    if named != model:
        raise InvalidRequest(f"item names model {named!r} but the shard serves {model!r}: "
                             "a shard's items all use the shard's model")
    return {**request, "model": model, "request_id": nonce}


@endpoint_function("model")
def run_shard(shard: dict[str, Any], auth: Any = None) -> dict[str, Any]:
    """Serve every input of ``shard``; returns per-input results and errors (see module doc)."""
    from fabric.protocol import validate_request

    ctx = current()
    model, version = str(shard["model"]), shard.get("version")
    entry = ctx.entry(model, version)
    items = list(shard["items"])
    out: dict[str, dict[str, Any]] = {}
    cids, reqs = [], []
    for it in items:
        cid, nonce = it["custom_id"], uuid.uuid4().hex
        try:
            reqs.append(validate_request(_in_shard(it["request"], model, nonce)))
            cids.append(cid)
        except FabricError as exc:  # this input alone is bad
            out[cid] = _error(cid, exc, nonce)
    identity = ctx.authorize(auth, model, sum(token_estimate(r) for r in reqs))
    audit = audit_path(ctx.state_dir, shard) if shard.get("audit") else None

    def settle(i: int, outcome: Outcome) -> None:
        cid = cids[i]
        if outcome.error is not None:
            out[cid] = _error(cid, outcome.error, outcome.request_id)
            return
        out[cid] = {"custom_id": cid, "ok": True, "nonce": outcome.request_id,
                    "result": line_result(reqs[i], outcome.result)}
        if audit is not None:
            _audit(audit, cid, outcome.request_id)

    session = ServerSession(ctx, entry, identity,
                            timeout_s=float(shard.get("timeout_s") or 3600.0),
                            window=int(shard.get("concurrency") or 64), patient=True,
                            fresh_ids=True)
    try:
        session.run(reqs, on_outcome=settle)
    finally:
        session.close()
    done = [_usage_of(r) for r in out.values() if r["ok"]]
    prompt, completion = sum(p for p, _ in done), sum(c for _, c in done)
    ctx.record_usage(identity, model, prompt + completion, str(shard.get("shard_id")),
                     prompt_tokens=prompt, completion_tokens=completion)
    served = session.served_by
    return {"shard_id": shard.get("shard_id"), "nonce": uuid.uuid4().hex, "site": ctx.site.name,
            "pid": os.getpid(),
            "model": {"name": entry.name, "version": entry.version,
                      "sha256": served.sha256 if served is not None else None},
            "results": [out[it["custom_id"]] for it in items]}


def _error(cid: str, err: FabricError, nonce: str) -> dict[str, Any]:
    return {"custom_id": cid, "ok": False, "nonce": nonce, "error": err.to_dict(),
            "retryable": bool(err.retryable)}


def _usage_of(record: dict[str, Any]) -> tuple[int, int]:
    usage = (record.get("result") or {}).get("usage") or {}
    return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))


def audit_path(state_dir: Path, shard: dict[str, Any]) -> Path:
    """The site's audit file for the shard's campaign: the site chooses the folder, and the
    campaign's name must be a plain file name (``InvalidRequest`` otherwise)."""
    name = shard.get("campaign")
    if not isinstance(name, str) or not AUDIT_NAME_RE.match(name):
        raise InvalidRequest(f"campaign name {str(name)[:100]!r} cannot name an audit file: "
                             "use 1-100 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit", field="campaign")
    folder = Path(state_dir) / "campaigns" / "audit"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.jsonl"


def _audit(path: Path, cid: str, nonce: str) -> None:
    # JSON-encoded so a custom_id holding newlines cannot forge lines; O_APPEND with one
    # write per line: concurrent workers never interleave a line.
    line = json.dumps({"custom_id": cid, "nonce": nonce}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def line_result(req: Any, result: Any) -> Any:
    """An input's result as its output line holds it (JSON): an embedding once, as float32
    numbers written short (``float32_floats``), with ``layers`` only when the request asked
    for more than one layer (else it is the ``embedding`` again)."""
    if req.kind != "embed" or not isinstance(result, dict):
        return jsonable(result)
    from fabric.wire.arrays import float32_floats

    kept = jsonable({k: v for k, v in result.items() if k != "layers" or len(req.layers) > 1})
    for key in ("embedding", "embeddings"):
        if kept.get(key) is not None:
            kept[key] = float32_floats(kept[key])
    if isinstance(kept.get("layers"), dict):
        kept["layers"] = {k: float32_floats(v) for k, v in kept["layers"].items()}
    return kept


def jsonable(value: Any) -> Any:
    """``value`` with wire-encoded arrays turned into nested lists (results go to JSONL)."""
    if isinstance(value, dict):
        if set(value) == {"dtype", "shape", "data"} and isinstance(value["data"], bytes):
            from fabric.wire.arrays import decode_array

            return decode_array(value).tolist()
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value
