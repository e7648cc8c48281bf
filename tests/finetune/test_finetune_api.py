"""The Files and fine-tuning APIs on a tiny random llama (trains in seconds): bad inputs
answer 4xx naming the problem, tenants never see each other's files or jobs, one job
trains at a time while the next waits queued, a finished job's adapter is served at once
under its name and suffix, and a restart reports an interrupted job as failed."""

from __future__ import annotations

import os
import shutil

import openai
import pytest
from ftkit import chat_rows, jsonl, tenant_keys, upload, wait_status
from livekit import live_server

from loraserve import EngineConfig
from loraserve.adapters import AdapterStore
from loraserve.api import ServerSettings
from loraserve.adapters.files import FileStore
from loraserve.adapters.finetune_jobs import JobManager
from loraserve.async_engine import AsyncEngine
from loraserve.api.cli import main

PAIRS = [(f"Question number {i}?", f"Answer {i % 3}.") for i in range(12)]
GOOD = jsonl(chat_rows(PAIRS))
TINY_HYPER = {"n_epochs": 2, "batch_size": 4, "lora_rank": 4, "max_seq_len": 64}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("ftapi")
    keys = tenant_keys(str(root / "keys.json"))
    engine = AsyncEngine(EngineConfig(model=tiny_base, dtype="float32", max_loras=2, max_lora_rank=16,
                                      max_model_len=128, num_kv_blocks=64, adapter_dir=str(root / "store")))
    settings = ServerSettings(api_keys=str(root / "keys.json"), max_file_bytes=32 << 10)
    try:
        with live_server(engine, settings) as server:
            yield server, keys
    finally:
        engine.shutdown()


def test_files_are_checked_listed_and_per_tenant(served):
    server, keys = served
    with server.client(keys["acme"]) as acme, server.client(keys["beta"]) as beta:
        r = upload(acme, GOOD)
        assert r.status_code == 200, r.text
        f = r.json()
        assert f["object"] == "file" and f["purpose"] == "fine-tune" and f["bytes"] == len(GOOD)
        assert [x["id"] for x in acme.get("/v1/files").json()["data"]] == [f["id"]]
        assert acme.get(f"/v1/files/{f['id']}/content").content == GOOD
        assert beta.get("/v1/files").json()["data"] == []
        for call in (beta.get(f"/v1/files/{f['id']}"), beta.delete(f"/v1/files/{f['id']}"),
                     beta.get(f"/v1/files/{f['id']}/content")):
            assert call.status_code == 404 and call.json()["error"]["code"] == "file_not_found"
        bad = {
            GOOD + b"{oops\n": (400, "line 13"),
            b"": (400, "no examples"),
            b'{"messages": [{"role": "user", "content": "hi"}]}\n': (400, "no assistant message"),
            b"x" * (40 << 10): (413, "--max-file-bytes"),
        }
        for data, (status, words) in bad.items():
            r = upload(acme, data)
            assert r.status_code == status and words in r.json()["error"]["message"], r.text
        r = upload(acme, GOOD, purpose="assistants")
        assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
        assert acme.delete(f"/v1/files/{f['id']}").json()["deleted"] is True
        assert acme.get(f"/v1/files/{f['id']}").status_code == 404


@pytest.mark.parametrize("change, param", [
    ({"model": "no-such-model"}, "model"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 1000}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": -1.0}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"lora_rank": 64}}, "hyperparameters.lora_rank"),
    ({"hyperparameters": {"target_modules": ["embed_tokens"]}}, "hyperparameters.target_modules"),
    ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters"),
    ({"hyperparameters": {"n_epochs": "lots"}}, "hyperparameters"),
    ({"hyperparameters": {"n_epochs": -2}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": "lots"}}, "hyperparameters"),
    ({"method": {"type": "dpo"}}, "method.type"),
    ({"suffix": "no/slashes"}, "suffix"),
    ({"training_file": "file-000000000000000000000000"}, "training_file"),
    ({"unknown_field": 1}, "unknown_field"),
])
def test_bad_job_requests(served, change, param):
    server, keys = served
    with server.client(keys["acme"]) as acme:
        file_id = upload(acme, GOOD).json()["id"]
        body = {"model": server.ctx.model_id, "training_file": file_id, **change}
        r = acme.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
    assert (r.status_code == 404) == (param == "training_file")
    for field in change.get("hyperparameters", {}):
        assert field in r.json()["error"]["message"], r.text       # the message names the field
    if param == "hyperparameters.lora_rank":
        assert "--max-lora-rank 64" in r.json()["error"]["message"]


def test_job_trains_queues_cancels_and_is_served(served, tmp_path):
    server, keys = served
    ctx = server.ctx
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=keys["acme"], max_retries=0, timeout=60)
    with server.client(keys["acme"]) as acme, server.client(keys["beta"]) as beta:
        file_id = sdk.files.create(file=("train.jsonl", GOOD), purpose="fine-tune").id
        assert upload(beta, GOOD).status_code == 200
        beta_try = beta.post("/v1/fine_tuning/jobs", json={"model": ctx.model_id, "training_file": file_id})
        assert beta_try.status_code == 404                     # acme's file, named by beta
        first = sdk.fine_tuning.jobs.create(model=ctx.model_id, training_file=file_id, suffix="tiny", seed=1,
                                            hyperparameters=TINY_HYPER)
        second = sdk.fine_tuning.jobs.create(model=ctx.model_id, training_file=file_id, seed=2,
                                             method={"type": "supervised",
                                                     "supervised": {"hyperparameters": TINY_HYPER}})
        assert first.status == "running" and second.status == "queued"       # one at a time
        assert sdk.fine_tuning.jobs.cancel(second.id).status == "cancelled"
        assert acme.post(f"/v1/fine_tuning/jobs/{second.id}/cancel").status_code == 400

        # a server that starts on this disk now finds the running job and reports it failed
        restarted_root = str(tmp_path / "restarted")
        shutil.copytree(os.path.dirname(ctx.jobs.jobs_dir), restarted_root)
        restarted = JobManager(restarted_root, FileStore(restarted_root, 1 << 20),
                               AdapterStore(str(tmp_path / "store"), ctx.store.spec), ctx.jobs.base_dir, ctx.model_id)
        lost = restarted.get("acme", first.id)
        assert lost.status == "failed" and lost.error["code"] == "server_restarted"
        assert "restart" in lost.error["message"] and restarted.get("acme", second.id).status == "cancelled"

        for path in (f"/v1/fine_tuning/jobs/{first.id}", f"/v1/fine_tuning/jobs/{first.id}/events"):
            assert beta.get(path).status_code == 404
        assert beta.post(f"/v1/fine_tuning/jobs/{first.id}/cancel").status_code == 404
        assert beta.get("/v1/fine_tuning/jobs").json()["data"] == []

        status = wait_status(lambda: sdk.fine_tuning.jobs.retrieve(first.id).status, ("succeeded", "failed"), 150)
        job = sdk.fine_tuning.jobs.retrieve(first.id)
        assert status == "succeeded", job.error
        assert job.fine_tuned_model == f"ft-tiny-{first.id[6:14]}" and job.trained_tokens > 0 and job.finished_at
        assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
        events = list(sdk.fine_tuning.jobs.list_events(first.id, limit=100))
        metrics = [e.data for e in events if e.type == "metrics"]
        assert any("train_loss" in d for d in metrics) and any("valid_loss" in d for d in metrics)
        assert any(e.message.startswith("New fine-tuned model created") for e in events)
        page = acme.get(f"/v1/fine_tuning/jobs/{first.id}/events", params={"limit": 2}).json()
        assert len(page["data"]) == 2 and page["has_more"] is True
        assert [j.id for j in sdk.fine_tuning.jobs.list()] == [second.id, first.id]

        for model in (job.fine_tuned_model, "tiny"):             # served at once, under both names
            r = acme.post("/v1/chat/completions", json={"model": model, "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": "Question?"}]})
            assert r.status_code == 200, r.text
        r = beta.post("/v1/chat/completions", json={"model": job.fine_tuned_model, "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "Question?"}]})
        assert r.status_code == 404
        names = {a["name"] for a in acme.get("/v1/adapters").json()["data"]}
        assert {job.fine_tuned_model, "tiny"} <= names
        r = acme.post(f"/v1/fine_tuning/jobs/{first.id}/cancel")
        assert r.status_code == 400 and "already succeeded" in r.json()["error"]["message"]


def test_cli_trains_into_the_store(tiny_base, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_bytes(GOOD)
    store = tmp_path / "store"
    args = ["finetune", "--data", str(data), "--name", "cli-tiny", "--model", tiny_base, "--adapter-dir", str(store),
            "--rank", "4", "--epochs", "1", "--batch-size", "4", "--max-seq-len", "64", "--tenant", "acme"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cli-tiny version 1: rank 4" in out and "eval loss" in out
    data.write_bytes(GOOD + b"[]\n")
    assert main(args) == 2
    assert "line 13" in capsys.readouterr().err
    assert main(args[:-2] + ["--rank", "32"]) == 2                 # over --max-lora-rank 16


def test_fine_tuning_off_answers_404_on_files_and_jobs(tmp_path, tiny_base):
    """With --max-finetune-jobs 0 both services are absent: each route says how to turn them on."""
    engine = AsyncEngine(EngineConfig(model=tiny_base, dtype="float32", max_lora_rank=16, max_model_len=128,
                                      num_kv_blocks=16, adapter_dir=str(tmp_path / "store")))
    try:
        with live_server(engine, ServerSettings(max_finetune_jobs=0)) as server:
            import httpx
            with httpx.Client(base_url=server.url, timeout=30) as http:
                for path in ("/v1/files", "/v1/fine_tuning/jobs"):
                    r = http.get(path)
                    assert r.status_code == 404, (path, r.text)
                    assert r.json()["error"]["code"] == "finetune_disabled"
                    assert "--max-finetune-jobs" in r.json()["error"]["message"]
    finally:
        engine.shutdown()
