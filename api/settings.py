"""What the HTTP layer is told at start-up (the engine has its own EngineConfig)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from loraserve.adapters import DEFAULT_TENANT  # noqa: F401 - the tenant of every caller without --api-keys

TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json")   # tool_parsers.PARSERS and auto


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: str | None = None             # key file; None = open (loopback only unless allowed)
    allow_unauthenticated: bool = False     # bind a non-loopback host without keys anyway
    max_queue: int | None = None            # requests waiting beyond max_num_seqs running; None = unbounded
    max_adapter_bytes: int = 512 << 20      # upload size limit (both PEFT files together)
    max_body_bytes: int = 16 << 20          # any JSON request body
    max_n: int = 16                         # most choices per request
    drain_timeout: float = 30.0             # SIGTERM: seconds running requests get to finish
    retry_after: int = 1                    # seconds, in the Retry-After header of a 429/503
    served_model_names: tuple[str, ...] = ()  # extra names for the base model besides its id
    finetune_dir: str | None = None         # training files and fine-tuning jobs; None = <adapter store>/finetune
    max_file_bytes: int = 64 << 20          # largest training file upload
    max_finetune_jobs: int = 1              # jobs training at once, more wait queued; 0 = fine-tuning off
    finetune_threads: int = 1               # torch threads of a training worker (the engine keeps the rest)
    batch_concurrency: int = 8              # Batch API lines running at once, behind interactive traffic; 0 = off
    tool_call_parser: str = "auto"          # the model's tool-call format (tool_parsers.py); auto = from its template
    max_schema_bytes: int = 32 << 10        # largest JSON schema in response_format or one tool's parameters

    def __post_init__(self):
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_adapter_bytes < 1:
            raise ValueError(f"max_adapter_bytes must be >= 1, got {self.max_adapter_bytes}")
        if self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be >= 1, got {self.max_file_bytes}")
        if self.max_finetune_jobs < 0 or self.finetune_threads < 1:
            raise ValueError(f"max_finetune_jobs must be >= 0 and finetune_threads >= 1, got "
                             f"{self.max_finetune_jobs} and {self.finetune_threads}")
        if self.batch_concurrency < 0:
            raise ValueError(f"batch_concurrency must be >= 0, got {self.batch_concurrency}")
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                             f"got {self.tool_call_parser!r}")
        if self.max_schema_bytes < 1:
            raise ValueError(f"max_schema_bytes must be >= 1, got {self.max_schema_bytes}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")

    def check_exposure(self) -> None:
        """Refuse to serve without keys on a non-loopback address unless told to."""
        if self.api_keys is None and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(f"refusing to serve {self.host} without authentication: pass --api-keys FILE "
                             "(create keys with `loraserve keys create`), bind 127.0.0.1, "
                             "or pass --allow-unauthenticated to serve it open anyway")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
