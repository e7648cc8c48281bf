"""The embedded model with more adapters than device slots and than CPU cache entries:
adapters rotate through both tiers and every output still matches HF + PEFT. (An end-to-end
test, marked slow, kept beside the other tier tests rather than in tests/e2e.)"""

from __future__ import annotations

import pytest
import torch

from lorakit import ALL_MODULES, PeftOracle, save_peft_adapter
from loraserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

NUM_ADAPTERS = 6


@pytest.fixture(scope="module")
def many_adapters(smollm_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("tier_adapters")
    targets = [ALL_MODULES, ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]]
    adapters = {f"t{i}": save_peft_adapter(base, str(root / f"t{i}"), rank=4 + 4 * (i % 3), alpha=16,
                                           use_rslora=i == 5, targets=targets[i % 3], seed=100 + i)
                for i in range(NUM_ADAPTERS)}
    del base
    return adapters, PeftOracle(smollm_dir, adapters)


def test_rotation_through_slots_and_cpu_cache_matches_peft(many_adapters, tmp_path):
    adapters, oracle = many_adapters
    llm = LLM(dtype="float32", max_loras=2, max_cpu_loras=3, max_lora_rank=16,
              adapter_dir=str(tmp_path / "store"))
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    names = list(adapters)
    plan = names + names[::-1] + [None]
    prompts = [f"Tell me about the number {i}." for i in range(len(plan))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                        adapters=plan, use_tqdm=False)
    for out, adapter in zip(outs, plan):
        ref = oracle.logits(out.prompt_token_ids + out.token_ids, adapter)[len(out.prompt_token_ids) - 1 : -1]
        assert out.token_ids == ref.argmax(-1).tolist(), f"adapter {adapter}"
    stats = llm.engine.stats()
    assert stats.adapter_evictions > 0, "six adapters through two slots must evict"
    assert stats.disk_loads > 3, "three CPU entries for six adapters must reload from disk"
    assert stats.kv_blocks_used == 0
