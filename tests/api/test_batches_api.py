"""The Batch API with the official openai client against a live server on a tiny random
llama: batch answers equal the same requests sent directly (greedy); bad lines are lines
of the error file while the batch goes on; lines that cannot be requests fail the batch
as OpenAI's validation does; batches, their files and the adapters their lines may name
are per tenant; cancel stops a batch and frees its KV blocks; expiry; and a restart
resumes a batch from the lines it had not answered, or fails it with those it had kept."""

from __future__ import annotations

import contextlib
import json
import os

import openai
import pytest
from livekit import LiveServer, tiny_engine, wait_until

from loraserve.api import ServerSettings
from loraserve.api.keys import create_key
from loraserve.scheduler import BATCH_PRIORITY

ENDED = ("completed", "failed", "cancelled", "expired")


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    base_dir, adapters = tiny_llama
    root = tmp_path_factory.mktemp("batches")
    keys_file = str(root / "keys.json")
    keys = {tenant: create_key(keys_file, tenant)[0] for tenant in ("acme", "beta")}
    engine = tiny_engine(base_dir, str(root / "store"), max_num_seqs=8)
    engine.engine.store.register_dir("acme", "pirate", adapters["r8"])
    engine.engine.store.register_dir("beta", "secret", adapters["r4"])
    settings = ServerSettings(api_keys=keys_file, batch_concurrency=2)
    try:
        with batch_server(engine, settings) as server:
            yield server, keys
    finally:
        engine.shutdown()


@contextlib.contextmanager
def batch_server(engine, settings: ServerSettings):
    server = LiveServer(engine, settings).start()
    try:
        yield server
    finally:
        if server.ctx.batches is not None:
            server.ctx.batches.shutdown()
        server.stop()


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def chat_line(custom_id: str, model: str, text: str, max_tokens: int = 8, **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, **extra}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def upload(c: openai.OpenAI, lines: list, name: str = "batch.jsonl") -> str:
    data = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()
    return c.files.create(file=(name, data), purpose="batch").id


def run_batch(c: openai.OpenAI, lines: list, endpoint: str = "/v1/chat/completions", timeout: float = 120):
    batch = c.batches.create(input_file_id=upload(c, lines), endpoint=endpoint, completion_window="24h")
    assert batch.status == "validating" and batch.completion_window == "24h"
    return wait_status(c, batch.id, ENDED, timeout)


def wait_status(c: openai.OpenAI, batch_id: str, wanted: tuple[str, ...], timeout: float = 120):
    return wait_until(lambda: (b := c.batches.retrieve(batch_id)).status in wanted and b, timeout) \
        or c.batches.retrieve(batch_id)


def results(c: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    entries = [json.loads(line) for line in c.files.content(file_id).text.splitlines()]
    by_id = {e["custom_id"]: e for e in entries}
    assert len(by_id) == len(entries), "a custom_id appears twice"
    return by_id


def test_batch_answers_equal_direct_requests(served):
    server, keys = served
    c = client(server, keys["acme"])
    base = server.ctx.model_id
    questions = [(base, "What is the capital of France?"), ("pirate", "Say hello"), (base, "Count to three"),
                 ("pirate", "Name a color"), ("pirate@1", "What is two plus two?")]
    batch = run_batch(c, [chat_line(f"chat-{i}", m, q) for i, (m, q) in enumerate(questions)])
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (5, 5, 0)
    assert batch.error_file_id is None and batch.in_progress_at and batch.finalizing_at and batch.completed_at
    output = c.files.retrieve(batch.output_file_id)
    assert output.purpose == "batch_output"
    answers = results(c, batch.output_file_id)
    assert sorted(answers) == [f"chat-{i}" for i in range(5)]
    output_tokens = 0
    for i, (model, question) in enumerate(questions):
        direct = c.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=8, temperature=0)
        entry = answers[f"chat-{i}"]
        assert entry["error"] is None and entry["response"]["status_code"] == 200
        body = entry["response"]["body"]
        assert entry["response"]["request_id"] == body["id"] and body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
        assert body["choices"][0]["finish_reason"] == direct.choices[0].finish_reason
        assert body["usage"]["prompt_tokens"] == direct.usage.prompt_tokens
        output_tokens += body["usage"]["completion_tokens"]
    assert batch.usage.output_tokens == output_tokens

    prompts = [(base, "Once upon a time"), ("pirate", "The sea is")]
    lines = [{"custom_id": f"cmpl-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": m, "prompt": p, "max_tokens": 6, "temperature": 0}} for i, (m, p) in enumerate(prompts)]
    batch = run_batch(c, lines, endpoint="/v1/completions")
    assert batch.status == "completed" and batch.request_counts.completed == 2
    answers = results(c, batch.output_file_id)
    for i, (model, prompt) in enumerate(prompts):
        direct = c.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
        assert answers[f"cmpl-{i}"]["response"]["body"]["choices"][0]["text"] == direct.choices[0].text


def test_bad_lines_are_errors_in_the_error_file_not_a_failed_batch(served):
    server, keys = served
    c = client(server, keys["acme"])
    base = server.ctx.model_id
    lines = [
        chat_line("good", base, "Hi"),
        chat_line("bad-field", base, "Hi", max_tokens=-1),
        chat_line("unknown-field", base, "Hi", colour="red"),
        chat_line("unknown-model", "no-such-model", "Hi"),
        chat_line("other-tenants-adapter", "secret", "Hi"),
        chat_line("other-tenants-adapter-by-owner", "beta/secret", "Hi"),
        chat_line("streamed", base, "Hi", stream=True),
        {"custom_id": "not-an-object", "method": "POST", "url": "/v1/chat/completions", "body": [1, 2]},
        chat_line("too-long", base, "Hi " * 200),
    ]
    batch = run_batch(c, lines)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (9, 1, 8)
    assert list(results(c, batch.output_file_id)) == ["good"]
    errors = results(c, batch.error_file_id)
    expected = {"bad-field": (400, "max_tokens"), "unknown-field": (400, "Unrecognized request argument supplied: "
                                                                         "colour"),
                "unknown-model": (404, "no-such-model"), "other-tenants-adapter": (404, "`secret` does not exist"),
                "other-tenants-adapter-by-owner": (404, "`beta/secret` does not exist"),
                "streamed": (400, "stream is not supported"), "not-an-object": (400, "body must be a JSON object"),
                "too-long": (400, "maximum context length")}
    assert sorted(errors) == sorted(expected)
    for custom_id, (status, words) in expected.items():
        response = errors[custom_id]["response"]
        assert response["status_code"] == status, (custom_id, response)
        assert words in response["body"]["error"]["message"], (custom_id, response)
    # the other tenant still serves its own adapter
    beta = client(server, keys["beta"])
    assert beta.chat.completions.create(model="secret", messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=2).choices[0].finish_reason == "length"


def test_lines_that_cannot_be_requests_fail_the_batch_with_their_line_numbers(served):
    server, keys = served
    c = client(server, keys["acme"])
    base = server.ctx.model_id
    lines = [chat_line("a", base, "Hi"), chat_line("a", base, "Hi again"),
             {**chat_line("b", base, "Hi"), "url": "/v1/completions"},
             {**chat_line("c", base, "Hi"), "method": "GET"}, {"method": "POST"}]
    batch = run_batch(c, lines)
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (2, "duplicate_custom_id"), (3, "mismatched_endpoint"), (4, "invalid_method"),
        (5, "missing_required_parameter")]


def test_bad_batch_requests_are_4xx_naming_the_problem(served):
    server, keys = served
    c = client(server, keys["acme"])
    base = server.ctx.model_id
    with pytest.raises(openai.BadRequestError, match="line 2 is not valid JSON"):
        upload(c, [chat_line("a", base, "Hi"), "{oops"])
    with pytest.raises(openai.BadRequestError, match="no requests"):
        upload(c, [""])
    good = upload(c, [chat_line("a", base, "Hi")])
    training = c.files.create(file=("t.jsonl", b'{"prompt": "a", "completion": "b"}\n'), purpose="fine-tune").id
    cases = [
        (dict(endpoint="/v1/embeddings"), openai.BadRequestError, "endpoint"),
        (dict(completion_window="1h"), openai.BadRequestError, "completion_window"),
        (dict(input_file_id=training), openai.BadRequestError, "purpose 'batch'"),
        (dict(input_file_id="file-000000000000000000000000"), openai.NotFoundError, "no file"),
        (dict(metadata={f"k{i}": "v" for i in range(17)}), openai.BadRequestError, "metadata"),
        (dict(extra_body={"colour": "red"}), openai.BadRequestError, "colour"),
    ]
    for change, error, words in cases:
        args = {"input_file_id": good, "endpoint": "/v1/chat/completions", "completion_window": "24h", **change}
        with pytest.raises(error, match=words):
            c.batches.create(**args)
    with pytest.raises(openai.BadRequestError, match="purpose 'fine-tune'"):
        c.fine_tuning.jobs.create(training_file=good, model=base)
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_000000000000000000000000")


def test_batches_and_their_files_are_per_tenant(served):
    server, keys = served
    acme, beta = client(server, keys["acme"]), client(server, keys["beta"])
    first = run_batch(acme, [chat_line("a", server.ctx.model_id, "Hi")])
    batch = run_batch(acme, [chat_line("a", server.ctx.model_id, "Hi")])
    assert batch.status == first.status == "completed"
    assert batch.id in [b.id for b in acme.batches.list().data]
    assert batch.id not in [b.id for b in beta.batches.list().data]
    for call in (lambda: beta.batches.retrieve(batch.id), lambda: beta.batches.cancel(batch.id),
                 lambda: beta.files.content(batch.output_file_id),
                 lambda: beta.batches.create(input_file_id=batch.input_file_id, endpoint="/v1/chat/completions",
                                             completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.ConflictError, match="completed"):
        acme.batches.cancel(batch.id)
    page = acme.batches.list(limit=1)
    assert [b.id for b in page.data] == [batch.id] and page.has_more     # newest first
    assert acme.batches.list(after=batch.id, limit=1).data[0].id == first.id


def slow_lines(model: str, n: int, max_tokens: int = 24) -> list[dict]:
    return [chat_line(f"line-{i}", model, f"Tell me a story, number {i}", max_tokens=max_tokens, ignore_eos=True)
            for i in range(n)]


def engine_priorities(core) -> set[int] | None:
    """The priorities of the engine's requests now (read from this thread: retried if the dict moves)."""
    try:
        return {seq.priority for seq in list(core.requests.values())}
    except RuntimeError:
        return None


def test_cancel_stops_the_batch_keeps_what_was_answered_and_frees_its_blocks(served):
    server, keys = served
    c = client(server, keys["acme"])
    lines = slow_lines(server.ctx.model_id, 40)
    batch = c.batches.create(input_file_id=upload(c, lines), endpoint="/v1/chat/completions",
                             completion_window="24h")
    core = server.engine.engine
    assert wait_until(lambda: engine_priorities(core) == {BATCH_PRIORITY}, 60)    # behind interactive traffic
    assert wait_until(lambda: c.batches.retrieve(batch.id).request_counts.completed >= 2, 60)
    cancelled = c.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at
    batch = wait_status(c, batch.id, ("cancelled",), 30)
    assert batch.status == "cancelled" and batch.cancelled_at
    counts = batch.request_counts
    assert counts.total == 40 and 2 <= counts.completed < 40 and counts.failed == 0
    assert len(results(c, batch.output_file_id)) == counts.completed
    assert wait_until(lambda: not core.requests and core.blocks.num_used_blocks == 0, 10)
    assert c.batches.cancel(batch.id).status == "cancelled"     # twice is harmless
    assert c.batches.retrieve(batch.id).request_counts.completed == counts.completed


def test_a_batch_past_its_window_expires_with_its_lines_in_the_error_file(served):
    server, keys = served
    c = client(server, keys["acme"])
    server.ctx.batches.windows = {"24h": 0}     # every new batch is already past its window
    try:
        batch = run_batch(c, [chat_line("a", server.ctx.model_id, "Hi"), chat_line("b", server.ctx.model_id, "Yo")])
    finally:
        server.ctx.batches.windows = {"24h": 24 * 3600}
    assert batch.status == "expired" and batch.expired_at
    assert batch.request_counts.failed == 2 and batch.output_file_id is None
    errors = results(c, batch.error_file_id)
    assert sorted(errors) == ["a", "b"], c.files.content(batch.error_file_id).text
    assert {e["error"]["code"] for e in errors.values()} == {"batch_expired"}


def stop_midway(engine, settings, key: str, lines: list[dict]) -> tuple[str, int]:
    """Start a batch on a server, stop the server once a few lines are answered; (batch id, lines answered)."""
    with batch_server(engine, settings) as server:
        c = client(server, key)
        batch = c.batches.create(input_file_id=upload(c, lines), endpoint="/v1/chat/completions",
                                 completion_window="24h")
        assert wait_until(lambda: c.batches.retrieve(batch.id).request_counts.completed >= 3, 60)
        server.ctx.batches.shutdown()
        answered = c.batches.retrieve(batch.id)
        assert answered.status == "in_progress" and answered.request_counts.completed < len(lines)
        return batch.id, answered.request_counts.completed


def test_a_restart_resumes_a_batch_from_the_lines_not_yet_answered(served, tmp_path):
    server, keys = served
    settings = ServerSettings(api_keys=server.ctx.settings.api_keys, batch_concurrency=1,
                              finetune_dir=str(tmp_path / "finetune"))
    lines = slow_lines(server.ctx.model_id, 30, max_tokens=12)
    batch_id, answered = stop_midway(server.engine, settings, keys["acme"], lines)
    partial = os.path.join(settings.finetune_dir, "batches", "acme", f"{batch_id}.output.jsonl")
    with open(partial, "ab") as f:
        f.write(b'{"id": "batch_req_torn", "custom_id": "line-2')   # a crash in the middle of a write
    with batch_server(server.engine, settings) as restarted:
        c = client(restarted, keys["acme"])
        batch = wait_status(c, batch_id, ENDED)
        assert batch.status == "completed", batch
        assert (batch.request_counts.total, batch.request_counts.completed) == (30, 30)
        answers = results(c, batch.output_file_id)
        assert sorted(answers) == sorted(line["custom_id"] for line in lines)
        for line in lines[::7]:
            body = dict(line["body"])
            extra = {"ignore_eos": body.pop("ignore_eos")}        # a vLLM extension: not in the client's signature
            direct = c.chat.completions.create(**body, extra_body=extra)
            body = answers[line["custom_id"]]["response"]["body"]
            assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content


def test_a_restart_without_the_input_file_fails_the_batch_and_keeps_its_partial_output(served, tmp_path):
    server, keys = served
    settings = ServerSettings(api_keys=server.ctx.settings.api_keys, batch_concurrency=1,
                              finetune_dir=str(tmp_path / "finetune"))
    batch_id, answered = stop_midway(server.engine, settings, keys["acme"], slow_lines(server.ctx.model_id, 30))
    with batch_server(server.engine, settings) as between:          # the file is deleted while it is down
        c = client(between, keys["acme"])
        between.ctx.batches.shutdown()
        c.files.delete(c.batches.retrieve(batch_id).input_file_id)
    with batch_server(server.engine, settings) as restarted:
        c = client(restarted, keys["acme"])
        batch = wait_status(c, batch_id, ENDED)
        assert batch.status == "failed" and batch.errors.data[0].code == "file_not_found"
        assert batch.request_counts.completed >= answered
        assert len(results(c, batch.output_file_id)) == batch.request_counts.completed
