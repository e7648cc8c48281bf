"""The C++ CPU paged-attention op (kernels/cpu_paged_attention.py) on the shared grid
(attention_grid.py: odd context lengths, block sizes, GQA ratios, prefix + new tokens),
reading the head-major cache the torch backend allocates, against the torch references of
paged_attention.py; window and softcap against dense fp32 attention with an explicit mask
computed here. The op takes fp32 and bf16: the grid's fp16 cases run in bf16."""

import pytest
import torch
from attention_grid import CASES, DECODE_CONTEXTS, PREFILL, TOL, case_id, make_cache, qkv_views

from loraserve.kernels import cpu_attention, cpu_paged_attention as op
from loraserve.kernels.paged_attention import paged_attention_decode, paged_attention_prefill

pytestmark = pytest.mark.skipif(op.extension() is None, reason="the C++ op does not build here")

OP_CASES = [c if c["dtype"] != torch.float16 else {**c, "dtype": torch.bfloat16} for c in CASES]
WINDOWS = [1, 7, 40]
SOFTCAPS = [0.5, 30.0]


def head_major_copy(cache: torch.Tensor) -> torch.Tensor:
    out = cpu_attention.allocate_cache(*cache.shape, cache.dtype, cache.device)
    out.copy_(cache)
    return out


def close(out, expected, dtype):
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


def dense_reference(q, k_cache, v_cache, table, q_len, ctx, scale, window=None, softcap=None):
    """fp32 attention of one sequence's q_len new tokens [q_len, H, D] over its ctx cached
    tokens: explicit scores, softcap, then the causal/window mask, softmax, @ V."""
    bs, H, H_kv = k_cache.shape[1], q.shape[1], k_cache.shape[2]
    n = -(-ctx // bs)
    k = k_cache[table[:n]].flatten(0, 1)[:ctx].float().repeat_interleave(H // H_kv, dim=1)  # [ctx, H, D]
    v = v_cache[table[:n]].flatten(0, 1)[:ctx].float().repeat_interleave(H // H_kv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    p = torch.arange(ctx - q_len, ctx)[:, None]
    kpos = torch.arange(ctx)[None, :]
    visible = (kpos <= p) & ((p - kpos < window) if window is not None else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
def test_decode(case):
    k_ref, v_ref, tables = make_cache(case, DECODE_CONTEXTS, "cpu")
    q, _, _ = qkv_views(len(DECODE_CONTEXTS), case, "cpu")
    lens, scale = torch.tensor(DECODE_CONTEXTS), case["head_dim"] ** -0.5
    out = op.paged_attention_decode(q, head_major_copy(k_ref), head_major_copy(v_ref), tables, lens,
                                    max(DECODE_CONTEXTS), scale)
    expected = paged_attention_decode(q.float(), k_ref.float(), v_ref.float(), tables, lens,
                                      max(DECODE_CONTEXTS), scale)
    close(out, expected, case["dtype"])


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
def test_prefill_with_cached_prefix(case):
    query_lens, context_lens = [q for q, _ in PREFILL], [c for _, c in PREFILL]
    k_ref, v_ref, tables = make_cache(case, context_lens, "cpu")
    q, _, _ = qkv_views(sum(query_lens), case, "cpu")
    scale = case["head_dim"] ** -0.5
    out = op.paged_attention_prefill(q, head_major_copy(k_ref), head_major_copy(v_ref), tables,
                                     query_lens, context_lens, scale)
    expected = paged_attention_prefill(q.float(), k_ref.float(), v_ref.float(), tables, query_lens,
                                       context_lens, scale)
    close(out, expected, case["dtype"])


OPTION_CASES = [OP_CASES[0], OP_CASES[6], OP_CASES[9], OP_CASES[15]]  # fp32 and bf16, block sizes 1-32


@pytest.mark.parametrize("case", OPTION_CASES, ids=case_id)
@pytest.mark.parametrize("window,softcap", [(w, None) for w in WINDOWS] + [(None, c) for c in SOFTCAPS] + [(7, 0.5)])
def test_decode_window_softcap(case, window, softcap):
    k_ref, v_ref, tables = make_cache(case, DECODE_CONTEXTS, "cpu")
    q, _, _ = qkv_views(len(DECODE_CONTEXTS), case, "cpu")
    q = q * 3                                       # scores large enough for the softcap to bend them
    lens, scale = torch.tensor(DECODE_CONTEXTS), case["head_dim"] ** -0.5
    out = op.paged_attention_decode(q, head_major_copy(k_ref), head_major_copy(v_ref), tables, lens,
                                    max(DECODE_CONTEXTS), scale, window=window, softcap=softcap)
    expected = torch.cat([dense_reference(q[i : i + 1], k_ref, v_ref, tables[i], 1, c, scale, window, softcap)
                          for i, c in enumerate(DECODE_CONTEXTS)])
    close(out, expected, case["dtype"])


@pytest.mark.parametrize("case", OPTION_CASES, ids=case_id)
@pytest.mark.parametrize("window,softcap", [(w, None) for w in WINDOWS] + [(None, c) for c in SOFTCAPS] + [(7, 0.5)])
def test_prefill_window_softcap(case, window, softcap):
    query_lens, context_lens = [q for q, _ in PREFILL], [c for _, c in PREFILL]
    k_ref, v_ref, tables = make_cache(case, context_lens, "cpu")
    q, _, _ = qkv_views(sum(query_lens), case, "cpu")
    q = q * 3
    scale = case["head_dim"] ** -0.5
    out = op.paged_attention_prefill(q, head_major_copy(k_ref), head_major_copy(v_ref), tables,
                                     query_lens, context_lens, scale, window=window, softcap=softcap)
    starts = [sum(query_lens[:i]) for i in range(len(query_lens))]
    expected = torch.cat([dense_reference(q[s : s + n], k_ref, v_ref, tables[i], n, c, scale, window, softcap)
                          for i, (s, n, c) in enumerate(zip(starts, query_lens, context_lens))])
    close(out, expected, case["dtype"])


def test_window_reference_matches_plain_reference_when_wide():
    """The test's own oracle agrees with paged_attention.py where they overlap."""
    case = OP_CASES[0]
    k_ref, v_ref, tables = make_cache(case, [37], "cpu")
    q, _, _ = qkv_views(5, case, "cpu")
    scale = case["head_dim"] ** -0.5
    expected = paged_attention_prefill(q, k_ref, v_ref, tables, [5], [37], scale)
    torch.testing.assert_close(dense_reference(q, k_ref, v_ref, tables[0], 5, 37, scale, window=1000), expected)


def test_token_major_cache_and_zero_context():
    """Any cache strides with head_dim contiguous (here the contiguous Triton layout); a
    padded decode row with context 0 gives zeros."""
    case = OP_CASES[5]
    k_ref, v_ref, tables = make_cache(case, DECODE_CONTEXTS, "cpu")
    q, _, _ = qkv_views(len(DECODE_CONTEXTS), case, "cpu")
    lens = torch.tensor([0] + DECODE_CONTEXTS[1:])
    scale = case["head_dim"] ** -0.5
    out = op.paged_attention_decode(q, k_ref, v_ref, tables.to(torch.int32), lens, max(DECODE_CONTEXTS), scale)
    expected = paged_attention_decode(q.float(), k_ref.float(), v_ref.float(), tables, lens.clamp(min=1),
                                      max(DECODE_CONTEXTS), scale)
    close(out[1:], expected[1:], case["dtype"])
    assert torch.count_nonzero(out[0]) == 0


def test_rejects_bad_options():
    case = OP_CASES[0]
    k_ref, v_ref, tables = make_cache(case, [5], "cpu")
    q, _, _ = qkv_views(1, case, "cpu")
    with pytest.raises(ValueError, match="window"):
        op.paged_attention_decode(q, k_ref, v_ref, tables, torch.tensor([5]), 5, 1.0, window=0)
    with pytest.raises(ValueError, match="softcap"):
        op.paged_attention_decode(q, k_ref, v_ref, tables, torch.tensor([5]), 5, 1.0, softcap=-1.0)


def test_fp16_takes_the_gather_path():
    case = {**OP_CASES[1], "dtype": torch.float16}
    k_ref, v_ref, tables = make_cache(case, DECODE_CONTEXTS, "cpu")
    q, _, _ = qkv_views(len(DECODE_CONTEXTS), case, "cpu")
    lens, scale = torch.tensor(DECODE_CONTEXTS), case["head_dim"] ** -0.5
    out = op.paged_attention_decode(q, head_major_copy(k_ref), head_major_copy(v_ref), tables, lens,
                                    max(DECODE_CONTEXTS), scale)
    expected = paged_attention_decode(q.float(), k_ref.float(), v_ref.float(), tables, lens,
                                      max(DECODE_CONTEXTS), scale)
    close(out, expected, torch.float16)


def test_select_kernels_takes_the_op_on_cpu_and_falls_back(monkeypatch):
    from loraserve import kernels

    chosen = kernels.select_kernels("cpu", "torch")
    assert chosen.paged_attention_decode is op.paged_attention_decode
    assert chosen.paged_attention_prefill is op.paged_attention_prefill
    monkeypatch.setattr(op, "extension", lambda: None)     # as when it cannot build
    fallback = kernels.select_kernels("cpu", "torch")
    assert fallback.paged_attention_decode is cpu_attention.paged_attention_decode
    assert fallback.paged_attention_prefill is cpu_attention.paged_attention_prefill
