"""Prometheus metrics, in a registry of the app's own (two apps in one process never clash).

Request-side series are counted here as requests pass; engine-side ones (queue, KV
blocks, adapter slots, loads, tier hits, residency) are read from `LLMEngine.stats()`
on the engine thread at scrape time and exposed by a custom collector.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from loraserve.engine_stats import EngineStats
from loraserve.outputs import RequestOutput

from .adapter_usage import AdapterUsage

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("loraserve_requests", "API requests answered, by endpoint, HTTP status "
                                "(499: client went away) and adapter", ["endpoint", "status", "adapter"], registry=r)
        self.prompt_tokens = Counter("loraserve_prompt_tokens", "prompt tokens of finished requests", ["adapter"],
                                     registry=r)
        self.generation_tokens = Counter("loraserve_generation_tokens", "generated tokens", ["adapter"], registry=r)
        self.ttft = Histogram("loraserve_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraserve_inter_token_latency_seconds", "time between consecutive generated tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("loraserve_e2e_request_latency_seconds", "arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.engine = EngineCollector()
        r.register(self.engine)
        self.usage = AdapterUsage()   # per version, for the console (/ui)

    def timer(self, adapter: str, arrival: float, adapter_key: str | None = None) -> "RequestTimer":
        return RequestTimer(self, adapter, arrival, adapter_key)

    def count(self, endpoint: str, status: int, adapter: str) -> None:
        self.requests.labels(endpoint, str(status), adapter).inc()

    def render(self, stats: EngineStats, api: dict) -> bytes:
        self.engine.stats = stats
        self.engine.api = api
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: count each generation request once, by its real ending. Routes
    leave the adapter label in request.state.adapter; a stream that ends badly after
    its 200 went out leaves request.state.final_status (499 when the client left)."""

    def __init__(self, app, metrics: ServerMetrics, endpoints: dict[str, str]):
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope, receive, send) -> None:
        endpoint = self.endpoints.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        sent = {"status": 500}

        async def capture(message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            state = scope.get("state") or {}
            self.metrics.count(endpoint, state.get("final_status", sent["status"]), state.get("adapter", ""))


class RequestTimer:
    """TTFT, inter-token latency and end-to-end time of one engine request."""

    def __init__(self, metrics: ServerMetrics, adapter: str, arrival: float, adapter_key: str | None = None):
        self.metrics = metrics
        self.adapter = adapter
        self.adapter_key = adapter_key   # tenant/name@version; None for the base model
        self.start = arrival          # time.monotonic() when the route began
        self.last: float | None = None
        self.num_tokens = 0

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        new = len(out.token_ids) - self.num_tokens
        if new > 0:
            if self.last is None:
                self.metrics.ttft.observe(now - self.start)
                new -= 1
            elif new:
                gap = (now - self.last) / new
                for _ in range(new):
                    self.metrics.itl.observe(gap)
            self.last = now
            self.num_tokens = len(out.token_ids)
        if out.finished:
            self.metrics.e2e.observe(now - self.start)
            self.metrics.prompt_tokens.labels(self.adapter).inc(len(out.prompt_token_ids))
            self.metrics.generation_tokens.labels(self.adapter).inc(len(out.token_ids))
            if self.adapter_key is not None:
                self.metrics.usage.record(self.adapter_key, len(out.prompt_token_ids), len(out.token_ids))


class EngineCollector:
    """Engine state from the last stats() snapshot, as gauges and counters."""

    GAUGES = {
        "num_running": ("loraserve_num_requests_running", "requests in the engine's running batch"),
        "num_waiting": ("loraserve_num_requests_waiting", "requests waiting in the engine's queue"),
        "kv_blocks_used": ("loraserve_kv_blocks_used", "KV-cache blocks in use"),
        "kv_blocks_total": ("loraserve_kv_blocks_total", "KV-cache blocks in the pool"),
        "adapter_slots_used": ("loraserve_adapter_slots_used", "device adapter slots holding an adapter"),
        "adapter_slots_total": ("loraserve_adapter_slots_total", "device adapter slots"),
        "adapter_slots_pinned": ("loraserve_adapter_slots_pinned", "device adapter slots pinned by running requests"),
        "base_weight_bytes": ("loraserve_base_weight_bytes", "bytes of the base's projection weights as served "
                              "(set by --quantization)"),
        "adapter_slot_bytes": ("loraserve_adapter_slot_bytes", "bytes of the device adapter slot buffers"),
    }
    COUNTERS = {
        "adapter_loads": ("loraserve_adapter_loads", "adapters copied into a device slot"),
        "adapter_evictions": ("loraserve_adapter_evictions", "adapters evicted from a device slot"),
        "num_preemptions": ("loraserve_preemptions", "requests preempted (recomputed) for KV blocks"),
        "prefix_cache_queries": ("loraserve_prefix_cache_queries", "prompt blocks looked up in the prefix cache"),
        "prefix_cache_hits": ("loraserve_prefix_cache_hits", "prompt blocks found in the prefix cache"),
    }
    TIERS = {"device_hits": "device", "cpu_hits": "cpu", "disk_loads": "disk"}

    def __init__(self):
        self.stats = EngineStats()
        self.api: dict = {}

    def describe(self):
        return []

    def collect(self):
        s = self.stats
        for key, (name, doc) in self.GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=getattr(s, key))
        for key, (name, doc) in self.COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=getattr(s, key))
        yield SummaryMetricFamily("loraserve_adapter_load_seconds", "time to read an adapter from the store on disk",
                                  count_value=s.disk_loads, sum_value=s.disk_load_seconds)
        hits = CounterMetricFamily("loraserve_adapter_tier_hits", "adapter lookups by the tier that served them "
                                   "(device: already in a slot, cpu: from the CPU cache, disk: read from the store)",
                                   labels=["tier"])
        for key, tier in self.TIERS.items():
            hits.add_metric([tier], getattr(s, key))
        yield hits
        resident = GaugeMetricFamily("loraserve_adapter_resident", "1 for each adapter version held in a tier",
                                     labels=["tier", "adapter"])
        for tier, keys in s.resident.items():
            for key in keys:
                resident.add_metric([tier, str(key)], 1)
        yield resident
        for key, (name, doc) in {"queued": ("loraserve_api_queued_requests", "engine requests admitted beyond "
                                            "max_num_seqs (the queue --max-queue bounds)"),
                                 "in_flight": ("loraserve_api_in_flight_requests", "engine requests admitted "
                                               "and not finished")}.items():
            if key in self.api:
                yield GaugeMetricFamily(name, doc, value=self.api[key])
        if "rejected" in self.api:
            yield CounterMetricFamily("loraserve_api_rejected_requests", "requests answered 429 (queue full)",
                                      value=self.api["rejected"])
