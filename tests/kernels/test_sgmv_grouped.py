"""The torch fallback of the CPU LoRA path (`add_lora_grouped`) against the fp32 loop oracle.

A step runs once per rank present, each pass over strided views of the packed slots at
that rank, so the slots' padding (NaN here) is never read. Token layouts cover the three
paths of the function: rows that are x itself (tokens sorted by slot, equal segments),
padded rows gathered from any order, and long segments split into several rows.
"""

import random

import pytest
import torch

from lorakit import random_lora_slots

from loraserve.kernels import add_lora_grouped, add_lora_ref, build_lora_meta

TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2)}


def layout(kind: str, rng: random.Random) -> list[int]:
    if kind == "sorted_equal":                  # the common decode step: x is the rows
        return [s for s in range(8) for _ in range(4)]
    if kind == "shuffled_with_base":
        slots = [rng.choice([-1, 0, 1, 2, 3, 5]) for _ in range(33)]
        return slots
    if kind == "one_long_segment":              # a prefill chunk beside decode tokens
        return [3] * 70 + [0, 1, 2, -1, 4]
    return [-1] * 9                             # no adapter at all


def make(kind: str, dtype, ranks=(4, 16, 8, 1, 16, 12, 2, 16), hidden=96, outs=(96, 24, 24), seed=0):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    A, Bs = random_lora_slots(list(ranks), hidden, list(outs), gen, pad=float("nan"))
    slots = layout(kind, rng)
    x = torch.randn(len(slots), hidden, generator=gen)
    y = torch.randn(len(slots), sum(outs), generator=gen)
    out_slices = [(sum(outs[:p]), o) for p, o in enumerate(outs)]
    meta = build_lora_meta(slots, list(ranks))
    return y, x, A, Bs, out_slices, meta


@pytest.mark.parametrize("ranks", [(4, 16, 8, 1, 16, 12, 2, 16), (8,) * 8], ids=["mixed", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["sorted_equal", "shuffled_with_base", "one_long_segment", "none"])
def test_grouped_matches_oracle(kind, dtype, ranks):
    """Uniform ranks take strided views of the packed slots; mixed ranks copy them out."""
    y, x, A, Bs, out_slices, meta = make(kind, dtype, ranks=ranks)
    assert meta.uniform_rank == (len(set(ranks)) == 1) or kind == "none"
    expected = add_lora_ref(y.clone(), x, A, Bs, out_slices, meta)
    y_d = y.to(dtype)
    out = add_lora_grouped(y_d, x.to(dtype), A.to(dtype), [B.to(dtype) for B in Bs], out_slices, meta)
    assert out.data_ptr() == y_d.data_ptr()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    base_rows = meta.token_slots < 0
    torch.testing.assert_close(out.float()[base_rows], y.to(dtype).float()[base_rows], atol=0, rtol=0)


def test_layout_flags_choose_the_gather_free_path():
    _, _, _, _, _, sorted_meta = make("sorted_equal", torch.float32)
    assert sorted_meta.rows.rows_are_tokens and sorted_meta.rows.all_tokens_have_lora
    _, _, _, _, _, mixed = make("shuffled_with_base", torch.float32)
    assert not mixed.rows.rows_are_tokens and not mixed.rows.all_tokens_have_lora
    _, _, _, _, _, long_seg = make("one_long_segment", torch.float32)
    assert long_seg.rows.row_slots.count(3) > 1       # the long segment spans several rows


def test_rank_of_the_step_is_the_largest_present():
    _, _, _, _, _, meta = make("sorted_equal", torch.float32, ranks=(4, 2, 8, 1, 4, 2, 8, 1, 64))
    assert meta.max_rank == 8                         # slot 8 (rank 64) is in no token
