"""The ingress of the Ray Serve scale-out: the single-node HTTP app (api/app.py, every
route unchanged) built on `ClusterEngine`, an engine-like proxy whose requests go to the
engine replicas through a Ray Serve streaming handle.

    route -> Group -> ClusterEngine.generate
          -> handle.options(multiplexed_model_id="tenant/name@version", stream=True).generate
          -> Ray Serve routes to a replica that holds that version -> AsyncEngine.generate

Management calls (`engine.call(fn)`) run `fn` on `IngressCore`, which looks like an
LLMEngine to the routes: store operations hit the shared store directly (the ingress is
its one writer), tiers and stats come from the replicas' latest reports on the board.
Replicas drop deleted versions themselves, within one sync interval.
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

from loraserve.adapters import AdapterRecord, AdapterStore, BaseModelSpec, default_store_root
from loraserve.async_engine import EngineDeadError
from loraserve.config import EngineConfig
from loraserve.engine import DEFAULT_TENANT
from loraserve.model.loader import load_config, load_tokenizer, resolve_model
from loraserve.outputs import RequestOutput

from .app import build_app
from .ray_replica import SYNC_INTERVAL_S
from .settings import ServerSettings

log = logging.getLogger("loraserve.ray")

REPLICA_HEADER = b"x-loraserve-replica"
# the replicas that served the current HTTP request (a list the ServedBy middleware owns)
_served_by: contextvars.ContextVar[list | None] = contextvars.ContextVar("loraserve_served_by", default=None)


class IngressCore:
    """The fixed attributes of an LLMEngine that the routes read, and the calls they make
    through engine.call, answered for the whole cluster. No model weights are loaded."""

    def __init__(self, config: EngineConfig, num_replicas: int, max_adapter_bytes: int):
        source = resolve_model(config.model, config.cache_dir)
        self.model_id = source.model_id
        self.hf_config = hf_config = load_config(source.local_dir)
        self.tokenizer = load_tokenizer(source.local_dir)
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

    def stats(self) -> dict:
        """LLMEngine.stats() summed over the live replicas; `resident` is their union."""
        total: dict = {}
        resident: dict[str, set] = {"device": set(), "cpu": set()}
        for report in self.replicas.values():
            for key, value in report["stats"].items():
                if key == "resident":
                    for tier, keys in value.items():
                        resident.setdefault(tier, set()).update(keys)
                elif isinstance(value, (int, float)):
                    total[key] = total.get(key, 0) + value
        total["resident"] = {tier: sorted(keys) for tier, keys in resident.items()}
        return total

    def adapter_tier(self, record: AdapterRecord) -> str:
        """The best tier any replica holds the version in."""
        resident = self.stats()["resident"]
        if record.key in resident["device"]:
            return "device"
        return "cpu" if record.key in resident["cpu"] else "disk"

    def remove_adapter(self, name: str, tenant: str = DEFAULT_TENANT) -> list[AdapterRecord]:
        """Delete from the shared store; each replica drops its copies at its next sync."""
        return self.store.delete(tenant, name)

    def forget_adapter(self, record: AdapterRecord) -> None:
        pass   # replicas notice a deleted version themselves (its metadata left the shared store)


class ClusterEngine:
    """AsyncEngine's interface (generate, call, alive, engine) over the engine replicas."""

    def __init__(self, core: IngressCore, replicas, board, adapter_affinity: bool = True):
        self.engine = core
        self.adapter_affinity = adapter_affinity   # False: Ray Serve's default routing (benchmarks compare)
        self.replicas = replicas   # DeploymentHandle of the engine deployment
        self.board = board         # DeploymentHandle of the ReplicaBoard
        self.error: str | None = "no engine replica has reported yet"
        self._refresh_task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        """True while at least one engine replica reports (/health answers 503 otherwise)."""
        self._start_refresh()
        return bool(self.engine.replicas)

    async def call(self, fn):
        self._start_refresh()
        return await to_thread.run_sync(fn, self.engine)

    async def generate(self, prompt: str | list[int], params, adapter: str | None = None,
                       request_id: str | None = None, tenant: str = DEFAULT_TENANT,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        self._start_refresh()
        # the version's key is the multiplexed model id: Ray Serve prefers a replica that holds it
        key = "" if adapter is None else self.engine.store.resolve(tenant, adapter).key
        if self.adapter_affinity:
            handle = self.replicas.options(multiplexed_model_id=key, stream=True)
        else:
            handle = self.replicas.options(stream=True)
        stream = handle.generate.remote(prompt, params, adapter, request_id, tenant, key, priority)
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
                self.engine.replicas = await self.board.snapshot.remote()
                self.error = None if self.engine.replicas else "no engine replica has reported recently"
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
