"""Base-weight formats (loraserve/model/base_weights.py): a packed bf16 weight multiplies
bit for bit as F.linear does, gives its matrix back exactly, and an engine serving packed
weights (with DoRA, which reads W at load time) equals one serving them plain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit import run_and_record, save_peft_kind
from loraserve import LLM, SamplingParams
from loraserve.model import base_weights
from loraserve.model.base_weights import PackedWeight, PlainWeight, can_pack

CPU = torch.device("cpu")


def test_pack_choice_follows_device_and_dtype():
    assert can_pack(CPU, torch.float32) == torch.backends.mkldnn.is_available()
    assert can_pack(CPU, torch.bfloat16) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert not can_pack(CPU, torch.float16)


@pytest.mark.parametrize("rows", [1, 7, 64, 130])
def test_packed_fp32_equals_linear_to_rounding(rows):
    """fp32 goes to oneDNN instead of MKL: another summation order, so equal to rounding."""
    gen = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 80, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(rows, 80, generator=gen)
    packed = PackedWeight(w, b, batch_hint=64)
    torch.testing.assert_close(packed(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.dense(), w)


@pytest.mark.skipif(not can_pack(CPU, torch.bfloat16), reason="this CPU's oneDNN has no bf16 matmul: weights stay plain")
@pytest.mark.parametrize("rows", [1, 7, 64, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_equals_linear_bit_for_bit(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=gen).to(torch.bfloat16)
    b = torch.randn(96, generator=gen).to(torch.bfloat16) if with_bias else None
    x = torch.randn(rows, 80, generator=gen).to(torch.bfloat16)
    packed = PackedWeight(w, b, batch_hint=64)
    assert torch.equal(packed(x), F.linear(x, w, b))
    assert torch.equal(packed.dense(), w)
    assert packed.nbytes == PlainWeight(w, b).nbytes


class _TiedHead:
    """What pack_output_head reads of a model whose lm_head is its embedding."""
    tie = True

    def __init__(self, weight):
        self.weight, self.head = weight, None

    def output_weight(self):
        return self.weight


@pytest.mark.skipif(not can_pack(CPU, torch.bfloat16), reason="this CPU's oneDNN has no bf16 matmul: weights stay plain")
@pytest.mark.parametrize("amx", [True, False])
def test_a_tied_bf16_head_gets_a_packed_copy_only_with_amx(amx, monkeypatch):
    monkeypatch.setattr(base_weights, "has_amx", lambda: amx)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(500, 64, generator=gen).to(torch.bfloat16)
    model = _TiedHead(w)
    added = base_weights.pack_output_head(model, batch_hint=64)
    if not amx:
        assert added == 0 and model.head is None
        return
    assert isinstance(model.head, PackedWeight) and added == w.numel() * w.element_size()
    assert model.weight is w                                   # the embedding stays dense beside it
    for rows in (1, 64, 130):
        x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
        assert torch.equal(model.head(x), F.linear(x, w))


def _engine(base_dir, adapters, **overrides):
    llm = LLM(model=base_dir, **(dict(dtype="bfloat16", max_loras=4, max_lora_rank=16) | overrides))
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    return llm


def test_engine_packed_equals_plain(tiny_models, tmp_path, monkeypatch):
    """Same prompts, base rows + plain LoRA + DoRA in one bf16 batch: identical logits."""
    from transformers import AutoModelForCausalLM

    base_dir, loras = tiny_models["llama"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    dora = save_peft_kind(base, str(tmp_path / "dora"), seed=5, r=8, lora_alpha=16, use_dora=True,
                          target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    adapters = {"plain": loras["r8"], "dora": dora}
    prompts = [[5, 17, 99, 4, 250, 31], [7, 7, 300, 12], [40, 41, 42, 43, 44, 45, 46, 47]] * 2
    plan = [None, "plain", "dora"] * 2
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    packed = _engine(base_dir, adapters)
    kinds = {type(p.base) for p in packed.engine.runner.model.modules() if hasattr(p, "base")}
    assert kinds == {PackedWeight if can_pack(CPU, torch.bfloat16) else PlainWeight}
    outs_packed, logits_packed = run_and_record(packed, prompts, plan, params)
    del packed

    monkeypatch.setattr(base_weights, "can_pack", lambda device, dtype: False)
    plain = _engine(base_dir, adapters)
    assert {type(p.base) for p in plain.engine.runner.model.modules() if hasattr(p, "base")} == {PlainWeight}
    outs_plain, logits_plain = run_and_record(plain, prompts, plan, params)
    for a, b, la, lb in zip(outs_packed, outs_plain, logits_packed, logits_plain):
        assert a.token_ids == b.token_ids
        assert torch.equal(la, lb)
