"""The services behind the files and fine-tuning routes, built from a server's engine
and settings.

They live apart from HTTP (adapters/files.py, adapters/finetune_jobs.py); the server
wires them up here because only api/ sees all it takes: the settings, and the engine
(an EngineClient: one process's, or a Ray ingress's). The batch runner is wired in batch_requests.py, beside
the route code that answers its lines.
"""

from __future__ import annotations

import os

from loraserve.adapters.files import FileStore
from loraserve.adapters.finetune_jobs import JobManager
from loraserve.engine_client import EngineClient


def finetune_services(engine: EngineClient, settings) -> tuple[FileStore, JobManager]:
    """The file store and job manager of a server on `engine`; a fine-tuning worker loads
    the base again from the engine's model directory."""
    root = settings.finetune_dir or os.path.join(engine.store.root, "finetune")
    files = FileStore(root, settings.max_file_bytes)
    jobs = JobManager(root, files, engine.store, engine.model_dir, engine.model_id, settings.max_finetune_jobs,
                      settings.finetune_threads)
    return files, jobs
