"""Percentiles from histogram buckets (as Prometheus' histogram_quantile reads them), and
over a sliding window of snapshots: plain numbers, a fake clock, no server."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from loraserve.api.latency_window import LatencyWindow, bucket_counts, histogram_quantile


def histogram(buckets) -> Histogram:
    return Histogram("h_seconds", "test", buckets=buckets, registry=CollectorRegistry())


def test_quantile_interpolates_inside_the_bucket_like_prometheus():
    h = histogram((0.1, 0.2, 0.5, 1.0))
    for v in [0.05] * 10 + [0.15] * 10:
        h.observe(v)
    b = bucket_counts(h)
    assert b[-1] == (float("inf"), 20)
    assert histogram_quantile(0.5, b) == pytest.approx(0.1)      # rank 10: the top of the first bucket
    assert histogram_quantile(0.75, b) == pytest.approx(0.15)    # rank 15: half-way through (0.1, 0.2]
    assert histogram_quantile(0.25, b) == pytest.approx(0.05)


def test_quantile_past_the_last_edge_is_that_edge_and_empty_is_none():
    h = histogram((0.1, 1.0))
    assert histogram_quantile(0.5, bucket_counts(h)) is None
    h.observe(0.05)
    h.observe(30.0)
    assert histogram_quantile(0.99, bucket_counts(h)) == 1.0


def test_quantile_is_within_one_bucket_of_the_exact_one():
    edges = tuple(round(0.01 * i, 2) for i in range(1, 101))
    h = histogram(edges)
    rng = random.Random(0)
    values = sorted(rng.betavariate(2, 5) for _ in range(2000))
    for v in values:
        h.observe(v)
    for q in (0.5, 0.9, 0.99):
        exact = values[int(q * len(values)) - 1]
        assert abs(histogram_quantile(q, bucket_counts(h)) - exact) <= 0.01


def test_window_covers_only_recent_observations():
    now = [0.0]
    h = histogram((0.01, 0.1, 1.0, 10.0))
    window = LatencyWindow(h, window_s=60, clock=lambda: now[0])
    for _ in range(100):
        h.observe(5.0)
    first = window.quantiles((0.5,))
    assert first["window_s"] is None and first["p50"] > 1.0        # no earlier snapshot: since the start
    now[0] = 10.0
    for _ in range(100):
        h.observe(0.005)
    recent = window.quantiles((0.5,))
    assert recent["window_s"] == 10.0 and recent["p50"] <= 0.01     # the 5 s ones came before the window
    now[0] = 30.0
    assert window.quantiles((0.5,))["p50"] <= 0.01                  # still measured from t=0's snapshot
    now[0] = 200.0                                                 # every snapshot is older than the window
    idle = window.quantiles((0.5, 0.99))
    assert idle["window_s"] is None and idle["p50"] is not None
    now[0] = 230.0
    assert window.quantiles((0.5,)) == {"window_s": 30.0, "p50": None}   # nothing observed in the last 30 s
