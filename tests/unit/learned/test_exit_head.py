"""The trained early-exit head: untrained it is the early exit (same chain as the early-exit drafter), its
drafter shares the target's layers, its training rows and loss do what they say, and its checkpoint
refuses another target or an exit layer the target lacks."""

from __future__ import annotations

import pytest
import torch

from specserve.drafters.base import DraftRequest
from specserve.drafters.early_exit import EarlyExitConfig, EarlyExitDrafter
from specserve.drafters.exit_head import ExitHeadDrafter
from specserve.drafters.layer_chain import ChainConfig
from specserve.engine.config import CacheConfig
from specserve.errors import DraftCheckpointError, InvalidRequestError
from specserve.learned.checkpoint import DraftCheckpoint, save_checkpoint, target_fingerprint
from specserve.learned.distill_data import DistillCorpus, choose_draft_vocab
from specserve.learned.draft_model import load_draft_model
from specserve.learned.exit_head import exit_model, load_exit_head, new_exit_head
from specserve.learned.fit import TrainConfig
from specserve.learned.train_exit_head import heldout_accuracy, loss_rows, train_exit_head

CACHE = CacheConfig(block_size=4, num_blocks=64)


def test_untrained_head_drafts_the_early_exits_chain(tiny_target, tiny_corpus):
    head = new_exit_head(tiny_target, torch.arange(96), exit_layer=1)
    chain = ChainConfig(max_depth=5, min_confidence=0.0, cache=CACHE)
    drafters = [ExitHeadDrafter(head, tiny_target, chain, pack=False),
                EarlyExitDrafter(tiny_target, EarlyExitConfig(exit_layer=1, max_depth=5, min_confidence=0.0,
                                                              cache=CACHE))]
    history = tiny_corpus.sequence(0)[0].tolist()[:7]
    trees = [d.propose([DraftRequest(0, history, num_prompt_tokens=4, budget=5)])[0] for d in drafters]
    assert trees[0].num_nodes == 5 and trees[0].tokens == trees[1].tokens
    assert trees[0].draft_probs == pytest.approx(trees[1].draft_probs, rel=1e-5)


def test_drafting_model_shares_the_targets_layers(tiny_target):
    head = new_exit_head(tiny_target, torch.arange(40), exit_layer=1)
    model = exit_model(head, tiny_target)
    assert len(model.layers) == 1 and model.layers[0] is tiny_target.layers[0]
    assert model.embed_tokens is tiny_target.embed_tokens and model.norm is tiny_target.norm
    assert model.lm_head is head.proj


def test_loss_rows():
    corpus = DistillCorpus(torch.tensor([5, 6, 8, 2, 1, 3, 4]), torch.tensor([0, 4, 7]), torch.tensor([2, 1]),
                           torch.zeros(7, 3, dtype=torch.bfloat16))
    rows, next_ids = loss_rows(corpus, [0, 1])
    assert rows.tolist() == [1, 2, 4, 5] and next_ids.tolist() == [8, 2, 3, 4]


@pytest.mark.parametrize("loss", ["hard", "soft"])
def test_loss_falls_and_accuracy_rises(tiny_target, tiny_corpus, tmp_path, loss):
    token_map, _ = choose_draft_vocab(tiny_corpus, 64, 96)
    head = new_exit_head(tiny_target, token_map, exit_layer=1)
    torch.nn.init.normal_(head.proj.weight, std=0.5, generator=torch.Generator().manual_seed(0))  # must learn
    before = heldout_accuracy(head, tiny_target, tiny_corpus)[0]
    config = TrainConfig(loss=loss, epochs=8, batch_size=4, lr=3e-2, save_every=1000)
    losses = train_exit_head(head, tiny_target, tiny_corpus, config, tmp_path / "s.pt", {})
    assert len(losses) == 8 * 3
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    after = heldout_accuracy(head, tiny_target, tiny_corpus)[0]  # on its own training data: it must fit it
    assert after > before + 0.2, (before, after)


@pytest.mark.parametrize("exit_layer", [0, 2])
def test_an_exit_layer_the_target_lacks_is_a_clear_error(tiny_target, exit_layer):
    with pytest.raises(InvalidRequestError, match=r"exit_layer must be in \[1, 1\]"):
        new_exit_head(tiny_target, torch.arange(96), exit_layer)


def test_checkpoint_round_trip_and_kind_checks(tiny_target, other_tiny_target, tmp_path):
    head = new_exit_head(tiny_target, torch.arange(48), exit_layer=1)
    path = tmp_path / "exit-head.safetensors"
    save_checkpoint(path, DraftCheckpoint("exit-head", head.state_dict(), head.config.to_dict(),
                                          target_fingerprint(tiny_target), {}, ""))
    loaded = load_exit_head(path, tiny_target)
    assert loaded.config == head.config and torch.equal(loaded.proj.weight, head.proj.weight)
    with pytest.raises(DraftCheckpointError, match="trained for another target"):
        load_exit_head(path, other_tiny_target)
    with pytest.raises(DraftCheckpointError, match="holds a 'exit-head' drafter, not 'draft-model'"):
        load_draft_model(path, tiny_target)
