"""Block pool accounting, prefix-cache hashing and reuse, with plain sequences."""

from loraserve.block_manager import BlockManager
from loraserve.sequence import Sequence


def seq(seq_id, tokens, adapter=None):
    return Sequence(seq_id, list(tokens), params=None, adapter_key=adapter)


def run_prompt(bm: BlockManager, s: Sequence) -> None:
    """Admit and 'compute' the whole prompt, as the scheduler and engine would."""
    hits = bm.match_prefix(s)
    assert bm.can_admit(s, hits, s.num_tokens - len(hits) * bm.block_size)
    bm.admit(s, hits)
    bm.allocate(s, s.num_tokens - s.num_computed_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.register_full_blocks(s)


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = seq(1, range(10))
    run_prompt(bm, s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 7
    bm.free_seq(s)
    assert bm.num_free_blocks == 10 and s.block_table == []


def test_growth_allocates_only_when_a_block_fills():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = seq(1, range(4))
    run_prompt(bm, s)
    assert bm.blocks_needed(s, 1) == 1
    s.output_token_ids.append(99)
    bm.allocate(s, 1)
    s.num_computed_tokens += 1
    assert bm.blocks_needed(s, 1) == 0


def test_same_prompt_same_adapter_hits_cache():
    bm = BlockManager(num_blocks=20, block_size=4)
    a = seq(1, range(13), adapter="x")
    run_prompt(bm, a)
    b = seq(2, range(13), adapter="x")
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:3]          # 3 full blocks; the last token is recomputed
    bm.admit(b, hits)
    assert b.num_computed_tokens == 12 and bm.num_cache_hits == 3
    assert all(bm.blocks[i].ref_count == 2 for i in hits)


def test_same_prompt_other_adapter_never_shares_kv():
    bm = BlockManager(num_blocks=20, block_size=4)
    run_prompt(bm, seq(1, range(13), adapter="x"))
    assert bm.match_prefix(seq(2, range(13), adapter="y")) == []
    assert bm.match_prefix(seq(3, range(13), adapter=None)) == []


def test_prefix_survives_free_until_its_block_is_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(1, range(9))
    run_prompt(bm, a)
    bm.free_seq(a)
    assert len(bm.match_prefix(seq(2, range(9)))) == 2    # freed but still cached
    run_prompt(bm, seq(3, range(100, 116)))                 # needs all 4 blocks: overwrites
    assert bm.match_prefix(seq(4, range(9))) == []


def test_cached_free_block_is_reclaimed_on_hit():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = seq(1, range(9))
    run_prompt(bm, a)
    bm.free_seq(a)
    b = seq(2, range(9))
    free_before = bm.num_free_blocks
    run_prompt(bm, b)
    assert bm.num_free_blocks == free_before - 3            # 2 reclaimed from the cache + 1 new


def test_can_admit_counts_blocks_taken_back_from_the_free_list():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq(1, range(9))
    run_prompt(bm, a)
    bm.free_seq(a)
    b = seq(2, range(9))
    hits = bm.match_prefix(b)
    assert bm.can_admit(b, hits, 1)
    assert not bm.can_admit(seq(3, range(50, 70)), [], 20)


def test_prefix_caching_off_never_matches():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    run_prompt(bm, seq(1, range(9)))
    assert bm.match_prefix(seq(2, range(9))) == []
