"""Segmented-gather LoRA (SGMV, after Punica): every token gets its own adapter's delta.

Semantics (one fused projection group with n_proj outputs, scale folded into B):
    y[t, off_p : off_p + out_p] += (x[t] @ A[slot[t], :, :rank, p]) @ B_p[slot[t], :rank]
for every token t with slot[t] >= 0; tokens with slot -1 are untouched.

Weight layout, shared by every implementation:
    A:  [max_loras, in, r_max, n_proj]  rank-major, projection-minor ("interleaved"), so
        the first `rank * n_proj` columns of A[s].view(in, -1) are exactly adapter s's
        ranks for all projections: a rank-aware kernel only bounds its column loop.
    Bs: n_proj tensors [max_loras, r_max, out_p]; rows >= rank are zero.

This file holds the torch implementations: `add_lora_ref` (a plain loop, the oracle of
the tests) and `add_lora_grouped` (the CPU production path: one batched matmul per
shrink and per expand over padded rows of equal length, sized to the step's largest
rank). The Triton kernels live beside them.
"""

from __future__ import annotations

import torch

from .lora_meta import LoRAMeta


def add_lora_ref(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor],
                 out_slices: list[tuple[int, int]], meta: LoRAMeta) -> torch.Tensor:
    """Oracle: loop over tokens in fp32. y [T, N], x [T, in]."""
    slots = meta.token_slots.tolist()
    ranks = meta.slot_ranks.tolist()
    for t, s in enumerate(slots):
        if s < 0:
            continue
        r = ranks[s]
        for p, ((off, size), B) in enumerate(zip(out_slices, Bs)):
            v = x[t].float() @ A[s, :, :r, p].float()          # [r]
            y[t, off : off + size] += (v @ B[s, :r].float()).to(y.dtype)
    return y


def add_lora_grouped(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor],
                     out_slices: list[tuple[int, int]], meta: LoRAMeta) -> torch.Tensor:
    """CPU path: y += LoRA delta with one bmm for the shrink and one per projection for
    the expand, over rows of meta.row_len tokens that share an adapter."""
    if not meta.has_lora:
        return y                                   # no adapter in the step: no work at all
    r = meta.max_rank
    n_proj = A.shape[-1]
    num_rows, row_len = len(meta.row_slots), meta.row_len
    a = A[:, :, :r, :].reshape(A.shape[0], A.shape[1], r * n_proj)  # view, [L, in, r*n_proj]
    a = a if meta.rows_are_all_slots else a.index_select(0, meta.row_slots_t)
    xr = x.index_select(0, meta.pad_idx).view(num_rows, row_len, -1)  # [R, row_len, in]
    v = torch.bmm(xr, a)                                              # [R, row_len, r*n_proj]
    if meta.pad_mask is not None:
        v = v * meta.pad_mask                      # pad cells hold token 0: zero them
    v = v.view(num_rows, row_len, r, n_proj)
    for p, ((off, size), B) in enumerate(zip(out_slices, Bs)):
        b = B[:, :r]
        b = b if meta.rows_are_all_slots else b.index_select(0, meta.row_slots_t)
        out = torch.bmm(v[..., p], b)                                  # [R, row_len, out_p]
        y[:, off : off + size].index_add_(0, meta.pad_idx, out.view(-1, size))
    return y
