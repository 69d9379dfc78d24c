"""Training the early-exit head (learned/exit_head.py) on a self-distillation corpus (learned/distill_data.py).

The head reads e_i, the target's final norm of its residual stream after layer L at token i. Those come
from one prefill of the target's first L layers over each corpus sequence (`exit_features`, once before
training, kept in bfloat16 like the corpus's final hidden states h_i). Row i = P-1 .. T-2 of a sequence
(where the drafter drafts at serving time) is trained towards t_{i+1}:
  hard:  CE(q(e_i), t_{i+1})   (a token outside the draft vocabulary is ignored: it is never drafted)
  soft:  KL(p_i || q(e_i)), p_i = softmax(lm_rows h_i), the target's own distribution of t_{i+1}
A step costs the head's product over the batch's rows: no layer of the target runs while training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from specserve.engine.model import LlamaModel
from specserve.errors import InvalidRequestError
from specserve.learned import fit
from specserve.learned.distill_data import DistillCorpus, final_hidden_states
from specserve.learned.eagle_head import target_tables
from specserve.learned.exit_head import ExitHead
from specserve.learned.fit import TrainConfig, draft_index_of

LOSSES = ("hard", "soft")


def exit_features(target: LlamaModel, corpus: DistillCorpus, exit_layer: int) -> torch.Tensor:
    """e_i of every corpus token `# [num_tokens, hidden]` bfloat16, sequence by sequence."""
    parts = []
    for k in tqdm(range(corpus.num_sequences), desc=f"layer-{exit_layer} features", unit="seq", disable=None):
        token_ids = corpus.sequence(k)[0].tolist()
        parts.append(final_hidden_states(target, token_ids, num_layers=exit_layer).to(torch.bfloat16))
    return torch.cat(parts)


def loss_rows(corpus: DistillCorpus, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Corpus rows i = P-1 .. T-2 of the sequences `indices` `# [num_rows]` int64, and the token t_{i+1} each
    predicts `# [num_rows]`.

    Example: sequences [5, 6, 8, 2] (P 2) and [1, 3, 4] (P 1), back to back: rows 1, 2, 4, 5 predict 8, 2, 3, 4.
    """
    starts = [int(corpus.offsets[k]) + max(int(corpus.prompt_lens[k]) - 1, 0) for k in indices]
    flat = torch.cat([torch.arange(start, int(corpus.offsets[k + 1]) - 1) for start, k in zip(starts, indices)])
    return flat, corpus.token_ids[flat + 1]


def batch_loss(head: ExitHead, lm_rows: torch.Tensor, features: torch.Tensor, corpus: DistillCorpus,
               indices: list[int], draft_index: torch.Tensor, loss: str, device: str) -> torch.Tensor:
    rows, next_ids = loss_rows(corpus, indices)
    logits = head.draft_logits(features[rows].float().to(device))  # [num_rows, draft_vocab]
    if loss == "hard":
        labels = draft_index[next_ids].to(device)
        return F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / labels.ge(0).sum().clamp(min=1)
    with torch.no_grad():
        teacher = F.log_softmax(corpus.hidden[rows].float().to(device) @ lm_rows.T, dim=-1)
    return F.kl_div(F.log_softmax(logits, dim=-1), teacher, log_target=True, reduction="batchmean")


def train_exit_head(head: ExitHead, target: LlamaModel, corpus: DistillCorpus, config: TrainConfig,
                    state_path: Path, recipe: dict[str, Any], state: dict[str, Any] | None = None) -> list[float]:
    """Train `head` in place (from `state` when resuming). Returns the loss of every step."""
    if config.loss not in LOSSES:
        raise InvalidRequestError(f"the exit head trains with a loss of {', '.join(LOSSES)}, not {config.loss!r}")
    draft_index = draft_index_of(head.token_map, head.config.vocab_size)
    lm_rows = target_tables(target)[1][head.token_map].to(config.device)  # [draft_vocab, hidden] frozen
    features = exit_features(target, corpus, head.config.exit_layer)

    def step_loss(indices: list[int]) -> torch.Tensor:
        return batch_loss(head, lm_rows, features, corpus, indices, draft_index, config.loss, config.device)

    return fit.fit(head, corpus.lengths, config, state_path, recipe, state, step_loss)


@torch.no_grad()
def heldout_accuracy(head: ExitHead, target: LlamaModel, corpus: DistillCorpus) -> list[float]:
    """[top-1 agreement of the head's argmax with the target's next token over the loss rows of `corpus`];
    a token outside the draft vocabulary counts as a miss. A fresh head (`new_exit_head`) scores the
    untrained early exit over the draft vocabulary."""
    head.cpu().eval()
    features = exit_features(target, corpus, head.config.exit_layer)
    rows, next_ids = loss_rows(corpus, list(range(corpus.num_sequences)))
    guesses = head.token_map[head.draft_logits(features[rows].float()).argmax(-1)]
    return [float((guesses == next_ids).sum()) / max(len(rows), 1)]
