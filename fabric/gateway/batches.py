"""``/v1/batches``: OpenAI batch jobs run as fabric campaigns.

A batch's input file is already a campaign input (campaigns read OpenAI's batch lines,
``{"custom_id", "method", "url", "body"}``), so a batch is a campaign whose manifest names the
model of the lines, the kind of the batch's ``endpoint``, and ``on_bad_line: record`` (a bad
line gets its own error line, as at OpenAI). The campaign's exactly-one-line-per-``custom_id``
output is turned into OpenAI's output file (``{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}``) and error file once it is done. The campaign runs in the
gateway's process, on the caller's client (so a Globus caller's identity reaches the site).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from fabric.errors import FabricError, InvalidRequest
from fabric.gateway.errors import NotFound, status_of
from fabric.gateway.files import FileStore, files_of
from fabric.gateway.routes import parse_body
from fabric.gateway.state import Who, gateway_of

__all__ = ["router"]

router = APIRouter(prefix="/v1")
ENDPOINT_KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "generate",
                  "/v1/embeddings": "embed"}
_FINALIZE = threading.Lock()


class BatchRequest(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(extra="allow")

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def _folder(request: Request) -> Path:
    folder = gateway_of(request).home / "batches"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def _load(request: Request, owner: str, batch_id: str) -> dict[str, Any]:
    if not batch_id.startswith("batch_") or not batch_id[6:].isalnum():
        raise NotFound(f"no batch {batch_id!r}", param="batch_id")
    try:
        record = json.loads((_folder(request) / f"{batch_id}.json").read_text())
    except FileNotFoundError:
        record = None
    if not record or record.get("owner") != owner:
        raise NotFound(f"no batch {batch_id!r}", param="batch_id")
    return dict(record)


def _save(request: Request, record: dict[str, Any]) -> None:
    path = _folder(request) / f"{record['id']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def _model_of(path: Path) -> str:
    """The one model the batch's lines name (a campaign runs one model)."""
    models: set[str] = set()
    with path.open() as lines:
        for text in lines:
            try:
                line = json.loads(text)
            except ValueError:
                continue  # the campaign records it as a bad line
            body = line.get("body") if isinstance(line, dict) else None
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                models.add(body["model"])
    if len(models) != 1:
        raise InvalidRequest(f"every line of a batch must name the same body.model (a batch "
                             f"runs one model); found {sorted(models) or 'none'}",
                             param="input_file_id")
    return models.pop()


@router.post("/batches")
async def create_batch(request: Request, who: Who) -> dict[str, Any]:
    """Start a batch from an uploaded ``purpose: batch`` file."""
    req = await parse_body(request, BatchRequest)
    kind = ENDPOINT_KINDS.get(req.endpoint)
    if kind is None:
        raise InvalidRequest(f"endpoint must be one of {sorted(ENDPOINT_KINDS)}",
                             param="endpoint")
    files = files_of(request)
    files.get(who.identity.name, req.input_file_id)
    path = files.path(req.input_file_id)
    batch_id = f"batch_{secrets.token_hex(12)}"
    home = gateway_of(request).home
    manifest = {"name": batch_id, "model": _model_of(path), "kind": kind,
                "input": {"path": str(path), "format": "jsonl"},
                "output": str(home / "batches" / batch_id), "on_bad_line": "record",
                "sites": [{"name": who.client.site}]}
    from fabric.campaign.api import campaign

    c = await asyncio.to_thread(campaign, who.client.fabric, manifest, run="here",
                                home=home / "campaigns")
    now = int(time.time())
    record = {"id": batch_id, "object": "batch", "endpoint": req.endpoint, "errors": None,
              "input_file_id": req.input_file_id, "completion_window": req.completion_window,
              "status": "in_progress", "output_file_id": None, "error_file_id": None,
              "created_at": now, "in_progress_at": now, "expires_at": now + 86400,
              "finalizing_at": None, "completed_at": None, "failed_at": None,
              "expired_at": None, "cancelling_at": None, "cancelled_at": None,
              "request_counts": {"total": 0, "completed": 0, "failed": 0},
              "metadata": req.metadata, "owner": who.identity.name, "campaign": str(c.folder)}
    _save(request, record)
    return _public(record)


@router.get("/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request,
                    who: Who) -> dict[str, Any]:
    """The batch, its progress, and its output files once it is done."""
    record = _load(request, who.identity.name, batch_id)
    record = await asyncio.to_thread(_refresh, request, files_of(request), record)
    return _public(record)


@router.get("/batches")
async def list_batches(request: Request, who: Who) -> dict[str, Any]:
    """The caller's batches, newest first."""
    records = []
    for path in _folder(request).glob("batch_*.json"):
        record = json.loads(path.read_text())
        if record.get("owner") == who.identity.name:
            records.append(await asyncio.to_thread(_refresh, request, files_of(request),
                                                   record))
    records.sort(key=lambda r: -int(r["created_at"]))
    return {"object": "list", "data": [_public(r) for r in records], "has_more": False}


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request,
                       who: Who) -> dict[str, Any]:
    """Stop the batch (results so far stay in its output file)."""
    record = _load(request, who.identity.name, batch_id)
    if record["status"] in ("in_progress", "validating"):
        from fabric.campaign.api import Campaign

        await asyncio.to_thread(Campaign(Path(record["campaign"])).cancel)
        record["cancelling_at"] = int(time.time())
        _save(request, record)
    return _public(await asyncio.to_thread(_refresh, request, files_of(request), record))


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("owner", "campaign")}


STATUS = {"queued": "in_progress", "scheduled": "in_progress", "running": "in_progress",
          "done": "completed", "cancelled": "cancelled", "failed": "failed",
          "interrupted": "failed"}


def _refresh(request: Request, files: FileStore, record: dict[str, Any]) -> dict[str, Any]:
    """The record brought up to date with its campaign; writes the output files when it ends."""
    if record["status"] in ("completed", "failed", "cancelled", "expired"):
        return record
    from fabric.campaign.api import Campaign

    c = Campaign(Path(record["campaign"]))
    state = c.status()
    record["request_counts"] = {"total": state["total"], "completed": state["done"],
                                "failed": state["failed"]}
    status = STATUS.get(str(state["status"]), "in_progress")
    if status == "in_progress":
        if record.get("cancelling_at"):
            record["status"] = "cancelling"  # OpenAI's, until the campaign has stopped
        return record
    with _FINALIZE:
        record = _load(request, record["owner"], record["id"]) | {
            "request_counts": record["request_counts"]}
        if record["output_file_id"] is None:
            _write_outputs(files, record, c)
        now = int(time.time())
        record["status"] = status
        record[{"completed": "completed_at", "failed": "failed_at",
                "cancelled": "cancelled_at"}[status]] = now
        if state["status"] == "interrupted":
            record["errors"] = {"object": "list", "data": [{
                "code": "interrupted", "message": "the gateway stopped while the batch ran"}]}
        _save(request, record)
    return record


def _write_outputs(files: FileStore, record: dict[str, Any], c: Any) -> None:
    kind = ENDPOINT_KINDS[record["endpoint"]]
    out = "".join(json.dumps(output_line(r, kind)) + "\n" for r in c.results())
    errs = "".join(json.dumps(error_line(r)) + "\n" for r in c.errors())
    owner, bid = record["owner"], record["id"]
    record["output_file_id"] = files.add(owner, f"{bid}_output.jsonl", "batch_output",
                                         out.encode())["id"]
    if errs:
        record["error_file_id"] = files.add(owner, f"{bid}_error.jsonl", "batch_output",
                                            errs.encode())["id"]


def output_line(rec: dict[str, Any], kind: str) -> dict[str, Any]:
    """A campaign result line as an OpenAI batch output line."""
    res, usage = rec.get("response") or {}, rec.get("usage") or {}
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    usage_out = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}
    model = (rec.get("model") or {}).get("name")
    nonce = str(rec.get("nonce", ""))
    from fabric.gateway.shapes import chat_logprobs, completion_logprobs, finish_reason

    ids, lps = list(res.get("token_ids") or []), res.get("logprobs")  # lps: asked for

    body: dict[str, Any]
    if kind == "embed":
        body = {"object": "list", "model": model, "usage": usage_out,
                "data": [{"object": "embedding", "index": 0, "embedding": res.get("embedding")}]}
    elif kind == "chat":
        body = {"id": f"chatcmpl-{nonce}", "object": "chat.completion", "model": model,
                "created": int(time.time()), "usage": usage_out,
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": res.get("text", "")},
                             "finish_reason": finish_reason(res.get("finish_reason")),
                             "logprobs": None if lps is None
                             else chat_logprobs(ids, lps, res.get("top_logprobs"))}]}
    else:
        body = {"id": f"cmpl-{nonce}", "object": "text_completion", "model": model,
                "created": int(time.time()), "usage": usage_out,
                "choices": [{"index": 0, "text": res.get("text", ""),
                             "logprobs": None if lps is None
                             else completion_logprobs(ids, lps, res.get("top_logprobs")),
                             "finish_reason": finish_reason(res.get("finish_reason"))}]}
    return {"id": f"batch_req_{nonce}", "custom_id": rec["custom_id"],
            "response": {"status_code": 200, "request_id": nonce, "body": body}, "error": None}


def error_line(rec: dict[str, Any]) -> dict[str, Any]:
    """A campaign error line as an OpenAI batch error line (the status its error would get)."""
    err = rec.get("error") or {}
    exc = FabricError.from_dict(err) if err.get("kind") else FabricError(str(err))
    if rec.get("attempts") == 0:  # a bad line (never ran): the request was malformed
        exc = InvalidRequest(str(err.get("message", "")))
    status, kind, code = status_of(exc)
    message = str(err.get("message", ""))
    return {"id": f"batch_req_{secrets.token_hex(8)}", "custom_id": rec.get("custom_id"),
            "response": {"status_code": status, "request_id": "",
                         "body": {"error": {"message": message, "type": kind, "param": None,
                                            "code": code}}},
            "error": {"code": err.get("kind") or code, "message": message}}
