"""deploy/grafana/loraserve.json queries only what the server exports: every metric each
panel (and the instance picker) names is a series a live server's /metrics has, every
label it matches on or groups by is one that series carries, and every function is
PromQL's. The issue's panels are all there."""

from __future__ import annotations

import json
import os
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from loraserve import EngineConfig
from loraserve.api import build_app
from loraserve.async_engine import AsyncEngine

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "grafana", "loraserve.json")
TARGET_LABELS = {"instance", "job"}    # Prometheus adds these to every series it scrapes
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
PROMQL_FUNCTIONS = {
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "count_values", "group",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "predict_linear", "resets", "changes",
    "histogram_quantile", "abs", "ceil", "floor", "round", "clamp", "clamp_min", "clamp_max", "scalar", "vector",
    "time", "timestamp", "label_replace", "label_join", "sort", "sort_desc", "absent", "absent_over_time",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "last_over_time",
    "quantile_over_time",
}
# What the issue asks the dashboard to show, as the series that show it.
REQUIRED = {
    "throughput": "loraserve_generation_tokens_total",
    "TTFT percentiles": "loraserve_time_to_first_token_seconds_bucket",
    "ITL percentiles": "loraserve_inter_token_latency_seconds_bucket",
    "queue depth": "loraserve_num_requests_waiting",
    "KV usage": "loraserve_kv_blocks_used",
    "slot occupancy": "loraserve_adapter_slots_used",
    "tier hits": "loraserve_adapter_tier_hits_total",
    "adapter load time": "loraserve_adapter_load_seconds_sum",
}
STRING = r'"(?:[^"\\]|\\.)*"'


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory) -> dict[str, set[str]]:
    """{sample name: its label names} from /metrics of a server that has served an adapter."""
    base_dir, adapter_dirs = tiny_models["llama"]
    engine = AsyncEngine(EngineConfig(model=base_dir, dtype="float32", max_loras=2, max_lora_rank=64, max_model_len=128,
                                      num_kv_blocks=64, adapter_dir=str(tmp_path_factory.mktemp("grafana"))))
    engine.engine.store.register_dir("default", "bot", adapter_dirs["r4"])
    try:
        with TestClient(build_app(engine)) as client:
            r = client.post("/v1/completions", json={"model": "bot", "prompt": "hi there", "max_tokens": 4})
            assert r.status_code == 200, r.text
            text = client.get("/metrics").text
    finally:
        engine.shutdown()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def parse(expr: str) -> tuple[dict[str, set[str]], set[str], set[str]]:
    """({metric: labels it is matched on}, labels grouped by, functions called) of a PromQL expression."""
    metrics: dict[str, set[str]] = {}
    for name, body in re.findall(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", expr):
        metrics.setdefault(name, set()).update(re.findall(rf"(\w+)\s*(?:=~|!~|!=|=)\s*{STRING}", body))
    grouped = {label.strip() for labels in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
               for label in labels.split(",") if label.strip()}
    bare = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|" + STRING, " ", bare)
    functions = set(re.findall(r"([a-zA-Z_:][\w:]*)\s*\(", bare))
    for token in re.findall(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()", bare):
        if token not in KEYWORDS:
            metrics.setdefault(token, set())
    return metrics, grouped, functions


def check_expr(expr: str, exported: dict[str, set[str]], where: str) -> dict[str, set[str]]:
    metrics, grouped, functions = parse(expr)
    assert metrics, f"{where}: {expr!r} queries no metric"
    assert functions <= PROMQL_FUNCTIONS, f"{where}: {sorted(functions - PROMQL_FUNCTIONS)} are not PromQL functions"
    for metric, labels in metrics.items():
        assert metric in exported, f"{where}: {metric} is not exported by /metrics"
        assert labels <= exported[metric] | TARGET_LABELS, \
            f"{where}: {metric} has no label {sorted(labels - exported[metric] - TARGET_LABELS)}"
    carried = set().union(*(exported[m] for m in metrics)) | TARGET_LABELS
    assert grouped <= carried, f"{where}: grouped by {sorted(grouped - carried)}, which none of {sorted(metrics)} has"
    return metrics


def test_every_panel_queries_exported_metrics(dashboard, exported):
    for panel in panels(dashboard):
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            where = f"panel {panel['title']!r} ({target['refId']})"
            check_expr(target["expr"], exported, where)
            _, grouped, _ = parse(target["expr"])
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert label in grouped, f"{where}: the legend names {label}, which the query does not keep"


def test_the_instance_picker_queries_an_exported_label(dashboard, exported):
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "instance")
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
    assert metric in exported and label in exported[metric] | TARGET_LABELS


def test_the_issues_panels_are_there(dashboard, exported):
    queried, grouped = set(), set()
    for panel in panels(dashboard):
        for target in panel["targets"]:
            metrics, groups, _ = parse(target["expr"])
            queried |= set(metrics)
            if "adapter" in groups:
                grouped |= set(metrics)
    missing = {what: metric for what, metric in REQUIRED.items() if metric not in queried}
    assert not missing, f"no panel shows {missing}"
    assert "loraserve_generation_tokens_total" in grouped, "no panel shows tokens per adapter"


def test_dashboard_is_importable(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    for panel in panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_the_checker_catches_mistakes(exported):
    """The check above would fail on a wrong name, a wrong label or a made-up function."""
    for bad in ('sum(rate(loraserve_generated_tokens_total[5m]))',
                'sum by (tenant) (rate(loraserve_generation_tokens_total[5m]))',
                'loraserve_adapter_tier_hits_total{level="cpu"}',
                'hist_quantile(0.5, sum by (le) (rate(loraserve_time_to_first_token_seconds_bucket[5m])))'):
        with pytest.raises(AssertionError):
            check_expr(bad, exported, "test")
    check_expr('histogram_quantile(0.9, sum by (le) (rate(loraserve_time_to_first_token_seconds_bucket'
               '{instance=~"$instance"}[$__rate_interval])))', exported, "test")
