"""One engine replica of the Ray Serve scale-out: an AsyncEngine with its own device slots
and CPU cache, reading adapter weights from the store every replica shares.

The ingress names the adapter version a request runs as Ray Serve's multiplexed model
id (its key, `tenant/name@version`), so Ray routes it to a replica that already holds
that version; `load_adapter` is the `@serve.multiplexed` loader: it reads the version's
metadata from the shared store and adopts it into this replica's view of the store.

The shared store has one writer, the ingress. A replica keeps a private, empty store
root of its own (so its start-up recovery never sweeps the shared root while the
ingress writes to it) and learns versions one by one as requests name them. Every
SYNC_INTERVAL_S it drops the versions whose metadata left the shared store (a delete,
or vLLM's load_inplace) and reports its stats to the ReplicaBoard.

Everything it asks of its engine goes through AsyncEngine's ReplicaEngineClient methods
(loraserve/engine_client.py), so engine state is only touched on the engine's thread.
A constrained request arrives with its grammar's text (a compiled matcher cannot cross
processes) and is compiled here again, off the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import tempfile
import time

from ray import serve

from loraserve.adapters import AdapterNotFound, AdapterRecord, default_store_root
from loraserve.adapters.record import record_from_json
from loraserve.adapters.store_layout import StoreLayout
from loraserve.async_engine import AsyncEngine
from loraserve.config import EngineConfig
from loraserve.grammar import GrammarCompiler
from loraserve.prepared import PreparedPrompt
from loraserve.sampling_params import SamplingParams

log = logging.getLogger("loraserve.ray")

SYNC_INTERVAL_S = 0.5
REPORT_MAX_AGE_S = 5.0   # a replica silent for longer counts as gone (killed, restarting)


def current_replica_id() -> str:
    ctx = serve.get_replica_context()
    replica_id = getattr(ctx, "replica_id", None)
    return getattr(replica_id, "unique_id", None) or str(getattr(ctx, "replica_tag", replica_id))


class EngineReplica:
    """The body of the engine deployment (ray_deploy.py wraps it with serve.deployment)."""

    def __init__(self, config: EngineConfig, max_adapters: int, board=None):
        self.shared = StoreLayout(config.adapter_dir or default_store_root())
        self.private_root = tempfile.mkdtemp(prefix="loraserve-replica-")
        self.engine = AsyncEngine(dataclasses.replace(config, adapter_dir=self.private_root))
        self.grammar = GrammarCompiler(self.engine.tokenizer, self.engine.vocab_size)
        self.replica_id = current_replica_id()
        self.board = board
        self.adopted: dict[str, AdapterRecord] = {}   # key -> record, the versions this replica has learnt
        self.num_adapter_requests = 0
        self.num_warm_requests = 0                     # adapter requests whose version was already in a slot
        self._sync_task: asyncio.Task | None = None
        # the multiplexed loader is made per instance: its capacity is a constructor argument
        self.load_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(self._make_loader())
        log.info("replica %s: %d adapter slots, at most %d adapters routed here", self.replica_id,
                 config.max_loras, max_adapters)
        self._start_sync()   # Ray Serve runs the constructor on the replica's event loop

    def _make_loader(self):
        async def load_adapter(key: str) -> AdapterRecord:
            return await self._adopt(key)
        return load_adapter

    # -- requests ------------------------------------------------------------------------
    async def info(self) -> dict:
        self._start_sync()
        return {"replica": self.replica_id, "model_id": self.engine.model_id,
                "max_model_len": self.engine.max_model_len}

    async def generate(self, prompt: PreparedPrompt, params: SamplingParams, request_id: str, priority: int = 0):
        """Streams RequestOutputs, each tagged with this replica's id (`.replica`). The
        ingress prepared the prompt (its adapter record is the version to run); the
        version's key is also the multiplexed model id Ray Serve routed by."""
        self._start_sync()
        if prompt.adapter is not None:
            await self.load_adapter(prompt.adapter_key)
            self.num_adapter_requests += 1
        if params.grammar is not None:
            processor = await asyncio.to_thread(self.grammar.processor, params.grammar)
            params = dataclasses.replace(params, logits_processors=[*params.logits_processors, processor])
        first = True
        async for out in self.engine.generate(prompt, params, request_id=request_id, priority=priority):
            if first and prompt.adapter is not None:
                self.num_warm_requests += out.adapter_tier == "device"   # it was in a slot when the request came
            first = False
            out.replica = self.replica_id
            yield out

    # -- the shared store ----------------------------------------------------------------
    async def _adopt(self, key: str) -> AdapterRecord:
        """Learn version `key` from the shared store and start loading it into the CPU tier
        (Ray Serve calls this once per version it routes here, until its LRU drops it)."""
        record = self.adopted.get(key)
        if record is None:
            record, blob_id = await asyncio.to_thread(self._read_meta, key)
            await self.engine.adopt_adapter(record, blob_id)   # and it starts reading into the CPU tier
            self.adopted[key] = record
        return record

    def _read_meta(self, key: str) -> tuple[AdapterRecord, str]:
        tenant, _, rest = key.partition("/")
        name, _, version = rest.rpartition("@")
        try:
            with open(self.shared.meta_path(tenant, name, int(version)), "rb") as f:
                record, blob_id, base = record_from_json(f.read(), self.shared.blobs)
        except (OSError, ValueError) as e:
            raise AdapterNotFound(f"adapter {key} is not in the shared store ({e}); it was deleted, "
                                  "or this replica reads another store than the ingress") from None
        if base != self.engine.store.spec.shape_key:
            raise AdapterNotFound(f"adapter {key} was registered for another base model")
        return record, blob_id

    async def _drop_deleted(self) -> None:
        gone = [r for r in self.adopted.values()
                if not os.path.exists(self.shared.meta_path(r.tenant, r.name, r.version))]
        for record in gone:
            del self.adopted[record.key]
            await self.engine.drop_adapter(record)
            log.info("replica %s: dropped deleted adapter %s", self.replica_id, record.key)

    # -- background sync -----------------------------------------------------------------
    def _start_sync(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            try:
                self._sync_task = asyncio.get_running_loop().create_task(self._sync())
            except RuntimeError:   # no loop here: the first request or health check starts it
                pass

    async def _sync(self) -> None:
        while True:
            try:
                await self._drop_deleted()
                if self.board is not None:
                    await self.board.report.remote(self.replica_id, await self._report())
            except Exception as e:   # noqa: BLE001 - the next round tries again
                log.warning("replica %s: sync failed: %r", self.replica_id, e)
            await asyncio.sleep(SYNC_INTERVAL_S)

    async def _report(self) -> dict:
        return {"max_model_len": self.engine.max_model_len, "stats": await self.engine.stats(),
                "adapter_requests": self.num_adapter_requests, "warm_requests": self.num_warm_requests}

    async def check_health(self) -> None:
        self._start_sync()
        if not self.engine.alive:
            raise RuntimeError(f"the engine loop of replica {self.replica_id} has stopped: {self.engine.error!r}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=2.0)
        shutil.rmtree(getattr(self, "private_root", ""), ignore_errors=True)


class ReplicaBoard:
    """Where replicas report their stats, and the ingress reads them (one replica)."""

    def __init__(self):
        self.reports: dict[str, dict] = {}

    async def report(self, replica_id: str, report: dict) -> None:
        self.reports[replica_id] = {**report, "time": time.time()}   # the board's clock, not the replica's

    async def snapshot(self) -> dict[str, dict]:
        now = time.time()
        self.reports = {r: rep for r, rep in self.reports.items() if now - rep["time"] < REPORT_MAX_AGE_S}
        return dict(self.reports)
