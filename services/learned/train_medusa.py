"""Training Medusa heads (learned/medusa_heads.py) on a self-distillation corpus (learned/distill_data.py).

A sequence t_0 .. t_{T-1} with prompt length P gives one **row** per drafting position i = P-1 .. T-2:
the target's hidden state h_i (the one that predicted t_{i+1}, the root when drafting from it). Head k of
row i is trained towards t_{i+1+k}, where that token exists:
  hard:  CE(q_k(h_i), t_{i+1+k})   (a token outside the draft vocabulary is ignored: it is never drafted)
  soft:  KL(p_{i+k} || q_k(h_i)), p_{i+k} = softmax(lm_rows h_{i+k}), the target's own distribution of that
         token given the true prefix, restricted to the draft vocabulary, from the cached h (no forward)
Heads are weighted HEAD_DECAY^(k-1), as in Medusa (later heads are harder and matter less: a draft token
is only accepted after every token before it). Everything else (AdamW, schedule, resumable state) is
learned/fit.py's. The corpus holds no target forward beyond its cached final-norm hidden states, so a
step costs the heads plus the draft-vocabulary LM-head products: no attention, no layer of the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from specserve.errors import InvalidRequestError
from specserve.learned import fit
from specserve.learned.distill_data import DistillCorpus
from specserve.learned.fit import TrainConfig, draft_index_of
from specserve.learned.medusa_heads import MedusaHeads

LOSSES = ("hard", "soft")
HEAD_DECAY = 0.8  # Medusa's per-head loss weight lambda_k = 0.8^(k-1)


@dataclass
class RowBatch:
    """The drafting rows of some sequences, with every hidden row of those sequences for the soft labels."""

    hidden: torch.Tensor  # [num_tokens, hidden] float32, the sequences back to back
    rows: torch.Tensor  # [num_rows] int64 index into `hidden` of each drafting row i
    labels: torch.Tensor  # [num_rows, K] int64 draft id of t_{i+1+k}; -1 outside the vocab or past the end
    valid: torch.Tensor  # [num_rows, K] bool: t_{i+1+k} exists

    def to(self, device: str) -> RowBatch:
        return RowBatch(*(t.to(device) for t in self.__dict__.values()))


def make_rows(corpus: DistillCorpus, indices: list[int], draft_index: torch.Tensor, num_heads: int) -> RowBatch:
    """Rows of the sequences `indices`; `draft_index` `# [vocab]` maps a target id to its draft id or -1.

    Example: prompt [5, 6], response [8, 2, 4] (T 5, P 2), 2 heads: rows i = 1, 2, 3; head 1 of row 1 is
    t_3 = 2, head 2 of row 1 is t_4 = 4; row 2 has head 1 (t_4) only; row 3 has none (t_5 does not exist).
    """
    hidden, rows, labels, valid = [], [], [], []
    start = 0
    for k in indices:
        token_ids, seq_hidden, prompt_len = corpus.sequence(k)
        length = len(token_ids)
        positions = torch.arange(max(prompt_len - 1, 0), length - 1)  # [rows of this sequence] i
        ahead = positions[:, None] + 1 + torch.arange(1, num_heads + 1)  # [rows, K] i + 1 + k
        ok = ahead < length
        labels.append(torch.where(ok, draft_index[token_ids[ahead.clamp(max=length - 1)]], -1))
        valid.append(ok)
        rows.append(start + positions)
        hidden.append(seq_hidden.float())
        start += length
    return RowBatch(torch.cat(hidden), torch.cat(rows), torch.cat(labels), torch.cat(valid))


def batch_loss(heads: MedusaHeads, batch: RowBatch, loss: str) -> torch.Tensor:
    """Sum over heads of HEAD_DECAY^(k-1) * (CE or KL) over the rows where head k has a token."""
    features = heads(batch.hidden[batch.rows])  # [num_rows, K, hidden]
    teacher = None
    if loss == "soft":
        with torch.no_grad():
            teacher = F.log_softmax(heads.draft_logits(batch.hidden), dim=-1)  # [num_tokens, draft_vocab]
    total = features.new_zeros(())
    for k in range(heads.config.num_heads):
        valid = batch.valid[:, k]
        if not valid.any():
            continue
        logits = heads.draft_logits(features[valid, k])  # [num_valid, draft_vocab]
        if teacher is None:
            labels = batch.labels[valid, k]
            term = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / labels.ge(0).sum().clamp(min=1)
        else:  # head m = k + 1 of row i learns p at row i + m (the distribution of t_{i+1+m})
            term = F.kl_div(F.log_softmax(logits, dim=-1), teacher[batch.rows[valid] + k + 1],
                            log_target=True, reduction="batchmean")
        total = total + HEAD_DECAY**k * term
    return total


def train_heads(heads: MedusaHeads, corpus: DistillCorpus, config: TrainConfig, state_path: Path,
                recipe: dict[str, Any], state: dict[str, Any] | None = None) -> list[float]:
    """Train `heads` in place (from `state` when resuming). Returns the loss of every step."""
    if config.loss not in LOSSES:
        raise InvalidRequestError(f"medusa heads train with a loss of {', '.join(LOSSES)}, not {config.loss!r}")
    draft_index = draft_index_of(heads.token_map, heads.config.vocab_size)

    def step_loss(indices: list[int]) -> torch.Tensor:
        batch = make_rows(corpus, indices, draft_index, heads.config.num_heads).to(config.device)
        return batch_loss(heads, batch, config.loss)

    return fit.fit(heads, corpus.lengths, config, state_path, recipe, state, step_loss)


@torch.no_grad()
def heldout_accuracy(heads: MedusaHeads, corpus: DistillCorpus, batch_size: int, device: str) -> list[float]:
    """Per head, top-1 agreement of its argmax with the target's token k past the root, over the rows where
    that token exists; one outside the draft vocabulary counts as a miss."""
    heads.to(device).eval()
    draft_index = draft_index_of(heads.token_map, heads.config.vocab_size)
    correct = torch.zeros(heads.config.num_heads)
    total = torch.zeros(heads.config.num_heads)
    for start in range(0, corpus.num_sequences, batch_size):
        indices = list(range(start, min(start + batch_size, corpus.num_sequences)))
        batch = make_rows(corpus, indices, draft_index, heads.config.num_heads).to(device)
        guesses = heads.draft_logits(heads(batch.hidden[batch.rows])).argmax(-1)  # [num_rows, K]
        correct += ((guesses == batch.labels) & batch.valid).sum(0).cpu()
        total += batch.valid.sum(0).cpu()
    return (correct / total.clamp(min=1)).tolist()
