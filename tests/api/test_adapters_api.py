"""Adapters over HTTP with API keys: upload and immediate use, versions, deletes, tenant
isolation (another tenant's adapter is a 404 exactly like a missing one; an admin reaches
all), rejected uploads store nothing, key changes apply without a restart, and vLLM's
load/unload endpoints answer as vLLM does, load_inplace never reusing stale KV blocks."""

from __future__ import annotations

import json
import os

import pytest
from livekit import live_server, tiny_engine
from peft_files import peft_files, read_dir, upload

from loraserve.api import ServerSettings
from loraserve.api.keys import create_key, read_keys, revoke_key

MAX_ADAPTER_BYTES = 4 << 20


@pytest.fixture(scope="module")
def env(tiny_llama, tmp_path_factory):
    base_dir, adapter_dirs = tiny_llama
    root = tmp_path_factory.mktemp("adapters_api")
    keys_file = str(root / "keys.json")
    keys = {"alice": create_key(keys_file, "alice")[0], "bob": create_key(keys_file, "bob")[0],
            "admin": create_key(keys_file, "ops", admin=True)[0]}
    engine = tiny_engine(base_dir, str(root / "store"))
    settings = ServerSettings(api_keys=keys_file, max_adapter_bytes=MAX_ADAPTER_BYTES)
    try:
        with live_server(engine, settings) as server:
            yield server, keys, keys_file, {name: read_dir(p) for name, p in adapter_dirs.items()}, adapter_dirs
    finally:
        engine.shutdown()


def complete(c, model: str, prompt: str = "the quick brown fox", max_tokens: int = 6):
    return c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                           "temperature": 0, "ignore_eos": True})


def names(response) -> set[str]:
    assert response.status_code == 200, response.text
    return {a["id"] for a in response.json()["data"]}


def test_upload_then_use_at_once(env):
    server, keys, _, files, _ = env
    base = server.ctx.model_id
    with server.client(keys["alice"]) as c:
        r = upload(c, "support-bot", files["r8"])
        assert r.status_code == 201, r.text
        body = r.json()
        assert (body["id"], body["version"], body["rank"], body["owner"], body["parent"]) == \
               ("support-bot", 1, 8, "alice", base)
        tuned = complete(c, "support-bot")
        plain = complete(c, base)
        assert tuned.status_code == 200 and plain.status_code == 200
        assert tuned.json()["choices"][0]["text"] != plain.json()["choices"][0]["text"]
        assert complete(c, f"{base}:support-bot").json()["choices"][0]["text"] == tuned.json()["choices"][0]["text"]
        assert "support-bot" in names(c.get("/v1/adapters"))
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["support-bot"]["parent"] == base and models[base]["parent"] is None


def test_versions_tiers_and_deleting_one_version(env):
    server, keys, _, files, _ = env
    with server.client(keys["alice"]) as c:
        assert upload(c, "multi", files["r4"]).json()["version"] == 1
        assert upload(c, "multi", files["r16_rslora"]).json()["version"] == 2
        first = complete(c, "multi@1").json()["choices"][0]["text"]
        newest = complete(c, "multi").json()["choices"][0]["text"]
        assert complete(c, "multi@2").json()["choices"][0]["text"] == newest != first
        info = c.get("/v1/adapters/multi").json()
        assert [v["version"] for v in info["versions"]] == [1, 2]
        assert [v["rank"] for v in info["versions"]] == [4, 16]
        assert all(v["tier"] in ("device", "cpu", "disk") and len(v["sha256"]) == 64 for v in info["versions"])
        assert info["versions"][1]["tier"] == "device"     # it just ran
        assert info["target_modules"] and info["version"] == 2
        assert [v["version"] for v in c.get("/v1/adapters/multi@1").json()["versions"]] == [1]
        gone = c.delete("/v1/adapters/multi@1")
        assert gone.status_code == 200 and gone.json()["versions"] == [1]
        assert complete(c, "multi@1").status_code == 404
        assert complete(c, "multi").json()["choices"][0]["text"] == newest
        assert c.delete("/v1/adapters/multi").json()["versions"] == [2]
        assert c.get("/v1/adapters/multi").status_code == 404


def test_tenants_see_use_and_delete_only_their_own(env):
    server, keys, _, files, _ = env
    with server.client(keys["alice"]) as alice, server.client(keys["bob"]) as bob, \
            server.client(keys["admin"]) as admin:
        assert upload(alice, "secret", files["r4"]).status_code == 201
        missing = bob.get("/v1/adapters/no-such-name").json()["error"]
        for path in ("/v1/adapters/secret", "/v1/adapters/alice/secret"):
            err = bob.get(path)
            assert err.status_code == 404
            assert err.json()["error"]["message"] == missing["message"].replace("no-such-name", path.split("/v1/adapters/")[1])
        assert "secret" not in names(bob.get("/v1/adapters"))
        assert "secret" not in {m["id"] for m in bob.get("/v1/models").json()["data"]}
        for model in ("secret", "alice/secret", "secret@1"):
            r = complete(bob, model)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            assert r.json()["error"]["message"] == complete(bob, "no-such-name").json()["error"]["message"].replace(
                "no-such-name", model)
        assert bob.delete("/v1/adapters/secret").status_code == 404
        assert bob.delete("/v1/adapters/alice/secret").status_code == 404
        assert bob.post("/v1/unload_lora_adapter", json={"lora_name": "secret"}).status_code == 404
        assert complete(alice, "secret").status_code == 200, "bob's attempts changed nothing"
        # the admin reaches alice's adapter as alice/secret
        assert "secret" in names(admin.get("/v1/adapters", params={"tenant": "alice"}))
        assert admin.get("/v1/adapters/alice/secret").json()["owner"] == "alice"
        assert complete(admin, "alice/secret").json()["choices"][0]["text"] == \
            complete(alice, "secret").json()["choices"][0]["text"]
        assert bob.get("/v1/adapters", params={"tenant": "alice"}).status_code == 403
        assert admin.delete("/v1/adapters/alice/secret").status_code == 200
        assert complete(alice, "secret").status_code == 404


def test_shared_adapters_are_usable_read_only(env):
    server, keys, _, files, _ = env
    with server.client(keys["admin"]) as admin, server.client(keys["bob"]) as bob, \
            server.client(keys["alice"]) as alice:
        assert upload(alice, "mine", files["r4"], shared="true").status_code == 403, "sharing needs an admin"
        assert upload(admin, "house-style", files["r8"], shared="true").status_code == 201
        listed = {a["id"]: a for a in bob.get("/v1/adapters").json()["data"]}
        assert listed["ops/house-style"]["shared"] is True
        assert complete(bob, "house-style").status_code == 200
        assert complete(bob, "ops/house-style").status_code == 200
        assert bob.delete("/v1/adapters/ops/house-style").status_code == 404
        assert bob.delete("/v1/adapters/house-style").status_code == 404
        assert complete(alice, "house-style").status_code == 200


@pytest.mark.parametrize("case", ["bad-name", "pickle", "missing-file", "too-big", "bad-safetensors", "rank-too-high",
                                  "bad-config", "unknown-target", "not-multipart"])
def test_rejected_uploads_store_nothing(env, case):
    server, keys, _, files, _ = env
    config, weights = files["r4"]
    with server.client(keys["alice"]) as c:
        before = c.get("/v1/adapters").json()["data"]
        expect = 400
        if case == "bad-name":
            r = upload(c, "../escape", (config, weights))
        elif case == "pickle":
            r = c.post("/v1/adapters", data={"name": "pickled"},
                       files={"adapter_config": ("adapter_config.json", config),
                              "adapter_model": ("adapter_model.bin", b"\x80\x04pickle")})
        elif case == "missing-file":
            r = c.post("/v1/adapters", data={"name": "half"}, files={"adapter_config": ("adapter_config.json", config)})
        elif case == "too-big":
            r, expect = upload(c, "huge", (config, os.urandom(MAX_ADAPTER_BYTES + 1))), 413
        elif case == "bad-safetensors":
            r = upload(c, "garbage", (config, b"not a safetensors file"))
        elif case == "rank-too-high":
            r = upload(c, "wide", peft_files(server.engine.engine.spec, rank=128))
        elif case == "bad-config":
            r = upload(c, "badcfg", (b"{not json", weights))
        elif case == "unknown-target":
            r = upload(c, "embed", (json.dumps({**json.loads(config), "target_modules": ["embed_tokens"]}).encode(),
                                    weights))
        else:
            r, expect = c.post("/v1/adapters", content=b"name=x", headers={"content-type": "text/plain"}), 415
        assert r.status_code == expect, r.text
        err = r.json()["error"]
        assert err["message"] and err["type"]
        assert c.get("/v1/adapters").json()["data"] == before


def test_missing_and_wrong_keys_are_401_and_key_changes_apply_live(env):
    server, keys, keys_file, _, _ = env
    with server.client() as anonymous:
        r = anonymous.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        assert anonymous.get("/health").status_code == 200
    with server.client("lsk-not-a-key") as wrong:
        assert wrong.get("/v1/models").json()["error"]["code"] == "invalid_api_key"
    with server.client(keys["bob"]) as bob:
        assert bob.get("/metrics").status_code == 403
    key, entry = create_key(keys_file, "carol")
    with server.client(key) as carol:
        assert carol.get("/v1/models").status_code == 200, "a new key works without a restart"
        revoke_key(keys_file, entry.id)
        assert carol.get("/v1/models").status_code == 401, "a revoked key stops at once"
    assert key not in open(keys_file).read() and all(e.sha256 != key for e in read_keys(keys_file))


def test_vllm_load_and_unload(env):
    server, keys, _, _, dirs = env
    with server.client(keys["admin"]) as admin, server.client(keys["alice"]) as alice:
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": dirs["r4"]})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql' added successfully."
        assert complete(admin, "sql").status_code == 200
        again = admin.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": dirs["r4"]})
        assert again.status_code == 400 and "has already been loaded" in again.json()["error"]["message"]
        r = admin.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql' removed successfully."
        r = admin.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
        assert r.status_code == 404 and "cannot be found" in r.json()["error"]["message"]
        missing = admin.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/no/such/dir"})
        assert missing.status_code == 400 and "does not exist" in missing.json()["error"]["message"]
        denied = alice.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": dirs["r4"]})
        assert denied.status_code == 403, "server paths are for admins"


def test_load_inplace_serves_new_weights_and_never_stale_prefix_blocks(env):
    """vllm#42125: a reload under the same name must not reuse KV blocks of the old weights."""
    server, keys, _, files, dirs = env
    prompt = "a prompt long enough to fill several kv cache blocks " * 3    # > 2 blocks of 16 tokens
    with server.client(keys["admin"]) as admin:
        assert admin.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": dirs["r4"]}).status_code == 200
        old = complete(admin, "policy", prompt).json()["choices"][0]["text"]
        complete(admin, "policy", prompt)                                   # the prefix is now cached
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": dirs["r8"],
                                                      "load_inplace": True})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'policy' added successfully."
        new = complete(admin, "policy", prompt).json()["choices"][0]["text"]
        assert upload(admin, "fresh-r8", files["r8"]).status_code == 201
        fresh = complete(admin, "fresh-r8", prompt).json()["choices"][0]["text"]
        assert new == fresh != old
        versions = admin.get("/v1/adapters/policy").json()["versions"]
        assert [v["version"] for v in versions] == [2], "the old weights are gone, as in vLLM"


def test_upload_dora_adapter_and_use_it(env, tiny_llama, tmp_path):
    """A DoRA adapter uploads, shows its kind and size, and changes the output at once."""
    import torch
    from lorakit import ALL_MODULES, save_peft_kind
    from transformers import AutoModelForCausalLM

    server, keys, _, _, _ = env
    base = AutoModelForCausalLM.from_pretrained(tiny_llama[0], dtype=torch.float32)
    files = read_dir(save_peft_kind(base, str(tmp_path / "dora"), seed=5, use_dora=True, target_modules=ALL_MODULES))
    with server.client(keys["alice"]) as c:
        r = upload(c, "dora-bot", files)
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["kinds"] == ["DoRA"] and body["bytes"] > 0 and body["copy_bytes"] == 0
        tuned = complete(c, "dora-bot")
        assert tuned.status_code == 200, tuned.text
        assert tuned.json()["choices"][0]["text"] != complete(c, server.ctx.model_id).json()["choices"][0]["text"]
        assert c.get("/v1/adapters/dora-bot").json()["kinds"] == ["DoRA"]
