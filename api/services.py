"""The services behind the files and fine-tuning routes, built from a server's engine
and settings.

They live apart from HTTP (adapters/files.py, adapters/finetune_jobs.py); the server
wires them up here because only api/ sees all it takes: the settings, and the engine
(or a Ray ingress's stand-in). The batch runner is wired in batch_requests.py, beside
the route code that answers its lines.
"""

from __future__ import annotations

import os

from loraserve.adapters.files import FileStore
from loraserve.adapters.finetune_jobs import JobManager


def finetune_services(core, settings) -> tuple[FileStore, JobManager]:
    """The file store and job manager of a server whose LLMEngine is `core`."""
    root = settings.finetune_dir or os.path.join(core.store.root, "finetune")
    files = FileStore(root, settings.max_file_bytes)
    jobs = JobManager(root, files, core.store, base_dir_of(core), core.model_id, settings.max_finetune_jobs,
                      settings.finetune_threads)
    return files, jobs


def base_dir_of(core) -> str:
    """The served model's HF directory (what the engine loaded), for the worker to load again."""
    path = getattr(core, "model_dir", "")           # a Ray ingress core has none
    if path and os.path.isdir(path):
        return path
    from loraserve.model.loader import resolve_model

    return resolve_model(core.config.model, core.config.cache_dir).local_dir

