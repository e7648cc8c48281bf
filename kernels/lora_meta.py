"""One description of a step's LoRA segments, built once and read by every LoRA layer.

Tokens arrive in batch order; requests for the same adapter slot are grouped into
segments so each segment runs one matmul against its own adapter:

    # slots per token [2, 2, -1, 0, 0, 0] -> sorted LoRA tokens [3, 4, 5, 0, 1]
    #   -> segments [0, 3, 5], slot per segment [0, 2]   (slot -1 tokens cost nothing)

`LoRAMeta` is that core and nothing else; the CPU C++ op reads it as it is. The other
implementations each read a view of it, built only when that implementation runs:

- `LoRAMeta.rows` (the torch grouped path, add_lora_grouped): every segment cut into
  rows of `row_len` tokens, so `x[pad_idx].view(num_rows, row_len, in)` holds the
  segments side by side and `row_slots[i]` names the adapter of row i. The model runner
  orders tokens by slot, so in the common decode step (every request has an adapter, as
  many requests per adapter) the rows are x itself and no gather is needed.
  `LoRAMeta.rank_groups` splits a step that mixes ranks into one meta per rank.
  Both are cached on the meta: built at the first LoRA layer of a step, read by the rest.
- `LoRABlocks` (the Triton path): segments cut into blocks of at most SGMV_BLOCK_M
  tokens, one program row per block: block b covers sorted positions
  [block_starts[b], block_ends[b]) of adapter slot block_slots[b], at rank block_ranks[b]
  (segments [0, 3, 5], slots [0, 2] -> block_starts [0, 3], block_ends [3, 5],
  block_slots [0, 2]). Per-block copies rather than indices into the segment arrays, so
  a program reads them all at once. A separate object, not a cached view, because a
  CUDA graph needs it in static buffers (`LoRAMetaBuffers`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

SGMV_BLOCK_M = 16  # tokens per Triton SGMV program; the smallest M of a tensor-core dot


class Segment(NamedTuple):
    """LoRA tokens sorted_token_idx[start:end] all use adapter `slot`, of rank `rank`."""
    slot: int
    rank: int
    start: int
    end: int


@dataclass(frozen=True, eq=False)
class LoRAMeta:
    num_tokens: int
    max_loras: int
    segments: tuple[Segment, ...]  # host copy of the segment arrays below, for the views
    sorted_tokens: tuple[int, ...]  # host copy of sorted_token_idx
    ranks: tuple[int, ...]         # host copy of slot_ranks
    token_slots: torch.Tensor      # [T] int32: adapter slot of each token, -1 = none
    sorted_token_idx: torch.Tensor  # [T_lora] int64: LoRA tokens ordered by slot
    seg_starts: torch.Tensor       # [S+1] int32: segment i = sorted_token_idx[s[i]:s[i+1]]
    seg_slots: torch.Tensor        # [S] int32: slot of segment i (never -1)
    slot_ranks: torch.Tensor       # [max_loras] int32: rank of the adapter in each slot

    @property
    def has_lora(self) -> bool:
        return len(self.segments) > 0

    @property
    def max_rank(self) -> int:
        """Largest rank among this step's slots: the grouped path's compute is sized to it."""
        return max((seg.rank for seg in self.segments), default=0)

    @property
    def uniform_rank(self) -> bool:
        """Every slot in the step has rank max_rank."""
        return len({seg.rank for seg in self.segments}) <= 1

    @functools.cached_property
    def rows(self) -> LoRARows:
        """The torch grouped path's padded rows, built on first use."""
        return LoRARows.of(self)

    @functools.cached_property
    def rank_groups(self) -> tuple[LoRAMeta, ...]:
        """The step split by rank, one meta per rank present (the other tokens at slot -1),
        for the grouped path, which runs each rank at its own width. Built on first use."""
        slots = [-1] * self.num_tokens
        for seg in self.segments:
            for t in self.sorted_tokens[seg.start : seg.end]:
                slots[t] = seg.slot
        device = self.token_slots.device
        return tuple(build_lora_meta([s if s >= 0 and self.ranks[s] == r else -1 for s in slots], self.ranks, device)
                     for r in sorted({seg.rank for seg in self.segments}))


def build_lora_meta(token_slots: list[int], slot_ranks: list[int], device: torch.device | str = "cpu") -> LoRAMeta:
    """Group a step's tokens by adapter slot (pure Python: the batch is at most a few
    hundred requests, and Python ints avoid a dozen tiny tensor ops per step)."""
    by_slot: dict[int, list[int]] = {}
    for t, s in enumerate(token_slots):
        if s >= 0:
            by_slot.setdefault(s, []).append(t)
    order: list[int] = []
    segments = []
    for s in sorted(by_slot):
        start = len(order)
        order.extend(by_slot[s])
        segments.append(Segment(s, slot_ranks[s], start, len(order)))
    i64 = dict(dtype=torch.int64, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    return LoRAMeta(
        num_tokens=len(token_slots),
        max_loras=len(slot_ranks),
        segments=tuple(segments),
        sorted_tokens=tuple(order),
        ranks=tuple(slot_ranks),
        token_slots=torch.tensor(token_slots, **i32),
        sorted_token_idx=torch.tensor(order, **i64),
        seg_starts=torch.tensor([0] + [seg.end for seg in segments], **i32),
        seg_slots=torch.tensor([seg.slot for seg in segments], **i32),
        slot_ranks=torch.tensor(slot_ranks, **i32),
    )


@dataclass(frozen=True, eq=False)
class LoRARows:
    """The torch grouped path's view: the step's LoRA tokens as num_rows rows of row_len
    cells, each row one adapter's. Pad cells hold token 0; their results are never read
    back (inv_idx points at no pad cell)."""
    row_len: int
    row_slots: list[int]           # row_slots[i]: slot of row i
    pad_idx: torch.Tensor          # [num_rows * row_len] int64: token index per cell (pads -> 0)
    inv_idx: torch.Tensor          # [T] int64: each token's cell in the rows; no-adapter -> the extra zero cell
    all_tokens_have_lora: bool     # no token points at the extra zero cell
    rows_are_tokens: bool          # the rows are x itself, in order: no gather, no scatter
    rows_are_all_slots: bool       # rows map one-to-one onto every slot buffer: no weight gather

    @classmethod
    def of(cls, meta: LoRAMeta) -> LoRARows:
        """Cut segments into rows of equal length. The row length is the mean segment
        length (at least 1), so one long prefill segment becomes several rows instead of
        padding every short decode segment up to its length."""
        lengths = [seg.end - seg.start for seg in meta.segments] or [1]
        row_len = max(lengths) if max(lengths) <= 2 * min(lengths) else math.ceil(sum(lengths) / len(lengths))
        row_slots, pad_idx = [], []
        for seg in meta.segments:
            for start in range(seg.start, seg.end, row_len):
                chunk = list(meta.sorted_tokens[start : min(start + row_len, seg.end)])
                row_slots.append(seg.slot)
                pad_idx.extend(chunk + [-1] * (row_len - len(chunk)))
        inv_idx = [len(pad_idx)] * meta.num_tokens            # the zero cell past the rows
        for cell, t in enumerate(pad_idx):
            if t >= 0:
                inv_idx[t] = cell
        i64 = dict(dtype=torch.int64, device=meta.token_slots.device)
        return cls(
            row_len=row_len,
            row_slots=row_slots,
            pad_idx=torch.tensor([max(i, 0) for i in pad_idx], **i64),
            inv_idx=torch.tensor(inv_idx, **i64),
            all_tokens_have_lora=len(meta.sorted_tokens) == meta.num_tokens,
            rows_are_tokens=pad_idx == list(range(meta.num_tokens)),
            rows_are_all_slots=row_slots == list(range(meta.max_loras)),
        )


@dataclass(frozen=True, eq=False)
class LoRABlocks:
    """The Triton path's view: `meta` (BGMV reads its token_slots and slot_ranks) and its
    segments cut into blocks of at most SGMV_BLOCK_M sorted tokens (what SGMV reads)."""
    meta: LoRAMeta
    block_slots: torch.Tensor      # [NB] int32: adapter slot of block b; -1 = padding, no work
    block_ranks: torch.Tensor      # [NB] int32: that slot's rank
    block_starts: torch.Tensor     # [NB] int32: block b holds sorted positions [block_starts[b], block_ends[b])
    block_ends: torch.Tensor       # [NB] int32

    @property
    def has_lora(self) -> bool:
        return self.meta.has_lora

    @classmethod
    def of(cls, meta: LoRAMeta) -> LoRABlocks:
        blocks = [(b, min(b + SGMV_BLOCK_M, seg.end), seg.slot, seg.rank)
                  for seg in meta.segments for b in range(seg.start, seg.end, SGMV_BLOCK_M)]
        i32 = dict(dtype=torch.int32, device=meta.token_slots.device)
        return cls(
            meta=meta,
            block_slots=torch.tensor([s for _, _, s, _ in blocks], **i32),
            block_ranks=torch.tensor([r for _, _, _, r in blocks], **i32),
            block_starts=torch.tensor([b for b, _, _, _ in blocks], **i32),
            block_ends=torch.tensor([e for _, e, _, _ in blocks], **i32),
        )


def triton_lora_meta(token_slots: list[int], slot_ranks: list[int], device: torch.device | str = "cpu") -> LoRABlocks:
    """A step's metadata in the form the Triton path reads."""
    return LoRABlocks.of(build_lora_meta(token_slots, slot_ranks, device))


_META_BUFFERS = ("token_slots", "sorted_token_idx", "seg_starts", "seg_slots", "slot_ranks")
_BLOCK_BUFFERS = ("block_slots", "block_ranks", "block_starts", "block_ends")


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

    def fill(self, token_slots: list[int], slot_ranks: list[int]) -> LoRABlocks:
        assert len(token_slots) <= self.max_tokens, (len(token_slots), self.max_tokens)
        assert len(slot_ranks) == self.max_loras, (len(slot_ranks), self.max_loras)
        padded = list(token_slots) + [-1] * (self.max_tokens - len(token_slots))
        host = triton_lora_meta(padded, slot_ranks)          # on CPU; one copy per buffer below
        for name, (buf, pad) in self.buffers.items():
            src = getattr(host.meta if name in _META_BUFFERS else host, name)
            values = torch.full(buf.shape, pad, dtype=buf.dtype)
            values[: src.numel()] = src
            buf.copy_(values, non_blocking=True)
        static = {name: self.buffers[name][0] for name in _BLOCK_BUFFERS}
        meta = replace(host.meta, **{name: self.buffers[name][0] for name in _META_BUFFERS})
        return LoRABlocks(meta=meta, **static)
