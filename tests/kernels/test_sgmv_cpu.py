"""The C++ CPU SGMV op (kernels/sgmv_cpu.cpp) against the fp32 loop oracle.

The grid: dtype x rank (ranks below r_max read a shorter, packed part of A; column counts that
are not a multiple of 16 take the masked tails) x projections per group x token layout.
Segments longer than MAX_SEG_LEN go to ATen matmuls inside the op, so two layouts also run
with every segment on ATen and with every segment on the op's own blocks. The extension
is built once per machine (cached) and loaded once per process; nothing here is timed."""

import logging
import random
import shutil

import pytest
import torch

from lorakit import random_lora_slots

from loraserve.kernels import add_lora_ref, build_lora_meta, sgmv_cpu
from loraserve.kernels.sgmv_cpu import add_lora_cpu

TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2)}
RANKS = {"1": (1,) * 6, "8": (8,) * 6, "16": (16,) * 6, "64": (64,) * 6, "mixed": (4, 16, 8, 1, 12, 2)}
OUTS = {1: (56,), 3: (96, 24, 40)}     # 40: an expand tail narrower than a vector


def layout(kind: str) -> list[int]:
    rng = random.Random(0)
    if kind == "sorted_equal":                  # the common decode step: tokens sorted by slot
        return [s for s in range(6) for _ in range(4)]
    if kind == "shuffled_with_base":            # any order, no-adapter tokens between
        return [rng.choice([-1, 0, 1, 2, 3, 5]) for _ in range(33)]
    if kind == "one_long_segment":              # a prefill chunk beside decode tokens
        return [3] * 70 + [0, 1, 2, -1, 4]
    if kind == "single_token":
        return [5]
    return [-1] * 9                             # no adapter at all


def make(kind: str, dtype, ranks, outs, hidden=72, seed=0):
    """Inputs rounded to dtype, and the oracle's answer on exactly those values."""
    gen = torch.Generator().manual_seed(seed)
    # A's pad and B's rows past the rank are NaN: the op must never read them
    A, Bs = random_lora_slots(list(ranks), hidden, list(outs), gen, pad=float("nan"), r_max=16)
    slots = layout(kind)
    x = torch.randn(len(slots), hidden, generator=gen)
    y = torch.randn(len(slots), sum(outs), generator=gen)
    x, y, A, Bs = x.to(dtype), y.to(dtype), A.to(dtype), [B.to(dtype) for B in Bs]
    out_slices = [(sum(outs[:p]), o) for p, o in enumerate(outs)]
    meta = build_lora_meta(slots, list(ranks))
    expected = add_lora_ref(y.float(), x.float(), A.float(), [B.float() for B in Bs], out_slices, meta)
    return y, x, A, Bs, out_slices, meta, expected


@pytest.fixture(scope="module")
def ext():
    """The built op. A build failure here fails the tests (the fallback would hide it),
    unless the machine has no C++ compiler at all."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the CPU path is add_lora_grouped")
    module = sgmv_cpu.extension()
    assert module is not None, "the C++ SGMV op failed to build; see the logged warning"
    return module


def check(kind, dtype, ranks, outs):
    y, x, A, Bs, out_slices, meta, expected = make(kind, dtype, ranks, outs)
    before = y.clone()
    out = add_lora_cpu(y, x, A, Bs, out_slices, meta)
    assert out.data_ptr() == y.data_ptr()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    base_rows = meta.token_slots < 0
    assert torch.equal(out[base_rows], before[base_rows])   # slot -1 tokens: untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rank", list(RANKS))
@pytest.mark.parametrize("n_proj", [1, 3])
@pytest.mark.parametrize("kind", ["sorted_equal", "shuffled_with_base", "one_long_segment", "none", "single_token"])
def test_op_matches_oracle(ext, kind, n_proj, rank, dtype):
    check(kind, dtype, RANKS[rank], OUTS[n_proj])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["sorted_equal", "shuffled_with_base", "single_token"])
def test_wide_projections(ext, kind, dtype):
    """Expand tiles are 64, 128 or 256 columns wide for 4, 2 or 1 tokens of an adapter:
    600 and 333 columns span several tiles of each width, with ragged (and bf16 half-unit) tails."""
    check(kind, dtype, RANKS["mixed"], (600, 333, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("max_seg_len", [0, 10**6], ids=["all_aten", "all_blocks"])
@pytest.mark.parametrize("kind", ["one_long_segment", "shuffled_with_base"])
def test_long_segments_either_way(ext, monkeypatch, kind, max_seg_len, dtype):
    monkeypatch.setitem(sgmv_cpu.MAX_SEG_LEN, dtype, max_seg_len)
    check(kind, dtype, RANKS["mixed"], OUTS[3])


def test_step_without_adapters_writes_nothing(ext, monkeypatch):
    y, x, A, Bs, out_slices, meta, _ = make("none", torch.float32, RANKS["16"], OUTS[3])
    monkeypatch.setattr(sgmv_cpu, "extension", lambda: pytest.fail("the op ran for a step without adapters"))
    before = y.clone()
    assert add_lora_cpu(y, x, A, Bs, out_slices, meta) is y
    assert torch.equal(y, before)


def test_unsupported_dtype_takes_the_torch_path(ext):
    y, x, A, Bs, out_slices, meta, expected = make("shuffled_with_base", torch.float16, RANKS["mixed"], OUTS[3])
    add_lora_cpu(y, x, A, Bs, out_slices, meta)
    torch.testing.assert_close(y.float(), expected, atol=2e-2, rtol=2e-2)


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    def broken_build():
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(sgmv_cpu, "_build", broken_build)
    sgmv_cpu.extension.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=sgmv_cpu.__name__):
            for _ in range(2):
                y, x, A, Bs, out_slices, meta, expected = make("shuffled_with_base", torch.float32,
                                                               RANKS["mixed"], OUTS[3])
                add_lora_cpu(y, x, A, Bs, out_slices, meta)
                torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
        warnings = [r for r in caplog.records if "simulated compiler failure" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        sgmv_cpu.extension.cache_clear()       # the next user loads the real build again
