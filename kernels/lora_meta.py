"""One description of a step's LoRA segments, built once and read by every LoRA layer.

Tokens arrive in batch order; requests for the same adapter slot are grouped into
segments so each segment runs one matmul against its own adapter:

    # slots per token [2, 2, -1, 0, 0, 0] -> sorted LoRA tokens [3, 4, 5, 0, 1]
    #   -> segments [0, 3, 5], slot per segment [0, 2]   (slot -1 tokens cost nothing)

The CPU path also needs a padded "rows" layout for one batched matmul: every segment is
cut into rows of `row_len` tokens, so `x[pad_idx].view(num_rows, row_len, in)` holds the
segments side by side and `row_slots[i]` names the adapter of row i. The model runner
orders tokens by slot, so in the common decode step (every request has an adapter, as
many requests per adapter) the rows are x itself and no gather is needed.

The Triton path cuts segments into blocks of at most SGMV_BLOCK_M tokens instead, one
program row per block: block b covers sorted positions [block_starts[b], block_ends[b])
of adapter slot block_slots[b], at rank block_ranks[b] (segments [0, 3, 5], slots [0, 2]
-> block_starts [0, 3], block_ends [3, 5], block_slots [0, 2]). Per-block copies rather
than indices into the segment arrays, so a program reads them all at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

SGMV_BLOCK_M = 16  # tokens per Triton SGMV program; the smallest M of a tensor-core dot


@dataclass
class LoRAMeta:
    num_tokens: int
    token_slots: torch.Tensor      # [T] int32: adapter slot of each token, -1 = none
    sorted_token_idx: torch.Tensor  # [T_lora] int64: LoRA tokens ordered by slot
    seg_starts: torch.Tensor       # [S+1] int32: segment i = sorted_token_idx[s[i]:s[i+1]]
    seg_slots: torch.Tensor        # [S] int32: slot of segment i (never -1)
    slot_ranks: torch.Tensor       # [max_loras] int32: rank of the adapter in each slot
    max_rank: int                  # largest rank among this step's slots: compute is sized to it
    uniform_rank: bool             # every slot in the step has rank max_rank
    # padded rows layout (CPU path)
    row_len: int
    row_slots: list[int]           # row_slots[i]: slot of row i
    row_slots_t: torch.Tensor      # the same as an int64 tensor
    pad_idx: torch.Tensor          # [num_rows * row_len] int64: token index per cell (pads -> 0)
    pad_mask: torch.Tensor | None  # [num_rows, row_len, 1]: 0 on pad cells; None when no pads
    max_loras: int
    inv_idx: torch.Tensor | None = None  # [T] int64: each token's cell in the rows; no-adapter -> the extra zero cell
    all_tokens_have_lora: bool = True    # no token points at the extra zero cell
    rows_are_tokens: bool = False        # the rows are x itself, in order: no gather, no scatter
    # token blocks (Triton path): block b holds sorted positions [block_starts[b], block_ends[b])
    block_slots: torch.Tensor | None = None   # [NB] int32: adapter slot of block b; -1 = padding, no work
    block_ranks: torch.Tensor | None = None   # [NB] int32: that slot's rank
    block_starts: torch.Tensor | None = None  # [NB] int32
    block_ends: torch.Tensor | None = None    # [NB] int32
    rank_groups: list | None = None           # the torch path's per-rank metas, built on first use

    @property
    def num_segments(self) -> int:
        return len(self.seg_slots)

    @property
    def has_lora(self) -> bool:
        return len(self.row_slots) > 0

    @property
    def rows_are_all_slots(self) -> bool:
        """Rows map one-to-one onto every slot buffer: no weight gather needed."""
        return self.row_slots == list(range(self.max_loras))


def build_lora_meta(
    token_slots: list[int],
    slot_ranks: list[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoRAMeta:
    """Group a step's tokens by adapter slot (pure Python: the batch is at most a few
    hundred requests, and Python ints avoid a dozen tiny tensor ops per step)."""
    max_loras = len(slot_ranks)
    by_slot: dict[int, list[int]] = {}
    for t, s in enumerate(token_slots):
        if s >= 0:
            by_slot.setdefault(s, []).append(t)
    slots = sorted(by_slot)
    seg_starts, order = [0], []
    for s in slots:
        order.extend(by_slot[s])
        seg_starts.append(len(order))
    row_len, row_slots, pad_idx, has_pad = _rows(by_slot, slots)
    blocks = [(b, min(b + SGMV_BLOCK_M, seg_starts[i + 1]), s)
              for i, s in enumerate(slots) for b in range(seg_starts[i], seg_starts[i + 1], SGMV_BLOCK_M)]
    num_rows = len(row_slots)
    inv_idx = [num_rows * row_len] * len(token_slots)          # the zero cell past the rows
    for cell, t in enumerate(pad_idx):
        if t >= 0:
            inv_idx[t] = cell
    pad_mask = None
    if has_pad:
        mask = [1.0 if i >= 0 else 0.0 for i in pad_idx]
        pad_mask = torch.tensor(mask, dtype=dtype, device=device).view(num_rows, row_len, 1)
    i64 = dict(dtype=torch.int64, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    return LoRAMeta(
        num_tokens=len(token_slots),
        token_slots=torch.tensor(token_slots, **i32),
        sorted_token_idx=torch.tensor(order, **i64),
        seg_starts=torch.tensor(seg_starts, **i32),
        seg_slots=torch.tensor(slots, **i32),
        slot_ranks=torch.tensor(slot_ranks, **i32),
        max_rank=max((slot_ranks[s] for s in slots), default=0),
        uniform_rank=len({slot_ranks[s] for s in slots}) <= 1,
        row_len=row_len,
        row_slots=row_slots,
        row_slots_t=torch.tensor(row_slots, **i64),
        pad_idx=torch.tensor([max(i, 0) for i in pad_idx], **i64),
        pad_mask=pad_mask,
        max_loras=max_loras,
        inv_idx=torch.tensor(inv_idx, **i64),
        all_tokens_have_lora=len(order) == len(token_slots),
        rows_are_tokens=pad_idx == list(range(len(token_slots))),
        block_slots=torch.tensor([s for _, _, s in blocks], **i32),
        block_ranks=torch.tensor([slot_ranks[s] for _, _, s in blocks], **i32),
        block_starts=torch.tensor([b for b, _, _ in blocks], **i32),
        block_ends=torch.tensor([e for _, e, _ in blocks], **i32),
    )


def _rows(by_slot: dict[int, list[int]], slots: list[int]):
    """Cut segments into rows of equal length. The row length is the mean segment length
    (at least 1), so one long prefill segment becomes several rows instead of padding
    every short decode segment up to its length."""
    if not slots:
        return 1, [], [], False
    lengths = [len(by_slot[s]) for s in slots]
    row_len = max(lengths) if max(lengths) <= 2 * min(lengths) else math.ceil(sum(lengths) / len(lengths))
    row_slots, pad_idx = [], []
    for s in slots:
        toks = by_slot[s]
        for start in range(0, len(toks), row_len):
            chunk = toks[start : start + row_len]
            row_slots.append(s)
            pad_idx.extend(chunk + [-1] * (row_len - len(chunk)))
    has_pad = any(i < 0 for i in pad_idx)
    return row_len, row_slots, pad_idx, has_pad


class LoRAMetaBuffers:
    """The Triton path's metadata preallocated at its maximum size, for steps replayed
    from a CUDA graph captured at `max_tokens` tokens: `fill` writes each step's metadata
    into the same device memory, padded (slot -1 tokens and blocks: no work), and the
    launchers size their grids from these buffer shapes only, so the captured launches
    stay valid. The step's x and y are padded to max_tokens rows as well; capture with a
    step that has adapters (a meta whose has_lora is false launches nothing)."""

    def __init__(self, max_tokens: int, max_loras: int, device: torch.device | str):
        self.max_tokens, self.max_loras = max_tokens, max_loras
        # at most one partial block per segment, and segments <= min(tokens, slots)
        max_blocks = min(max_tokens, max_loras) + -(-max_tokens // SGMV_BLOCK_M)
        i32 = dict(dtype=torch.int32, device=device)
        self.buffers = {                           # name -> (device buffer, value of padding)
            "token_slots": (torch.full((max_tokens,), -1, **i32), -1),
            "sorted_token_idx": (torch.zeros(max_tokens, dtype=torch.int64, device=device), 0),
            "seg_starts": (torch.zeros(max_loras + 1, **i32), 0),
            "seg_slots": (torch.zeros(max_loras, **i32), 0),
            "slot_ranks": (torch.zeros(max_loras, **i32), 0),
            "block_slots": (torch.full((max_blocks,), -1, **i32), -1),
            "block_ranks": (torch.zeros(max_blocks, **i32), 0),
            "block_starts": (torch.zeros(max_blocks, **i32), 0),
            "block_ends": (torch.zeros(max_blocks, **i32), 0),
        }

    def fill(self, token_slots: list[int], slot_ranks: list[int]) -> LoRAMeta:
        assert len(token_slots) <= self.max_tokens, (len(token_slots), self.max_tokens)
        assert len(slot_ranks) == self.max_loras, (len(slot_ranks), self.max_loras)
        padded = list(token_slots) + [-1] * (self.max_tokens - len(token_slots))
        meta = build_lora_meta(padded, slot_ranks)          # on CPU; one copy per buffer below
        for name, (buf, pad) in self.buffers.items():
            src = getattr(meta, name)
            host = torch.full(buf.shape, pad, dtype=buf.dtype)
            host[: src.numel()] = src
            buf.copy_(host, non_blocking=True)
        return replace(meta, **{name: buf for name, (buf, _) in self.buffers.items()})
