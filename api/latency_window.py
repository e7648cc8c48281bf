"""Percentiles of a Prometheus histogram over the last minute, as Grafana would draw them.

A histogram only counts observations per bucket since the start, so "TTFT p95 now" is
the difference of two snapshots of its cumulative bucket counts, read the way
Prometheus' histogram_quantile reads buckets: linear inside the bucket that holds the
rank, the lower edge of the first bucket being 0, and the highest finite edge for a rank
that falls in +Inf.
"""

from __future__ import annotations

import math
import time
from collections import deque

from prometheus_client import Histogram


def bucket_counts(histogram: Histogram) -> list[tuple[float, float]]:
    """[(upper edge, cumulative count)], +Inf last, from the histogram's own samples."""
    samples = histogram.collect()[0].samples
    return [(float(s.labels["le"]), s.value) for s in samples if s.name.endswith("_bucket")]


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile (0 < q < 1) of cumulative `buckets`; None when they hold nothing."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower_edge, lower_count = 0.0, 0.0
    for edge, count in buckets:
        if count >= rank:
            if math.isinf(edge):
                return lower_edge
            inside = count - lower_count
            return edge if inside <= 0 else lower_edge + (edge - lower_edge) * (rank - lower_count) / inside
        lower_edge, lower_count = edge, count
    return lower_edge


class LatencyWindow:
    """Quantiles of `histogram` over about the last `window_s` seconds: snapshots are taken
    when asked (at most one a second), so the window is as wide as the oldest one kept."""

    def __init__(self, histogram: Histogram, window_s: float = 60.0, clock=time.monotonic):
        self.histogram = histogram
        self.window_s = window_s
        self.clock = clock
        self._snapshots: deque[tuple[float, list[tuple[float, float]]]] = deque()

    def quantiles(self, qs: tuple[float, ...]) -> dict:
        """{"window_s": seconds covered (None: since the start), "p50": seconds or None, ...};
        a quantile is None where nothing was observed in the window."""
        now, current = self.clock(), bucket_counts(self.histogram)
        while self._snapshots and now - self._snapshots[0][0] > self.window_s:
            self._snapshots.popleft()
        if self._snapshots:
            since, baseline = self._snapshots[0]
            window = now - since
        else:
            window, baseline = None, [(edge, 0.0) for edge, _ in current]
        if not self._snapshots or now - self._snapshots[-1][0] >= 1.0:
            self._snapshots.append((now, current))
        recent = [(edge, count - old) for (edge, count), (_, old) in zip(current, baseline)]
        return {"window_s": window, **{f"p{round(q * 100)}": histogram_quantile(q, recent) for q in qs}}
