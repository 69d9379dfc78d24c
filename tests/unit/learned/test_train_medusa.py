"""Training Medusa heads: the row layout, losses that fall, accuracy that rises, and the kind checks of
their checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specserve.errors import DraftCheckpointError, InvalidRequestError
from specserve.learned.checkpoint import DraftCheckpoint, save_checkpoint, target_fingerprint
from specserve.learned.distill_data import DistillCorpus, choose_draft_vocab
from specserve.learned.eagle_head import load_eagle_head
from specserve.learned.fit import TrainConfig, draft_index_of
from specserve.learned.medusa_heads import load_medusa_heads, new_medusa_heads
from specserve.learned.train_medusa import heldout_accuracy, make_rows, train_heads

CONFIG = TrainConfig(epochs=8, batch_size=4, lr=1e-2, save_every=1000)


def test_rows_of_one_sequence():
    # prompt [5, 6], response [8, 2, 4]: rows i = 1, 2, 3 (h_1 predicted t_2 = 8, the first root).
    hidden = torch.arange(5.0).repeat_interleave(3).view(5, 3).to(torch.bfloat16)  # row k is all k
    corpus = DistillCorpus(torch.tensor([5, 6, 8, 2, 4]), torch.tensor([0, 5]), torch.tensor([2]), hidden)
    draft_index = torch.full((10,), -1)
    draft_index[torch.tensor([2, 8])] = torch.tensor([0, 1])  # 4 is outside the draft vocabulary
    batch = make_rows(corpus, [0], draft_index, num_heads=2)
    assert batch.rows.tolist() == [1, 2, 3] and batch.hidden[batch.rows, 0].tolist() == [1, 2, 3]
    # row 1: head 1 -> t_3 = 2 (draft 0), head 2 -> t_4 = 4 (outside); row 2: head 1 -> t_4; row 3: none
    assert batch.labels.tolist() == [[0, -1], [-1, -1], [-1, -1]]
    assert batch.valid.tolist() == [[True, True], [True, False], [False, False]]


def test_rows_index_into_the_whole_batch(tiny_corpus):
    draft_index = draft_index_of(torch.arange(96), 96)
    batch = make_rows(tiny_corpus, [2, 5], draft_index, num_heads=3)
    assert batch.hidden.shape[0] == 32  # two 16-token sequences back to back
    assert batch.rows.tolist() == list(range(3, 15)) + list(range(19, 31))  # P - 1 .. T - 2 of each
    tokens = torch.cat([tiny_corpus.sequence(2)[0], tiny_corpus.sequence(5)[0]])
    for r, row in enumerate(batch.rows.tolist()):
        for k in range(3):
            if batch.valid[r, k]:
                assert batch.labels[r, k] == tokens[row + 2 + k]


@pytest.mark.parametrize("loss", ["hard", "soft"])
def test_loss_falls_and_accuracy_rises(tiny_target, tiny_corpus, tmp_path, loss):
    token_map, _ = choose_draft_vocab(tiny_corpus, 64, 96)
    heads = new_medusa_heads(tiny_target, token_map, num_heads=2)
    # Scrambled weights: zero-initialised heads already echo the LM head, which the tiny target's repetitive
    # continuations reward; from here the heads must learn.
    torch.nn.init.normal_(heads.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    before = heldout_accuracy(heads, tiny_corpus, 4, "cpu")
    losses = train_heads(heads, tiny_corpus, TrainConfig(**{**CONFIG.__dict__, "loss": loss}), tmp_path / "s.pt", {})
    assert len(losses) == 8 * 3
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    after = heldout_accuracy(heads, tiny_corpus, 4, "cpu")  # on its own training data: it must fit it
    assert after[0] > before[0] + 0.2 and after[1] > before[1] + 0.1, (before, after)


def test_unroll_is_not_a_medusa_loss(tiny_target, tiny_corpus, tmp_path):
    heads = new_medusa_heads(tiny_target, torch.arange(96), num_heads=2)
    with pytest.raises(InvalidRequestError, match="hard, soft"):
        train_heads(heads, tiny_corpus, TrainConfig(loss="unroll"), tmp_path / "s.pt", {})


def save_heads(path: Path, target, num_heads: int = 2) -> None:
    heads = new_medusa_heads(target, torch.arange(48), num_heads)
    tensors = {name: t for name, t in heads.state_dict().items()}
    checkpoint = DraftCheckpoint("medusa", tensors, heads.config.to_dict(), target_fingerprint(target), {}, "")
    save_checkpoint(path, checkpoint)


def test_checkpoint_round_trip_and_kind_checks(tiny_target, other_tiny_target, tmp_path):
    path = tmp_path / "medusa.safetensors"
    save_heads(path, tiny_target)
    loaded = load_medusa_heads(path, tiny_target)
    assert loaded.config.num_heads == 2 and loaded.token_map.tolist() == list(range(48))
    with pytest.raises(DraftCheckpointError, match="trained for another target"):
        load_medusa_heads(path, other_tiny_target)
    with pytest.raises(DraftCheckpointError, match="holds a 'medusa' drafter, not 'eagle'"):
        load_eagle_head(path, tiny_target)
    with pytest.raises(DraftCheckpointError, match="does not exist"):
        load_medusa_heads(tmp_path / "none.safetensors", tiny_target)
