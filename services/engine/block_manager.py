"""Which KV-cache blocks each sequence owns: a free list, reference counts and prefix hashing.

Plain Python (no torch). A block holds `block_size` token slots in every layer. Full blocks are keyed by
a chained hash of (parent block hash, token ids), so a new sequence whose prompt starts with the same
tokens shares those blocks by reference count instead of recomputing them (automatic prefix caching).
A freed block keeps its hash until it is handed out again, so a later request can still revive it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from specserve.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    # Set once the block is full of committed tokens; None for a partial or unhashed block.
    block_hash: int | None = None
    token_ids: tuple[int, ...] = field(default=())


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block given its predecessor's hash: equal hashes mean equal prefixes (checked)."""
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order = least recently freed first, so cached prefixes survive as long as possible.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks `seq` needs so that its first `num_computed + num_new_tokens` slots exist."""
        return max(0, self.num_blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate_cached_prefix(self, seq: Sequence) -> None:
        """Attach the longest cached prefix of `seq`'s tokens; at least one token is left to compute."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        tokens = seq.all_token_ids
        # The last token must run through the model to produce logits, so never match all of them.
        max_blocks = (len(tokens) - 1) // self.block_size
        parent: int | None = None
        for i in range(max_blocks):
            block_tokens = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            block_hash = chain_hash(parent, block_tokens)
            block_id = self.hash_to_block_id.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != block_tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            parent = block_hash
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_new_tokens` more tokens. Caller checked capacity."""
        needed = self.blocks_needed(seq, num_new_tokens)
        assert needed <= self.num_free_blocks, "append_slots without capacity"
        for _ in range(needed):
            block_id, _ = self.free_block_ids.popitem(last=False)
            self._forget_hash(self.blocks[block_id])
            self._take(block_id)
            seq.block_table.append(block_id)

    def commit(self, seq: Sequence) -> None:
        """Hash the blocks that `seq`'s computed tokens have filled, so other sequences can reuse them."""
        num_full = seq.num_computed_tokens // self.block_size
        first_unhashed = num_full
        for i in range(num_full):
            if self.blocks[seq.block_table[i]].block_hash is None:
                first_unhashed = i
                break
        for i in range(first_unhashed, num_full):
            block = self.blocks[seq.block_table[i]]
            parent = self.blocks[seq.block_table[i - 1]].block_hash if i > 0 else None
            block.token_ids = tuple(seq.token_ids_slice(i * self.block_size, (i + 1) * self.block_size))
            block.block_hash = chain_hash(parent, block.token_ids)
            self.hash_to_block_id[block.block_hash] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody holds go back on the free list (hash kept)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.free_block_ids.pop(block_id, None)
        block.ref_count += 1

    def _forget_hash(self, block: Block) -> None:
        if block.block_hash is not None and self.hash_to_block_id.get(block.block_hash) == block.block_id:
            del self.hash_to_block_id[block.block_hash]
        block.block_hash = None
        block.token_ids = ()
