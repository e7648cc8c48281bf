"""The console's JSON views and files, without a browser: who sees which adapter
versions, per-version use counted from finished requests, the engine snapshot, and the
page's files (served with a policy that forbids any other origin, and shipped as
package data)."""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib

import httpx
import pytest
from uikit import live_server

from loraserve import EngineConfig
from loraserve.api import ServerSettings
from loraserve.api.console_routes import STATIC_DIR
from loraserve.api.keys import create_key
from loraserve.async_engine import AsyncEngine

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    base_dir, adapter_dirs = tiny_models["llama"]
    root = tmp_path_factory.mktemp("console_api")
    keys_file = str(root / "keys.json")
    keys = {"alice": create_key(keys_file, "alice")[0], "bob": create_key(keys_file, "bob")[0],
            "admin": create_key(keys_file, "ops", admin=True)[0]}
    engine = AsyncEngine(EngineConfig(model=base_dir, dtype="float32", max_loras=2, max_lora_rank=64,
                                      max_model_len=128, num_kv_blocks=64, adapter_dir=str(root / "store")))
    store = engine.engine.store
    store.register_dir("alice", "bot", adapter_dirs["r4"])
    store.register_dir("alice", "bot", adapter_dirs["r8"])
    store.register_dir("bob", "private", adapter_dirs["r8"])
    store.register_dir("bob", "common", adapter_dirs["r4"], shared=True)
    try:
        with live_server(engine, ServerSettings(api_keys=keys_file, max_finetune_jobs=0)) as app:
            yield app, keys
    finally:
        engine.shutdown()


def client(app, key: str | None) -> httpx.Client:
    return httpx.Client(base_url=app.url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60)


def rows(app, key: str) -> dict[str, dict]:
    with client(app, key) as c:
        r = c.get("/ui/api/adapters")
    assert r.status_code == 200, r.text
    return {f"{a['owner']}/{a['name']}@{a['version']}": a for a in r.json()["data"]}


@pytest.mark.parametrize("path", ["/ui/api/session", "/ui/api/engine", "/ui/api/adapters"])
def test_views_need_a_key(env, path):
    app, _ = env
    for key in (None, "sk-wrong"):
        with client(app, key) as c:
            r = c.get(path)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]


def test_tenant_sees_its_versions_and_shared_ones_read_only(env):
    app, keys = env
    alice = rows(app, keys["alice"])
    assert list(alice) == ["alice/bot@1", "alice/bot@2", "bob/common@1"]
    assert [alice[k]["latest"] for k in alice] == [False, True, True]
    assert (alice["alice/bot@1"]["ref"], alice["alice/bot@1"]["rank"], alice["alice/bot@2"]["rank"]) == ("bot@1", 4, 8)
    assert alice["alice/bot@1"]["deletable"] and not alice["bob/common@1"]["deletable"]
    assert alice["bob/common@1"]["ref"] == "bob/common@1" and alice["bob/common@1"]["shared"]
    assert list(rows(app, keys["bob"])) == ["bob/common@1", "bob/private@1"]
    admin = rows(app, keys["admin"])
    assert list(admin) == ["alice/bot@1", "alice/bot@2", "bob/common@1", "bob/private@1"]
    assert all(a["deletable"] for a in admin.values()) and admin["bob/private@1"]["ref"] == "bob/private@1"
    with client(app, keys["admin"]) as c:
        session = c.get("/ui/api/session").json()
    assert (session["tenant"], session["admin"], session["keys_required"]) == ("ops", True, True)


def test_an_admin_deletes_another_tenants_version_by_its_ref(env, tiny_models):
    app, keys = env
    app.state.ctx.store.register_dir("bob", "doomed", tiny_models["llama"][1]["r4"])
    ref = rows(app, keys["admin"])["bob/doomed@1"]["ref"]
    with client(app, keys["alice"]) as c:
        assert c.delete(f"/v1/adapters/{ref}").status_code == 404      # not alice's to delete
    with client(app, keys["admin"]) as c:
        r = c.delete(f"/v1/adapters/{ref}")
    assert r.status_code == 200 and r.json()["versions"] == [1], r.text
    assert "bob/doomed@1" not in rows(app, keys["admin"]) and "bob/doomed@1" not in rows(app, keys["bob"])


def test_use_is_counted_per_version_from_finished_requests(env):
    app, keys = env
    with client(app, keys["alice"]) as c:
        r = c.post("/v1/completions", json={"model": "bot@1", "prompt": "one two three", "max_tokens": 7,
                                            "temperature": 0, "ignore_eos": True, "n": 2})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    alice = rows(app, keys["alice"])
    used, unused = alice["alice/bot@1"], alice["alice/bot@2"]
    # n=2: two engine requests, each with the prompt (as loraserve_prompt_tokens counts them)
    assert (used["requests"], used["prompt_tokens"], used["generated_tokens"]) == \
           (2, 2 * usage["prompt_tokens"], usage["completion_tokens"])
    assert used["last_used"] is not None and used["tier"] == "device"
    assert (unused["requests"], unused["last_used"], unused["tier"]) == (0, None, "disk")


def test_engine_snapshot(env):
    app, keys = env
    with client(app, keys["bob"]) as c:
        c.post("/v1/completions", json={"model": "private", "prompt": "hello there", "max_tokens": 4,
                                        "ignore_eos": True})
        e = c.get("/ui/api/engine").json()
        metrics = client(app, keys["admin"]).get("/metrics").text
    assert e["requests"]["running"] == 0 and e["requests"]["waiting"] == 0
    assert e["kv_blocks"]["total"] == 64 and e["slots"]["total"] == 2
    # finished requests only, so every generated token is both in the counter and observed once
    assert e["tokens"]["generated"] == _sample(metrics, "loraserve_generation_tokens_total")
    assert e["tokens"]["prompt"] == _sample(metrics, "loraserve_prompt_tokens_total")
    assert e["adapters"]["tier_hits"]["disk"] == _sample(metrics, 'loraserve_adapter_tier_hits_total{tier="disk"}')
    assert e["adapters"]["disk_load_mean_s"] > 0
    for latency in (e["ttft_s"], e["itl_s"]):
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]


def _sample(text: str, name: str) -> float:
    """A series' value, summed over its other labels."""
    metric, _, labels = name.partition("{")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(metric + "{") or line.startswith(metric + " "):
            if not labels or labels.rstrip("}") in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_page_and_its_files(env):
    app, _ = env
    with client(app, None) as c:
        page = c.get("/ui")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        assets = re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', page.text)
        assert len(assets) == 5
        for path in assets:
            assert c.get(path).status_code == 200, path
        assert c.get("/ui/static/../console_routes.py").status_code == 404


def test_every_console_file_is_package_data():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["loraserve.api"]
    api_dir = os.path.dirname(STATIC_DIR)
    for folder, _, names in os.walk(STATIC_DIR):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), api_dir)
            assert any(fnmatch.fnmatch(relative, p) and relative.count("/") == p.count("/") for p in patterns), \
                f"{relative} would be missing from a wheel: add it to [tool.setuptools.package-data]"


def test_snapshot_of_an_engine_that_has_not_reported():
    """A Ray ingress before any replica reports has empty stats: the console shows zeros."""
    from loraserve.api.admission import Admission
    from loraserve.api.console_state import ConsoleState
    from loraserve.api.metrics import ServerMetrics
    from loraserve.engine_stats import EngineStats

    e = ConsoleState(ServerMetrics()).snapshot(EngineStats.total([]), Admission(4, 8, 1))
    assert e["requests"]["running"] == 0 and e["kv_blocks"] == {"used": 0, "total": 0}
    assert e["adapters"]["disk_load_mean_s"] is None and e["ttft_s"]["p50"] is None
