"""What the console (/ui) shows of the engine, as one JSON snapshot.

The same numbers /metrics exports (LLMEngine.stats(), the admission queue, the request
histograms), shaped for a page that polls it: latency percentiles over the last minute
rather than since the start, and token totals the page turns into a rate.
"""

from __future__ import annotations

import time

from loraserve.engine_stats import EngineStats

from .latency_window import LatencyWindow
from .metrics import ServerMetrics

QUANTILES = (0.5, 0.9, 0.99)


class ConsoleState:
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.ttft = LatencyWindow(metrics.ttft)
        self.itl = LatencyWindow(metrics.itl)

    def snapshot(self, stats: EngineStats, admission) -> dict:
        """`stats` as LLMEngine.stats() returns it (all zeros at a Ray ingress before any
        replica has reported)."""
        loads = stats.disk_loads
        return {
            "time": time.time(),
            "requests": {"running": stats.num_running, "waiting": stats.num_waiting,
                         "api_queued": admission.num_queued, "in_flight": admission.in_flight,
                         "rejected": admission.num_rejected, "preemptions": stats.num_preemptions},
            "kv_blocks": {"used": stats.kv_blocks_used, "total": stats.kv_blocks_total},
            "slots": {"used": stats.adapter_slots_used, "total": stats.adapter_slots_total,
                      "pinned": stats.adapter_slots_pinned},
            "adapters": {"loads": stats.adapter_loads, "evictions": stats.adapter_evictions,
                         "disk_load_mean_s": stats.disk_load_seconds / loads if loads else None,
                         "tier_hits": {"device": stats.device_hits, "cpu": stats.cpu_hits,
                                       "disk": stats.disk_loads}},
            "prefix_cache": {"queries": stats.prefix_cache_queries,
                             "hits": stats.prefix_cache_hits},
            # generated: one TTFT or ITL observation per token as it streams, so it moves while
            # requests run (the token counters move when a request finishes)
            "tokens": {"prompt": _counter_total(self.metrics.prompt_tokens),
                       "generated": _count(self.metrics.ttft) + _count(self.metrics.itl)},
            "ttft_s": self.ttft.quantiles(QUANTILES),
            "itl_s": self.itl.quantiles(QUANTILES),
        }


def _counter_total(counter) -> float:
    """The sum of a labelled counter over all its labels."""
    return sum(s.value for s in counter.collect()[0].samples if s.name.endswith("_total"))


def _count(histogram) -> float:
    return next(s.value for s in histogram.collect()[0].samples if s.name.endswith("_count"))
