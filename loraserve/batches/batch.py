"""A batch: OpenAI's Batch API object, its statuses, and the errors a request about one meets.

    validating -> in_progress -> finalizing -> completed
        |             |--> cancelling -> cancelled     cancel
        |             '--> expired                     the completion window passed
        '--> failed                                    a line that cannot be a request; the input file is gone

Errors are ServiceError subclasses naming the problem; api/errors.py gives each its
HTTP status and code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from loraserve.adapters import ServiceError

WINDOWS = {"24h": 24 * 3600}        # completion windows, as OpenAI offers them
CANCELLABLE = ("validating", "in_progress")
ENDED = {"finalizing": "completed", "cancelling": "cancelled"}     # the last status, unless an outcome was decided


class EngineStopped(Exception):
    """The engine has stopped (the server is going down): leave the batch for the next start."""


class BatchNotFound(ServiceError):
    """No such batch for this tenant (another tenant's batch too: no probing)."""


class BatchNotCancellable(ServiceError):
    """The batch has already ended, or is ending, some other way than a cancel."""


class BatchesStopped(ServiceError):
    """The batch runner has stopped: the server is shutting down."""


class Owner(NamedTuple):
    """Whom a batch's lines run as: its creator's tenant and rights."""
    tenant: str
    admin: bool



@dataclass
class Batch:
    id: str
    tenant: str
    admin: bool                 # the creator's rights, which its lines run with
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    metadata: dict | None = None
    status: str = "validating"
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict] | None = None
    total: int = 0
    completed: int = 0          # lines answered 200
    failed: int = 0             # lines in the error file
    input_tokens: int = 0
    output_tokens: int = 0
    outcome: str | None = None  # failed or expired once decided; shown as the status when its files are in place
    result_ids: list[str] | None = None     # [output, error] file ids, chosen once so a restart adopts each once
    finalized: bool = False     # its result files are in the store: nothing left to do

    def to_openai(self) -> dict:
        counts = {"total": self.total, "completed": self.completed, "failed": self.failed}
        usage = {"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": self.input_tokens + self.output_tokens}
        errors = {"object": "list", "data": self.errors} if self.errors else None
        times = {f"{s}_at": getattr(self, f"{s}_at") for s in
                 ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")}
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": errors,
                "input_file_id": self.input_file_id, "completion_window": self.completion_window,
                "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": self.created_at, "expires_at": self.expires_at, **times,
                "request_counts": counts, "usage": usage, "metadata": self.metadata, "model": None}
