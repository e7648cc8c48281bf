"""Triton paged attention and store_kv against the torch references (gather + SDPA).

Grid: dtype x block size x GQA ratio x head dim as a Latin square (every block size and
every GQA ratio meets every head dim), each case running store_kv, decode over odd
context lengths and prefill of new tokens after cached prefixes. The full product with
long contexts runs on a GPU (`-m gpu`).
"""

import itertools

import pytest
import torch

pytest.importorskip("triton")

from attention_grid import (  # noqa: E402
    BLOCK_SIZES, CASES, DECODE_CONTEXTS, DTYPES, HEAD_DIMS, HEADS, PREFILL, TOL, VARIANT_CASES, attention_kwargs,
    case_id, make_cache, qkv_views, variant_id,
)

from loraserve.kernels.paged_attention import (  # noqa: E402
    paged_attention_decode, paged_attention_decode_triton, paged_attention_prefill,
    paged_attention_prefill_triton, store_kv, store_kv_triton,
)

def check_decode(case: dict, context_lens: list[int], device: str) -> None:
    k_cache, v_cache, tables = make_cache(case, context_lens, device)
    q, _, _ = qkv_views(len(context_lens), case, device)
    lens = torch.tensor(context_lens, device=device)
    scale, kw = case["head_dim"] ** -0.5, attention_kwargs(case)
    out = paged_attention_decode_triton(q, k_cache, v_cache, tables, lens, max(context_lens), scale, **kw)
    f = lambda t: t.float().cpu()  # noqa: E731
    expected = paged_attention_decode(f(q), f(k_cache), f(v_cache), tables.cpu(), lens.cpu(), max(context_lens),
                                      scale, **kw)
    atol, rtol = TOL[case["dtype"]]
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(f(out), expected, atol=atol, rtol=rtol)


def check_prefill(case: dict, seqs: list[tuple[int, int]], device: str) -> None:
    query_lens, context_lens = [q for q, _ in seqs], [c for _, c in seqs]
    k_cache, v_cache, tables = make_cache(case, context_lens, device)
    q, _, _ = qkv_views(sum(query_lens), case, device)
    scale, kw = case["head_dim"] ** -0.5, attention_kwargs(case)
    out = paged_attention_prefill_triton(q, k_cache, v_cache, tables, query_lens, context_lens, scale, **kw)
    f = lambda t: t.float().cpu()  # noqa: E731
    expected = paged_attention_prefill(f(q), f(k_cache), f(v_cache), tables.cpu(), query_lens, context_lens,
                                       scale, **kw)
    atol, rtol = TOL[case["dtype"]]
    torch.testing.assert_close(f(out), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_store_kv(case, device):
    k_cache, v_cache, _ = make_cache(case, [40], device)
    _, k, v = qkv_views(9, case, device)
    slots = torch.tensor([3, 0, -1, 17, 39, 4, -1, 38, 20], device=device)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    store_kv(k[keep].contiguous(), v[keep].contiguous(), expected_k, expected_v, slots[keep])
    store_kv_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_decode(case, device):
    check_decode(case, DECODE_CONTEXTS, device)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_prefill_with_cached_prefix(case, device):
    check_prefill(case, PREFILL, device)


@pytest.mark.parametrize("case", VARIANT_CASES, ids=variant_id)
def test_window_and_softcap(case, device):
    check_decode(case, DECODE_CONTEXTS, device)
    check_prefill(case, PREFILL, device)


def test_reference_window_is_hf_sliding_window():
    """The reference's window against a dense mask built like HF's sliding_window_overlay
    (kv_idx > q_idx - sliding_window, and causal), with a 6-token window over 13 tokens."""
    case = dict(dtype=torch.float32, block_size=4, heads=(4, 2), head_dim=16)
    k_cache, v_cache, tables = make_cache(case, [13], "cpu")
    q, _, _ = qkv_views(13, case, "cpu")
    out = paged_attention_prefill(q, k_cache, v_cache, tables, [13], [13], 0.25, window=6)
    idx = torch.arange(13)
    mask = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - 6)
    k = k_cache[tables[0, :4]].flatten(0, 1)[:13].transpose(0, 1).repeat_interleave(2, 0)
    v = v_cache[tables[0, :4]].flatten(0, 1)[:13].transpose(0, 1).repeat_interleave(2, 0)
    expected = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=0.25)
    torch.testing.assert_close(out, expected.transpose(0, 1))


def test_decode_padding_row_is_zero(device):
    """A batch padded to a captured size holds rows with context length 0."""
    case = dict(dtype=torch.float16, block_size=16, heads=(8, 2), head_dim=64)
    k_cache, v_cache, tables = make_cache(case, [20, 1], device)
    q, _, _ = qkv_views(2, case, device)
    lens = torch.tensor([20, 0], device=device)
    out = paged_attention_decode_triton(q, k_cache, v_cache, tables, lens, 20, 0.125)
    assert torch.isfinite(out).all() and not out[1].any()


def test_launchers_reject_bad_layouts(device):
    case = dict(dtype=torch.float16, block_size=16, heads=(8, 2), head_dim=64)
    k_cache, v_cache, tables = make_cache(case, [20], device)
    q, _, _ = qkv_views(1, case, device)
    with pytest.raises(AssertionError):
        paged_attention_decode_triton(q.float(), k_cache, v_cache, tables, torch.tensor([20], device=device), 20, 0.1)
    strided = torch.cat([k_cache, k_cache], dim=-1)[..., :64]     # same shape, not contiguous
    with pytest.raises(AssertionError, match="contiguous"):
        paged_attention_decode_triton(q, strided, v_cache, tables, torch.tensor([20], device=device), 20, 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_full_grid_on_gpu(dtype):
    long_decode = DECODE_CONTEXTS + [1023, 2049, 4001]
    long_prefill = PREFILL + [(512, 512), (129, 3001), (1, 4096)]
    for bs, heads, D in itertools.product(BLOCK_SIZES, HEADS, HEAD_DIMS):
        case = dict(dtype=dtype, block_size=bs, heads=heads, head_dim=D)
        check_decode(case, long_decode, "cuda")
        check_prefill(case, long_prefill, "cuda")
