"""The ingress of the Ray Serve scale-out: the single-node HTTP app (api/app.py, every
route unchanged) built on `ClusterEngine`, the EngineClient (loraserve/engine_client.py)
whose requests go to the engine replicas through a Ray Serve streaming handle.

    route -> prepare (here: ids and the adapter version checked once) -> Group
          -> ClusterEngine.generate
          -> handle.options(multiplexed_model_id="tenant/name@version", stream=True).generate
          -> Ray Serve routes to a replica that holds that version -> AsyncEngine.generate

`IngressCore` holds the facts an engine has (tokenizer, the shared store, the context
length) without loading weights. Store operations hit the shared store directly (the
ingress is its one writer); tiers and stats come from the replicas' latest reports on
the board. Replicas drop deleted versions themselves, within one sync interval. A
constrained request travels with its grammar's text and no compiled matcher (which
cannot be pickled); the replica compiles it again.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
from typing import AsyncIterator

from anyio import to_thread
from prometheus_client.core import GaugeMetricFamily
from ray import exceptions as ray_exceptions
from ray import serve

from loraserve.adapters import DEFAULT_TENANT, AdapterRecord, AdapterStore, BaseModelSpec, default_store_root
from loraserve.async_engine import EngineDeadError
from loraserve.config import EngineConfig
from loraserve.engine_stats import EngineStats
from loraserve.grammar import GrammarProcessor
from loraserve.model.loader import load_config, load_tokenizer, resolve_model
from loraserve.outputs import RequestOutput
from loraserve.prepared import PreparedPrompt, prepare_prompt
from loraserve.sampling_params import SamplingParams

from .app import build_app
from .ray_replica import SYNC_INTERVAL_S
from .settings import ServerSettings

log = logging.getLogger("loraserve.ray")

REPLICA_HEADER = b"x-loraserve-replica"
# the replicas that served the current HTTP request (a list the ServedBy middleware owns)
_served_by: contextvars.ContextVar[list | None] = contextvars.ContextVar("loraserve_served_by", default=None)


class IngressCore:
    """The facts of an engine for the whole cluster, and the replicas' latest reports. No
    model weights are loaded."""

    def __init__(self, config: EngineConfig, num_replicas: int, max_adapter_bytes: int):
        source = resolve_model(config.model, config.cache_dir)
        self.model_id = source.model_id
        self.model_dir = source.local_dir
        self.hf_config = hf_config = load_config(source.local_dir)
        self.tokenizer = load_tokenizer(source.local_dir)
        self.vocab_bound = min(len(self.tokenizer), hf_config.vocab_size)   # as LLMEngine's
        # admission counts the whole cluster's running places
        self.config = dataclasses.replace(config, max_num_seqs=config.max_num_seqs * num_replicas)
        spec = BaseModelSpec.from_hf_config(hf_config, config.max_lora_rank, self.model_id)
        self.store = AdapterStore(config.adapter_dir or default_store_root(), spec, max_adapter_bytes)
        context = getattr(hf_config, "max_position_embeddings", 4096)
        self._wanted_len = config.max_model_len or min(context, 4096)
        self.replicas: dict[str, dict] = {}   # replica id -> its latest report (ray_replica.EngineReplica._report)

    @property
    def max_model_len(self) -> int:
        """What the replicas report (their KV pools may cap it); the configured length until one has."""
        return min((r["max_model_len"] for r in self.replicas.values()), default=self._wanted_len)

    def stats(self) -> EngineStats:
        """LLMEngine.stats() summed over the live replicas; `resident` is their union."""
        return EngineStats.total([report["stats"] for report in self.replicas.values()])


class ClusterEngine:
    """The EngineClient of the ingress: facts from IngressCore, requests to the replicas."""

    def __init__(self, core: IngressCore, replicas, board, adapter_affinity: bool = True):
        self.core = core
        self.model_id, self.model_dir, self.tokenizer = core.model_id, core.model_dir, core.tokenizer
        self.vocab_size, self.config, self.store = core.hf_config.vocab_size, core.config, core.store
        self.adapter_affinity = adapter_affinity   # False: Ray Serve's default routing (benchmarks compare)
        self.replicas = replicas   # DeploymentHandle of the engine deployment
        self.board = board         # DeploymentHandle of the ReplicaBoard
        self.error: str | None = "no engine replica has reported yet"
        self._refresh_task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        """True while at least one engine replica reports (/health answers 503 otherwise)."""
        self._start_refresh()
        return bool(self.core.replicas)

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def prepare(self, prompt: str | list[int], adapter: str | AdapterRecord | None = None,
                tenant: str = DEFAULT_TENANT) -> PreparedPrompt:
        c = self.core
        return prepare_prompt(prompt, adapter, tenant, tokenizer=c.tokenizer, store=c.store,
                              vocab_bound=c.vocab_bound, max_model_len=c.max_model_len)

    async def stats(self) -> EngineStats:
        self._start_refresh()
        return self.core.stats()

    async def adapter_tiers(self, records: list[AdapterRecord]) -> list[str]:
        """The best tier any replica holds each version in."""
        stats = await self.stats()
        return [stats.tier_of(r.key) for r in records]

    async def remove_adapter(self, ref: str, tenant: str) -> list[AdapterRecord]:
        """Delete from the shared store; each replica drops its copies at its next sync."""
        return await to_thread.run_sync(self.store.delete, tenant, ref)

    async def settle(self) -> None:
        pass   # an abort is a cancelled stream: nothing is left on its way back

    def shutdown(self, timeout: float = 10.0) -> None:
        pass   # the replicas belong to Ray Serve

    async def generate(self, prompt: PreparedPrompt, params: SamplingParams, request_id: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        self._start_refresh()
        # the version's key is the multiplexed model id: Ray Serve prefers a replica that holds it
        if self.adapter_affinity:
            handle = self.replicas.options(multiplexed_model_id=prompt.adapter_key or "", stream=True)
        else:
            handle = self.replicas.options(stream=True)
        if params.grammar is not None:   # the replica compiles it again: a matcher is not picklable
            params = dataclasses.replace(params, logits_processors=[
                p for p in params.logits_processors if not isinstance(p, GrammarProcessor)])
        stream = handle.generate.remote(prompt, params, request_id, priority)
        served = _served_by.get()
        finished = False
        try:
            async for out in stream:
                if served is not None and out.replica and out.replica not in served:
                    served.append(out.replica)
                finished = out.finished
                yield out
        except Exception as e:   # noqa: BLE001 - re-raised as what the routes understand
            raise replica_error(e) from None
        finally:
            if not finished:
                stream.cancel()   # the replica's generator stops, which aborts its engine request

    def abort(self, request_id: str) -> None:
        pass   # leaving generate() cancels the replica's stream, which aborts the request there

    def _start_refresh(self) -> None:
        if self._refresh_task is None or self._refresh_task.done():
            try:
                self._refresh_task = asyncio.get_running_loop().create_task(self._refresh())
            except RuntimeError:   # no event loop here: the next call from one starts it
                pass

    async def _refresh(self) -> None:
        while True:
            try:
                self.core.replicas = await self.board.snapshot.remote()
                self.error = None if self.core.replicas else "no engine replica has reported recently"
            except Exception as e:   # noqa: BLE001 - the board restarts with the app; try again
                log.warning("reading the replica board failed: %r", e)
            await asyncio.sleep(SYNC_INTERVAL_S)


_REPLICA_GONE = tuple(getattr(ray_exceptions, name) for name in ("RayActorError", "ActorUnavailableError")
                      if hasattr(ray_exceptions, name))


def replica_error(e: BaseException) -> BaseException:
    """A replica's exception as the routes' error mapping knows it: the replica's own
    exception (a ValueError is a 400, ...), or EngineDeadError (503, retry) when the
    replica died under the request."""
    if isinstance(e, _REPLICA_GONE):
        return EngineDeadError(f"the engine replica serving this request stopped ({type(e).__name__}); "
                               "Ray Serve restarts it, other replicas keep serving")
    cause = getattr(e, "cause", None)
    if isinstance(e, ray_exceptions.RayTaskError) and isinstance(cause, BaseException):
        return cause
    return e


class ServedBy:
    """ASGI middleware: the `x-loraserve-replica` header names the replica(s) that served
    a generation request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        served: list[str] = []
        token = _served_by.set(served)

        async def tagged(message) -> None:
            if message["type"] == "http.response.start" and served:
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER, ",".join(served).encode())]}
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        finally:
            _served_by.reset(token)


class ReplicaCollector:
    """Per-replica series for /metrics, from the replicas' latest reports."""

    def __init__(self, core: IngressCore):
        self.core = core

    def describe(self):
        return []

    def collect(self):
        series = {
            "adapter_requests": ("loraserve_replica_adapter_requests", "adapter requests routed to each replica"),
            "warm_requests": ("loraserve_replica_warm_adapter_requests", "adapter requests that found their "
                              "adapter already in a device slot of the replica they were routed to"),
        }
        up = GaugeMetricFamily("loraserve_replica_up", "1 for each engine replica that reported recently",
                               labels=["replica"])
        families = {key: GaugeMetricFamily(name, doc, labels=["replica"]) for key, (name, doc) in series.items()}
        for replica, report in sorted(self.core.replicas.items()):
            up.add_metric([replica], 1)
            for key, family in families.items():
                family.add_metric([replica], report.get(key, 0))
        yield up
        yield from families.values()


def ingress_builder(config: EngineConfig, settings: ServerSettings, num_replicas: int, engine_name: str,
                    board_name: str, adapter_affinity: bool = True):
    """The ASGI app builder serve.ingress runs on the ingress replica."""
    def build():
        app_name = serve.get_replica_context().app_name
        core = IngressCore(config, num_replicas, settings.max_adapter_bytes)
        engine = ClusterEngine(core, serve.get_deployment_handle(engine_name, app_name),
                               serve.get_deployment_handle(board_name, app_name), adapter_affinity)
        app = build_app(engine, settings)
        app.state.ctx.metrics.registry.register(ReplicaCollector(core))
        app.add_middleware(ServedBy)
        return app
    return build
