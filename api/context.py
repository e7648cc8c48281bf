"""Everything a route needs, built once per app from an engine and the settings.

`engine` is anything shaped like AsyncEngine: `generate(prompt, params, adapter=,
request_id=, tenant=)`, `call(fn)`, `alive`, and `engine` (the LLMEngine: model_id,
tokenizer, max_model_len, config, store). A Ray Serve replica passes its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loraserve.grammar import GrammarCompiler

from .admission import Admission
from .keys import KeyRing
from .metrics import ServerMetrics
from .prompts import Prompts
from .services import finetune_services
from .settings import ServerSettings


@dataclass
class ServeContext:
    engine: object
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
    def build(cls, engine, settings: ServerSettings) -> "ServeContext":
        core = engine.engine
        files, jobs = finetune_services(core, settings) if settings.max_finetune_jobs > 0 else (None, None)
        return cls(
            engine=engine,
            settings=settings,
            keyring=KeyRing(settings.api_keys) if settings.api_keys else None,
            admission=Admission(core.config.max_num_seqs, settings.max_queue, settings.retry_after),
            prompts=Prompts(core.tokenizer),
            files=files,
            jobs=jobs,
            grammar=GrammarCompiler(core.tokenizer, core.hf_config.vocab_size),
        )

    @property
    def core(self):
        """The LLMEngine: read its fixed attributes anywhere; call its methods through engine.call."""
        return self.engine.engine

    @property
    def vocab_size(self) -> int:
        """The width of the logits (a tokenizer may have fewer tokens)."""
        return self.core.hf_config.vocab_size

    @property
    def model_id(self) -> str:
        return self.core.model_id

    @property
    def base_names(self) -> set[str]:
        return {self.model_id, *self.settings.served_model_names}

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def store(self):
        return self.core.store
