"""Segmented-gather LoRA (SGMV, after Punica): every token gets its own adapter's delta.

Semantics (one fused projection group with n_proj outputs, scale folded into B):
    y[t, off_p : off_p + out_p] += (x[t] @ a_s[:, p::n_proj]) @ B_p[s, :rank]
        with s = slot[t], a_s = slot_a(A, s, rank[s]) [in, rank * n_proj]
for every token t with slot[t] >= 0; tokens with slot -1 are untouched.

Weight layout, shared by every implementation:
    A:  [max_loras, in, r_max, n_proj] names each slot's capacity (r_max * n_proj a
        multiple of ROW_ALIGN). Slot s is packed at its adapter's rank: its first
        in * row_width(rank, n_proj) elements are rows of the adapter's rank * n_proj
        columns (rank-major, projection-minor: "interleaved"), each padded to a multiple
        of ROW_ALIGN. `slot_a` is that view. A kernel streams the adapter's own bytes, so
        a rank-8 adapter in a rank-128 buffer costs rank 8, not 128 (rows padded to r_max
        would drag whole cache lines of padding along), and rows start 16-byte aligned,
        so the GPU kernels load A in 16-byte vectors.
    Bs: n_proj tensors [max_loras, r_max, out_p]; rows >= rank are never read.

This file holds the oracle of the tests, `add_lora_ref` (a plain loop over tokens), and
beside it the Triton kernels (the CUDA path): `sgmv_shrink` + `sgmv_expand` over blocks
of tokens that share a slot (`LoRABlocks`), and `bgmv_shrink` + `bgmv_expand`, one token
per program (Punica's decode-shaped variant, reading the core `LoRAMeta`). The torch
formulation is sgmv_grouped.py, the CPU C++ op sgmv_cpu.py. Between shrink and expand
the LoRA activations live in `v [T, r_max * n_proj]` fp32, in A's interleaved column
order: v[t, j * n_proj + p] = x[t] @ a_s[:, j * n_proj + p]; inside add_lora_sgmv/bgmv
as the shrink's split-K partials [split_k, T, r_max * n_proj], which the expand sums.
Block sizes of compiled launches come from a `GpuLaunch` passed in (the default, or
what `benchmarks.kernels --tune` picks), never from module state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .lora_meta import SGMV_BLOCK_M, LoRABlocks, LoRAMeta

from .triton_support import HAS_TRITON, dot_dtype, kernel, tl, triton


ROW_ALIGN = 8   # elements: a packed row of A starts 16-byte aligned at bf16


def row_width(rank: int, n_proj: int) -> int:
    """Elements per packed row of A: the adapter's columns, padded to ROW_ALIGN."""
    return -(-rank * n_proj // ROW_ALIGN) * ROW_ALIGN


def capacity_rank(r_max: int) -> int:
    """The rank slot buffers are allocated at: r_max rounded up to ROW_ALIGN, so that
    every rank up to r_max packs into a slot."""
    return row_width(r_max, 1)


def slot_a(A: torch.Tensor, slot: int, rank: int) -> torch.Tensor:
    """Adapter `slot`'s A as a [in, rank * n_proj] view of its packed rows (writing
    through it loads the slot; the pad columns stay as they were)."""
    _, in_features, _, n_proj = A.shape
    width = row_width(rank, n_proj)
    return A[slot].view(-1)[: in_features * width].view(in_features, width)[:, : rank * n_proj]


def add_lora_ref(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor],
                 out_slices: list[tuple[int, int]], meta: LoRAMeta, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Oracle: loop over tokens in fp32. y [T, N], x [T, in]. With int8 slots, `scale`
    [max_loras, r_cap * n_proj] multiplies the shrink's column (r, p) (slot_pool.LoRAGroup)."""
    slots = meta.token_slots.tolist()
    ranks = meta.slot_ranks.tolist()
    n_proj = A.shape[3]
    for t, s in enumerate(slots):
        if s < 0:
            continue
        r = ranks[s]
        a = slot_a(A, s, r).view(A.shape[1], r, n_proj)
        for p, ((off, size), B) in enumerate(zip(out_slices, Bs)):
            v = x[t].float() @ a[:, :, p].float()               # [r]
            if scale is not None:
                v = v * scale[s, : r * n_proj].view(r, n_proj)[:, p]
            y[t, off : off + size] += (v @ B[s, :r].float()).to(y.dtype)
    return y


# ---------------------------------------------------------------------------------------
# Triton kernels. Each program reads its slot and that slot's rank and does work only for
# the adapter's own `rank * n_proj` columns (rank-aware); slot -1 tokens are in no block.

def _sgmv_shrink_kernel(
    x_ptr, a_ptr, v_ptr,
    sorted_idx_ptr, block_slots_ptr, block_ranks_ptr, block_starts_ptr, block_ends_ptr,
    in_features, stride_xt, stride_al, stride_vs, stride_vt,
    N_PROJ: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Semantics: v[t, :rank*n_proj] = x[t] @ slot_a(A, slot[t], rank), as split-K partial
    sums v[split, t] (summed by the expand: no zeroed buffer, no atomics).
    Grid (block, column block, split-K); x rows are gathered through sorted_token_idx.
    A block's slot, rank and token range are read in one go (no chain of dependent loads
    before the weights stream: decode programs are short). A's tile is loaded whole packed
    rows wide (pad columns included, their products never stored): a mask that changes
    only every ROW_ALIGN columns lets the compiler load it in 16-byte vectors."""
    blk = tl.program_id(0)
    slot = tl.load(block_slots_ptr + blk)
    cols = tl.load(block_ranks_ptr + blk) * N_PROJ          # this adapter's columns
    start = tl.load(block_starts_ptr + blk)
    end = tl.load(block_ends_ptr + blk)
    if slot < 0 or tl.program_id(1) * BLOCK_N >= cols:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    tok = tl.load(sorted_idx_ptr + offs_m, mask=m_mask, other=0)       # [BLOCK_M] int64
    n_mask = offs_n < cols
    width = tl.multiple_of(tl.cdiv(cols, ROW_ALIGN) * ROW_ALIGN, ROW_ALIGN)   # packed row of A
    a_mask = offs_n < width
    x_rows = x_ptr + tok[:, None] * stride_xt
    a_cols = a_ptr + slot.to(tl.int64) * stride_al + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(tl.program_id(2) * BLOCK_K, in_features, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < in_features
        xt = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_cols + offs_k[:, None] * width, mask=k_mask[:, None] & a_mask[None, :], other=0.0)
        acc += tl.dot(xt.to(DOT_DTYPE), at.to(DOT_DTYPE), input_precision=PRECISION)
    v_ptrs = v_ptr + tl.program_id(2) * stride_vs + tok[:, None] * stride_vt + offs_n[None, :]
    tl.store(v_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


def _sgmv_expand_kernel(
    y_ptr, v_ptr, b0_ptr, b1_ptr, b2_ptr, proj_ptr,
    sorted_idx_ptr, block_slots_ptr, block_ranks_ptr, block_starts_ptr, block_ends_ptr,
    stride_yt, stride_vs, stride_vt,
    N_PROJ: tl.constexpr, VEC: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Semantics: y[t, off_p + n] += v[t, p::n_proj][:rank] @ B_p[slot[t], :rank, n], with
    v the sum of the shrink's SPLIT_K partials.
    Grid (block, projection, column block); proj_ptr [n_proj, 4] int64 holds
    (column offset, out_p, B_p stride 0, B_p stride 1) per projection, all multiples of
    VEC (the launcher checks): values read from memory carry no alignment of their own,
    and without it every load of B and y would be a 2-byte scalar."""
    blk = tl.program_id(0)
    p = tl.program_id(1)
    slot = tl.load(block_slots_ptr + blk)
    rank = tl.load(block_ranks_ptr + blk)
    start = tl.load(block_starts_ptr + blk)
    end = tl.load(block_ends_ptr + blk)
    out_p = tl.multiple_of(tl.load(proj_ptr + p * 4 + 1), VEC)
    if slot < 0 or tl.program_id(2) * BLOCK_N >= out_p:
        return
    if p == 0:
        b_ptr = b0_ptr
    elif p == 1:
        b_ptr = b1_ptr
    else:
        b_ptr = b2_ptr
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    tok = tl.load(sorted_idx_ptr + offs_m, mask=m_mask, other=0)       # [BLOCK_M] int64
    v_rows = v_ptr + tok[:, None] * stride_vt + p
    b_slot = b_ptr + slot.to(tl.int64) * tl.multiple_of(tl.load(proj_ptr + p * 4 + 2), VEC)
    stride_br = tl.multiple_of(tl.load(proj_ptr + p * 4 + 3), VEC)
    y_rows = y_ptr + tok[:, None] * stride_yt + tl.multiple_of(tl.load(proj_ptr + p * 4), VEC)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_p
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):                              # the slot's rank, not r_max
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < rank
        vt = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for split in tl.static_range(SPLIT_K):
            vt += tl.load(v_rows + split * stride_vs + offs_k[None, :] * N_PROJ,
                          mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        bt = tl.load(b_slot + offs_k[:, None] * stride_br + offs_n[None, :],
                     mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(vt.to(DOT_DTYPE), bt.to(DOT_DTYPE), input_precision=PRECISION)
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_rows + offs_n[None, :], mask=mask, other=0.0)
    tl.store(y_rows + offs_n[None, :], (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _bgmv_shrink_kernel(
    x_ptr, a_ptr, v_ptr, token_slots_ptr, slot_ranks_ptr,
    in_features, stride_xt, stride_al, stride_vs, stride_vt,
    N_PROJ: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Semantics: as _sgmv_shrink_kernel, one token per program. Grid (token, column block,
    split-K): a matrix-vector product, no padding of a decode token to a 16-row tile."""
    t = tl.program_id(0)
    slot = tl.load(token_slots_ptr + t)
    if slot < 0:
        return
    cols = tl.load(slot_ranks_ptr + slot) * N_PROJ
    if tl.program_id(1) * BLOCK_N >= cols:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < cols
    width = tl.multiple_of(tl.cdiv(cols, ROW_ALIGN) * ROW_ALIGN, ROW_ALIGN)   # packed row of A
    a_mask = offs_n < width
    a_cols = a_ptr + slot.to(tl.int64) * stride_al + offs_n[None, :]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(tl.program_id(2) * BLOCK_K, in_features, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < in_features
        xt = tl.load(x_ptr + t.to(tl.int64) * stride_xt + offs_k, mask=k_mask, other=0.0)
        at = tl.load(a_cols + offs_k[:, None] * width, mask=k_mask[:, None] & a_mask[None, :], other=0.0)
        acc += tl.sum(xt.to(tl.float32)[:, None] * at.to(tl.float32), axis=0)
    v_ptrs = v_ptr + tl.program_id(2) * stride_vs + t.to(tl.int64) * stride_vt + offs_n
    tl.store(v_ptrs, acc, mask=n_mask)


def _bgmv_expand_kernel(
    y_ptr, v_ptr, b0_ptr, b1_ptr, b2_ptr, proj_ptr, token_slots_ptr, slot_ranks_ptr,
    stride_yt, stride_vs, stride_vt,
    N_PROJ: tl.constexpr, VEC: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Semantics: as _sgmv_expand_kernel, one token per program. Grid (token, projection,
    column block)."""
    t = tl.program_id(0)
    slot = tl.load(token_slots_ptr + t)
    if slot < 0:
        return
    p = tl.program_id(1)
    out_p = tl.multiple_of(tl.load(proj_ptr + p * 4 + 1), VEC)
    if tl.program_id(2) * BLOCK_N >= out_p:
        return
    rank = tl.load(slot_ranks_ptr + slot)
    if p == 0:
        b_ptr = b0_ptr
    elif p == 1:
        b_ptr = b1_ptr
    else:
        b_ptr = b2_ptr
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_p
    b_cols = b_ptr + slot.to(tl.int64) * tl.multiple_of(tl.load(proj_ptr + p * 4 + 2), VEC) + offs_n[None, :]
    stride_br = tl.multiple_of(tl.load(proj_ptr + p * 4 + 3), VEC)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < rank
        vt = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for split in tl.static_range(SPLIT_K):
            vt += tl.load(v_ptr + split * stride_vs + t.to(tl.int64) * stride_vt + offs_k * N_PROJ + p,
                          mask=k_mask, other=0.0)
        bt = tl.load(b_cols + offs_k[:, None] * stride_br, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.sum(vt[:, None] * bt.to(tl.float32), axis=0)
    y_ptrs = y_ptr + t.to(tl.int64) * stride_yt + tl.multiple_of(tl.load(proj_ptr + p * 4), VEC) + offs_n
    y = tl.load(y_ptrs, mask=n_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=n_mask)


# ---------------------------------------------------------------------------------------
# Launchers: check the contract, pick block sizes, launch. The grid depends only on tensor
# shapes (never on values read back from the device), so a launch can be graph-captured.

@dataclass(frozen=True)
class GpuLaunch:
    """Block sizes of the compiled (GPU) launches, passed to each launcher (the Triton
    backend holds one); `python -m benchmarks.kernels --tune` sweeps them on decode
    shapes. The interpreter uses its own (fewer, larger programs)."""
    shrink_block_k: int = 128
    shrink_min_programs: int = 512     # split the reduction until this many programs run
    shrink_warps: int = 4
    shrink_stages: int = 4
    expand_block_n: int = 256
    expand_warps: int = 4


DEFAULT_LAUNCH = GpuLaunch()


def _split_k(programs: int, in_features: int, block_k: int, min_programs: int) -> int:
    """Split the reduction when there are too few programs to keep enough loads in flight
    (a decode step with few adapters is a handful of blocks streaming all of A)."""
    split = 1
    while programs * split < min_programs and in_features >= block_k * split * 2:
        split *= 2
    return split


def _check_lora_args(x: torch.Tensor, A: torch.Tensor, meta: LoRAMeta) -> None:
    assert x.dim() == 2 and A.dim() == 4, "x [T, in], A [max_loras, in, r_max, n_proj]"
    assert x.dtype == A.dtype or A.dtype == torch.int8, f"x {x.dtype} and A {A.dtype} must share a dtype (or A int8)"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), x.dtype
    assert x.shape[1] == A.shape[1] and x.shape[0] == meta.num_tokens, (x.shape, A.shape, meta.num_tokens)
    assert x.stride(1) == 1 and A.is_contiguous(), "x rows and A must be contiguous"
    assert A.shape[0] == meta.max_loras, (A.shape, meta.max_loras)
    assert A.shape[2] * A.shape[3] % ROW_ALIGN == 0, f"r_max * n_proj must be a multiple of {ROW_ALIGN}: {A.shape}"
    assert x.device == A.device == meta.token_slots.device


def _proj_table(y: torch.Tensor, v: torch.Tensor, Bs: list[torch.Tensor],
                out_slices: list[tuple[int, int]], meta: LoRAMeta) -> tuple[torch.Tensor, int]:
    """Check the expand contract; return [n_proj, 4] int64 (offset, out_p, B stride 0,
    stride 1) and the largest of 8 and 1 that divides them all (the kernels' VEC)."""
    n_proj = len(Bs)
    assert 1 <= n_proj <= 3 and len(out_slices) == n_proj, "1 to 3 fused projections"
    assert y.dim() == 2 and y.stride(1) == 1 and y.shape[0] == meta.num_tokens, "y [T, N], rows contiguous"
    assert v.dtype == torch.float32 and v.is_contiguous() and v.dim() == 3 and v.shape[1] == y.shape[0]
    assert y.device == v.device == meta.token_slots.device
    r_max = v.shape[2] // n_proj
    for B, (off, size) in zip(Bs, out_slices):
        assert B.is_contiguous() and B.dtype == Bs[0].dtype and B.device == y.device
        assert B.shape == (meta.max_loras, r_max, size), (B.shape, meta.max_loras, r_max, size)
        assert 0 <= off and off + size <= y.shape[1], (off, size, y.shape)
    rows = tuple((off, size, B.stride(0), B.stride(1)) for B, (off, size) in zip(Bs, out_slices))
    return _proj_tensor(rows, y.device)


@functools.lru_cache(maxsize=64)
def _proj_tensor(rows: tuple, device: torch.device) -> tuple[torch.Tensor, int]:
    """Cached: every layer of a model reuses a few tables, copied to the device once."""
    vec = 8 if all(value % 8 == 0 for row in rows for value in row) else 1
    return torch.tensor(rows, dtype=torch.int64, device=device), vec


def sgmv_shrink(x: torch.Tensor, A: torch.Tensor, blocks: LoRABlocks, launch: GpuLaunch = DEFAULT_LAUNCH) -> torch.Tensor:
    """Semantics: v[t, :rank * n_proj] = x[t] @ slot_a(A, slot[t], rank[slot[t]]).
    x [T, in], A [max_loras, in, r_max, n_proj] packed; returns v [T, r_max * n_proj]
    fp32 (zero outside each token's rank columns and on slot -1 rows)."""
    return _sum_splits(sgmv_shrink_splits(x, A, blocks, torch.zeros, launch))


def sgmv_shrink_splits(x: torch.Tensor, A: torch.Tensor, blocks: LoRABlocks, alloc=torch.empty,
                       launch: GpuLaunch = DEFAULT_LAUNCH) -> torch.Tensor:
    """The shrink's split-K partials v [split_k, T, r_max * n_proj], allocated by `alloc`:
    uninitialized for the expand, which reads only what the shrink wrote (a decode step
    then has no memset per LoRA layer)."""
    meta = blocks.meta
    _check_lora_args(x, A, meta)
    _, in_features, r_max, n_proj = A.shape
    num_blocks = blocks.block_slots.numel()
    if not meta.has_lora or num_blocks == 0:
        return alloc(1, x.shape[0], r_max * n_proj, dtype=torch.float32, device=x.device)   # no launch
    interpret = triton.knobs.runtime.interpret
    block_n = min(64, max(16, triton.next_power_of_2(r_max * n_proj)))
    block_k = 256 if interpret else launch.shrink_block_k
    grid_n = triton.cdiv(r_max * n_proj, block_n)
    split_k = _split_k(num_blocks * grid_n, in_features, block_k, launch.shrink_min_programs)
    v = alloc(split_k, x.shape[0], r_max * n_proj, dtype=torch.float32, device=x.device)
    kernel(_sgmv_shrink_kernel)[(num_blocks, grid_n, split_k)](
        x, A, v,
        meta.sorted_token_idx, blocks.block_slots, blocks.block_ranks, blocks.block_starts, blocks.block_ends,
        in_features, x.stride(0), A.stride(0), v.stride(0), v.stride(1),
        N_PROJ=n_proj, ROW_ALIGN=ROW_ALIGN, BLOCK_M=SGMV_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT_K=split_k, DOT_DTYPE=dot_dtype(x.dtype), PRECISION="ieee",
        num_warps=launch.shrink_warps, num_stages=launch.shrink_stages,
    )
    return v


def _sum_splits(v: torch.Tensor) -> torch.Tensor:
    """The shrink's v from its split-K partials."""
    return v[0] if v.shape[0] == 1 else v.sum(0)


def _as_splits(v: torch.Tensor) -> torch.Tensor:
    """An expand's v: [T, W] as one split, or the shrink's [split_k, T, W] partials."""
    return v.unsqueeze(0) if v.dim() == 2 else v


def sgmv_expand(y: torch.Tensor, v: torch.Tensor, Bs: list[torch.Tensor], out_slices: list[tuple[int, int]],
                blocks: LoRABlocks, launch: GpuLaunch = DEFAULT_LAUNCH) -> torch.Tensor:
    """Semantics: y[t, off_p : off_p + out_p] += v[t, p::n_proj][:rank] @ Bs[p][slot[t], :rank].
    v [T, r_max * n_proj] fp32 from sgmv_shrink, or [split_k, T, r_max * n_proj] partials
    that it sums; y may be a column slice of a wider output. Returns y, updated in place."""
    meta = blocks.meta
    v = _as_splits(v)
    proj, vec = _proj_table(y, v, Bs, out_slices, meta)
    num_blocks = blocks.block_slots.numel()
    if not meta.has_lora or num_blocks == 0:
        return y
    n_proj = len(Bs)
    interpret = triton.knobs.runtime.interpret
    max_out = max(size for _, size in out_slices)
    block_n = min(1024, triton.next_power_of_2(max_out)) if interpret else launch.expand_block_n
    b = list(Bs) + [Bs[0]] * (3 - n_proj)
    kernel(_sgmv_expand_kernel)[(num_blocks, n_proj, triton.cdiv(max_out, block_n))](
        y, v, b[0], b[1], b[2], proj,
        meta.sorted_token_idx, blocks.block_slots, blocks.block_ranks, blocks.block_starts, blocks.block_ends,
        y.stride(0), v.stride(0), v.stride(1),
        N_PROJ=n_proj, VEC=vec, SPLIT_K=v.shape[0], BLOCK_M=SGMV_BLOCK_M, BLOCK_N=block_n,
        BLOCK_K=64 if interpret else 16, DOT_DTYPE=dot_dtype(y.dtype), PRECISION="ieee",
        num_warps=launch.expand_warps,
    )
    return y


def bgmv_shrink(x: torch.Tensor, A: torch.Tensor, meta: LoRAMeta, launch: GpuLaunch = DEFAULT_LAUNCH) -> torch.Tensor:
    """Semantics: as sgmv_shrink, one token per program (decode-shaped batches)."""
    return _sum_splits(bgmv_shrink_splits(x, A, meta, torch.zeros, launch))


def bgmv_shrink_splits(x: torch.Tensor, A: torch.Tensor, meta: LoRAMeta, alloc=torch.empty,
                       launch: GpuLaunch = DEFAULT_LAUNCH) -> torch.Tensor:
    """As sgmv_shrink_splits, one token per program, over the core meta's token slots."""
    _check_lora_args(x, A, meta)
    _, in_features, r_max, n_proj = A.shape
    T = x.shape[0]
    if not meta.has_lora:
        return alloc(1, T, r_max * n_proj, dtype=torch.float32, device=x.device)
    interpret = triton.knobs.runtime.interpret
    block_n = min(64, max(16, triton.next_power_of_2(r_max * n_proj)))
    block_k = 256 if interpret else 64
    grid_n = triton.cdiv(r_max * n_proj, block_n)
    split_k = _split_k(T * grid_n, in_features, block_k, launch.shrink_min_programs)
    v = alloc(split_k, T, r_max * n_proj, dtype=torch.float32, device=x.device)
    kernel(_bgmv_shrink_kernel)[(T, grid_n, split_k)](
        x, A, v, meta.token_slots, meta.slot_ranks,
        in_features, x.stride(0), A.stride(0), v.stride(0), v.stride(1),
        N_PROJ=n_proj, ROW_ALIGN=ROW_ALIGN, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
    )
    return v


def bgmv_expand(y: torch.Tensor, v: torch.Tensor, Bs: list[torch.Tensor],
                out_slices: list[tuple[int, int]], meta: LoRAMeta) -> torch.Tensor:
    """Semantics: as sgmv_expand, one token per program. Returns y, updated in place."""
    v = _as_splits(v)
    proj, vec = _proj_table(y, v, Bs, out_slices, meta)
    if not meta.has_lora:
        return y
    n_proj = len(Bs)
    interpret = triton.knobs.runtime.interpret
    max_out = max(size for _, size in out_slices)
    block_n = min(1024, triton.next_power_of_2(max_out)) if interpret else 128
    b = list(Bs) + [Bs[0]] * (3 - n_proj)
    kernel(_bgmv_expand_kernel)[(y.shape[0], n_proj, triton.cdiv(max_out, block_n))](
        y, v, b[0], b[1], b[2], proj, meta.token_slots, meta.slot_ranks,
        y.stride(0), v.stride(0), v.stride(1),
        N_PROJ=n_proj, VEC=vec, SPLIT_K=v.shape[0], BLOCK_N=block_n, BLOCK_K=16,
    )
    return y


BGMV_MAX_TOKENS = 16   # steps this small take BGMV: it measured faster there (RESULTS.md, H100)


def add_lora_triton(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor],
                    out_slices: list[tuple[int, int]], blocks: LoRABlocks,
                    launch: GpuLaunch = DEFAULT_LAUNCH, scale: torch.Tensor | None = None) -> torch.Tensor:
    """CUDA path: y += LoRA delta. Steps of up to BGMV_MAX_TOKENS tokens take the
    one-token-per-program BGMV kernels (H100, hidden 4096, rank 16, 16 tokens: 10.0 vs
    11.8 us with 64 adapters, 8.2 vs 8.7 us with one); larger steps take SGMV, which wins
    from 32 tokens with one adapter and from 128 with 64. The choice depends on the
    token count only, so a captured CUDA graph keeps it."""
    if blocks.meta.num_tokens <= BGMV_MAX_TOKENS:
        return add_lora_bgmv(y, x, A, Bs, out_slices, blocks.meta, launch, scale)
    return add_lora_sgmv(y, x, A, Bs, out_slices, blocks, launch, scale)


def add_lora_sgmv(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor],
                  out_slices: list[tuple[int, int]], blocks: LoRABlocks,
                  launch: GpuLaunch = DEFAULT_LAUNCH, scale: torch.Tensor | None = None) -> torch.Tensor:
    """y += LoRA delta as one SGMV shrink and one SGMV expand launch (int8 slots: the
    kernels convert the codes as they load them; `scale` multiplies the small v between)."""
    if not blocks.has_lora:
        return y                                   # no adapter in the step: nothing launched
    v = _scaled(sgmv_shrink_splits(x, A, blocks, launch=launch), scale, blocks.meta)
    return sgmv_expand(y, v, Bs, out_slices, blocks, launch)


def add_lora_bgmv(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor],
                  out_slices: list[tuple[int, int]], meta: LoRAMeta,
                  launch: GpuLaunch = DEFAULT_LAUNCH, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The same as add_lora_sgmv with the one-token-per-program kernels (decode shapes),
    which read the core meta only."""
    if not meta.has_lora:
        return y
    return bgmv_expand(y, _scaled(bgmv_shrink_splits(x, A, meta, launch=launch), scale, meta), Bs, out_slices, meta)


def _scaled(v_splits: torch.Tensor, scale: torch.Tensor | None, meta: LoRAMeta) -> torch.Tensor:
    """int8 slots: the shrink's v [T, r_max * n_proj] times each token's slot scale (zero
    on slot -1 rows); no host sync, so a captured graph replays it. Without: v as it is."""
    if scale is None:
        return v_splits
    slots = meta.token_slots.long()
    rows = scale.index_select(0, slots.clamp(min=0)) * (slots >= 0).unsqueeze(1)
    return (_sum_splits(v_splits) * rows).contiguous()
