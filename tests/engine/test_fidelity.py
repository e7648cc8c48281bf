"""Mixed-adapter batches match HF transformers + PEFT on the same weights, at fp32, on
every engine path: plain, chunked prefill, preemption, prefix-cache hits."""

from __future__ import annotations

import pytest
import torch

from lorakit import ADAPTER_MIX, PeftOracle
from loraserve import LLM, SamplingParams

NUM_TOKENS = 32
ATOL = 1e-3

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "In a distant galaxy, a small robot",
    "def fibonacci(n):",
    "Once upon a time there was a king who had three daughters, and the youngest",
    "Paris is the capital of",
    "1, 2, 3, 4,",
    "Water boils at",
    "The meaning of life is",
]


def adapter_plan() -> list[str | None]:
    """Four adapters of ranks 4/8/16/64 (one rsLoRA, one q,v only) and base requests."""
    names = [a[0] for a in ADAPTER_MIX]
    return [names[0], None, names[1], names[2], None, names[3], names[0], names[2]]


def run_and_record(llm: LLM, prompts, adapters, params):
    """Generate, keeping the engine's logits of every sampled position per request."""
    recorded: dict[str, list[torch.Tensor]] = {}

    def on_logits(seqs, logits):
        for seq, row in zip(seqs, logits):
            recorded.setdefault(seq.state.output.request_id, []).append(row.float().clone())

    llm.engine.runner.on_logits = on_logits
    try:
        outs = llm.generate(prompts, params, adapters=adapters, use_tqdm=False)
    finally:
        llm.engine.runner.on_logits = None
    return outs, [torch.stack(recorded[o.request_id]) for o in outs]


def check_against_oracle(oracle: PeftOracle, outs, logits, adapters):
    for out, ours, adapter in zip(outs, logits, adapters):
        full = out.prompt_token_ids + out.token_ids
        ref = oracle.logits(full, adapter)[len(out.prompt_token_ids) - 1 : -1]   # [n_gen, V]
        assert ours.shape == ref.shape
        err = (ours - ref).abs().max().item()
        assert err < ATOL, f"adapter {adapter}: max logit error {err}"
        assert out.token_ids == ref.argmax(-1).tolist(), f"adapter {adapter}: greedy tokens differ"


def make_llm(base_dir, adapters, **overrides) -> LLM:
    llm = LLM(model=base_dir, dtype="float32", max_loras=4, max_lora_rank=64, **overrides)
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    return llm


GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)

ENGINE_PATHS = {
    "plain": {},
    "chunked_prefill": {"max_num_batched_tokens": 7},
    "preemption": {"num_kv_blocks": 12, "block_size": 4},
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_oracle(request, tiny_models):
    base_dir, adapters = tiny_models[request.param]
    return base_dir, adapters, PeftOracle(base_dir, adapters)


@pytest.mark.parametrize("path", list(ENGINE_PATHS))
def test_mixed_batch_matches_peft(model_and_oracle, path):
    base_dir, adapters, oracle = model_and_oracle
    llm = make_llm(base_dir, adapters, **ENGINE_PATHS[path])
    plan = adapter_plan()
    outs, logits = run_and_record(llm, PROMPTS, plan, GREEDY)
    check_against_oracle(oracle, outs, logits, plan)
    stats = llm.engine.stats()
    if path == "preemption":
        assert stats["num_preemptions"] > 0, "the tiny pool was meant to force preemption"
    assert stats["kv_blocks_used"] == 0, "blocks leaked"


def test_prefix_cache_hits_match_peft(model_and_oracle):
    """A second pass over the same prompts reuses cached blocks and still matches."""
    base_dir, adapters, oracle = model_and_oracle
    llm = make_llm(base_dir, adapters, block_size=4)
    plan = adapter_plan()
    run_and_record(llm, PROMPTS, plan, GREEDY)
    hits_before = llm.engine.stats()["prefix_cache_hits"]
    outs, logits = run_and_record(llm, PROMPTS, plan, GREEDY)
    assert llm.engine.stats()["prefix_cache_hits"] > hits_before
    assert any(o.num_cached_tokens > 0 for o in outs)
    check_against_oracle(oracle, outs, logits, plan)


def test_same_prompt_under_two_adapters_never_shares_kv(model_and_oracle):
    """Adapter A then adapter B on one prompt: B gets its own reference output, and no
    block computed under A is reused; the same adapter twice hits the cache."""
    base_dir, adapters, oracle = model_and_oracle
    llm = make_llm(base_dir, adapters, block_size=4)
    prompt = [PROMPTS[3]]
    run_and_record(llm, prompt, ["r8"], GREEDY)
    outs, logits = run_and_record(llm, prompt, ["r16_rslora"], GREEDY)
    assert outs[0].num_cached_tokens == 0
    check_against_oracle(oracle, outs, logits, ["r16_rslora"])
    again, _ = run_and_record(llm, prompt, ["r16_rslora"], GREEDY)
    assert again[0].num_cached_tokens > 0 and again[0].token_ids == outs[0].token_ids
