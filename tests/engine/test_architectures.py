"""Every supported family against HF transformers + PEFT on the same tiny random weights,
at fp32: one mixed batch of base rows and two adapters, then chunked prefill with a
prefix-cache hit, and one batch of every adapter kind. Prompts outgrow the 8-token
windows of Gemma 2/3 and Mistral, so windowed layers must window (a full-context answer
differs)."""

from __future__ import annotations

import pytest
import torch
from lorakit import (PeftOracle, PeftOracles, adapter_kinds, leading_token_ids, run_and_record,
                     save_peft_adapter, save_peft_kind, save_tiny_model)

from loraserve import LLM, SamplingParams

ATOL = 1e-3
ARCHS = ["qwen3", "gemma2", "gemma3_text", "mistral", "phi3"]
EVERY_MODEL_TYPE = ["llama", "qwen2", *ARCHS]      # loraserve/model/registry.py's list
PROMPTS = [
    "Once upon a time there was a king who had three daughters, and the youngest",
    "The quick brown fox jumps over the lazy dog because",
    "def fibonacci(n):",
    "In a distant galaxy, a small robot",
]
PLAN = ["r8", None, "r16_rslora", "r8"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def targets_of(model_type: str) -> list[str]:
    """What fine-tuning targets by default (adapters/finetune.py), in the model's own names."""
    from loraserve.adapters.base_spec import LORA_MODULES
    from loraserve.adapters.fused_layouts import model_targets

    return model_targets(model_type, LORA_MODULES)


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    base_dir = save_tiny_model(model_type, str(root / "base"), tokenizer_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = targets_of(model_type)
    adapters = {"r8": save_peft_adapter(base, str(root / "r8"), 8, 32, False, targets, seed=1),
                "r16_rslora": save_peft_adapter(base, str(root / "r16"), 16, 16, True, targets, seed=2)}
    return model_type, base_dir, adapters, PeftOracle(base_dir, adapters)


def make_llm(base_dir, adapters, **overrides) -> LLM:
    llm = LLM(model=base_dir, **(dict(dtype="float32", max_loras=2, max_lora_rank=16) | overrides))
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    return llm


def check(oracle, outs, logits, plan):
    for out, ours, adapter in zip(outs, logits, plan):
        full = out.prompt_token_ids + out.token_ids
        ref = oracle.logits(full, adapter)[len(out.prompt_token_ids) - 1 : -1]
        err = (ours - ref).abs().max().item()
        assert err < ATOL, f"adapter {adapter}: max logit error {err}"
        assert out.token_ids == ref.argmax(-1).tolist(), f"adapter {adapter}: greedy tokens differ"


def test_mixed_batch_matches_peft(arch):
    _, base_dir, adapters, oracle = arch
    llm = make_llm(base_dir, adapters)
    outs, logits = run_and_record(llm, PROMPTS, PLAN, GREEDY)
    assert max(len(o.prompt_token_ids) for o in outs) > 8, "a prompt must outgrow the window"
    check(oracle, outs, logits, PLAN)


def test_dora_in_a_mixed_batch_matches_peft(arch, tmp_path):
    """DoRA on each family's own projections (Phi-3: its fused qkv_proj and gate_up_proj,
    whose magnitudes split by rows like B), beside base rows and plain LoRA."""
    from transformers import AutoModelForCausalLM

    model_type, base_dir, adapters, _ = arch
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    dora = {"dora": save_peft_adapter(base, str(tmp_path / "dora"), 8, 16, False, targets_of(model_type), seed=3,
                                      use_dora=True), "r8": adapters["r8"]}
    plan = ["dora", None, "r8", "dora"]
    outs, logits = run_and_record(make_llm(base_dir, dora), PROMPTS, plan, GREEDY)
    check(PeftOracle(base_dir, dora), outs, logits, plan)


KINDS_PLAN = ["plain", None, "dora", "embed_head", "copies", "tokens"]


@pytest.mark.parametrize("arch", EVERY_MODEL_TYPE, indirect=True)
def test_every_adapter_kind_in_one_batch_matches_peft(arch, tmp_path):
    """Base rows, plain LoRA, DoRA (lm_head too), LoRA on embed_tokens and lm_head,
    modules_to_save copies of both and trainable tokens, in one batch, on every family.
    Gemma 2/3 tie lm_head to embed_tokens: PEFT (without ensure_weight_tying) gives each
    its own copy / LoRA over the shared base matrix, ties trainable tokens to lm_head,
    and scales embed_tokens' parts by sqrt(hidden) like the base rows."""
    from transformers import AutoModelForCausalLM

    model_type, base_dir, _, _ = arch
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    prompts = PROMPTS + ["Paris is the capital of", "1, 2, 3, 4,"]
    configs = adapter_kinds(model_type, leading_token_ids(base_dir, prompts))
    adapters = {name: save_peft_kind(base, str(tmp_path / name), seed=i + 21, **cfg)
                for i, (name, cfg) in enumerate(configs.items())}
    oracle = PeftOracles(base_dir, adapters)
    outs, logits = run_and_record(make_llm(base_dir, adapters, max_loras=len(adapters)), prompts, KINDS_PLAN, GREEDY)
    check(oracle, outs, logits, KINDS_PLAN)
    for out, adapter in zip(outs, KINDS_PLAN):             # each kind visibly moves the oracle's logits
        full = out.prompt_token_ids + out.token_ids
        if adapter is not None:
            assert (oracle.logits(full, adapter) - oracle.logits(full, None)).abs().max() > 1e-2, adapter


def test_preemption_matches_peft(arch):
    """A KV pool too small for the batch: requests are preempted and recomputed (windowed
    layers included) and still equal HF+PEFT; no block leaks."""
    _, base_dir, adapters, oracle = arch
    llm = make_llm(base_dir, adapters, num_kv_blocks=12, block_size=4)
    outs, logits = run_and_record(llm, PROMPTS, PLAN, GREEDY)
    check(oracle, outs, logits, PLAN)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0, "the tiny pool was meant to force preemption"
    assert stats.kv_blocks_used == 0, "blocks leaked"


def test_chunked_prefill_and_prefix_cache_match_peft(arch):
    _, base_dir, adapters, oracle = arch
    llm = make_llm(base_dir, adapters, max_num_batched_tokens=7, block_size=4)
    run_and_record(llm, PROMPTS, PLAN, GREEDY)
    outs, logits = run_and_record(llm, PROMPTS, PLAN, GREEDY)
    assert any(o.num_cached_tokens > 0 for o in outs), "the second pass should hit the prefix cache"
    check(oracle, outs, logits, PLAN)
    assert llm.engine.stats().kv_blocks_used == 0


def test_default_finetune_targets_exist(arch):
    """PEFT finds every default fine-tuning target in the model (Phi-3: the fused names)."""
    from transformers import AutoModelForCausalLM

    model_type, base_dir, _, _ = arch
    names = {n.rsplit(".", 1)[-1] for n, _ in AutoModelForCausalLM.from_pretrained(base_dir).named_modules()}
    targets = targets_of(model_type)
    assert set(targets) <= names, (model_type, targets)
    if model_type == "phi3":
        assert targets == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def test_adapter_of_another_architecture_is_refused(arch, tmp_path):
    """A Phi-3 adapter (fused names) on a per-projection base, and the reverse, are refused
    before they are stored; so is one whose head_dim-dependent shapes do not fit."""
    from loraserve.adapters import AdapterRejected, BaseModelSpec
    from loraserve.adapters.peft_format import load_peft_dir
    from transformers import AutoConfig

    model_type, base_dir, adapters, _ = arch
    spec = BaseModelSpec.from_hf_config(AutoConfig.from_pretrained(base_dir), max_lora_rank=16)
    load_peft_dir(adapters["r8"], spec)
    other = "llama" if model_type == "phi3" else "phi3"
    wrong = BaseModelSpec(**{**spec.__dict__, "model_type": other})
    with pytest.raises(AdapterRejected, match="does not fit"):
        load_peft_dir(adapters["r8"], wrong)
    shifted = BaseModelSpec(**{**spec.__dict__, "head_dim": spec.head_dim * 2})
    with pytest.raises(AdapterRejected, match="shape"):
        load_peft_dir(adapters["r8"], shifted)


@pytest.mark.parametrize("arch", ["gemma2"], indirect=True)
def test_triton_kernels_window_and_softcap_match_peft(arch):
    """The Triton path (the interpreter on CPU) through windowed, soft-capped layers."""
    _, base_dir, adapters, oracle = arch
    llm = make_llm(base_dir, adapters, kernel_backend="triton", max_num_batched_tokens=9, block_size=4)
    plan = ["r8", None]
    outs, logits = run_and_record(llm, PROMPTS[:2], plan, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    check(oracle, outs, logits, plan)
