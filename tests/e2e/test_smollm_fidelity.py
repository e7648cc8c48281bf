"""The embedded SmolLM2-135M with a mixed-adapter batch matches HF transformers + PEFT
at fp32 (the converted GGUF weights, the same ones HF+PEFT loads here)."""

from __future__ import annotations

import pytest
import torch

from lorakit import ADAPTER_MIX, PeftOracle, save_peft_adapter
from loraserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The three primary colors are",
    "Write a short poem about autumn leaves.",
    "Q: What is the boiling point of water?\nA:",
    "Translate 'good morning' into French:",
    "List three fruits:",
    "The capital of Japan is",
]
PLAN = ["r4", None, "r8", "r16_rslora", "r64_qv", None]


@pytest.fixture(scope="module")
def smollm_setup(smollm_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("smollm_adapters")
    adapters = {name: save_peft_adapter(base, str(root / name), r, a, rs, t, seed=10 + i)
                for i, (name, r, a, rs, t) in enumerate(ADAPTER_MIX)}
    del base
    return adapters, PeftOracle(smollm_dir, adapters)


def test_embedded_model_mixed_adapters_match_peft(smollm_setup):
    adapters, oracle = smollm_setup
    llm = LLM(dtype="float32", max_loras=4, max_lora_rank=64)      # no model: the embedded default
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    recorded = {}
    llm.engine.hooks.on_logits = lambda seqs, logits: [
        recorded.setdefault(s.state.output.request_id, []).append(row.clone()) for s, row in zip(seqs, logits)]
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True),
                        adapters=PLAN, use_tqdm=False)
    changed = 0
    for out, adapter in zip(outs, PLAN):
        ours = torch.stack(recorded[out.request_id])
        ref = oracle.logits(out.prompt_token_ids + out.token_ids, adapter)[len(out.prompt_token_ids) - 1 : -1]
        assert (ours - ref).abs().max().item() < 1e-3, f"adapter {adapter}"
        assert out.token_ids == ref.argmax(-1).tolist(), f"adapter {adapter}: greedy tokens differ"
        if adapter is not None:
            base_ref = oracle.logits(out.prompt_token_ids + out.token_ids, None)[len(out.prompt_token_ids) - 1 : -1]
            changed += (base_ref - ref).abs().max().item() > 0.1
    assert changed == 4, "every adapter should move the logits"
    assert llm.engine.stats().kv_blocks_used == 0
