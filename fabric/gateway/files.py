"""``/v1/files``: uploaded JSONL files (batch inputs) and the batches' output files.

Files live in ``<gateway home>/files/<file id>`` next to a small JSON record; each belongs to
the identity that uploaded it (or the batch it came from), and another caller gets 404 for it.
Uploads arrive as ``multipart/form-data`` (``file`` and ``purpose``), parsed with the standard
library's email parser so that no multipart package is needed.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from fabric.errors import InvalidRequest
from fabric.gateway.errors import NotFound
from fabric.gateway.state import Who, read_body

__all__ = ["FileStore", "router"]

router = APIRouter(prefix="/v1")
PURPOSES = {"batch", "batch_output", "fine-tune", "assistants", "user_data", "evals"}


class FileStore:
    """Files and their records in one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    def add(self, owner: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        """Store ``data``; returns the OpenAI ``file`` object."""
        file_id = f"file-{secrets.token_hex(12)}"
        self.path(file_id).write_bytes(data)
        record = {"id": file_id, "object": "file", "bytes": len(data),
                  "created_at": int(time.time()), "filename": filename, "purpose": purpose,
                  "status": "processed", "status_details": None, "owner": owner}
        self._meta(file_id).write_text(json.dumps(record))
        return record

    def get(self, owner: str, file_id: str) -> dict[str, Any]:
        """The record of ``file_id`` if ``owner`` has it, else ``NotFound``."""
        try:
            record = json.loads(self._meta(_checked(file_id)).read_text())
        except FileNotFoundError:
            record = None
        if not record or record.get("owner") != owner:
            raise NotFound(f"no file {file_id!r}", param="file_id")
        return dict(record)

    def list(self, owner: str, purpose: str | None = None) -> list[dict[str, Any]]:
        """The owner's files, newest first."""
        out = []
        for meta in self.folder.glob("*.json"):
            record = json.loads(meta.read_text())
            if record.get("owner") == owner and purpose in (None, record.get("purpose")):
                out.append(record)
        return sorted(out, key=lambda r: -int(r["created_at"]))

    def delete(self, owner: str, file_id: str) -> None:
        """Remove the file (``NotFound`` if the owner has no such file)."""
        self.get(owner, file_id)
        self.path(file_id).unlink(missing_ok=True)
        self._meta(file_id).unlink(missing_ok=True)

    def path(self, file_id: str) -> Path:
        """Where the file's bytes are."""
        return self.folder / _checked(file_id)

    def _meta(self, file_id: str) -> Path:
        return self.folder / f"{file_id}.json"


def _checked(file_id: str) -> str:
    # Ids go into paths: only our own format may.
    if not file_id.startswith("file-") or not file_id[5:].isalnum():
        raise NotFound(f"no file {file_id!r}", param="file_id")
    return file_id


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A file record without the gateway's bookkeeping."""
    return {k: v for k, v in record.items() if k != "owner"}


def files_of(request: Request) -> FileStore:
    """The app's file store."""
    store: FileStore = request.app.state.files
    return store


def parse_upload(content_type: str, body: bytes) -> tuple[str, str, bytes]:
    """``(filename, purpose, data)`` from a ``multipart/form-data`` body."""
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest("upload a file as multipart/form-data with fields file and purpose")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name] = (part.get_filename(), payload)
    if "file" not in fields:
        raise InvalidRequest("the upload has no `file` field", param="file")
    purpose = fields.get("purpose", (None, b""))[1].decode().strip()
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose must be one of {sorted(PURPOSES)}, got {purpose!r}",
                             param="purpose")
    filename, data = fields["file"]
    return os.path.basename(filename or "upload.jsonl"), purpose, data


@router.post("/files")
async def upload(request: Request, who: Who) -> dict[str, Any]:
    """Store an uploaded file (``purpose: batch`` for batch inputs)."""
    body = await read_body(request, "upload")
    filename, purpose, data = parse_upload(request.headers.get("content-type", ""), body)
    return public(files_of(request).add(who.identity.name, filename, purpose, data))


@router.get("/files")
async def list_files(request: Request, who: Who,
                     purpose: str | None = None) -> dict[str, Any]:
    """The caller's files."""
    records = files_of(request).list(who.identity.name, purpose)
    return {"object": "list", "data": [public(r) for r in records], "has_more": False}


@router.get("/files/{file_id}")
async def get_file(file_id: str, request: Request,
                   who: Who) -> dict[str, Any]:
    """One file's record."""
    return public(files_of(request).get(who.identity.name, file_id))


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, request: Request, who: Who) -> Response:
    """The file's bytes."""
    store = files_of(request)
    store.get(who.identity.name, file_id)
    return Response(store.path(file_id).read_bytes(), media_type="application/octet-stream")


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, request: Request,
                      who: Who) -> dict[str, Any]:
    """Remove a file."""
    files_of(request).delete(who.identity.name, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
