"""DoRA, LoRA on embed_tokens / lm_head, modules_to_save and trainable tokens, served in
one mixed batch with plain LoRA and base rows, match HF transformers + PEFT at fp32 on
every engine path (plain, chunked prefill, preemption, prefix-cache hits)."""

from __future__ import annotations

import pytest
import torch

from lorakit import PeftOracles, adapter_kinds, leading_token_ids, run_and_record, save_peft_kind
from loraserve import SamplingParams

from test_fidelity import PROMPTS, check_against_oracle, make_llm

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PATHS = {"plain": {}, "chunked_prefill": {"max_num_batched_tokens": 7},
         "preemption": {"num_kv_blocks": 10, "block_size": 4}}


PLAN = ["plain", None, "dora", "embed_head", "copies", "tokens", None, "dora"]


@pytest.fixture(scope="module")
def kinds_setup(tiny_models, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    base_dir, _ = tiny_models["llama"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("kinds")
    adapters = {name: save_peft_kind(base, str(root / name), seed=i + 11, **cfg)
                for i, (name, cfg) in enumerate(adapter_kinds("llama", leading_token_ids(base_dir, PROMPTS[:3])).items())}
    return base_dir, adapters, PeftOracles(base_dir, adapters)


@pytest.mark.parametrize("path", list(PATHS))
def test_mixed_kinds_match_peft(kinds_setup, path):
    base_dir, adapters, oracle = kinds_setup
    llm = make_llm(base_dir, adapters, max_loras=5, **PATHS[path])
    outs, logits = run_and_record(llm, PROMPTS, PLAN, GREEDY)
    check_against_oracle(oracle, outs, logits, PLAN)
    stats = llm.engine.stats()
    if path == "preemption":
        assert stats.num_preemptions > 0, "the tiny pool was meant to force preemption"
    assert stats.kv_blocks_used == 0


def test_kinds_prefix_cache_hits_match_peft(kinds_setup):
    base_dir, adapters, oracle = kinds_setup
    llm = make_llm(base_dir, adapters, max_loras=5, block_size=4)
    run_and_record(llm, PROMPTS, PLAN, GREEDY)
    outs, logits = run_and_record(llm, PROMPTS, PLAN, GREEDY)
    assert any(o.num_cached_tokens > 0 for o in outs)
    check_against_oracle(oracle, outs, logits, PLAN)


def test_each_kind_changes_the_output(kinds_setup):
    """The oracle itself sees every adapter's effect (so the match above means something)."""
    base_dir, adapters, oracle = kinds_setup
    ids = list(range(1, 9))
    base = oracle.logits(ids, None)
    for name in adapters:
        assert (oracle.logits(ids, name) - base).abs().max() > 1e-2, name


def test_triton_backend_with_decode_graphs(kinds_setup):
    """The Triton backend (interpreted on CPU) with decode graphs in place: steps with
    these kinds run eagerly (the graphs hold none of them) and still match PEFT; a step
    of plain adapters keeps replaying its graph."""
    from loraserve.kernels import triton_kernels

    base_dir, adapters, oracle = kinds_setup
    cuda = torch.cuda.is_available()
    if not cuda:
        triton_kernels(torch.device("cpu"))        # fails here without the interpreter
    llm = make_llm(base_dir, adapters, max_loras=5, max_num_seqs=6, kernel_backend="triton",
                   device="cuda" if cuda else "cpu")
    runner = llm.engine.runner
    if not cuda:                                   # emulate replay: same buffers, no graph
        runner.graphs = runner.make_decode_graphs(llm.engine.max_model_len, capture=False)
    replays = []
    run = runner.graphs.run
    runner.graphs.run = lambda step: replays.append(step.token_slots) or run(step)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for plan in (["plain", "dora", None, "embed_head", "tokens", "copies"], ["plain", None]):
        replays.clear()
        outs, logits = run_and_record(llm, PROMPTS[: len(plan)], plan, params)
        check_against_oracle(oracle, [o for o in outs], logits, plan)
        # a replayed step never holds a DoRA / vocabulary adapter (a base-only step may
        # replay while those adapters still load in the background)
        special = runner.slots.extras_slots
        assert not [slots for slots in replays if set(slots) & special], (replays, special)
        if plan == ["plain", None]:
            assert replays, "a step of plain adapters replays its graph"


def test_tied_base_trainable_tokens_and_head_lora(tiny_models, tokenizer_dir, tmp_path_factory):
    """On a tied base (SmolLM2's layout) PEFT ties trainable tokens to lm_head as well,
    and LoRA on lm_head reads the shared weight: both still match."""
    import glob
    import os
    import shutil

    from lorakit import tiny_config
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tied")
    config = tiny_config("llama", 49152)
    config.tie_word_embeddings = True
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base_dir = str(root / "base")
    base.save_pretrained(base_dir, safe_serialization=True)
    for f in glob.glob(os.path.join(tokenizer_dir, "*token*")) + glob.glob(os.path.join(tokenizer_dir, "*.jinja")):
        shutil.copy(f, base_dir)
    ids = leading_token_ids(base_dir, PROMPTS[:3])
    adapters = {"tokens": save_peft_kind(base, str(root / "tokens"), seed=1, target_modules=["q_proj"],
                                         trainable_token_indices=ids),
                "embed_head": save_peft_kind(base, str(root / "eh"), seed=2,
                                             target_modules=["embed_tokens", "lm_head", "v_proj"])}
    oracle = PeftOracles(base_dir, adapters)
    llm = make_llm(base_dir, adapters, max_loras=2)
    plan = ["tokens", None, "embed_head", "tokens"]
    outs, logits = run_and_record(llm, PROMPTS[:4], plan, GREEDY)
    check_against_oracle(oracle, outs, logits, plan)
