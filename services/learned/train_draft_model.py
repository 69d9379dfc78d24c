"""Training the distilled draft model (learned/draft_model.py) on a self-distillation corpus
(learned/distill_data.py).

A sequence t_0 .. t_{T-1} with prompt length P runs through the draft model teacher-forced (causal, one
padded batch of sequences); its feature at row i gives q_i, the draft distribution of t_{i+1}. The loss is
taken where it drafts at serving time, rows i = P-1 .. T-2 (the last prompt token predicts the first
response token, the root of the first draft):
  hard:  CE(q_i, t_{i+1})   (a token outside the draft vocabulary is ignored: it is never drafted)
  soft:  KL(p_i || q_i), p_i = softmax(lm_rows h_i), the target's own distribution of t_{i+1} restricted to
         the draft vocabulary, from the cached final-norm hidden state h_i (no target forward)
  on-policy (DistillSpec): soft, but in the second half of training every ON_POLICY_EVERY-th step the
         batch's responses are not the target's but the draft model's own, sampled at temperature 1 by its
         current weights (as long as the corpus response at most), and h_i comes from a target prefill of
         each new sequence. The drafter learns the target's distribution on the text it drafts itself, not
         only on the target's. The first half (the corpus only) makes that text worth scoring: from the
         copied layers, on-policy steps from the start cost held-out accuracy (measured in
         docs/benchmarks.md); the corpus steps after it keep the model anchored.
Everything else (AdamW, schedule, resumable state) is learned/fit.py's. A step costs a forward and
backward of the draft model's L layers over the batch plus the draft-vocabulary LM-head products at the
loss rows: L / num_layers of the target's layer work, no target layer at all. An on-policy step adds the
draft model's token-by-token sampling and a target prefill of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from specserve.engine.model import LlamaModel
from specserve.errors import InvalidRequestError
from specserve.learned import fit
from specserve.learned.distill_data import DistillCorpus, concat_corpora, final_hidden_states, one_sequence
from specserve.learned.draft_model import DraftModel
from specserve.learned.fit import TrainConfig, draft_index_of

LOSSES = ("hard", "soft", "on-policy")
ON_POLICY_EVERY = 2  # on-policy: every other step of the second half trains on the draft model's own responses
ON_POLICY_FROM = 0.5  # of the training steps: before it, the corpus only


@dataclass
class TokenBatch:
    """Sequences padded at the end to the longest (causal attention never lets a real row see a pad)."""

    token_ids: torch.Tensor  # [batch, max_len] int64, 0 past a sequence's end
    hidden: torch.Tensor  # [num_loss_rows, hidden] float32 the target's h_i at each loss row, in mask order
    next_draft_ids: torch.Tensor  # [num_loss_rows] int64 draft id of t_{i+1}; -1 outside the draft vocabulary
    loss_mask: torch.Tensor  # [batch, max_len] bool: row i is in P-1 .. T-2

    def to(self, device: str) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in self.__dict__.values()))


def make_batch(corpus: DistillCorpus, indices: list[int], draft_index: torch.Tensor) -> TokenBatch:
    """The sequences `indices`; `draft_index` `# [vocab]` maps a target id to its draft id or -1.

    Example: prompt [5, 6], response [8, 2] (T 4, P 2): loss rows i = 1, 2, predicting 8 and 2.
    """
    max_len = max(int(corpus.lengths[k]) for k in indices)
    token_ids = torch.zeros(len(indices), max_len, dtype=torch.int64)
    loss_mask = torch.zeros(len(indices), max_len, dtype=torch.bool)
    hidden, next_ids = [], []
    for row, k in enumerate(indices):
        ids, seq_hidden, prompt_len = corpus.sequence(k)
        token_ids[row, : len(ids)] = ids
        first = max(prompt_len - 1, 0)
        loss_mask[row, first : len(ids) - 1] = True
        hidden.append(seq_hidden[first:-1].float())
        next_ids.append(draft_index[ids[first + 1 :]])
    return TokenBatch(token_ids, torch.cat(hidden), torch.cat(next_ids), loss_mask)


def on_policy_batch(model: DraftModel, target: LlamaModel, corpus: DistillCorpus, indices: list[int],
                    draft_index: torch.Tensor, stop_ids: tuple[int, ...], generator: torch.Generator) -> TokenBatch:
    """The prompts of sequences `indices`, each answered by the draft model itself (no longer than the
    corpus's response), with the target's hidden states over prompt + that response."""
    parts = []
    for k in indices:
        ids, _, prompt_len = corpus.sequence(k)
        prompt = ids[:prompt_len].tolist()
        token_ids = prompt + model.sample(prompt, len(ids) - prompt_len, stop_ids, generator)
        parts.append(one_sequence(torch.tensor(token_ids), final_hidden_states(target, token_ids), prompt_len))
    return make_batch(concat_corpora(parts), list(range(len(parts))), draft_index)


def batch_loss(model: DraftModel, batch: TokenBatch, loss: str) -> torch.Tensor:
    logits = model.draft_logits(model(batch.token_ids)[batch.loss_mask])  # [num_loss_rows, draft_vocab]
    if loss == "hard":
        labels = batch.next_draft_ids
        return F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / labels.ge(0).sum().clamp(min=1)
    with torch.no_grad():
        teacher = F.log_softmax(model.draft_logits(batch.hidden), dim=-1)
    return F.kl_div(F.log_softmax(logits, dim=-1), teacher, log_target=True, reduction="batchmean")


def train_model(model: DraftModel, corpus: DistillCorpus, config: TrainConfig, state_path: Path,
                recipe: dict[str, Any], state: dict[str, Any] | None = None, target: LlamaModel | None = None,
                stop_ids: tuple[int, ...] = ()) -> list[float]:
    """Train `model` in place (from `state` when resuming). Returns the loss of every step. On-policy needs
    the float32 `target` (it scores the draft model's responses) and the ids that end a response."""
    if config.loss not in LOSSES:
        raise InvalidRequestError(f"the draft model trains with a loss of {', '.join(LOSSES)}, not {config.loss!r}")
    assert config.loss != "on-policy" or target is not None, "on-policy distillation needs the target"
    draft_index = draft_index_of(model.token_map, model.config.vocab_size)
    step = len(state["losses"]) if state is not None else 0
    first_on_policy = ON_POLICY_FROM * config.epochs * -(-corpus.num_sequences // config.batch_size)

    def step_loss(indices: list[int]) -> torch.Tensor:
        nonlocal step
        step += 1
        if config.loss == "on-policy" and step > first_on_policy and step % ON_POLICY_EVERY == 0:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # same draws on resume
            batch = on_policy_batch(model, target, corpus, indices, draft_index, stop_ids, generator)
        else:
            batch = make_batch(corpus, indices, draft_index)
        return batch_loss(model, batch.to(config.device), "hard" if config.loss == "hard" else "soft")

    return fit.fit(model, corpus.lengths, config, state_path, recipe, state, step_loss)


@torch.no_grad()
def heldout_accuracy(model: DraftModel, corpus: DistillCorpus, batch_size: int, device: str) -> tuple[float, float]:
    """Step 1: top-1 agreement of the draft argmax with the target's next token over the loss rows. Step 2:
    the same at row i + 1 among the rows whose row i agreed (a greedy chain's second token is drafted only
    after its first was right, and then sees the same history as here). A token outside the draft
    vocabulary counts as a miss."""
    model.to(device).eval()
    draft_index = draft_index_of(model.token_map, model.config.vocab_size)
    first_right = first_total = second_right = second_total = 0
    for start in range(0, corpus.num_sequences, batch_size):
        indices = list(range(start, min(start + batch_size, corpus.num_sequences)))
        batch = make_batch(corpus, indices, draft_index).to(device)
        right = model.draft_logits(model(batch.token_ids)[batch.loss_mask]).argmax(-1) == batch.next_draft_ids
        # Consecutive loss rows of one sequence: row r and r + 1 of the flat order, both masked.
        masked_right = torch.zeros_like(batch.loss_mask)
        masked_right[batch.loss_mask] = right
        after_right = batch.loss_mask[:, 1:] & masked_right[:, :-1]  # [batch, max_len - 1] row i+1 after a right i
        first_right += int(right.sum())
        first_total += len(right)
        second_right += int((after_right & masked_right[:, 1:]).sum())
        second_total += int(after_right.sum())
    return first_right / max(first_total, 1), second_right / max(second_total, 1)
