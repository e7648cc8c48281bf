"""Decode steps replayed from CUDA graphs.

A decode step of a small model on a GPU is hundreds of short kernels; launching them one
by one from Python costs more than running them. So each decode batch size in a few
buckets (1, 2, 4, 8, 16, 32, ...) is captured once, with and without LoRA, and a step
copies its inputs into the graphs' static buffers, pads to the bucket, and replays.

What keeps a captured graph valid for every later step:
- Inputs live in static buffers at their largest size (token ids, positions, KV slots,
  block tables, context lengths, and the LoRA metadata in the Triton backend's form:
  `LoRAMetaBuffers` per bucket; graphs run with the Triton kernels only).
- Every kernel sizes its grid from tensor shapes, never from values; the LoRA kernels
  read each segment's slot and rank from the metadata buffers.
- Padding rows are a harmless real sequence: one token at position 0 in a scratch KV
  block that no request owns, with no adapter (slot -1). Every kernel handles them
  like any other row, and their outputs are dropped.

`capture=False` keeps the same buffers and padding but re-runs the captured closure
instead of a graph. With the Triton kernels taken on CPU (`kernel_backend="triton"`
under TRITON_INTERPRET=1) that is what a replay does, Python-side decisions frozen at capture included, so CI tests it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from loraserve.kernels import LoRABlocks, LoRAMetaBuffers


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: powers of two to 16, then every 16 up to max_batch."""
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch]


@dataclass
class DecodeInputs:
    """One decode step, unpadded: n sequences, one new token each."""
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    block_tables: list[list[int]]
    context_lens: list[int]
    token_slots: list[int]        # adapter slot per token, -1 = none
    slot_ranks: list[int]


class DecodeGraphs:
    def __init__(self, model, max_batch: int, max_blocks_per_seq: int, scratch_block: int,
                 block_size: int, max_loras: int, capture: bool = True):
        self.model, self.capture_graphs = model, capture
        self.buckets = graph_buckets(max_batch)
        self.scratch_block, self.block_size = scratch_block, block_size
        device = model.embed.weight.device
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(max_batch, **i64)
        self.positions = torch.zeros(max_batch, **i64)
        self.slot_mapping = torch.full((max_batch,), scratch_block * block_size, **i64)
        self.block_tables = torch.full((max_batch, max_blocks_per_seq), scratch_block, **i64)
        self.context_lens = torch.ones(max_batch, **i64)
        self.hidden = torch.zeros(max_batch, model.config.hidden_size, dtype=model.embed.weight.dtype, device=device)
        self.lora_buffers = {bs: LoRAMetaBuffers(bs, max_loras, device) for bs in self.buckets}
        self.max_loras = max_loras
        self.replays: dict[tuple[int, bool], Callable[[], None]] = {}
        self.pool = None

    def capture_all(self) -> None:
        """Largest bucket first, so smaller graphs reuse its memory pool."""
        work = [(bs, with_lora) for bs in reversed(self.buckets) for with_lora in (True, False)]
        for bs, with_lora in tqdm(work, desc="Capturing decode CUDA graphs", disable=not self.capture_graphs):
            self.replays[(bs, with_lora)] = self._capture(bs, with_lora)
        if self.capture_graphs:
            torch.cuda.synchronize()

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def run(self, step: DecodeInputs) -> torch.Tensor:
        """Hidden states [n, hidden] of the step's tokens, from the bucket's graph."""
        n = len(step.input_ids)
        bs = self.bucket(n)
        assert bs is not None, f"decode batch {n} is over the largest captured bucket {self.buckets[-1]}"
        self._fill(step, bs)
        with_lora = any(s >= 0 for s in step.token_slots)
        if with_lora:
            self.lora_buffers[bs].fill(step.token_slots, step.slot_ranks)
        self.replays[(bs, with_lora)]()
        return self.hidden[:n]

    def _fill(self, step: DecodeInputs, bs: int) -> None:
        n, pad = len(step.input_ids), bs - len(step.input_ids)
        scratch_slot = self.scratch_block * self.block_size
        host = torch.tensor([step.input_ids + [0] * pad, step.positions + [0] * pad,
                             step.slot_mapping + [scratch_slot] * pad, step.context_lens + [1] * pad])
        for buf, row in zip((self.input_ids, self.positions, self.slot_mapping, self.context_lens), host):
            buf[:bs].copy_(row, non_blocking=True)
        width = max(len(t) for t in step.block_tables)
        tables = torch.tensor([t + [self.scratch_block] * (width - len(t)) for t in step.block_tables]
                              + [[self.scratch_block] * width] * pad)
        self.block_tables[:bs, :width].copy_(tables, non_blocking=True)

    def _batch(self, bs: int, lora: LoRABlocks):
        from .layers import ForwardBatch

        device = self.input_ids.device
        return ForwardBatch(
            positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs], num_prefill_tokens=0,
            prefill_query_lens=[], prefill_context_lens=[],
            prefill_block_tables=torch.zeros(0, 0, dtype=torch.int64, device=device),
            decode_block_tables=self.block_tables[:bs], decode_context_lens=self.context_lens[:bs],
            decode_max_context_len=self.block_tables.shape[1] * self.block_size, lora=lora,
        )

    def _capture(self, bs: int, with_lora: bool) -> Callable[[], None]:
        ranks = [0] * self.max_loras
        if with_lora:     # any slot: has_lora is what the capture freezes; ranks come from the buffers
            lora = self.lora_buffers[bs].fill([0] * bs, ranks)
        else:
            lora = self.model.kernels.lora_meta([-1] * bs, ranks, self.input_ids.device)
        batch = self._batch(bs, lora)

        def forward() -> None:
            self.hidden[:bs].copy_(self.model(self.input_ids[:bs], batch))

        forward()                                   # compiles the kernels, outside the capture
        if not self.capture_graphs:
            return forward
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, self.pool):
            forward()
        self.pool = graph.pool() if self.pool is None else self.pool
        return graph.replay
