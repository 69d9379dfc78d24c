"""Training the EAGLE head (learned/eagle_head.py) on a self-distillation corpus (learned/distill_data.py).

A sequence t_0 .. t_{T-1} gives the head its pairs (h_{i-1}, t_i), i = 1 .. T-1, with the target's own
features h (teacher forcing). The loss is taken where the head drafts at serving time: pairs i >= P (P =
prompt length), whose next token t_{i+1} the target generated; prompt pairs are attention context only.
With f_i the head's feature, q_i = softmax(lm_rows f_i) its draft distribution over the draft vocabulary:
  hard:   w_reg * smoothL1(f_i, h_i) + w_tok * CE(q_i, t_{i+1})  (a next token outside the draft vocab is
          ignored: the head can never draft it)
  soft:   w_reg * smoothL1(f_i, h_i) + w_tok * KL(p_i || q_i), p_i = softmax(lm_rows h_i), the target's own
          distribution restricted to the draft vocabulary, computed from the cached h_i (no target forward)
  unroll: soft, plus the same loss at a second step whose previous feature is the head's own f_{i-1}
          rather than h_{i-1} (EAGLE-3's "training-time test"), attending to the first step's keys before
          i and to itself: the context of the second draft token at serving time. Gradients flow through
          f_{i-1}. This is NOT DistillSpec's on-policy distillation (tokens sampled from the drafter and
          scored by a target forward): the tokens stay the target's, only the features are the head's own.
Weights default to EAGLE's (w_reg 1.0, w_tok 0.1). The optimizer loop, schedule and resumable training state
are learned/fit.py's.
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
from specserve.learned.eagle_head import EagleHead
from specserve.learned.fit import TrainConfig, draft_index_of

LOSSES = ("hard", "soft", "unroll")

@dataclass
class PairBatch:
    """Sequences' pairs, row j = pair i = j + 1, padded at the end to the longest (causal attention never
    lets a real row see a pad)."""

    prev_hidden: torch.Tensor  # [batch, num_pairs, hidden] float32 h_{i-1}
    token_ids: torch.Tensor  # [batch, num_pairs] int64 t_i
    positions: torch.Tensor  # [batch, num_pairs] int64 i
    target_hidden: torch.Tensor  # [batch, num_pairs, hidden] float32 h_i
    next_draft_ids: torch.Tensor  # [batch, num_pairs] int64 draft id of t_{i+1}; -1 outside the vocab or none
    loss_mask: torch.Tensor  # [batch, num_pairs] bool: i >= prompt length and t_{i+1} exists

    def to(self, device: str) -> PairBatch:
        return PairBatch(*(t.to(device) for t in self.__dict__.values()))


def make_batch(corpus: DistillCorpus, indices: list[int], draft_index: torch.Tensor) -> PairBatch:
    """Pairs of the sequences `indices`; `draft_index` `# [vocab]` maps a target id to its draft id or -1."""
    num_pairs = max(int(corpus.lengths[k]) for k in indices) - 1
    batch, hidden_size = len(indices), corpus.hidden.shape[1]
    out = PairBatch(torch.zeros(batch, num_pairs, hidden_size), torch.zeros(batch, num_pairs, dtype=torch.int64),
                    torch.arange(1, num_pairs + 1).repeat(batch, 1), torch.zeros(batch, num_pairs, hidden_size),
                    torch.full((batch, num_pairs), -1), torch.zeros(batch, num_pairs, dtype=torch.bool))
    for row, k in enumerate(indices):
        token_ids, hidden, prompt_len = corpus.sequence(k)
        n = len(token_ids) - 1
        out.prev_hidden[row, :n] = hidden[:-1].float()
        out.token_ids[row, :n] = token_ids[1:]
        out.target_hidden[row, :n] = hidden[1:].float()
        out.next_draft_ids[row, : n - 1] = draft_index[token_ids[2:]]
        out.loss_mask[row, max(prompt_len - 1, 0) : n - 1] = True
    return out


def second_step_mask(num_pairs: int, device: str) -> torch.Tensor:
    """`# [1, 1, num_pairs, 2 * num_pairs]` bool: second-step row a sees first-step keys before it and itself.

    Example num_pairs 3: [[0 0 0 | 1 0 0], [1 0 0 | 0 1 0], [1 1 0 | 0 0 1]].
    """
    earlier = torch.ones(num_pairs, num_pairs, dtype=torch.bool, device=device).tril(-1)
    return torch.cat([earlier, torch.eye(num_pairs, dtype=torch.bool, device=device)], 1)[None, None]


def two_step_features(head: EagleHead, batch: PairBatch, unroll: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced features f `# [batch, num_pairs, hidden]` and, with `unroll`, second-step ones."""
    features, kv = head(batch.prev_hidden, batch.token_ids, batch.positions)
    if not unroll:
        return features, None
    own_prev = torch.cat([batch.prev_hidden[:, :1], features[:, :-1]], 1)  # f_{i-1}; pair 1 has none: h_0
    second, _ = head(own_prev, batch.token_ids, batch.positions, kv,
                     second_step_mask(batch.token_ids.shape[1], batch.token_ids.device))
    return features, second


def feature_loss(head: EagleHead, features: torch.Tensor, batch: PairBatch, config: TrainConfig) -> torch.Tensor:
    """w_reg * smoothL1 + w_tok * (CE for hard, KL(p || q) otherwise), over the masked pairs."""
    mask = batch.loss_mask
    predicted, target = features[mask], batch.target_hidden[mask]  # [num_masked, hidden]
    regression = F.smooth_l1_loss(predicted, target)
    logits = head.draft_logits(predicted)  # [num_masked, draft_vocab]
    if config.loss == "hard":
        labels = batch.next_draft_ids[mask]
        token = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / labels.ge(0).sum().clamp(min=1)
    else:
        with torch.no_grad():
            target_log_probs = F.log_softmax(head.draft_logits(target), dim=-1)
        token = F.kl_div(F.log_softmax(logits, dim=-1), target_log_probs, log_target=True, reduction="batchmean")
    return config.regression_weight * regression + config.token_weight * token


def batch_loss(head: EagleHead, batch: PairBatch, config: TrainConfig) -> torch.Tensor:
    first, second = two_step_features(head, batch, unroll=config.loss == "unroll")
    loss = feature_loss(head, first, batch, config)
    return loss if second is None else loss + feature_loss(head, second, batch, config)


def train_head(head: EagleHead, corpus: DistillCorpus, config: TrainConfig, state_path: Path,
               recipe: dict[str, Any], state: dict[str, Any] | None = None) -> list[float]:
    """Train `head` in place (from `state` when resuming); every `save_every` steps the training state goes
    to `state_path`. Returns the loss of every step."""
    if config.loss not in LOSSES:
        raise InvalidRequestError(f"the eagle head trains with a loss of {', '.join(LOSSES)}, not {config.loss!r}")
    draft_index = draft_index_of(head.token_map, head.config.vocab_size)

    def step_loss(indices: list[int]) -> torch.Tensor:
        return batch_loss(head, make_batch(corpus, indices, draft_index).to(config.device), config)

    return fit.fit(head, corpus.lengths, config, state_path, recipe, state, step_loss)


@torch.no_grad()
def heldout_accuracy(head: EagleHead, corpus: DistillCorpus, batch_size: int, device: str) -> tuple[float, float]:
    """Top-1 agreement of the head's argmax with the target's next token over the masked pairs of `corpus`:
    step 1 (the target's features), step 2 (the previous feature the head's own). A next token outside the
    draft vocabulary counts as a miss."""
    head.to(device).eval()
    draft_index = draft_index_of(head.token_map, head.config.vocab_size)
    correct, total = torch.zeros(2), 0
    for start in range(0, corpus.num_sequences, batch_size):
        indices = list(range(start, min(start + batch_size, corpus.num_sequences)))
        batch = make_batch(corpus, indices, draft_index).to(device)
        labels = batch.next_draft_ids[batch.loss_mask]
        for step, features in enumerate(two_step_features(head, batch, unroll=True)):
            correct[step] += (head.draft_logits(features[batch.loss_mask]).argmax(-1) == labels).sum().cpu()
        total += len(labels)
    first, second = (correct / max(total, 1)).tolist()
    return first, second
