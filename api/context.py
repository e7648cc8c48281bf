"""Everything a route needs, built once per app from an engine and the settings.

`engine` is an EngineClient (loraserve/engine_client.py): AsyncEngine in one process,
the Ray ingress's ClusterEngine in a cluster. Routes use nothing else of the engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loraserve.engine_client import EngineClient
from loraserve.grammar import GrammarCompiler

from .admission import Admission
from .keys import KeyRing
from .metrics import ServerMetrics
from .prompts import Prompts
from .services import finetune_services
from .settings import ServerSettings


@dataclass
class ServeContext:
    engine: EngineClient
    settings: ServerSettings
    keyring: KeyRing | None
    admission: Admission
    prompts: Prompts
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    started_at: float = field(default_factory=time.time)
    files: object | None = None     # adapters.files.FileStore; None when fine-tuning is off
    jobs: object | None = None      # adapters.finetune_jobs.JobManager; None when fine-tuning is off
    batches: object | None = None   # loraserve.batches.BatchManager, set by build_app; None when the Batch API is off
    grammar: GrammarCompiler | None = None   # structured outputs and forced tool calls

    @classmethod
    def build(cls, engine: EngineClient, settings: ServerSettings) -> "ServeContext":
        files, jobs = finetune_services(engine, settings) if settings.max_finetune_jobs > 0 else (None, None)
        return cls(
            engine=engine,
            settings=settings,
            keyring=KeyRing(settings.api_keys) if settings.api_keys else None,
            admission=Admission(engine.config.max_num_seqs, settings.max_queue, settings.retry_after),
            prompts=Prompts(engine.tokenizer),
            files=files,
            jobs=jobs,
            grammar=GrammarCompiler(engine.tokenizer, engine.vocab_size),
        )

    @property
    def vocab_size(self) -> int:
        """The width of the logits (a tokenizer may have fewer tokens)."""
        return self.engine.vocab_size

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    @property
    def base_names(self) -> set[str]:
        return {self.model_id, *self.settings.served_model_names}

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def store(self):
        return self.engine.store
