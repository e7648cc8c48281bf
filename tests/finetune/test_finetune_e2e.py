"""Fine-tune then serve, end to end on the embedded SmolLM2 through the official `openai`
client: a job teaches the base a behaviour it does not have (answer every question with
a fixed code word), the served adapter shows it on held-out questions the moment the job
ends, serving keeps running while the job trains, and the adapter the job wrote gives
the same greedy answers in plain transformers + PEFT."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from ftkit import chat_rows, jsonl, tenant_keys, wait_status
from livekit import live_server

from loraserve import EngineConfig
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
HYPER = {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 10, "lora_rank": 8, "max_seq_len": 96}


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


def throughput(client, model: str, n: int = 4, max_tokens: int = 32) -> float:
    """Generated tokens per second over n concurrent requests."""
    def one(i):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Count to {i + 20}."}],
                                           max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens
    start = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        tokens = sum(pool.map(one, range(n)))
    return tokens / (time.monotonic() - start)


def test_finetune_then_serve(served, smollm_dir):
    server, client = served
    base = server.ctx.model_id
    before = pass_rate(answers(client, base, HELD_OUT))
    idle_tps = throughput(client, base)

    training_file = client.files.create(file=("zebra.jsonl", jsonl(chat_rows([(q, ANSWER) for q in TRAIN]))),
                                        purpose="fine-tune")
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(training_file=training_file.id, model=base, suffix="zebra", seed=0,
                                         hyperparameters=HYPER)
    stepping = wait_status(lambda: "step" if any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(
        job.id, limit=5).data) else client.fine_tuning.jobs.retrieve(job.id).status, ("step", "failed"), 120)
    assert stepping == "step", client.fine_tuning.jobs.retrieve(job.id).error
    busy_tps = throughput(client, base)
    overlapped = client.fine_tuning.jobs.retrieve(job.id).status == "running"

    status = wait_status(lambda: client.fine_tuning.jobs.retrieve(job.id).status, ("succeeded", "failed"), 240)
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert status == "succeeded", job.error
    job_seconds = time.monotonic() - started
    after_texts = answers(client, job.fine_tuned_model, HELD_OUT)
    after = pass_rate(after_texts)
    alias = pass_rate(answers(client, "zebra", HELD_OUT[:2]))
    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    eval_losses = [e.data["valid_loss"] for e in events if e.type == "metrics" and "valid_loss" in e.data]
    print(f"\nheld-out pass rate: base {before:.0%}, fine-tuned {after:.0%} ({job.fine_tuned_model}), "
          f"alias 'zebra' {alias:.0%}; job {job_seconds:.0f} s, {job.trained_tokens} tokens, "
          f"eval losses {[round(x, 3) for x in reversed(eval_losses)]}; serving throughput {idle_tps:.1f} tok/s "
          f"idle, {busy_tps:.1f} tok/s while training (overlapped: {overlapped})")
    assert before == 0.0
    assert after >= 0.875, after_texts
    assert alias == 1.0 and len(eval_losses) == HYPER["n_epochs"]
    assert busy_tps > 0.2 * idle_tps     # training is another process: the engine loop never stalls

    # the job's adapter, loaded in plain transformers + PEFT, answers exactly as loraserve serves it
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = server.ctx.store.resolve("acme", job.fine_tuned_model)
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32),
                                      record.path).eval()
    eos = list(server.ctx.core.eos_token_ids)
    for question, served_text in zip(HELD_OUT[:3], after_texts[:3]):
        text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       tokenize=False)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == served_text
