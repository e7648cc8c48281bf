"""The KV block pool: which block holds which tokens, shared through reference counts.

Plain integers and dicts only, so it is tested without a model. A full block's hash
chains its parent's hash, the adapter's identity and its tokens: the same prompt under
two adapters never shares KV (LoRA on k_proj/v_proj changes K and V), and a new
version of an adapter gets a new identity.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .sequence import Sequence


def block_hash(parent: int | None, adapter_key: str | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, adapter_key, tokens))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None            # set once the block is full and registered


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    blocks: list[Block] = field(init=False)
    free: OrderedDict = field(init=False)          # block_id -> None, least recently freed first
    cached: dict[int, int] = field(init=False)     # hash -> block_id, for full blocks
    seq_hashes: dict[int, list[int]] = field(init=False)  # seq_id -> hashes of its full blocks
    num_cache_queries: int = 0                     # full prompt blocks of admitted requests
    num_cache_hits: int = 0                        # of those, found in the cache

    def __post_init__(self):
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self.free = OrderedDict((i, None) for i in range(self.num_blocks))
        self.cached = {}
        self.seq_hashes = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    # -- admission: reuse a cached prefix --------------------------------------------
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for the sequence's leading full blocks; the last token is always
        left to compute, because its logits are needed."""
        if not self.enable_prefix_caching or seq.num_computed_tokens:
            return []
        tokens = seq.token_ids()
        hits, parent = [], None
        for start in range(0, len(tokens) - 1 - self.block_size + 1, self.block_size):
            h = block_hash(parent, seq.adapter_key, tuple(tokens[start : start + self.block_size]))
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
            parent = h
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        total = len(hits) * self.block_size + num_new_tokens
        needed = -(-total // self.block_size) - len(hits)
        return needed <= self.num_free_blocks - reclaimed

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Take the cached prefix blocks (a free one is taken back from the free list)."""
        if self.enable_prefix_caching:
            self.num_cache_queries += (seq.num_tokens - 1) // self.block_size
            self.num_cache_hits += len(hits)
        hashes = []
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            hashes.append(block.hash)
        self.seq_hashes[seq.seq_id] = hashes
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size

    # -- growth ------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give the sequence blocks for its next num_new_tokens tokens."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take_free())

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]                # its old content is overwritten now
        block.hash = None
        block.ref_count = 1
        return block_id

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: hash the blocks that became full so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        hashes = self.seq_hashes.setdefault(seq.seq_id, [])
        tokens = seq.token_ids()
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else None
            h = block_hash(parent, seq.adapter_key, tuple(tokens[i * self.block_size : (i + 1) * self.block_size]))
            block = self.blocks[seq.block_table[i]]
            hashes.append(h)
            if block.hash is None:
                block.hash = h
                self.cached.setdefault(h, block.block_id)

    # -- release -------------------------------------------------------------------------
    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's blocks; full ones stay findable until their block is reused.
        Released in reverse so a prompt's tail is evicted before its head."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        self.seq_hashes.pop(seq.seq_id, None)
