"""Turn one target forward's logits into each sequence's new tokens: the part of a step that the
in-process engine (engine/llm_engine.py) and the verifier service (verifier/core.py) share.

Plain rows (a decode, or a prefill chunk that reaches the last token) are sampled together; a draft
tree's rows go through the request's acceptance rule and the accepted path's K/V are moved into place.
Every scheduled sequence's computed-token count advances; the caller appends the returned tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from specserve.engine.acceptance import LossyConfig
from specserve.engine.draft_tree import DraftTree
from specserve.engine.logprobs import TokenLogprob
from specserve.engine.model_runner import ModelRunner
from specserve.engine.sampler import Sampler, adjust_logits, seed_for_position, token_logprobs
from specserve.engine.scheduler import ScheduledSeq
from specserve.engine.sequence import Sequence
from specserve.engine.verify import accept, kv_moves


class DecodeState(Protocol):
    """Per-request state the acceptance rules read and spend."""

    generator: torch.Generator | None
    lossy: LossyConfig | None
    lossy_budget_left: float

    @property
    def output_token_ids(self) -> list[int]:
        """The tokens generated so far (what presence and frequency penalties count)."""


@dataclass
class StepTokens:
    """One sequence's new tokens from a forward: accepted drafts, then the target's next token."""

    token_ids: list[int]
    num_accepted: int
    tree: DraftTree | None
    lossy_spent: float = 0.0  # nats of the lossy budget this step's acceptance used
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asks for them


def step_tokens(
    scheduled: list[ScheduledSeq],
    trees: list[DraftTree | None],
    logits: torch.Tensor,  # [num_rows, vocab], as ModelRunner.execute returns them
    states: Mapping[int, DecodeState],  # by seq_id
    runner: ModelRunner,
    sampler: Sampler,
) -> dict[int, StepTokens]:
    """New tokens of every sequence that produced some (by seq_id), advancing each one's computed tokens."""
    plain: list[tuple[Sequence, int]] = []  # (sequence, its logits row)
    out: dict[int, StepTokens] = {}
    row = 0
    for s, tree in zip(scheduled, trees):
        seq = s.seq
        if tree is None:
            if s.samples:
                plain.append((seq, row))
                row += 1
            seq.num_computed_tokens += s.num_new_tokens
            continue
        state = states[seq.seq_id]
        seed_for_position(state.generator, seq.params, seq.num_tokens)
        rows = logits[row : row + 1 + tree.num_nodes]
        if seq.params.adjusts_logits:  # row 1 + i continues the sequence with node i's path
            paths = [[]] + [[tree.tokens[n] for n in tree.path_to(i)] for i in range(tree.num_nodes)]
            rows = adjust_logits(rows, seq.params, seq.all_token_ids, state.output_token_ids, paths)
        result = accept(tree, rows, seq.params, state.generator, state.lossy, state.lossy_budget_left)
        state.lossy_budget_left -= result.divergence
        runner.move_kv(seq.block_table, kv_moves(result.accepted_nodes, seq.num_computed_tokens))
        seq.num_computed_tokens += 1 + len(result.accepted_nodes)
        accepted = [tree.tokens[i] for i in result.accepted_nodes]
        tokens = accepted + [result.next_token]
        logprobs = None
        if seq.params.logprobs is not None:
            # Each token comes from its parent's row: the root's, then its accepted nodes'.
            parent_rows = [row] + [row + 1 + i for i in result.accepted_nodes]
            logprobs = token_logprobs(logits[parent_rows], tokens, seq.params.logprobs)
        row += 1 + tree.num_nodes
        out[seq.seq_id] = StepTokens(tokens, len(accepted), tree, result.divergence, logprobs)
    if plain:
        for seq, _ in plain:
            seed_for_position(states[seq.seq_id].generator, seq.params, seq.num_tokens)
        rows = logits[[r for _, r in plain]]
        for i, (seq, _) in enumerate(plain):
            if seq.params.adjusts_logits:
                rows[i : i + 1] = adjust_logits(rows[i : i + 1], seq.params, seq.all_token_ids,
                                                  states[seq.seq_id].output_token_ids)
        tokens = sampler.sample(rows, [seq.params for seq, _ in plain],
                                [states[seq.seq_id].generator for seq, _ in plain]).tolist()
        for (seq, row), token in zip(plain, tokens):
            logprobs = None
            if seq.params.logprobs is not None:
                logprobs = token_logprobs(logits[row : row + 1], [token], seq.params.logprobs)
            out[seq.seq_id] = StepTokens([token], 0, None, logprobs=logprobs)
    return out
