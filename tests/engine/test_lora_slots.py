"""Device slots (adapters/slot_pool.py) hold adapters in the kernels' packed layout:
what `LoRAGroup.load` stores, every LoRA implementation reads back as the adapter's
own delta, scaling included, at any rank up to the buffers' (rounded-up) capacity, and
reloading a slot with a smaller adapter leaves nothing of the larger one behind."""

import pytest
import torch

from loraserve.kernels import add_lora_cpu, add_lora_grouped, add_lora_triton, build_lora_meta, select_kernels
from loraserve.adapters import LoRAGroup

HIDDEN, OUTS = 64, [64, 16, 16]          # a qkv-like group


def peft_delta(x, lora_a, lora_b, scaling):
    """What PEFT adds for one projection: x @ A^T @ B^T * scaling."""
    return (x @ lora_a.T @ lora_b.T) * scaling


def adapter(rank: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rank, HIDDEN, generator=gen), torch.randn(out, rank, generator=gen)) for out in OUTS]


def run(impl, group: LoRAGroup, x, slots, ranks):
    y = torch.zeros(x.shape[0], sum(OUTS))
    if impl is add_lora_triton:                     # the Triton backend on CPU: the interpreter
        pytest.importorskip("triton")
        triton = select_kernels("cpu", "triton")
        return triton.add_lora(y, x, group.A, group.Bs, group.out_slices, triton.lora_meta(slots, ranks, "cpu"))
    return impl(y, x, group.A, group.Bs, group.out_slices, build_lora_meta(slots, ranks))


@pytest.mark.parametrize("impl", [add_lora_cpu, add_lora_grouped, add_lora_triton],
                         ids=["cpu_op", "torch", "triton"])
def test_written_slots_read_back_as_peft_deltas(impl):
    group = LoRAGroup.empty(HIDDEN, OUTS, max_loras=3, r_max=12, dtype=torch.float32, device="cpu")
    assert group.A.shape == (3, HIDDEN, 16, 3), "capacity rounds r_max up to a multiple of 8"
    weights = {0: (adapter(12, 0), 2.0), 2: (adapter(4, 1), 0.5)}
    for slot, (pairs, scaling) in weights.items():
        group.load(slot, pairs[0][0].shape[0], pairs, scaling)
    ranks = [12, 0, 4]
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(2))
    slots = [0, 2, -1, 0, 2]
    out = run(impl, group, x, slots, ranks)
    for t, s in enumerate(slots):
        expected = torch.zeros(sum(OUTS))
        if s >= 0:
            pairs, scaling = weights[s]
            expected = torch.cat([peft_delta(x[t], a, b, scaling) for a, b in pairs])
        torch.testing.assert_close(out[t], expected, atol=1e-4, rtol=1e-4)


def test_reloading_a_slot_with_a_smaller_adapter():
    group = LoRAGroup.empty(HIDDEN, OUTS, max_loras=1, r_max=16, dtype=torch.float32, device="cpu")
    for rank, seed in ((16, 0), (4, 1)):
        pairs = adapter(rank, seed)
        group.load(0, rank, pairs, 1.0)
    x = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(3))
    out = run(add_lora_grouped, group, x, [0, 0], [4])
    expected = torch.cat([peft_delta(x, a, b, 1.0) for a, b in pairs], dim=1)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", [add_lora_cpu, add_lora_grouped, add_lora_triton],
                         ids=["cpu_op", "torch", "triton"])
def test_untargeted_projection_adds_nothing(impl):
    """An adapter on q and v only: k's columns of the fused output stay untouched."""
    group = LoRAGroup.empty(HIDDEN, OUTS, max_loras=1, r_max=8, dtype=torch.float32, device="cpu")
    group.load(0, 8, adapter(8, 5), 1.0)               # a previous adapter on all three
    pairs = adapter(8, 6)
    group.load(0, 8, [pairs[0], None, pairs[2]], 1.0)
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(4))
    out = run(impl, group, x, [0, 0, 0], [8])
    k_cols = slice(OUTS[0], OUTS[0] + OUTS[1])
    assert not out[:, k_cols].any()
    torch.testing.assert_close(out[:, : OUTS[0]], peft_delta(x, *pairs[0], 1.0), atol=1e-4, rtol=1e-4)
