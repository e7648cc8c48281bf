"""The console (/ui) in a real browser, headless Chromium through Playwright, against a
live server with API keys: sign in, see only this tenant's adapters, upload one through
the form and see it appear, have bad uploads answered with the server's own message,
delete with a confirmation, and watch the running-requests figure move while requests
run. A screenshot of the console is saved (the path is printed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading

import openai
import pytest
from playwright.sync_api import expect
from uikit import live_server

from loraserve import EngineConfig
from loraserve.api import ServerSettings
from loraserve.api.keys import create_key
from loraserve.async_engine import AsyncEngine

TINY_HYPER = {"n_epochs": 2, "batch_size": 4, "lora_rank": 4, "max_seq_len": 64}   # 6 steps
JOB_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    base_dir, adapter_dirs = tiny_models["llama"]
    root = tmp_path_factory.mktemp("console")
    keys_file = str(root / "keys.json")
    keys = {"alice": create_key(keys_file, "alice")[0], "bob": create_key(keys_file, "bob")[0],
            "admin": create_key(keys_file, "ops", admin=True)[0]}
    # room for long generations: the running figure must be seen while they run
    engine = AsyncEngine(EngineConfig(model=base_dir, dtype="float32", max_loras=2, max_lora_rank=64,
                                      max_model_len=512, num_kv_blocks=256, adapter_dir=str(root / "store")))
    store = engine.engine.store
    store.register_dir("alice", "alice-bot", adapter_dirs["r4"])
    store.register_dir("bob", "bob-secret", adapter_dirs["r8"])
    uploads = _upload_files(root / "uploads", adapter_dirs["r8"])
    try:
        with live_server(engine, ServerSettings(api_keys=keys_file)) as app:
            start_tiny_job(app, keys["alice"])    # it trains while the tests before its own run
            yield app, keys, uploads
    finally:
        engine.shutdown()


def start_tiny_job(app, key: str) -> str:
    """A few steps of real training on the tiny base: its events carry the loss curve."""
    sdk = openai.OpenAI(base_url=f"{app.url}/v1", api_key=key, max_retries=0, timeout=60)
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i % 3}."}]} for i in range(12)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    training_file = sdk.files.create(file=("train.jsonl", data), purpose="fine-tune").id
    return sdk.fine_tuning.jobs.create(model=app.state.ctx.model_id, training_file=training_file, suffix="tiny",
                                       seed=1, hyperparameters=TINY_HYPER).id


def _upload_files(folder, peft_dir: str) -> dict[str, str]:
    """The files a user picks: a real adapter, and a pickled checkpoint (any bytes named .bin)."""
    os.makedirs(folder)
    paths = {}
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        paths[name] = shutil.copy(os.path.join(peft_dir, name), str(folder / name))
    paths["adapter_model.bin"] = str(folder / "adapter_model.bin")
    with open(paths["adapter_model.bin"], "wb") as f:
        f.write(b"\x80\x04\x95 pickled")
    return paths


def sign_in(page, url: str, key: str) -> None:
    page.goto(f"{url}/ui")
    page.fill("#api-key", key)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#console")).to_be_visible()


def adapter_row(page, name: str):
    return page.locator("#adapter-table tbody tr", has=page.locator("td.name", has_text=re.compile(f"^{name}")))


def upload(page, name: str, *files: str) -> None:
    page.fill("#upload-name", name)
    for path in files:
        target = "#upload-config" if path.endswith(".json") else "#upload-model"
        page.set_input_files(target, path)
    page.click("#upload-submit")


def test_sign_in_with_a_bad_key_shows_the_servers_message(env, page):
    app, _, _ = env
    page.goto(f"{app.url}/ui")
    page.fill("#api-key", "sk-not-a-key")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("Incorrect API key")
    expect(page.locator("#console")).to_be_hidden()


def test_tenant_console(env, page, artifacts_dir):
    app, keys, files = env
    store = app.state.ctx.store
    foreign = []
    page.on("request", lambda r: foreign.append(r.url) if not r.url.startswith(app.url) else None)
    sign_in(page, app.url, keys["alice"])
    expect(page.locator("#who")).to_have_text("tenant alice")

    # this tenant's adapters only
    expect(adapter_row(page, "alice-bot")).to_have_count(1)
    expect(page.locator("#adapter-table")).not_to_contain_text("bob-secret")

    # upload through the form; it appears in the table
    upload(page, "uploaded-bot", files["adapter_config.json"], files["adapter_model.safetensors"])
    expect(page.locator("#upload-message")).to_have_text(re.compile(r"Registered uploaded-bot version 1"))
    row = adapter_row(page, "uploaded-bot")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("disk")            # not used yet: only in the store
    assert [r.name for r in store.owned("alice")] == ["alice-bot", "uploaded-bot"]

    # bad input: the server's message, and nothing stored
    page.reload()
    upload(page, "pickled", files["adapter_config.json"], files["adapter_model.bin"])
    expect(page.locator("#upload-message")).to_contain_text("adapter_model.bin is a pickled checkpoint, refused")
    page.reload()
    upload(page, "no-config", files["adapter_model.safetensors"])
    expect(page.locator("#upload-message")).to_contain_text("the upload has no adapter_config.json")
    assert [r.name for r in store.owned("alice")] == ["alice-bot", "uploaded-bot"]

    # delete asks first: cancel keeps it, confirm deletes it
    row.locator("button.delete").click()
    expect(page.locator("#confirm-delete")).to_be_visible()
    expect(page.locator("#confirm-what")).to_have_text("alice/uploaded-bot version 1")
    page.click("#confirm-delete button[value=cancel]")
    expect(page.locator("#confirm-delete")).to_be_hidden()
    expect(row).to_have_count(1)
    row.locator("button.delete").click()
    page.click("#confirm-yes")
    expect(page.locator("#upload-message")).to_have_text("Deleted alice/uploaded-bot version 1.")
    expect(row).to_have_count(0)
    assert [r.name for r in store.owned("alice")] == ["alice-bot"]

    # the running figure moves while requests run, and falls back when they end
    expect(page.locator("#fig-running")).to_have_text("0")
    with running_requests(app.url, keys["alice"], "alice-bot", num=2):
        expect(page.locator("#fig-running")).not_to_have_text("0", timeout=30_000)
        expect(page.locator("#fig-kv")).not_to_have_text(re.compile(r"^0 / "))
        bot = adapter_row(page, "alice-bot")
        expect(bot).to_contain_text("device")      # its weights sit in a slot while it runs
        expect(page.locator("#fig-slots")).to_contain_text("pinned")
        path = os.path.join(artifacts_dir, "console.png")
        page.screenshot(path=path, full_page=True)
        print(f"\nconsole screenshot: {path}")
    expect(page.locator("#fig-running")).to_have_text("0", timeout=30_000)
    # a request that runs to its end is counted for its adapter (aborted streams are not)
    sdk = openai.OpenAI(base_url=f"{app.url}/v1", api_key=keys["alice"], max_retries=0, timeout=60)
    sdk.completions.create(model="alice-bot", prompt="hello", max_tokens=5, extra_body={"ignore_eos": True})
    expect(bot.locator("td").nth(6)).not_to_have_text("0", timeout=15_000)
    expect(page.locator("#fig-ttft")).not_to_have_text("–")
    expect(page.locator("#batches-note")).to_have_text("No batches for this tenant.")
    # a batch the tenant runs shows with its progress
    lines = "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"model": "alice-bot", "prompt": f"batch {i}", "max_tokens": 3}}) + "\n"
                    for i in range(2))
    batch_file = sdk.files.create(file=("lines.jsonl", lines.encode()), purpose="batch")
    batch = sdk.batches.create(input_file_id=batch_file.id, endpoint="/v1/completions", completion_window="24h")
    row = page.locator("#batch-table tbody tr", has_text=batch.id)
    expect(row).to_contain_text("completed", timeout=60_000)
    expect(row).to_contain_text("2 done, 0 failed of 2")
    expect(page.locator("#batches-note")).to_have_text("")
    assert foreign == [], f"the console fetched from elsewhere: {foreign}"


def test_admin_sees_every_tenant(env, page):
    app, keys, _ = env
    sign_in(page, app.url, keys["admin"])
    expect(page.locator("#who")).to_contain_text("admin")
    expect(adapter_row(page, "alice-bot")).to_contain_text("alice")
    expect(adapter_row(page, "bob-secret")).to_contain_text("bob")


class running_requests:
    """`num` streaming completions that keep restarting until the block ends; leaving it
    closes their streams, which aborts them on the server."""

    def __init__(self, url: str, key: str, model: str, num: int):
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
        self.model = model
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(num)]

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                stream = self.client.completions.create(model=self.model, prompt="count with me:", max_tokens=400,
                                                        stream=True, extra_body={"ignore_eos": True})
                with stream:
                    for _ in stream:
                        if self.stop.is_set():
                            break
        except BaseException as e:   # noqa: BLE001 - reported by __exit__
            self.errors.append(e)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors


def test_fine_tuning_job_and_its_loss_curve(env, page, artifacts_dir):
    app, keys, _ = env
    sdk = openai.OpenAI(base_url=f"{app.url}/v1", api_key=keys["alice"], max_retries=0, timeout=60)
    job = sdk.fine_tuning.jobs.list().data[0]
    sign_in(page, app.url, keys["alice"])
    row = page.locator("#job-table tbody tr", has_text=job.id)
    expect(row).to_contain_text("succeeded", timeout=JOB_TIMEOUT_S * 1000)
    events = sdk.fine_tuning.jobs.list_events(job.id, limit=10000).data
    steps = [e.data for e in events if e.type == "metrics"]
    train = [d for d in steps if "train_loss" in d]
    assert train, "the job reported no training loss"
    newest = train[0]                          # events come newest first
    expect(row).to_contain_text(f"{newest['step']}/{newest['total_steps']}")
    expect(row).to_contain_text(f"{newest['train_loss']:.4f}")
    expect(row).to_contain_text(sdk.fine_tuning.jobs.retrieve(job.id).fine_tuned_model)
    chart = page.locator("#chart-loss")
    expect(chart).to_have_attribute("data-job", job.id)
    expect(chart).to_have_attribute("data-points", str(len(steps)))
    expect(chart.locator("canvas")).to_be_visible()
    with running_requests(app.url, keys["alice"], "alice-bot", num=2):   # the console at work, for the README
        expect(page.locator("#fig-running")).not_to_have_text("0", timeout=30_000)
        expect(page.locator("#fig-throughput")).not_to_have_text(re.compile(r"^(–|0\.0)$"))   # moves while they run
        path = os.path.join(artifacts_dir, "console-jobs.png")
        page.screenshot(path=path, full_page=True)
        print(f"\nconsole screenshot: {path}")


def test_a_server_without_keys_opens_the_console_at_once(tiny_models, tmp_path, page):
    """No key file (loopback only): every caller is the default tenant's admin, no sign-in."""
    base_dir, _ = tiny_models["llama"]
    engine = AsyncEngine(EngineConfig(model=base_dir, dtype="float32", max_loras=1, max_lora_rank=8,
                                      max_model_len=64, num_kv_blocks=16, adapter_dir=str(tmp_path / "store")))
    try:
        with live_server(engine, ServerSettings(max_finetune_jobs=0)) as app:
            page.goto(f"{app.url}/ui")
            expect(page.locator("#console")).to_be_visible()
            expect(page.locator("#who")).to_have_text("default (admin: every tenant)")
            expect(page.locator("#sign-out")).to_be_hidden()
            expect(page.locator("#adapters-empty")).to_be_visible()
            expect(page.locator("#jobs-note")).to_contain_text("fine-tuning")   # off here: the server says so
    finally:
        engine.shutdown()
