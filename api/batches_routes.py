"""/v1/batches: OpenAI's Batch API over files uploaded with purpose "batch".

create (validating at once, then run line by line behind interactive traffic: see
loraserve/batches/), list, retrieve, cancel. Per tenant: another tenant's batch answers 404
like a missing one, and each line may name only the adapters its tenant may use.
Results are files of purpose "batch_output", read with GET /v1/files/{id}/content.
"""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from loraserve.adapters.files import BATCH
from loraserve.batches import ENDPOINTS, WINDOWS, BatchManager

from .auth import Caller, authenticate
from .errors import APIError
from .files_routes import page
from .openai_models import _Strict

router = APIRouter(tags=["batches"])

MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


class BatchRequest(_Strict):
    input_file_id: str = Field(min_length=1, description="a file uploaded with purpose 'batch'")
    endpoint: str = Field(description=f"where every line goes: {', '.join(ENDPOINTS)}")
    completion_window: str = Field(description="'24h', the only window OpenAI offers")
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None


def batch_manager(request: Request) -> BatchManager:
    batches = request.app.state.ctx.batches
    if batches is None:
        raise APIError(404, "the Batch API is off on this server: it needs the Files API (on unless started with "
                            "--max-finetune-jobs 0) and --batch-concurrency of at least 1", code="batches_disabled")
    return batches


@router.post("/v1/batches", summary="Create a batch from a JSONL file of requests (purpose=batch)")
async def create_batch(body: BatchRequest, request: Request, caller: Caller = Depends(authenticate)):
    batches = batch_manager(request)
    if body.endpoint not in ENDPOINTS:
        raise APIError(400, f"endpoint {body.endpoint!r} is not served here; a batch runs {' or '.join(ENDPOINTS)}",
                       "endpoint", "invalid_endpoint")
    if body.completion_window not in WINDOWS:
        raise APIError(400, f"completion_window must be one of {', '.join(map(repr, WINDOWS))}, got "
                            f"{body.completion_window!r}", "completion_window", "invalid_completion_window")
    if body.output_expires_after is not None:
        raise APIError(400, "output_expires_after is not supported: result files are kept until deleted "
                            "(DELETE /v1/files/{id}); leave it out", "output_expires_after")
    _check_metadata(body.metadata)
    batches.files.get(caller.tenant, body.input_file_id, "input_file_id", BATCH)
    batch = await to_thread.run_sync(batches.create, caller, body.input_file_id, body.endpoint,
                                     body.completion_window, body.metadata)
    created = batch.to_openai()      # as created: validating
    batches.start(batch)
    return created


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if not metadata:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise APIError(400, f"metadata holds at most {MAX_METADATA_PAIRS} pairs, got {len(metadata)}", "metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise APIError(400, f"metadata keys are at most {MAX_METADATA_KEY} characters and values at most "
                                f"{MAX_METADATA_VALUE}; {key[:MAX_METADATA_KEY]!r} is longer", "metadata")


@router.get("/v1/batches", summary="This tenant's batches, newest first")
async def list_batches(request: Request, caller: Caller = Depends(authenticate), after: str | None = None,
                       limit: int = Query(20, ge=1, le=100)):
    return page([b.to_openai() for b in batch_manager(request).list(caller.tenant)], after, limit)


@router.get("/v1/batches/{batch_id}", summary="One batch: its status, request_counts and result files")
async def get_batch(batch_id: str, request: Request, caller: Caller = Depends(authenticate)):
    return batch_manager(request).get(caller.tenant, batch_id).to_openai()


@router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch; the lines already answered are kept")
async def cancel_batch(batch_id: str, request: Request, caller: Caller = Depends(authenticate)):
    batch = await to_thread.run_sync(batch_manager(request).cancel, caller.tenant, batch_id)
    return batch.to_openai()
