"""Weight-only int8 / int4 base weights (--quantization): the formats against the matrix
their codes stand for, the engine against HF transformers + PEFT running the *same*
quantized weights dequantized to fp32, the embedded GGUF served from its own Q4_1 blocks,
and the errors at start-up."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from lorakit import PeftOracle
from loraserve import SamplingParams
from loraserve.config import EngineConfig
from loraserve.model import loader
from loraserve.model.base_weights import Int4Weight, Int8Weight
from loraserve.model.gguf_quant import file_precision, gguf_int4_blocks
from loraserve.model.quantize import quantize_int4, quantize_int8, resolve_quantization
from loraserve.model.runner import check_supported

from test_fidelity import ENGINE_PATHS, PROMPTS, adapter_plan, check_against_oracle, make_llm

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
FORMATS = {"int8": (quantize_int8, Int8Weight), "int4": (quantize_int4, Int4Weight)}


@pytest.mark.parametrize("bits", list(FORMATS))
def test_quantization_error_is_half_a_step(bits):
    w = torch.randn(96, 256) * torch.linspace(0.1, 3, 96)[:, None]   # rows of different ranges
    q = FORMATS[bits][0](w)
    err = (q.dequantize() - w).abs().view(96, -1, q.group)
    assert (err <= q.scales[..., None] / 2 + 1e-6).all()
    assert err.max() > 0                                  # it did round


@pytest.mark.parametrize("bits", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_formats_multiply_by_the_matrix_their_codes_stand_for(bits, dtype):
    quantize, fmt = FORMATS[bits]
    q = quantize(torch.randn(80, 128))
    bias = torch.randn(80).to(dtype)
    weight = fmt(q, bias, dtype)
    x = torch.randn(3, 5, 128).to(dtype)                  # a [batch, tokens, in] input keeps its shape
    ref = F.linear(x.float(), q.dequantize(), bias.float())
    y = weight(x)
    assert y.shape == (3, 5, 80) and y.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 0.05 * ref.abs().max().item()
    assert (y.float() - ref).abs().max() < tol
    # dense() reads W back through the served matmul: the dequantized codes, to rounding (in
    # bf16 the kernels round the scales and zeros to bf16 first: a bf16 step of the largest weight)
    exact = q.dequantize()
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7 * exact.abs().max().item()
    torch.testing.assert_close(weight.dense().float(), exact, rtol=0, atol=tol)


def dequantized_copy(base_dir: str, out_dir: str, bits: str) -> str:
    """The HF checkpoint with every projection replaced by its quantized-then-dequantized
    matrix (fp32): what the engine's int8/int4 base computes with."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base_dir, out_dir)
    path = os.path.join(out_dir, "model.safetensors")
    state = load_file(path)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for key, w in state.items():
        if key.endswith(".weight") and key.split(".")[-2] in projections:
            state[key] = FORMATS[bits][0](w.float()).dequantize().contiguous()
    save_file(state, path, metadata={"format": "pt"})
    return out_dir


@pytest.fixture(scope="module", params=list(FORMATS))
def quantized_setup(request, tiny_models, tmp_path_factory):
    base_dir, adapters = tiny_models["llama"]
    ref_dir = dequantized_copy(base_dir, str(tmp_path_factory.mktemp("deq") / "base"), request.param)
    return request.param, base_dir, adapters, PeftOracle(ref_dir, adapters)


@pytest.mark.parametrize("path", list(ENGINE_PATHS))
def test_quantized_base_with_mixed_adapters_matches_peft(quantized_setup, path):
    """Four adapters (ranks 4-64, rsLoRA) and base rows in one batch on an int8 / int4 base,
    through chunked prefill and preemption: logits within 1e-3 of HF+PEFT on the same
    quantized weights at fp32, greedy tokens equal."""
    bits, base_dir, adapters, oracle = quantized_setup
    llm = make_llm(base_dir, adapters, quantization=bits, **ENGINE_PATHS[path])
    from lorakit import run_and_record

    plan = adapter_plan()
    outs, logits = run_and_record(llm, PROMPTS, plan, GREEDY)
    check_against_oracle(oracle, outs, logits, plan)
    stats = llm.engine.stats()
    assert stats.kv_blocks_used == 0
    if path == "preemption":
        assert stats.num_preemptions > 0


def test_quantized_base_prefix_cache_hits_match_peft(quantized_setup):
    bits, base_dir, adapters, oracle = quantized_setup
    from lorakit import run_and_record

    llm = make_llm(base_dir, adapters, quantization=bits, block_size=4)
    plan = adapter_plan()
    run_and_record(llm, PROMPTS, plan, GREEDY)
    outs, logits = run_and_record(llm, PROMPTS, plan, GREEDY)
    assert any(o.num_cached_tokens > 0 for o in outs)
    check_against_oracle(oracle, outs, logits, plan)


def test_quantization_shrinks_the_served_weights(tiny_models):
    base_dir, _ = tiny_models["llama"]
    sizes = {q: make_llm(base_dir, {}, quantization=q, dtype="bfloat16").engine.stats().base_weight_bytes
             for q in ("none", "int8", "int4")}
    assert sizes["int8"] <= 0.55 * sizes["none"]
    assert sizes["int4"] <= 0.3 * sizes["none"]


def test_embedded_gguf_blocks_are_the_files_weights(smollm_dir):
    """Every Q4_1 projection of the embedded GGUF, taken from its blocks (q/k rows
    reordered as transformers does), dequantizes to exactly the weights transformers'
    GGUF loader produces for the same file."""
    from transformers import AutoConfig

    from loraserve.model.loader import load_state_dict

    path = loader.embedded_gguf_path()
    assert file_precision(path) == "int4"
    blocks = gguf_int4_blocks(path, AutoConfig.from_pretrained(smollm_dir))
    state = load_state_dict(smollm_dir)
    assert len(blocks) == 7 * 30
    for key, q in blocks.items():
        assert q.group == 32
        torch.testing.assert_close(q.dequantize(), state[key], rtol=0, atol=1e-6, msg=key)


def test_embedded_auto_serves_the_file_and_matches_hf(smollm_dir):
    """`--quantization auto` on the embedded GGUF serves its Q4_1 blocks; at fp32 its
    logits equal HF transformers' on the same file (dequantized by transformers)."""
    from loraserve import LLM

    llm = LLM(quantization="auto", dtype="float32", max_loras=1)
    assert llm.engine.runner.quantization == "int4"
    weights = sum(p.numel() for n, p in _hf(smollm_dir).named_parameters() if n.split(".")[-2].endswith("proj"))
    # 4 bits a weight + an fp32 scale and zero per block of 32 (at bf16: 0.31x of bf16's bytes)
    assert llm.engine.stats().base_weight_bytes == weights // 2 + weights // 32 * 8
    from lorakit import run_and_record

    prompts = PROMPTS[:3]
    outs, logits = run_and_record(llm, prompts, [None] * 3, SamplingParams(max_tokens=6, temperature=0,
                                                                           ignore_eos=True))
    oracle = PeftOracle(smollm_dir, {})
    check_against_oracle(oracle, outs, logits, [None] * 3)


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def test_bad_quantization_values_are_refused_at_start(tmp_path, tiny_models):
    with pytest.raises(ValueError, match="quantization 'int3' is not one of none, int8, int4, auto"):
        EngineConfig(quantization="int3")
    with pytest.raises(ValueError, match="runs on CPU only"):
        resolve_quantization("int4", None, torch.device("cuda"))
    assert resolve_quantization("auto", None, torch.device("cpu")) == "none"   # not a GGUF: as loaded

    base_dir, _ = tiny_models["llama"]
    awq = tmp_path / "awq"
    shutil.copytree(base_dir, awq)
    config = json.loads((awq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (awq / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pre-quantized 'awq' checkpoint.*--quantization int8 or int4"):
        check_supported(loader.load_config(str(awq)))

    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"this is not a GGUF file")
    with pytest.raises(ValueError, match="broken.gguf through transformers' GGUF loader"):
        loader.resolve_model(str(not_gguf), cache_dir=str(tmp_path / "cache"))


def test_every_adapter_kind_serves_on_an_int4_base(tiny_models, tmp_path_factory):
    """DoRA (its norms read the served, dequantized W), embed/lm_head LoRA, modules_to_save
    copies and trainable tokens on an int4 base, mixed with base rows, against HF+PEFT on
    the same dequantized weights."""
    from transformers import AutoModelForCausalLM

    from lorakit import PeftOracles, adapter_kinds, leading_token_ids, run_and_record, save_peft_kind

    base_dir, _ = tiny_models["llama"]
    ref_dir = dequantized_copy(base_dir, str(tmp_path_factory.mktemp("deq4") / "base"), "int4")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("kinds4")
    kinds = adapter_kinds("llama", leading_token_ids(base_dir, PROMPTS[:3]))
    adapters = {name: save_peft_kind(base, str(root / name), seed=i + 31, **cfg)
                for i, (name, cfg) in enumerate(kinds.items())}
    plan = [None] + list(adapters) + [None]
    llm = make_llm(base_dir, adapters, quantization="int4", max_loras=len(adapters))
    outs, logits = run_and_record(llm, PROMPTS[: len(plan)], plan, GREEDY)
    check_against_oracle(PeftOracles(ref_dir, adapters), outs, logits, plan)


def test_a_shape_int4_cannot_pack_is_a_clear_error():
    from loraserve.model.base_weights import pack_base_weights
    from loraserve.model.layers import LoRAProjection

    model = torch.nn.Module()
    model.proj = LoRAProjection("o", 64, 24, False, None)      # 24 outputs: torch's int4 packing needs 16k
    torch.nn.init.normal_(model.proj.weight)
    with pytest.raises(ValueError, match=r"int4 cannot pack projection proj of shape \(24, 64\).*int8 or none"):
        pack_base_weights(model, 8, "int4")
