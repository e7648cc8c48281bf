"""A fine-tuning job: OpenAI's fine_tuning.job object as it is kept on disk, and the
errors a request about one meets (ServiceError subclasses; api/errors.py gives each its
HTTP status and code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ServiceError

ACTIVE = ("validating_files", "queued", "running")


class JobNotFound(ServiceError):
    """No such job for this tenant (another tenant's job too: no probing)."""


class JobNotCancellable(ServiceError):
    """The job has ended, or has finished training and is being registered."""


@dataclass
class Job:
    id: str
    tenant: str
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    hyperparameters: dict       # OpenAI's three, resolved to numbers
    config: dict                # the fields of adapters.finetune.FinetuneConfig
    created_at: int
    metadata: dict | None = None
    status: str = "queued"
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error: dict | None = None   # {"code", "message", "param"} once failed
    estimated_finish: int | None = None
    events: list[dict] = field(default_factory=list)    # oldest first

    def to_openai(self) -> dict:
        return {"object": "fine_tuning.job", "id": self.id, "model": self.model, "created_at": self.created_at,
                "finished_at": self.finished_at, "fine_tuned_model": self.fine_tuned_model,
                "organization_id": self.tenant, "result_files": [], "status": self.status,
                "validation_file": self.validation_file, "training_file": self.training_file,
                "hyperparameters": dict(self.hyperparameters), "trained_tokens": self.trained_tokens,
                "error": self.error, "seed": self.seed, "estimated_finish": self.estimated_finish,
                "integrations": [], "metadata": self.metadata, "user_provided_suffix": self.suffix,
                "method": {"type": "supervised", "supervised": {"hyperparameters": dict(self.hyperparameters)}}}


def stopped_error(status: str) -> dict:
    """The error of a job that was active when its server stopped."""
    return {"code": "server_restarted", "param": None,
            "message": f"the server stopped while this job was {status}; a job does not survive a restart "
                       "and nothing of its training was kept: create the job again"}


def model_name(job: Job) -> str:
    """`ft-<suffix>-<8 hex of the job id>`: a store name (no ':' or '/'), unique per job."""
    tag = job.id.removeprefix("ftjob-")[:8]
    return f"ft-{job.suffix}-{tag}" if job.suffix else f"ft-{tag}"
