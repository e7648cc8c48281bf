"""The C++ CPU rotary op (kernels/cpu_rope.cpp) against its torch reference, bit for bit:
the same two products and sum, each rounded to the dtype as torch's ops round them. The
grid: dtype x tokens x heads x full and partial rotary (Phi's: the dims past R pass
through) x q and k as strided views of a fused qkv row."""

import pytest
import torch

from loraserve.kernels import cpu_rope, torch_kernels
from loraserve.kernels.cpu_rope import rotate, rotate_ref

pytestmark = pytest.mark.skipif(cpu_rope.extension() is None, reason="no C++ compiler: the reference serves")


def tables(tokens, rot, dtype, gen):
    angles = torch.rand(tokens, 1, rot // 2, generator=gen) * 50
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize("heads, head_dim, rot", [(1, 16, 16), (12, 64, 64), (4, 96, 32), (3, 80, 80)])
def test_op_equals_the_reference(dtype, tokens, heads, head_dim, rot):
    gen = torch.Generator().manual_seed(tokens * heads + rot)
    x = (torch.randn(tokens, heads, head_dim, generator=gen) * 4).to(dtype)
    cos, sin = tables(tokens, rot, dtype, gen)
    assert torch.equal(rotate(x, cos, sin), rotate_ref(x, cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_and_k_as_views_of_a_fused_qkv_row(dtype):
    gen = torch.Generator().manual_seed(3)
    tokens, h, h_kv, d = 7, 9, 3, 64
    qkv = torch.randn(tokens, (h + 2 * h_kv) * d, generator=gen).to(dtype)
    qk = qkv[:, : (h + h_kv) * d].view(tokens, h + h_kv, d)     # rows strided by the v part
    assert not qk.is_contiguous()
    cos, sin = tables(tokens, d, dtype, gen)
    out = rotate(qk, cos, sin)
    assert out.is_contiguous() and torch.equal(out, rotate_ref(qk, cos, sin))


def test_the_reference_is_hf_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, 32, generator=gen).to(torch.bfloat16), torch.randn(5, 2, 32, generator=gen).to(torch.bfloat16)
    cos, sin = tables(5, 32, torch.bfloat16, gen)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[:, 0][None], sin[:, 0][None])
    assert torch.equal(rotate_ref(q, cos, sin), hf_q[0].transpose(0, 1))
    assert torch.equal(rotate_ref(k, cos, sin), hf_k[0].transpose(0, 1))


def test_the_torch_backend_takes_the_op_on_cpu():
    assert torch_kernels(torch.device("cpu")).rotate is rotate
