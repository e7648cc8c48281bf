"""The official `openai` client against a live server on the embedded SmolLM2: completions
and chat, plain and streamed, on the base model and two adapters in concurrent requests;
every answer equals the offline engine's for the same input.

The offline answers come from the very LLMEngine the server then serves (wrapped in an
AsyncEngine): one model load instead of two, and the comparison is between the offline
and the HTTP code paths on identical weights.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from livekit import live_server
from peft_files import peft_files, upload, write_peft_dir

from loraserve import LLM, SamplingParams
from loraserve.async_engine import AsyncEngine

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
PROMPTS = ["The capital of France is", "List three fruits:", "Once upon a time"]
CHAT = [{"role": "user", "content": "What is the boiling point of water?"}]
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    llm = LLM(dtype="float32", max_loras=2, max_lora_rank=16, max_model_len=512, kv_cache_memory=64 << 20,
              adapter_dir=str(root / "store"))
    spec = llm.engine.spec
    files = {"one": peft_files(spec, rank=8, seed=1, targets=("q_proj", "k_proj", "v_proj", "o_proj"), scale=0.2),
             "two": peft_files(spec, rank=16, seed=2, targets=("gate_proj", "up_proj", "down_proj"), scale=0.2)}
    for name, f in files.items():
        llm.add_adapter(name, write_peft_dir(str(root / name), f))
    models = [None, "one", "two"]
    offline = {
        "completion": {m: llm.generate(PROMPTS, GREEDY, adapters=m, use_tqdm=False) for m in models},
        "chat": {m: llm.chat([CHAT], GREEDY, adapters=m, use_tqdm=False)[0] for m in models},
    }
    engine = AsyncEngine(engine=llm.engine)
    try:
        with live_server(engine) as server:
            yield server, files, offline, llm.engine.model_id
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def client(served):
    server = served[0]
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed-on-loopback", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def uploaded(served):
    """The same two adapters uploaded over HTTP under new names, then used at once."""
    server, files, _, _ = served
    with server.client() as c:
        for name, f in files.items():
            r = upload(c, f"up-{name}", f)
            assert r.status_code == 201, r.text
            assert r.json()["version"] == 1 and r.json()["sha256"]
    return {None: None, "one": "up-one", "two": "up-two"}


def _model(base_id: str, name: str | None) -> str:
    return base_id if name is None else name


def test_concurrent_completions_on_base_and_two_adapters_match_offline(served, client, uploaded):
    _, _, offline, base_id = served
    jobs = [(m, i) for m in (None, "one", "two") for i in range(len(PROMPTS))]

    def run(job):
        m, i = job
        return client.completions.create(model=_model(base_id, uploaded[m]), prompt=PROMPTS[i], max_tokens=MAX_TOKENS,
                                         temperature=0, extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(run, jobs))
    for (m, i), answer in zip(jobs, answers):
        ref = offline["completion"][m][i]
        assert answer.choices[0].text == ref.text, f"adapter {m}, prompt {i}"
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert answer.usage.completion_tokens == MAX_TOKENS
        assert answer.usage.total_tokens == len(ref.prompt_token_ids) + MAX_TOKENS
        assert answer.model == _model(base_id, uploaded[m])
    texts = {m: [o.text for o in offline["completion"][m]] for m in (None, "one", "two")}
    assert texts["one"] != texts[None] and texts["two"] != texts[None] and texts["one"] != texts["two"], \
        "each adapter should change the output"


def test_concurrent_streamed_chat_matches_offline(served, client, uploaded):
    _, _, offline, base_id = served

    def run(m):
        stream = client.chat.completions.create(model=_model(base_id, uploaded[m]), messages=CHAT,
                                                max_completion_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True})
        return list(stream)

    with ThreadPoolExecutor(3) as pool:
        results = dict(zip((None, "one", "two"), pool.map(run, (None, "one", "two"))))
    for m, chunks in results.items():
        ref = offline["chat"][m]
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == ref.text, f"adapter {m}"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["length"]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.prompt_tokens == len(ref.prompt_token_ids)
        assert chunks[-1].usage.completion_tokens == MAX_TOKENS
        assert all(c.usage is None for c in chunks[:-1])


def test_plain_chat_and_streamed_completion_match_offline(served, client, uploaded):
    _, _, offline, base_id = served
    for m in (None, "one", "two"):
        answer = client.chat.completions.create(model=_model(base_id, uploaded[m]), messages=CHAT,
                                                max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
        assert answer.choices[0].message.content == offline["chat"][m].text
        assert answer.choices[0].message.role == "assistant"
        assert answer.usage.prompt_tokens == len(offline["chat"][m].prompt_token_ids)
        stream = client.completions.create(model=_model(base_id, uploaded[m]), prompt=PROMPTS[1],
                                           max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in stream if c.choices) == offline["completion"][m][1].text


def test_adapter_name_forms_and_models_listing(served, client, uploaded):
    _, _, offline, base_id = served
    ref = offline["completion"]["one"][0].text
    for model in ("one", "one@1", f"{base_id}:one", "up-one@1", f"{base_id}:up-one"):
        answer = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert answer.choices[0].text == ref, model
    models = {m.id: m for m in client.models.list().data}
    assert base_id in models
    for name in ("one", "two", "up-one", "up-two"):
        assert models[name].model_extra["parent"] == base_id


def test_unknown_model_is_openai_404(served, client):
    _, _, _, base_id = served
    for model in ("no-such-adapter", "one@7", f"{base_id}:nope", "other-base:one"):
        with pytest.raises(openai.NotFoundError) as err:
            client.completions.create(model=model, prompt="hi", max_tokens=2)
        body = err.value.body
        assert body["code"] == "model_not_found" and model in body["message"], body
