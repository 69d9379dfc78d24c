"""The verifier's state and its one operation, `step`: a ragged forward over many sequences' prefill
chunks and draft trees, then each sequence's acceptance rule.

The verifier keeps, per sequence, a mirror of the token history it was sent or emitted (an engine
`Sequence` with its block table), the sampler's generator and the lossy budget. It decides nothing about
stopping: the router appends the returned tokens, applies stops and max_tokens, and releases finished
sequences. Capacity is never taken from one sequence to give to another: an item that does not fit is
answered NO_CAPACITY and the router decides whom to release.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

import torch

from specserve.engine.acceptance import LossyConfig
from specserve.engine.block_manager import BlockManager
from specserve.engine.config import CacheConfig, SamplingParams
from specserve.engine.draft_tree import DraftTree
from specserve.engine.logprobs import TokenLogprob
from specserve.engine.model import LlamaModel
from specserve.engine.model_runner import ModelRunner
from specserve.engine.sampler import Sampler, request_generator
from specserve.engine.scheduler import ScheduledSeq
from specserve.engine.sequence import Sequence, check_logit_bias
from specserve.engine.step_outcome import step_tokens
from specserve.errors import InvalidRequestError


class ItemStatus(enum.IntEnum):
    """Values of specserve.v1.ItemStatus."""

    OK = 0
    UNKNOWN_SEQUENCE = 1
    NO_CAPACITY = 2


@dataclass
class VerifyWork:
    """One sequence's share of a step (a VerifyItem)."""

    seq_id: int
    new_token_ids: list[int] = field(default_factory=list)
    params: SamplingParams | None = None  # required on a sequence's first item
    max_compute_tokens: int = 0  # 0 = all uncomputed tokens
    tree: DraftTree | None = None
    lossy: LossyConfig | None = None
    position: int = 0  # tokens the router believes this verifier holds
    num_prompt_tokens: int = 0  # first item: how many of new_token_ids are the prompt (0 = all)


@dataclass
class VerifyOutcome:
    seq_id: int
    status: ItemStatus
    token_ids: list[int] = field(default_factory=list)
    num_accepted: int = 0
    hidden_states: torch.Tensor | None = None  # [rows, hidden] of the tokens computed and kept this step
    num_computed_tokens: int = 0
    lossy_spent: float = 0.0
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when the sequence's sampling asks


@dataclass
class _SeqState:
    seq: Sequence  # its prompt_token_ids hold the whole history
    generator: torch.Generator | None
    lossy: LossyConfig | None
    lossy_budget_left: float
    num_prompt_tokens: int  # of the history: the rest was generated

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.prompt_token_ids[self.num_prompt_tokens:]


class VerifierCore:
    """Thread-safe: one step at a time (several routers may call)."""

    def __init__(self, model: LlamaModel, cache: CacheConfig, keep_hidden: bool = False,
                 batch_invariant: bool = False, attention_backend: str = "auto") -> None:
        self.model = model
        self.cache = cache
        self.block_manager = BlockManager(cache.num_blocks, cache.block_size)
        self.runner = ModelRunner(model, cache, batch_invariant=batch_invariant,
                                  attention_backend=attention_backend, keep_hidden=keep_hidden)
        self.sampler = Sampler()
        self.max_total_tokens = min(model.config.max_position_embeddings, cache.num_blocks * cache.block_size)
        self.seqs: dict[int, _SeqState] = {}
        self._lock = threading.Lock()

    @property
    def keeps_hidden(self) -> bool:
        return self.runner.hidden_cache is not None

    def release(self, seq_ids: list[int]) -> None:
        with self._lock:
            for seq_id in seq_ids:
                self._forget(seq_id)

    def occupancy(self) -> tuple[int, int]:
        """(free blocks, sequences held)."""
        with self._lock:
            return self.block_manager.num_free_blocks, len(self.seqs)

    def step(self, work: list[VerifyWork], return_hidden: bool = False) -> list[VerifyOutcome]:
        """Outcomes in the order of `work`. Malformed work raises InvalidRequestError before any state
        changes; one sequence's failure to fit never touches another's state."""
        self._check(work)
        with self._lock:
            outcomes = {w.seq_id: VerifyOutcome(w.seq_id, ItemStatus.OK) for w in work}
            scheduled: list[ScheduledSeq] = []
            trees: list[DraftTree | None] = []
            # Where each sequence's returned hidden rows start: 0 for a sequence new to this step, so rows
            # of a prefix taken from the cache are returned too (the hidden cache follows the KV slots).
            hidden_from: dict[int, int] = {}
            for w in work:
                state = self._admit(w, outcomes[w.seq_id])
                if state is None:
                    continue
                planned = self._plan(state.seq, w)
                if planned is None:
                    outcomes[w.seq_id].status = ItemStatus.NO_CAPACITY
                    if w.position == 0:  # a sequence new to this step is not kept
                        self._forget(w.seq_id)
                    else:
                        del state.seq.prompt_token_ids[len(state.seq.prompt_token_ids) - len(w.new_token_ids):]
                    continue
                scheduled.append(planned[0])
                trees.append(planned[1])
                hidden_from[w.seq_id] = 0 if w.position == 0 else state.seq.num_computed_tokens
            if scheduled:
                self._run(scheduled, trees, outcomes, hidden_from if return_hidden and self.keeps_hidden else None)
            return [outcomes[w.seq_id] for w in work]

    # ---- internals -------------------------------------------------------------------------------

    def _check(self, work: list[VerifyWork]) -> None:
        vocab = self.model.config.vocab_size
        seen: set[int] = set()
        for w in work:
            if w.seq_id in seen:
                raise InvalidRequestError(f"sequence {w.seq_id} appears twice in one step")
            seen.add(w.seq_id)
            if w.new_token_ids and (min(w.new_token_ids) < 0 or max(w.new_token_ids) >= vocab):
                raise InvalidRequestError(f"sequence {w.seq_id}: token ids must lie in [0, {vocab})")
            if w.tree is not None and w.tree.tokens and (min(w.tree.tokens) < 0 or max(w.tree.tokens) >= vocab):
                raise InvalidRequestError(f"sequence {w.seq_id}: draft token ids must lie in [0, {vocab})")
            if w.max_compute_tokens < 0 or w.position < 0:
                raise InvalidRequestError(f"sequence {w.seq_id}: max_compute_tokens and position must be >= 0")
            if not 0 <= w.num_prompt_tokens <= len(w.new_token_ids):
                raise InvalidRequestError(f"sequence {w.seq_id}: num_prompt_tokens must lie in [0, new tokens]")
            if w.position == 0 and (not w.new_token_ids or w.params is None):
                raise InvalidRequestError(f"sequence {w.seq_id}: a first item needs new_token_ids and sampling")
            if w.params is not None:
                check_logit_bias(w.params, vocab)
            if w.position + len(w.new_token_ids) >= self.max_total_tokens:
                raise InvalidRequestError(
                    f"sequence {w.seq_id} would hold {w.position + len(w.new_token_ids)} tokens; the context "
                    f"holds {self.max_total_tokens} including at least one generated token")

    def _admit(self, w: VerifyWork, outcome: VerifyOutcome) -> _SeqState | None:
        """The sequence's state with `w.new_token_ids` appended, or None (UNKNOWN_SEQUENCE set)."""
        state = self.seqs.get(w.seq_id)
        if w.position == 0:
            if state is not None:  # the router restarted the sequence (for example after a preemption)
                self._forget(w.seq_id)
            assert w.params is not None
            seq = Sequence(w.new_token_ids, w.params, self.max_total_tokens)
            seq.seq_id = w.seq_id
            self.block_manager.allocate_cached_prefix(seq)
            state = _SeqState(seq, request_generator(w.params), w.lossy, w.lossy.budget if w.lossy is not None else 0.0,
                              w.num_prompt_tokens or len(w.new_token_ids))
            self.seqs[w.seq_id] = state
            return state
        if state is None or state.seq.num_tokens != w.position:
            if state is not None:
                self._forget(w.seq_id)
            outcome.status = ItemStatus.UNKNOWN_SEQUENCE
            return None
        # The mirror's history is one list: the verifier has no use for the prompt/output split.
        state.seq.prompt_token_ids.extend(w.new_token_ids)
        return state

    def _plan(self, seq: Sequence, w: VerifyWork) -> tuple[ScheduledSeq, DraftTree | None] | None:
        """Reserve slots for the step's chunk (and tree, if it fits); None when even the chunk does not."""
        num_new = seq.num_uncomputed_tokens
        if w.max_compute_tokens:
            num_new = min(num_new, w.max_compute_tokens)
        tree = w.tree if w.tree is not None and w.tree.num_nodes else None
        if tree is not None and (seq.num_uncomputed_tokens != 1 or
                                 seq.num_tokens + tree.num_nodes > self.max_total_tokens):
            tree = None
        bm = self.block_manager
        if tree is not None and not bm.can_allocate(bm.blocks_needed(seq, num_new + tree.num_nodes)):
            tree = None  # speculation never takes capacity a plain step would need
        num_draft = tree.num_nodes if tree is not None else 0
        if not bm.can_allocate(bm.blocks_needed(seq, num_new + num_draft)):
            return None
        bm.append_slots(seq, num_new + num_draft)
        return ScheduledSeq(seq, num_new, num_draft), tree

    def _run(self, scheduled: list[ScheduledSeq], trees: list[DraftTree | None],
             outcomes: dict[int, VerifyOutcome], hidden_from: dict[int, int] | None) -> None:
        logits = self.runner.execute(scheduled, trees)
        emitted = step_tokens(scheduled, trees, logits, self.seqs, self.runner, self.sampler)
        for s in scheduled:
            seq, outcome = s.seq, outcomes[s.seq.seq_id]
            out = emitted.get(seq.seq_id)
            if out is not None:
                seq.prompt_token_ids.extend(out.token_ids)
                outcome.token_ids, outcome.num_accepted = out.token_ids, out.num_accepted
                outcome.lossy_spent = out.lossy_spent
                outcome.logprobs = out.logprobs
            self.block_manager.commit(seq)
            outcome.num_computed_tokens = seq.num_computed_tokens
            if hidden_from is not None:
                rows = self.runner.hidden_states(seq.block_table, seq.num_computed_tokens)
                outcome.hidden_states = rows[hidden_from[seq.seq_id]:]

    def _forget(self, seq_id: int) -> None:
        state = self.seqs.pop(seq_id, None)
        if state is not None:
            self.block_manager.free(state.seq)
