"""The CPU production path of paged attention (kernels/cpu_attention.py: head-major cache,
one gather per batch) against the torch references of paged_attention.py, on the same
grid as the Triton kernels (attention_grid.py): store_kv, decode over odd context
lengths, and prefill of new tokens after a cached prefix, every dtype and GQA ratio."""

import pytest
import torch
from attention_grid import (
    CASES, DECODE_CONTEXTS, PREFILL, TOL, VARIANT_CASES, attention_kwargs, case_id, make_cache, qkv_views, variant_id,
)

from loraserve.kernels import cpu_attention, cpu_paged_attention
from loraserve.kernels.paged_attention import paged_attention_decode, paged_attention_prefill, store_kv


def head_major_copy(cache: torch.Tensor) -> torch.Tensor:
    """The same contents in the CPU path's own layout (what allocate_kv_cache gives on CPU)."""
    out = cpu_attention.allocate_cache(*cache.shape, cache.dtype, cache.device)
    out.copy_(cache)
    assert cpu_attention.head_major(out) is not None
    return out


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.float()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_store_kv(case):
    k_ref, v_ref, _ = make_cache(case, [40], "cpu")
    k_cache, v_cache = head_major_copy(k_ref), head_major_copy(v_ref)
    _, k, v = qkv_views(7, case, "cpu")
    slots = torch.tensor([3, 0, 17, 39, 4, 38, 20])
    store_kv(k.contiguous(), v.contiguous(), k_ref, v_ref, slots)
    cpu_attention.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("case", [c for c in CASES if c["dtype"] in cpu_paged_attention.DTYPES], ids=case_id)
def test_the_ops_store_kv_equals_the_torch_path(case):
    """The C++ op's write (kernels/cpu_paged_attention.py; fp32 and bf16, others take
    index_copy_) from strided views of a fused qkv row, into the head-major cache, equals
    index_copy_'s; a slot outside the cache is refused, not written."""
    if cpu_paged_attention.extension() is None:
        pytest.skip("no C++ compiler: index_copy_ serves")
    k_ref, v_ref, _ = make_cache(case, [40], "cpu")
    k_ref, v_ref = head_major_copy(k_ref), head_major_copy(v_ref)
    k_cache, v_cache = k_ref.clone(), v_ref.clone()
    _, k, v = qkv_views(7, case, "cpu")
    assert not k.is_contiguous()
    slots = torch.tensor([3, 0, 17, 39, 4, 38, 20])
    cpu_attention.store_kv(k, v, k_ref, v_ref, slots)
    cpu_paged_attention.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_paged_attention.store_kv(k, v, k_cache, v_cache, torch.tensor([3, 0, 17, 39, 4, 38, 10_000]))
    assert torch.equal(k_cache, k_ref)


@pytest.mark.parametrize("case", CASES + VARIANT_CASES, ids=variant_id)
def test_decode(case):
    k_ref, v_ref, tables = make_cache(case, DECODE_CONTEXTS, "cpu")
    q, _, _ = qkv_views(len(DECODE_CONTEXTS), case, "cpu")
    lens, scale, kw = torch.tensor(DECODE_CONTEXTS), case["head_dim"] ** -0.5, attention_kwargs(case)
    out = cpu_attention.paged_attention_decode(q, head_major_copy(k_ref), head_major_copy(v_ref), tables, lens,
                                               max(DECODE_CONTEXTS), scale, **kw)
    expected = paged_attention_decode(f32(q), f32(k_ref), f32(v_ref), tables, lens, max(DECODE_CONTEXTS), scale, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(f32(out), expected, atol=TOL[case["dtype"]][0], rtol=TOL[case["dtype"]][1])


@pytest.mark.parametrize("case", CASES + VARIANT_CASES, ids=variant_id)
def test_prefill_with_cached_prefix(case):
    query_lens, context_lens = [q for q, _ in PREFILL], [c for _, c in PREFILL]
    k_ref, v_ref, tables = make_cache(case, context_lens, "cpu")
    q, _, _ = qkv_views(sum(query_lens), case, "cpu")
    scale, kw = case["head_dim"] ** -0.5, attention_kwargs(case)
    out = cpu_attention.paged_attention_prefill(q, head_major_copy(k_ref), head_major_copy(v_ref), tables,
                                                query_lens, context_lens, scale, **kw)
    expected = paged_attention_prefill(f32(q), f32(k_ref), f32(v_ref), tables, query_lens, context_lens, scale, **kw)
    torch.testing.assert_close(f32(out), expected, atol=TOL[case["dtype"]][0], rtol=TOL[case["dtype"]][1])
