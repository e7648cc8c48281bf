"""int8 adapter slots (`--lora-dtype int8`, adapters/slot_pool.py LoRAGroup): every LoRA
backend against the int8 torch reference, which defines the semantics, and the int8
reference against full-precision slots holding the same adapters.

The grid: activation dtype x ranks (mixed in one step) x projections per group x token
layout (sorted decode, shuffled with base tokens, a long prefill segment beside decode
tokens). Slot -1 rows stay untouched. Measured: the int8 delta's error relative to the
fp32 slots' is 0.5-0.75% of the delta's largest value (round-to-nearest codes, 1/254 of
each column's and row's range)."""

import pytest
import torch

from loraserve.adapters.slot_pool import LoRAGroup
from loraserve.kernels import add_lora_ref, build_lora_meta, sgmv_cpu
from loraserve.kernels.sgmv_cpu import add_lora_cpu
from loraserve.kernels.sgmv_grouped import add_lora_grouped

from test_sgmv_cpu import layout

HIDDEN = 72
OUTS = {1: (56,), 3: (96, 24, 40)}
RANKS = {"uniform16": (16,) * 6, "mixed": (4, 16, 8, 1, 12, 2)}
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2)}   # as the bf16 slot grids


def groups(ranks, outs, dtype, seed=0) -> tuple[LoRAGroup, LoRAGroup]:
    """The same random PEFT-shaped adapters written into int8 slots and fp32 slots."""
    gen = torch.Generator().manual_seed(seed)
    q = LoRAGroup.empty(HIDDEN, list(outs), len(ranks), 16, dtype, "cpu", int8=True)
    full = LoRAGroup.empty(HIDDEN, list(outs), len(ranks), 16, torch.float32, "cpu")
    for slot, r in enumerate(ranks):
        pairs = [(torch.randn(r, HIDDEN, generator=gen) / HIDDEN ** 0.5, torch.randn(o, r, generator=gen) / r ** 0.5)
                 for o in outs]
        if len(outs) == 3 and slot == 1:
            pairs[1] = None                      # an adapter that leaves one projection out
        for g in (q, full):
            g.load(slot, r, pairs, scaling=2.0)
    return q, full


def inputs(kind, ranks, outs, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    slots = layout(kind)
    x = torch.randn(len(slots), HIDDEN, generator=gen).to(dtype)
    y = torch.randn(len(slots), sum(outs), generator=gen).to(dtype)
    return x, y, build_lora_meta(slots, list(ranks))


def reference(g: LoRAGroup, x, y, meta):
    return add_lora_ref(y.float().clone(), x.float(), g.A, g.Bs, g.out_slices, meta, scale=g.scale)


def test_int8_slots_halve_the_bytes():
    q, full = groups(RANKS["mixed"], OUTS[3], torch.bfloat16)
    bf16 = LoRAGroup.empty(HIDDEN, list(OUTS[3]), 6, 16, torch.bfloat16, "cpu")
    weight_bytes = lambda g: sum(t.numel() * t.element_size() for t in [g.A, *g.Bs])
    assert q.A.dtype == torch.int8 and all(B.dtype == torch.int8 for B in q.Bs)
    assert weight_bytes(q) * 2 == weight_bytes(bf16)
    assert q.scale.shape == (6, q.A.shape[2] * 3) and q.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["sorted_equal", "shuffled_with_base", "one_long_segment"])
@pytest.mark.parametrize("n_proj", [1, 3])
def test_int8_reference_is_close_to_full_precision_slots(kind, n_proj):
    q, full = groups(RANKS["mixed"], OUTS[n_proj], torch.float32)
    x, y, meta = inputs(kind, RANKS["mixed"], OUTS[n_proj], torch.float32)
    delta_q = reference(q, x, y, meta) - y
    delta = add_lora_ref(y.clone(), x, full.A, full.Bs, full.out_slices, meta) - y
    err = (delta_q - delta).abs().max() / delta.abs().max()
    assert 0 < err < 0.02, err                 # it did round, within what int8 rounding explains


BACKENDS = {"cpu_op": add_lora_cpu, "grouped": add_lora_grouped}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rank", list(RANKS))
@pytest.mark.parametrize("n_proj", [1, 3])
@pytest.mark.parametrize("kind", ["sorted_equal", "shuffled_with_base", "one_long_segment", "single_token"])
def test_cpu_backends_match_the_int8_reference(backend, kind, n_proj, rank, dtype):
    q, _ = groups(RANKS[rank], OUTS[n_proj], dtype)
    x, y, meta = inputs(kind, RANKS[rank], OUTS[n_proj], dtype)
    expected = reference(q, x, y, meta)
    before = y.clone()
    out = BACKENDS[backend](y, x, q.A, q.Bs, q.out_slices, meta, scale=q.scale)
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    base = meta.token_slots < 0
    assert torch.equal(out[base], before[base])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["sorted_equal", "shuffled_with_base", "single_token"])
def test_cpu_op_wide_projections(kind, dtype):
    """The op's expand tiles are 64, 128 or 256 columns wide for 4, 2 or 1 tokens of an
    adapter: 600 and 333 columns span several tiles of each width with a ragged tail."""
    outs = (600, 333)
    q, _ = groups(RANKS["mixed"], outs, dtype)
    x, y, meta = inputs(kind, RANKS["mixed"], outs, dtype)
    expected = reference(q, x, y, meta)
    out = add_lora_cpu(y, x, q.A, q.Bs, q.out_slices, meta, scale=q.scale)
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("max_seg_len", [0, 10**6], ids=["all_aten", "all_blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_op_long_segments_either_way(monkeypatch, max_seg_len, dtype):
    assert sgmv_cpu.extension() is not None, "the C++ SGMV op failed to build"
    monkeypatch.setitem(sgmv_cpu.MAX_SEG_LEN, dtype, max_seg_len)
    q, _ = groups(RANKS["mixed"], OUTS[3], dtype)
    x, y, meta = inputs("one_long_segment", RANKS["mixed"], OUTS[3], dtype)
    expected = reference(q, x, y, meta)
    out = add_lora_cpu(y, x, q.A, q.Bs, q.out_slices, meta, scale=q.scale)
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("path", ["sgmv", "bgmv"])
@pytest.mark.parametrize("kind", ["sorted_equal", "shuffled_with_base"])
def test_triton_kernels_match_the_int8_reference(device, path, kind):
    pytest.importorskip("triton")
    from loraserve.kernels import triton_lora_meta
    from loraserve.kernels.sgmv import add_lora_bgmv, add_lora_sgmv

    ranks, outs = RANKS["mixed"], OUTS[3]
    q, _ = groups(ranks, outs, torch.float32)
    x, y, meta = inputs(kind, ranks, outs, torch.float32)
    expected = reference(q, x, y, meta)
    to = lambda t: t.to(device)
    blocks = triton_lora_meta(layout(kind), list(ranks), device=device)
    args = (to(y), to(x), to(q.A), [to(B) for B in q.Bs], q.out_slices)
    if path == "sgmv":
        out = add_lora_sgmv(*args, blocks, scale=to(q.scale))
    else:
        out = add_lora_bgmv(*args, blocks.meta, scale=to(q.scale))
    torch.testing.assert_close(out.float().cpu(), expected, atol=1e-4, rtol=1e-4)


def test_int8_served_pairs_are_what_the_slots_hold():
    """DoRA's norm at int8 is taken over int8_served(A, B): they must be exactly the
    weights the codes and scales stand for (delta W_p = (A_q * scale_p) @ B_q_p)."""
    from loraserve.adapters.slot_pool import int8_served
    from loraserve.kernels.sgmv import slot_a

    gen = torch.Generator().manual_seed(3)
    rank, outs, scaling = 8, (96, 24, 40), 2.0
    pairs = [(torch.randn(rank, HIDDEN, generator=gen), torch.randn(o, rank, generator=gen)) for o in outs]
    g = LoRAGroup.empty(HIDDEN, list(outs), 2, 16, torch.float32, "cpu", int8=True)
    g.load(1, rank, pairs, scaling)
    codes = slot_a(g.A, 1, rank).float().view(HIDDEN, rank, 3)
    scale = g.scale[1, : rank * 3].view(rank, 3)
    for p, (a, b) in enumerate(pairs):
        stored = (codes[:, :, p] * scale[:, p]) @ g.Bs[p][1, :rank].float()          # [in, out]
        a_served, b_served = int8_served(a, b, scaling)
        torch.testing.assert_close(stored, scaling * (b_served @ a_served).t(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(a_served, a)                               # it did round
