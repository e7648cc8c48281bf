"""What the HTTP layer (api/) and a Ray Serve replica may ask of an engine, and nothing else.

Two classes implement it: AsyncEngine (one process: the engine loop on its own thread)
and the Ray ingress's ClusterEngine (requests go to engine replicas). The routes are
written against this Protocol, so neither reaches into the other's internals, and every
call that touches engine state runs on the engine's own thread.

Facts (model_id, tokenizer, ...) are fixed at start and readable from any thread;
`max_model_len` may shrink once a cluster's replicas report their KV pools. `prepare`
runs on the caller's thread: it only reads facts and the store (which has its own lock).
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from loraserve.adapters import AdapterRecord, AdapterStore

from .config import EngineConfig
from .engine_stats import EngineStats
from .outputs import RequestOutput
from .prepared import PreparedPrompt
from .sampling_params import SamplingParams


class EngineClient(Protocol):
    model_id: str
    model_dir: str | None        # the base's local HF directory (a fine-tuning worker loads it), if any
    tokenizer: object
    vocab_size: int              # the width of the logits (a tokenizer may have fewer tokens)
    config: EngineConfig         # as it runs (a cluster: max_num_seqs counts every replica's places)
    store: AdapterStore          # adapter registration and lookup; thread-safe
    error: object                # why the engine stopped, when it has

    @property
    def max_model_len(self) -> int: ...

    @property
    def alive(self) -> bool: ...

    def prepare(self, prompt: str | list[int], adapter: str | AdapterRecord | None = None,
                tenant: str = ...) -> PreparedPrompt:
        """Every check of a request, once (LLMEngine.prepare); raises ValueError subclasses."""

    def generate(self, prompt: PreparedPrompt, params: SamplingParams, request_id: str | None = None,
                 priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields a snapshot each time the request advances; the last is finished. A caller
        that stops early aborts the request."""

    async def stats(self) -> EngineStats: ...

    async def adapter_tiers(self, records: list[AdapterRecord]) -> list[str]:
        """Where each version sits now: device, cpu or disk."""

    async def remove_adapter(self, ref: str, tenant: str) -> list[AdapterRecord]:
        """Delete `ref` (every version, or `name@3`); requests already running on it finish."""

    async def settle(self) -> None:
        """Return once every abort sent so far has been taken."""

    def shutdown(self, timeout: float = 10.0) -> None: ...


class ReplicaEngineClient(EngineClient, Protocol):
    """What a Ray Serve engine replica adds: it learns adapter versions one by one from the
    shared store (the ingress is the store's one writer) and drops the deleted ones."""

    async def adopt_adapter(self, record: AdapterRecord, blob_id: str) -> None:
        """Index a version registered elsewhere, and start reading it into the CPU tier."""

    async def drop_adapter(self, record: AdapterRecord) -> None:
        """Forget a version deleted elsewhere; requests running on it keep its weights and finish."""
