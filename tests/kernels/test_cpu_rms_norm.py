"""The C++ CPU RMSNorm op (kernels/cpu_rms_norm.cpp) against its torch reference, which is
HF's Llama and Gemma norms. bf16 outputs are the reference's except where the sum of
squares, taken in another order, rounds the other way (one bf16 ulp, rarely); fp32 agree to
rounding. The grid: dtype x rows x hidden sizes that are not a multiple of the vector
width x Llama's and Gemma's form x 3-D inputs (Qwen3's per-head q/k norms) and views."""

import pytest
import torch

from loraserve.kernels import cpu_rms_norm, torch_kernels
from loraserve.kernels.cpu_rms_norm import rms_norm, rms_norm_ref

pytestmark = pytest.mark.skipif(cpu_rms_norm.extension() is None, reason="no C++ compiler: the reference serves")


def inputs(shape, hidden, dtype, unit_offset, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, hidden, generator=gen) * 3).to(dtype)
    w = (torch.randn(hidden, generator=gen) * (0.1 if unit_offset else 1.0) + (0 if unit_offset else 1)).to(dtype)
    return x, w


def assert_matches(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        return
    torch.testing.assert_close(out, ref, rtol=2 ** -7, atol=1e-6)      # one bf16 ulp
    assert (out != ref).float().mean().item() <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64, 130])
@pytest.mark.parametrize("hidden", [16, 100, 576])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_op_matches_the_reference(dtype, rows, hidden, unit_offset):
    x, w = inputs((rows,), hidden, dtype, unit_offset, seed=rows + hidden)
    assert_matches(rms_norm(x, w, 1e-6, unit_offset), rms_norm_ref(x, w, 1e-6, unit_offset))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_head_norms_of_a_strided_view(dtype):
    """q_norm / k_norm: [T, H, D] over D, on a slice of a fused qkv output."""
    x, w = inputs((9, 6), 32, dtype, False)
    view = x[:, 1:5]                               # not contiguous
    assert not view.is_contiguous()
    assert_matches(rms_norm(view, w, 1e-5), rms_norm_ref(view, w, 1e-5))


def test_the_reference_is_hf_llama_and_gemma_norms():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype in (torch.float32, torch.bfloat16):
        x, w = inputs((33,), 64, dtype, False)
        llama = LlamaRMSNorm(64, eps=1e-5).to(dtype)
        llama.weight.data.copy_(w)
        assert torch.equal(rms_norm_ref(x, w, 1e-5), llama(x))
        gemma = Gemma2RMSNorm(64, eps=1e-6).to(dtype)
        gemma.weight.data.copy_(w)
        assert torch.equal(rms_norm_ref(x, w, 1e-6, unit_offset=True), gemma(x))


def test_the_torch_backend_takes_the_op_on_cpu():
    assert torch_kernels(torch.device("cpu")).rms_norm is rms_norm
