"""/v1/fine_tuning/jobs: OpenAI's fine-tuning API, training LoRA adapters of the served base.

create (queued at once; trained by a worker process, see adapters/finetune_jobs.py), list, retrieve,
events, cancel. Per tenant: another tenant's job answers 404 like a missing one, and
the finished adapter lands in the caller's namespace as the job's `fine_tuned_model`.

Hyperparameters are OpenAI's three (`n_epochs`, `batch_size`, `learning_rate_multiplier`,
each a number or "auto", chosen from the training file's size and length), at the top
level or under method.supervised, plus loraserve's own: `lora_rank`, `lora_alpha`,
`target_modules`, `use_dora`, `max_seq_len`.
"""

from __future__ import annotations

import math
import random
from typing import Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from loraserve.adapters import LORA_MODULES, AdapterRejected, check_name
from loraserve.adapters.finetune import (BASE_LEARNING_RATE, LIMITS, FinetuneConfig, auto_hyperparameters,
                                         mean_example_tokens)
from loraserve.adapters.files import PURPOSE
from loraserve.adapters.finetune_data import parse_jsonl
from loraserve.adapters.finetune_jobs import JobManager

from .auth import Caller, authenticate
from .errors import APIError
from .files_routes import finetune_service, page
from .openai_models import _Strict

router = APIRouter(tags=["fine-tuning"])

DEFAULT_RANK = 16
DEFAULT_MAX_SEQ_LEN = 1024
MAX_LR_MULTIPLIER = 10.0
MAX_SUFFIX = 40


class Hyperparameters(_Strict):
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | int | Literal["auto"] = "auto"
    lora_rank: int | None = None                # loraserve's own, from here down
    lora_alpha: float | int | None = None
    target_modules: list[str] | None = None
    use_dora: bool | None = None                # train DoRA instead of plain LoRA
    max_seq_len: int | None = None


class Supervised(_Strict):
    hyperparameters: Hyperparameters | None = None


class Method(_Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class FineTuningJobRequest(_Strict):
    model: str = Field(min_length=1, description="the served base model's id")
    training_file: str = Field(min_length=1, description="a file id from POST /v1/files")
    validation_file: str | None = None
    suffix: str | None = Field(None, description=f"up to {MAX_SUFFIX} letters, digits, '.', '_' or '-'; the "
                                                 "adapter is also registered under this name")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None


def job_manager(request: Request) -> JobManager:
    return finetune_service(request, "jobs")


@router.post("/v1/fine_tuning/jobs", summary="Create a fine-tuning job: a LoRA adapter of the base model")
async def create_job(body: FineTuningJobRequest, request: Request, caller: Caller = Depends(authenticate)):
    ctx = request.app.state.ctx
    jobs = job_manager(request)
    if body.model not in ctx.base_names:
        raise APIError(400, f"model {body.model!r} is not available for fine-tuning here; fine-tune the served base "
                            f"model {ctx.model_id!r} (an adapter cannot be trained further)", "model",
                       "model_not_available")
    if body.suffix is not None:
        _check_suffix(body.suffix)
    if body.integrations:
        raise APIError(400, "integrations (e.g. wandb) are not supported by this server; leave them out",
                       "integrations")
    hyper = _hyperparameters(body)
    training = jobs.files.get(caller.tenant, body.training_file, "training_file", PURPOSE)
    if body.validation_file is not None:
        validation = jobs.files.get(caller.tenant, body.validation_file, "validation_file", PURPOSE)
        if validation.format != training.format:
            raise APIError(400, f"the validation file is {validation.format} data but the training file is "
                                f"{training.format}; use one format for both", "validation_file")
    seed = body.seed if body.seed is not None else random.randrange(2**31)
    examples = await to_thread.run_sync(lambda: parse_jsonl(jobs.files.read(training)).examples)
    resolved, config = resolve_hyperparameters(hyper, examples, ctx.store.spec.max_lora_rank,
                                               ctx.max_model_len, seed)
    job = await to_thread.run_sync(lambda: jobs.create(
        caller.tenant, body.model, training.id, body.validation_file, body.suffix, seed, resolved, config,
        body.metadata))
    return job.to_openai()


def _check_suffix(suffix: str) -> None:
    try:
        check_name(suffix, "suffix")
    except AdapterRejected as e:
        raise APIError(400, str(e), "suffix") from None
    if len(suffix) > MAX_SUFFIX:
        raise APIError(400, f"suffix is {len(suffix)} characters; at most {MAX_SUFFIX}", "suffix")


def _hyperparameters(body: FineTuningJobRequest) -> Hyperparameters:
    if body.method is not None:
        if body.method.type != "supervised":
            raise APIError(400, f"method {body.method.type!r} is not supported; this server trains supervised "
                                "LoRA adapters (method.type = 'supervised')", "method.type")
        nested = body.method.supervised.hyperparameters if body.method.supervised else None
        if nested is not None and body.hyperparameters is not None:
            raise APIError(400, "hyperparameters are given twice; send them under method.supervised only",
                           "hyperparameters")
        return nested or body.hyperparameters or Hyperparameters()
    return body.hyperparameters or Hyperparameters()


def resolve_hyperparameters(h: Hyperparameters, examples: list[dict], max_rank: int, max_len: int,
                            seed: int) -> tuple[dict, dict]:
    """("auto" resolved to numbers as the job reports them, FinetuneConfig fields); 400 when out of range.
    "auto" is chosen from the dataset's size and length (adapters/finetune.py, auto_hyperparameters)."""
    epochs = None if h.n_epochs == "auto" else _int_in("n_epochs", h.n_epochs, *LIMITS["epochs"])
    batch = None if h.batch_size == "auto" else _int_in("batch_size", h.batch_size, *LIMITS["batch_size"])
    auto = auto_hyperparameters(len(examples), mean_example_tokens(examples), epochs, batch)
    epochs, batch = auto.n_epochs, auto.batch_size
    multiplier = (auto.learning_rate_multiplier if h.learning_rate_multiplier == "auto"
                  else _number("learning_rate_multiplier", h.learning_rate_multiplier))
    if not (math.isfinite(multiplier) and 0 < multiplier <= MAX_LR_MULTIPLIER):
        raise _out_of_range("learning_rate_multiplier", f"a number in (0, {MAX_LR_MULTIPLIER:g}] or 'auto'",
                            h.learning_rate_multiplier)
    rank = h.lora_rank if h.lora_rank is not None else min(DEFAULT_RANK, max_rank)
    if h.lora_rank is not None and h.lora_rank > max_rank:
        raise APIError(400, f"hyperparameters.lora_rank {rank} exceeds this server's max_lora_rank {max_rank}; "
                            f"ask for at most {max_rank}, or restart the server with --max-lora-rank {rank}",
                       "hyperparameters.lora_rank")
    rank = _int_in("lora_rank", rank, 1, max_rank)
    alpha = float(h.lora_alpha) if h.lora_alpha is not None else 2.0 * rank
    if not (math.isfinite(alpha) and 0 < alpha <= 4096):
        raise _out_of_range("lora_alpha", "a number in (0, 4096]", h.lora_alpha)
    targets = h.target_modules if h.target_modules is not None else list(LORA_MODULES)
    if not targets or any(t not in LORA_MODULES for t in targets):
        raise _out_of_range("target_modules", f"a non-empty list of {', '.join(LORA_MODULES)}", targets)
    max_seq_len = h.max_seq_len if h.max_seq_len is not None else min(DEFAULT_MAX_SEQ_LEN, max_len)
    max_seq_len = _int_in("max_seq_len", max_seq_len, LIMITS["max_seq_len"][0], max_len)
    use_dora = bool(h.use_dora)
    config = FinetuneConfig(rank=rank, alpha=alpha, targets=tuple(targets), use_dora=use_dora, epochs=epochs,
                            batch_size=batch,
                            learning_rate=BASE_LEARNING_RATE * multiplier, max_seq_len=max_seq_len, seed=seed)
    resolved = {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": multiplier,
                "lora_rank": rank, "lora_alpha": alpha, "target_modules": list(targets), "use_dora": use_dora,
                "max_seq_len": max_seq_len}
    fields = {f: getattr(config, f) for f in ("rank", "alpha", "use_dora", "epochs", "batch_size", "learning_rate",
                                              "max_seq_len", "eval_fraction", "max_eval_examples", "seed")}
    return resolved, {**fields, "targets": list(config.targets)}


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _out_of_range(name, f"a number in (0, {MAX_LR_MULTIPLIER:g}] or 'auto'", value)
    return float(value)


def _int_in(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _out_of_range(name, f"an integer from {low} to {high}" + (" or 'auto'" if name in (
            "n_epochs", "batch_size") else ""), value)
    return value


def _out_of_range(name: str, wanted: str, got) -> APIError:
    return APIError(400, f"hyperparameters.{name} must be {wanted}, got {got!r}", f"hyperparameters.{name}",
                    "invalid_hyperparameters")


@router.get("/v1/fine_tuning/jobs", summary="This tenant's fine-tuning jobs, newest first")
async def list_jobs(request: Request, caller: Caller = Depends(authenticate), after: str | None = None,
                    limit: int = Query(20, ge=1, le=1000)):
    return page([j.to_openai() for j in job_manager(request).list(caller.tenant)], after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}", summary="One fine-tuning job")
async def get_job(job_id: str, request: Request, caller: Caller = Depends(authenticate)):
    return job_manager(request).get(caller.tenant, job_id).to_openai()


@router.get("/v1/fine_tuning/jobs/{job_id}/events", summary="A job's events (status, per-step loss), newest first")
async def job_events(job_id: str, request: Request, caller: Caller = Depends(authenticate),
                     after: str | None = None, limit: int = Query(20, ge=1, le=10000)):
    return page(job_manager(request).events(caller.tenant, job_id), after, limit)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", summary="Cancel a queued or running job")
async def cancel_job(job_id: str, request: Request, caller: Caller = Depends(authenticate)):
    jobs = job_manager(request)
    job = await to_thread.run_sync(jobs.cancel, caller.tenant, job_id)
    return job.to_openai()
