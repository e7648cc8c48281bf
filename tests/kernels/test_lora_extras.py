"""The adapter-kind ops against plain loops: DoRA's row rescale, the embedding LoRA
lookup, trainable-token row replacement, and DoRA's scale against PEFT's own layer."""

from __future__ import annotations

import pytest
import torch

from loraserve.kernels.lora_extras import (apply_row_scale, apply_row_scale_ref, dora_scale, embedding_lora,
                                           replace_token_rows)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("slots", [[-1, -1, -1], [0, -1, 2, 2, 1], [1] * 7])
def test_row_scale_matches_loop(with_bias, slots):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(len(slots), 12, generator=g)
    scales = torch.ones(4, 12)                      # 3 slots + the row for -1
    scales[:3] = torch.rand(3, 12, generator=g) + 0.5
    scales[1] = 1.0                                 # a non-DoRA slot
    bias = torch.randn(12, generator=g) if with_bias else None
    expected = apply_row_scale_ref(y, bias, scales, torch.tensor(slots))
    got = apply_row_scale(y.clone(), bias, scales, torch.tensor(slots))
    torch.testing.assert_close(got, expected)
    base_rows = [i for i, s in enumerate(slots) if s in (-1, 1)]
    torch.testing.assert_close(got[base_rows], y[base_rows])


def test_embedding_lora_and_token_rows():
    g = torch.Generator().manual_seed(1)
    a_t, b_t = torch.randn(50, 4, generator=g), torch.randn(4, 8, generator=g)
    ids = torch.tensor([3, 7, 3, 49])
    torch.testing.assert_close(embedding_lora(ids, a_t, b_t), torch.stack([a_t[i] @ b_t for i in ids.tolist()]))
    x = torch.zeros(4, 8)
    rows = torch.randn(2, 8, generator=g)
    out = replace_token_rows(x.clone(), ids, torch.tensor([7, 49]), rows)
    torch.testing.assert_close(out, torch.stack([x[0], rows[0], x[2], rows[1]]))


def test_dora_scale_matches_peft_layer():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24, bias=True))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True,
                                            init_lora_weights=False))
    layer = peft.base_model.model[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.5)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    scale = dora_scale(layer.base_layer.weight, A, B, layer.scaling["default"], m)
    x = torch.randn(5, 16)
    y = torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias) + (x @ A.t() @ B.t()) * 2
    ours = apply_row_scale(y, layer.base_layer.bias, torch.stack([scale, torch.ones(24)]), torch.zeros(5, dtype=torch.long))
    with torch.no_grad():
        torch.testing.assert_close(ours, peft(x), atol=1e-5, rtol=1e-5)
