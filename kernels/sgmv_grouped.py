"""The torch formulation of the LoRA delta: batched matmuls over padded rows.

Semantics as in sgmv.py (same weight layout, same oracle `add_lora_ref`). It is the CPU
path's fallback beside the C++ op (sgmv_cpu.py: other dtypes, no compiler) and the torch
backend on any device: one bmm for the shrink and one per projection for the expand,
over rows of equal length that share an adapter (`LoRAMeta.rows`), once per rank in the
step (`LoRAMeta.rank_groups`), each pass over strided views of the packed slots.
"""

from __future__ import annotations

import torch

from .lora_meta import LoRAMeta, LoRARows
from .sgmv import row_width


def add_lora_grouped(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor],
                     out_slices: list[tuple[int, int]], meta: LoRAMeta, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Torch path: y += LoRA delta with one bmm for the shrink and one per projection for
    the expand, over rows of meta.rows.row_len tokens that share an adapter; a step
    mixing ranks runs once per rank. int8 slots (`scale`): the rows' slots are converted
    to x's dtype as they are gathered, never the whole pool."""
    if not meta.has_lora:
        return y                                   # no adapter in the step: no work at all
    if not meta.uniform_rank:                      # one pass per rank, each at its own rank
        for group in meta.rank_groups:
            add_lora_grouped(y, x, A, Bs, out_slices, group, scale)
        return y
    r = meta.max_rank
    rows = meta.rows
    n_proj = A.shape[-1]
    num_rows, row_len = len(rows.row_slots), rows.row_len
    a = _rows_a(A, rows, r).to(x.dtype)                               # [R, in, r*n_proj]
    xr = x if rows.rows_are_tokens else x.index_select(0, rows.pad_idx)
    xr = xr.view(num_rows, row_len, -1)                                # [R, row_len, in]
    v = torch.bmm(xr, a)                                              # [R, row_len, r*n_proj]
    if scale is not None:
        v = (v.float() * _row_weights(scale[:, : r * n_proj], rows)[:, None]).to(x.dtype)
    v = v.view(num_rows, row_len, r, n_proj)       # pad cells hold token 0; inv_idx never reads them
    for p, ((off, size), B) in enumerate(zip(out_slices, Bs)):
        b = _row_weights(B[:, :r], rows).to(x.dtype)                   # [R, r, out_p]
        if rows.rows_are_tokens:                   # accumulate straight into y's columns
            y[:, off : off + size].view(num_rows, row_len, size).baddbmm_(v[..., p], b)
            continue
        out = torch.bmm(v[..., p], b).view(-1, size)                   # [R * row_len, out_p]
        if not rows.all_tokens_have_lora:                              # no-adapter tokens read a zero cell
            out = torch.cat([out, out.new_zeros(1, size)])
        y[:, off : off + size] += out.index_select(0, rows.inv_idx)    # back to token order
    return y


def _rows_a(A: torch.Tensor, rows: LoRARows, r: int) -> torch.Tensor:
    """Each row's adapter A as [num_rows, in, r * n_proj], a strided view of the packed
    slots (every slot in the step has rank r)."""
    L, in_features, _, n_proj = A.shape
    width = row_width(r, n_proj)
    return _row_weights(A.view(L, -1)[:, : in_features * width].view(L, in_features, width)[:, :, : r * n_proj], rows)


def _row_weights(w: torch.Tensor, rows: LoRARows) -> torch.Tensor:
    """w [max_loras, ...] per row: w itself when the rows are the slots, else a stack of
    the rows' slots (5x faster than index_select on these strided bf16 views)."""
    return w if rows.rows_are_all_slots else torch.stack([w[s] for s in rows.row_slots])
