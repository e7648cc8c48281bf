"""/v1/files, OpenAI's Files API for fine-tuning and batches: upload (multipart `file` +
`purpose`), list, inspect, read back, delete; per tenant (another tenant's file is a 404).

An upload is checked line by line before it is stored: a bad line is a 400 naming the
line number and the problem (adapters/files.py).
A batch's results come back here as files of purpose "batch_output".
"""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request
from starlette.datastructures import UploadFile
from starlette.responses import Response

from loraserve.adapters.files import PURPOSE, UPLOAD_PURPOSES, FileStore

from .auth import Caller, authenticate
from .errors import APIError
from .uploads import read_capped_form

router = APIRouter(tags=["files"])


UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "JSONL: training data, or a batch's requests"},
                   "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)}}}}}}


def finetune_service(request: Request, name: str):
    """The server's `files` or `jobs` service, or a 404 when fine-tuning is off."""
    service = getattr(request.app.state.ctx, name)
    if service is None:
        raise APIError(404, "fine-tuning is off on this server (started with --max-finetune-jobs 0)",
                       code="finetune_disabled")
    return service


def file_store(request: Request) -> FileStore:
    return finetune_service(request, "files")


def page(items: list, after: str | None, limit: int) -> dict:
    """OpenAI's cursor page: the items after the one with id `after`, at most `limit` of them."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    data = items[:limit]
    return {"object": "list", "data": data, "has_more": len(items) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.post("/v1/files", openapi_extra={"requestBody": UPLOAD_BODY},
             summary="Upload a JSONL file (purpose=fine-tune or batch), checked line by line")
async def upload_file(request: Request, caller: Caller = Depends(authenticate)):
    files = file_store(request)
    form = await _read_form(request, files.max_bytes)
    try:
        purpose = form.get("purpose")
        if not isinstance(purpose, str) or not purpose:
            raise APIError(400, f"the form needs a 'purpose' field; use purpose={PURPOSE!r} or 'batch'", "purpose")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "the form needs a 'file' field holding the JSONL data", "file")
        data = await upload.read()
        record = await to_thread.run_sync(files.add, caller.tenant, upload.filename or "", purpose, data)
    finally:
        await form.close()
    return record.to_openai()


async def _read_form(request: Request, limit: int):
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise APIError(415 if content_type else 400, "send the file as multipart/form-data with the fields "
                       f"file (the JSONL data) and purpose ({PURPOSE!r} or 'batch')")
    return await read_capped_form(request, limit, lambda size: _too_large(size, limit), 2, 4)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the upload is {size} bytes or more; this server takes files of at most {limit} bytes "
                         "(--max-file-bytes)", "file", "file_too_large")


@router.get("/v1/files", summary="This tenant's files, newest first")
async def list_files(request: Request, caller: Caller = Depends(authenticate), purpose: str | None = None,
                     after: str | None = None, limit: int = Query(10000, ge=1, le=10000),
                     order: str = Query("desc", pattern="^(asc|desc)$")):
    records = [f.to_openai() for f in file_store(request).list(caller.tenant, purpose)]
    return page(records if order == "desc" else records[::-1], after, limit)


@router.get("/v1/files/{file_id}", summary="One file")
async def get_file(file_id: str, request: Request, caller: Caller = Depends(authenticate)):
    return file_store(request).get(caller.tenant, file_id).to_openai()


@router.get("/v1/files/{file_id}/content", summary="A file's bytes, as uploaded")
async def file_content(file_id: str, request: Request, caller: Caller = Depends(authenticate)):
    files = file_store(request)
    record = files.get(caller.tenant, file_id)
    try:
        data = await to_thread.run_sync(files.read, record)
    except FileNotFoundError:       # deleted between the lookup and the read
        raise APIError(404, f"no file {file_id!r} for this tenant", "file_id", "file_not_found") from None
    return Response(data, media_type="application/jsonl")


@router.delete("/v1/files/{file_id}", summary="Delete a file (jobs already trained on it are unaffected)")
async def delete_file(file_id: str, request: Request, caller: Caller = Depends(authenticate)):
    files = file_store(request)
    record = await to_thread.run_sync(files.delete, caller.tenant, file_id)
    return {"id": record.id, "object": "file", "deleted": True}
