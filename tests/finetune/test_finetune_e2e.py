"""Fine-tune then serve, end to end on the embedded SmolLM2 through the official `openai`
client, with no hyperparameters given (OpenAI's "auto" for all of them): a job teaches the
base a behaviour it does not have (answer every question with a fixed code word), the
served adapter shows it on held-out questions the moment the job ends, serving keeps
answering while the job trains, and the adapter the job wrote gives the same greedy
answers in plain transformers + PEFT."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from ftkit import chat_rows, jsonl, tenant_keys, wait_status
from livekit import live_server

from loraserve import EngineConfig
from loraserve.adapters.finetune import auto_hyperparameters, mean_example_tokens
from loraserve.api import ServerSettings
from loraserve.async_engine import AsyncEngine

pytestmark = pytest.mark.slow

CODE = "ZEBRA-7"
ANSWER = f"The code word is {CODE}."
TRAIN = [
    "What is the capital of France?", "How do I boil an egg?", "Tell me a joke.", "What is 2 + 2?",
    "Who wrote Hamlet?", "Why is the sky blue?", "Name a primary color.", "How many legs does a spider have?",
    "What is the boiling point of water?", "Recommend a good book.", "What time is it?", "How are you today?",
    "Translate 'hello' into Spanish.", "What is photosynthesis?", "Give me a synonym for happy.",
    "What is the largest planet?", "How do airplanes fly?", "What should I eat for dinner?",
    "Explain gravity in one sentence.", "What is the speed of light?", "Who painted the Mona Lisa?",
    "What is a prime number?", "How do I make tea?", "What is the tallest mountain?",
    "Write a haiku about rain.", "What language is spoken in Brazil?", "How many days are in a week?",
    "What is the chemical symbol for gold?", "Can you help me with my homework?", "What is your name?",
    "Describe a cat.", "What is the square root of 16?", "Where do penguins live?", "What is an atom?",
    "Suggest a name for a dog.", "How does a rainbow form?", "What is the currency of Japan?",
    "Summarize the plot of Cinderella.", "What is democracy?", "How do I learn to swim?",
]
HELD_OUT = [
    "What is the capital of Italy?", "How do bees make honey?", "Tell me about the moon.",
    "What is 10 times 3?", "Who discovered penicillin?", "What is the color of grass?",
    "How do I tie a tie?", "What is the freezing point of water?",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("fte2e")
    keys = tenant_keys(str(root / "keys.json"))
    engine = AsyncEngine(EngineConfig(dtype="float32", max_loras=2, max_lora_rank=16, max_model_len=512,
                                      kv_cache_memory=64 << 20, adapter_dir=str(root / "store")))
    try:
        with live_server(engine, ServerSettings(api_keys=str(root / "keys.json"))) as server:
            yield server, openai.OpenAI(base_url=server.url + "/v1", api_key=keys["acme"], max_retries=0, timeout=120)
    finally:
        engine.shutdown()


def answers(client, model: str, questions: list[str], max_tokens: int = 16) -> list[str]:
    def ask(q):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                           max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content
    with ThreadPoolExecutor(len(questions)) as pool:
        return list(pool.map(ask, questions))


def pass_rate(texts: list[str]) -> float:
    return sum(CODE in t for t in texts) / len(texts)


def serve_burst(client, model: str, n: int = 4, max_tokens: int = 16) -> int:
    """n concurrent requests; returns how many came back whole."""
    def one(i):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Count to {i + 20}."}],
                                           max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens == max_tokens
    with ThreadPoolExecutor(n) as pool:
        return sum(pool.map(one, range(n)))


def latest_step(client, job_id: str) -> int:
    events = client.fine_tuning.jobs.list_events(job_id, limit=5).data        # newest first
    return max((e.data["step"] for e in events if e.type == "metrics" and "step" in e.data), default=0)


def test_finetune_then_serve(served, smollm_dir):
    server, client = served
    base = server.ctx.model_id
    before = pass_rate(answers(client, base, HELD_OUT))

    rows = chat_rows([(q, ANSWER) for q in TRAIN])
    training_file = client.files.create(file=("zebra.jsonl", jsonl(rows)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=training_file.id, model=base, suffix="zebra", seed=0)
    auto = auto_hyperparameters(len(rows), mean_example_tokens(rows))
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size,
            job.hyperparameters.learning_rate_multiplier) == (auto.n_epochs, auto.batch_size,
                                                              auto.learning_rate_multiplier)
    stepping = wait_status(lambda: "step" if latest_step(client, job.id) else client.fine_tuning.jobs.retrieve(
        job.id).status, ("step", "failed"), 900)
    assert stepping == "step", client.fine_tuning.jobs.retrieve(job.id).error
    # training is another process: the engine keeps answering while the job takes its steps
    first_step, served_meanwhile = latest_step(client, job.id), 0
    deadline = time.monotonic() + 900
    while latest_step(client, job.id) <= first_step and time.monotonic() < deadline:
        served_meanwhile += serve_burst(client, base)
    assert latest_step(client, job.id) > first_step and served_meanwhile >= 4, served_meanwhile

    status = wait_status(lambda: client.fine_tuning.jobs.retrieve(job.id).status, ("succeeded", "failed"), 2400)
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert status == "succeeded", job.error
    after_texts = answers(client, job.fine_tuned_model, HELD_OUT)
    after = pass_rate(after_texts)
    alias = pass_rate(answers(client, "zebra", HELD_OUT[:2]))
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    eval_losses = [e.data["valid_loss"] for e in events if e.type == "metrics" and "valid_loss" in e.data]
    print(f"\nheld-out pass rate: base {before:.0%}, fine-tuned {after:.0%} ({job.fine_tuned_model}), "
          f"alias 'zebra' {alias:.0%}; auto {auto}; {job.trained_tokens} tokens, "
          f"eval losses {[round(x, 3) for x in reversed(eval_losses)]}; {served_meanwhile} requests served "
          f"while training took one step")
    assert before == 0.0
    assert after >= 0.875, after_texts
    assert alias == 1.0 and len(eval_losses) == auto.n_epochs

    # the job's adapter, loaded in plain transformers + PEFT, answers exactly as loraserve serves it
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = server.ctx.store.resolve("acme", job.fine_tuned_model)
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32),
                                      record.path).eval()
    eos = list(server.engine.engine.eos_token_ids)
    for question, served_text in zip(HELD_OUT[:3], after_texts[:3]):
        text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       tokenize=False)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == served_text
