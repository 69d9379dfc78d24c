"""Block manager: free list, reference counts, prefix sharing by chained hashes."""

from specserve.engine.block_manager import BlockManager
from specserve.engine.config import SamplingParams
from specserve.engine.sequence import Sequence


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence(tokens, SamplingParams(max_tokens=8), max_total_tokens=1024)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What a forward over every uncomputed token does to the bookkeeping."""
    bm.append_slots(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def test_append_slots_takes_blocks_by_need():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(9)))
    bm.append_slots(seq, 9)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    seq.num_computed_tokens = 9
    bm.append_slots(seq, 3)  # 12 slots fit in 3 blocks
    assert len(seq.block_table) == 3
    bm.append_slots(seq, 4)
    assert len(seq.block_table) == 4


def test_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    compute_all(bm, seq)
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_shared_prefix_is_reused_by_reference():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(10)))
    compute_all(bm, a)
    b = make_seq(list(range(8)) + [99, 98, 97])
    bm.allocate_cached_prefix(b)
    assert b.block_table == a.block_table[:2]
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_prefix_match_stops_at_first_difference():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute_all(bm, a)
    b = make_seq([1, 2, 3, 0, 5, 6, 7, 8, 9])
    bm.allocate_cached_prefix(b)
    assert b.block_table == [] and b.num_computed_tokens == 0


def test_whole_prompt_cached_still_leaves_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(8)))
    compute_all(bm, a)
    b = make_seq(list(range(8)))
    bm.allocate_cached_prefix(b)
    assert b.num_computed_tokens == 4 and b.num_uncomputed_tokens == 4


def test_freed_block_is_revived_from_cache():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(list(range(9)))
    compute_all(bm, a)
    first_blocks = a.block_table[:2]
    bm.free(a)
    b = make_seq(list(range(9)))
    bm.allocate_cached_prefix(b)
    assert b.block_table == first_blocks
    assert bm.num_free_blocks == 2


def test_reused_block_forgets_old_hash():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = make_seq(list(range(5)))
    compute_all(bm, a)
    bm.free(a)
    other = make_seq([50] * 8)  # takes both blocks, overwriting a's cached prefix
    compute_all(bm, other)
    bm.free(other)
    b = make_seq(list(range(5)))
    bm.allocate_cached_prefix(b)
    assert b.block_table == []


def test_partial_blocks_are_not_hashed():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(list(range(6)))
    compute_all(bm, a)
    assert bm.blocks[a.block_table[0]].block_hash is not None
    assert bm.blocks[a.block_table[1]].block_hash is None
