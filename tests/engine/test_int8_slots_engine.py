"""An engine with int8 adapter slots (`lora_dtype="int8"`) against HF transformers + PEFT
at fp32: four adapters (ranks 4-64, rsLoRA, q,v-only) and base rows in one batch, through
chunked prefill and preemption. The int8 codes move each adapter's logits by a small
fraction of what the adapter itself changes (asserted: at most 3% of it; measured below),
and base rows are bit for bit those of an engine with full-precision slots."""

from __future__ import annotations

import pytest
import torch

from lorakit import PeftOracle, run_and_record
from loraserve import SamplingParams
from loraserve.config import EngineConfig

from test_fidelity import ENGINE_PATHS, PROMPTS, adapter_plan, make_llm

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tiny_models):
    base_dir, adapters = tiny_models["llama"]
    return base_dir, adapters, PeftOracle(base_dir, adapters)


@pytest.mark.parametrize("path", list(ENGINE_PATHS))
def test_int8_slots_match_peft_within_their_rounding(setup, path):
    base_dir, adapters, oracle = setup
    plan = adapter_plan()
    llm = make_llm(base_dir, adapters, lora_dtype="int8", **ENGINE_PATHS[path])
    outs, logits = run_and_record(llm, PROMPTS, plan, GREEDY)
    agree = total = 0
    for out, ours, adapter in zip(outs, logits, plan):
        full = out.prompt_token_ids + out.token_ids
        n = len(out.prompt_token_ids)
        ref = oracle.logits(full, adapter)[n - 1 : -1]
        if adapter is None:
            torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)
            assert out.token_ids == ref.argmax(-1).tolist()
            continue
        effect = (ref - oracle.logits(full, None)[n - 1 : -1]).abs().max()
        err = (ours - ref).abs().max()
        assert err <= 0.03 * effect, (adapter, err.item(), effect.item())
        agree += sum(a == b for a, b in zip(out.token_ids, ref.argmax(-1).tolist()))
        total += len(out.token_ids)
    assert agree / total >= 0.9, f"greedy tokens agree on {agree}/{total}"
    assert llm.engine.stats().kv_blocks_used == 0


def test_int8_slots_leave_base_rows_alone_and_halve_slot_bytes(setup):
    base_dir, adapters, _ = setup
    plan = adapter_plan()
    runs = {}
    for lora_dtype in ("auto", "int8"):
        llm = make_llm(base_dir, adapters, lora_dtype=lora_dtype, dtype="bfloat16")
        runs[lora_dtype] = (run_and_record(llm, PROMPTS, plan, GREEDY), llm.engine.stats().adapter_slot_bytes)
    (outs_a, logits_a), bytes_a = runs["auto"]
    (outs_q, logits_q), bytes_q = runs["int8"]
    for adapter, a, q, la, lq in zip(plan, outs_a, outs_q, logits_a, logits_q):
        if adapter is None:
            assert a.token_ids == q.token_ids and torch.equal(la, lq)
    assert bytes_q < 0.6 * bytes_a          # codes at half of bf16, plus DoRA ones and fp32 scales


def test_unknown_lora_dtype_is_refused():
    with pytest.raises(ValueError, match="lora_dtype 'int4' is not one of auto, int8"):
        EngineConfig(lora_dtype="int4")
