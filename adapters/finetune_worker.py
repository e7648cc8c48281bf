"""The body of a fine-tuning worker process, which the server's job manager starts with the
"spawn" context: train, write the adapter, report over a queue, exit.

Training runs in its own process so it never stalls the serving engine's loop, with its
torch threads capped so serving keeps its cores. Messages on `events`, plain tuples:
    ("progress", dict of finetune.Progress)
    ("done", dict of finetune.TrainResult)
    ("error", code, message)
A thread watches the parent: a worker never outlives the server that started it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

log = logging.getLogger(__name__)


@dataclasses.dataclass
class WorkerJob:
    base_dir: str                   # the served model's HF directory
    base_model_id: str              # written into adapter_config.json
    training_path: str
    validation_path: str | None
    out_dir: str                    # where the PEFT files go
    config: dict                    # the fields of finetune.FinetuneConfig
    num_threads: int = 1
    parent_pid: int = 0


def run(job: WorkerJob, events) -> None:
    _exit_with_parent(job.parent_pid)
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(max(1, job.num_threads))
    hf_logging.set_verbosity_error()
    from .finetune import FinetuneConfig, TrainingError, train_lora
    from .finetune_data import DataError, parse_jsonl

    try:
        data = parse_jsonl(_read(job.training_path, "training"))
        validation = parse_jsonl(_read(job.validation_path, "validation")) if job.validation_path else None
        result = train_lora(job.base_dir, data, FinetuneConfig(**job.config), job.out_dir, validation,
                            on_progress=lambda p: events.put(("progress", dataclasses.asdict(p))),
                            base_model_id=job.base_model_id)
        events.put(("done", dataclasses.asdict(result)))
    except FileNotFoundError as e:
        events.put(("error", "file_not_found", str(e)))
    except DataError as e:
        events.put(("error", "invalid_training_file", str(e)))
    except TrainingError as e:
        events.put(("error", "training_diverged", str(e)))
    except Exception as e:   # noqa: BLE001 - whatever broke, the job must end with a reason
        log.exception("fine-tuning worker failed")
        events.put(("error", "training_failed", f"training failed ({type(e).__name__}: {e})"))
    events.close()
    events.join_thread()     # the last message is in the pipe before the process exits


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"the {what} file was deleted before the job started; upload it again "
                                "and create a new job") from None


def _exit_with_parent(parent_pid: int) -> None:
    if not parent_pid:
        return

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(3)     # the server is gone: nobody will read what this job makes

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
