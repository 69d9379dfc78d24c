"""Which sequences run in the next forward, and how many of their tokens (continuous batching).

Plain Python (no torch). Each step has a token budget: running sequences go first (a decode costs one
token, an unfinished prompt a chunk of it), then waiting sequences are admitted while the budget,
`max_num_seqs` and free KV blocks allow. When blocks run out, the youngest running sequence is preempted:
its blocks are freed and it is recomputed later from its token history (prompt + output so far).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from specserve.engine.block_manager import BlockManager
from specserve.engine.config import SchedulerConfig
from specserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: its next `num_new_tokens` uncomputed tokens, and for a decode
    that speculates, `num_draft_tokens` drafted tokens verified after them (slots are reserved for both)."""

    seq: Sequence
    num_new_tokens: int
    num_draft_tokens: int = 0

    @property
    def num_query_tokens(self) -> int:
        return self.num_new_tokens + self.num_draft_tokens

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the sequence's last token, so its logits give the next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, num_draft_tokens: dict[int, int] | None = None) -> SchedulerOutput:
        """`num_draft_tokens`: seq_id -> drafted tokens to verify after a decoding sequence's last token.
        A draft is dropped (plain decode) when the step's token budget or the free blocks cannot hold it."""
        budget = self.config.max_num_batched_tokens
        drafts = num_draft_tokens or {}
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            num_draft = drafts.get(seq.seq_id, 0) if seq.num_uncomputed_tokens == 1 else 0
            bm = self.block_manager
            if num_new + num_draft > budget or not bm.can_allocate(bm.blocks_needed(seq, num_new + num_draft)):
                num_draft = 0  # speculation never preempts anyone
            if not self._make_room(seq, num_new + num_draft, preempted):
                continue
            self.block_manager.append_slots(seq, num_new + num_draft)
            scheduled.append(ScheduledSeq(seq, num_new, num_draft))
            budget -= num_new + num_draft
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            self.block_manager.allocate_cached_prefix(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(self.block_manager.blocks_needed(seq, num_new)):
                self.block_manager.free(seq)
                break
            self.waiting.popleft()
            self.block_manager.append_slots(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return SchedulerOutput(scheduled, preempted)

    def finish(self, seq: Sequence) -> None:
        """Release a finished (or aborted) sequence's blocks and forget it."""
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _make_room(self, seq: Sequence, num_new: int, preempted: list[Sequence]) -> bool:
        """Preempt the youngest running sequences until `seq` fits; False if `seq` itself was preempted."""
        while not self.block_manager.can_allocate(self.block_manager.blocks_needed(seq, num_new)):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
