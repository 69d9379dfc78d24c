"""Training the EAGLE head: the pair layout, the second-step mask, losses that fall, and a resumed run that
ends exactly where an uninterrupted one does."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from specserve.learned import fit, train_eagle
from specserve.learned.distill_data import DistillCorpus, choose_draft_vocab, concat_corpora
from specserve.learned.train_draft import head_from_target
from specserve.learned.fit import TrainConfig, epoch_batches, load_training_state
from specserve.learned.train_eagle import heldout_accuracy, make_batch, second_step_mask, train_head

CONFIG = TrainConfig(epochs=8, batch_size=4, lr=3e-3, save_every=1000)


def test_pairs_of_one_sequence():
    # prompt [5, 6], response [8, 2]: pairs (h0, 6) (h1, 8) (h2, 2) at positions 1 2 3; only pair 2 drafts
    # (its next token 2 is a response token, and pair 2 is the first the head sees after the prompt).
    hidden = torch.arange(4.0).repeat_interleave(3).view(4, 3).to(torch.bfloat16)  # row k is all k
    corpus = DistillCorpus(torch.tensor([5, 6, 8, 2]), torch.tensor([0, 4]), torch.tensor([2]), hidden)
    draft_index = torch.full((10,), -1)
    draft_index[torch.tensor([2, 8])] = torch.tensor([0, 1])
    batch = make_batch(corpus, [0], draft_index)
    assert batch.token_ids.tolist() == [[6, 8, 2]]
    assert batch.positions.tolist() == [[1, 2, 3]]
    assert batch.prev_hidden[0, :, 0].tolist() == [0, 1, 2] and batch.target_hidden[0, :, 0].tolist() == [1, 2, 3]
    assert batch.next_draft_ids.tolist() == [[1, 0, -1]]
    assert batch.loss_mask.tolist() == [[False, True, False]]


def test_shorter_sequence_is_padded_and_masked(tiny_corpus):
    tokens, hidden, prompt_len = tiny_corpus.sequence(0)  # 4 prompt + 12 response tokens
    short = DistillCorpus(tokens[:11], torch.tensor([0, 11]), torch.tensor([prompt_len]), hidden[:11])
    batch = make_batch(concat_corpora([short, tiny_corpus.subset([1])]), [0, 1], torch.arange(96))
    assert batch.token_ids.shape == (2, 15)  # 10 and 15 pairs
    assert batch.loss_mask.sum(1).tolist() == [6, 11]  # pairs 4 .. T-2
    assert not batch.loss_mask[0, 9:].any() and (batch.next_draft_ids[0, 9:] == -1).all()
    assert (batch.token_ids[0, 10:] == 0).all() and (batch.prev_hidden[0, 10:] == 0).all()


def test_second_step_mask():
    expected = [[0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1]]
    assert second_step_mask(3, "cpu")[0, 0].int().tolist() == expected


def test_epoch_batches_cover_each_sequence_once_and_repeat():
    lengths = torch.randint(5, 50, (37,), generator=torch.Generator().manual_seed(0))
    batches = epoch_batches(lengths, 4, seed=3, epoch=1)
    assert len(batches) == 10 and sorted(k for b in batches for k in b) == list(range(37))
    assert batches == epoch_batches(lengths, 4, seed=3, epoch=1)
    assert batches != epoch_batches(lengths, 4, seed=3, epoch=2)


def test_draft_vocab_is_most_frequent_response_tokens_ties_by_id():
    # responses [7, 7, 3, 9] and [9, 1]: counts 7:2 9:2 3:1 1:1; prompt tokens (5, 6) do not count.
    corpus = DistillCorpus(torch.tensor([5, 7, 7, 3, 9, 6, 9, 1]), torch.tensor([0, 5, 8]), torch.tensor([1, 1]),
                           torch.zeros(8, 2, dtype=torch.bfloat16))
    token_map, coverage = choose_draft_vocab(corpus, 3, vocab_size=10)
    assert token_map.tolist() == [1, 7, 9] and token_map.dtype == torch.int64
    assert coverage == pytest.approx(5 / 6)


@pytest.mark.parametrize("loss", ["hard", "soft", "unroll"])
def test_loss_falls_and_accuracy_rises(tiny_target, tiny_corpus, tmp_path, loss):
    token_map, _ = choose_draft_vocab(tiny_corpus, 64, 96)
    head = head_from_target(tiny_target, token_map, seed=0)
    before = heldout_accuracy(head, tiny_corpus, 4, "cpu")
    config = replace(CONFIG, loss=loss)
    losses = train_head(head, tiny_corpus, config, tmp_path / "state.pt", config.recipe())
    assert len(losses) == 8 * 3
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    after = heldout_accuracy(head, tiny_corpus, 4, "cpu")  # on its own training data: it must fit it
    assert after[0] > before[0] + 0.2 and after[1] > before[1], (before, after)


class Interrupted(Exception):
    pass


def test_resume_ends_where_an_uninterrupted_run_does(tiny_target, tiny_corpus, tmp_path, monkeypatch):
    config = replace(CONFIG, epochs=2, save_every=2)  # 6 steps, states saved after steps 2 and 4
    token_map, _ = choose_draft_vocab(tiny_corpus, 64, 96)
    whole = head_from_target(tiny_target, token_map, seed=0)
    whole_losses = train_head(whole, tiny_corpus, config, tmp_path / "whole.pt", config.recipe())

    state_path = tmp_path / "state.pt"
    save = fit.save_training_state

    def save_then_die(path: Path, state: dict) -> None:
        save(path, state)
        raise Interrupted

    monkeypatch.setattr(fit, "save_training_state", save_then_die)
    with pytest.raises(Interrupted):
        train_head(head_from_target(tiny_target, token_map, seed=0), tiny_corpus, config, state_path, config.recipe())
    monkeypatch.undo()
    state = load_training_state(state_path)
    assert len(state["losses"]) == 2 and state["optimizer"]["state"]  # step counter and Adam moments saved

    steps_run = []
    batch_loss = train_eagle.batch_loss

    def counted_batch_loss(*args: object) -> torch.Tensor:
        steps_run.append(1)
        return batch_loss(*args)

    monkeypatch.setattr(train_eagle, "batch_loss", counted_batch_loss)
    resumed = head_from_target(tiny_target, token_map, seed=0)
    resumed_losses = train_head(resumed, tiny_corpus, config, state_path, config.recipe(), state)
    assert len(steps_run) == 4  # continued from step 2, not from scratch
    assert resumed_losses == whole_losses
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
