"""The distilled draft model: it starts as a copy of target layers (all of them: it is the target), its
serving form drafts the same chain as its training form, its batches and losses do what they say, and
its checkpoint refuses another target."""

from __future__ import annotations

import pytest
import torch

from specserve.drafters.base import DraftRequest
from specserve.drafters.draft_model import DraftModelDrafter
from specserve.drafters.layer_chain import ChainConfig
from specserve.engine.config import CacheConfig
from specserve.errors import DraftCheckpointError, InvalidRequestError
from specserve.learned.checkpoint import DraftCheckpoint, save_checkpoint, target_fingerprint
from specserve.learned.distill_data import DistillCorpus, choose_draft_vocab, final_hidden_states
from specserve.learned.draft_model import load_draft_model, new_draft_model
from specserve.learned.fit import TrainConfig
from specserve.learned.medusa_heads import load_medusa_heads
from specserve.learned.train_draft_model import heldout_accuracy, make_batch, on_policy_batch, train_model

CONFIG = TrainConfig(epochs=8, batch_size=4, lr=1e-2, save_every=1000)


def test_all_target_layers_make_the_target(tiny_target, tiny_corpus):
    model = new_draft_model(tiny_target, torch.arange(96), source_layers=(0, 1))
    token_ids = tiny_corpus.sequence(0)[0]
    with torch.no_grad():
        features = model(token_ids[None])[0]
    torch.testing.assert_close(features, final_hidden_states(tiny_target, token_ids.tolist()), rtol=1e-4, atol=1e-4)
    assert heldout_accuracy(model, tiny_corpus, 4, "cpu") == (1.0, 1.0)  # the corpus is its own greedy output


@torch.no_grad()
def greedy_chain(model, token_ids: list[int], steps: int) -> list[int]:
    """Greedy decoding of the training form, recomputing the whole history each step."""
    ids = list(token_ids)
    for _ in range(steps):
        logits = model.draft_logits(model(torch.tensor([ids]))[0, -1])
        ids.append(int(model.token_map[logits.argmax()]))
    return ids[len(token_ids):]


def test_serving_form_drafts_the_training_forms_greedy_chain(tiny_target, tiny_corpus):
    token_map, _ = choose_draft_vocab(tiny_corpus, 40, 96)  # a reduced vocabulary: drafts map back through it
    model = new_draft_model(tiny_target, token_map, source_layers=(1,)).eval()
    torch.nn.init.normal_(model.layers[0].mlp.down_proj.weight, std=0.3, generator=torch.Generator().manual_seed(0))
    drafter = DraftModelDrafter(model, ChainConfig(max_depth=6, min_confidence=0.0,
                                                    cache=CacheConfig(block_size=4, num_blocks=64)))
    histories = [tiny_corpus.sequence(k)[0].tolist()[: 5 + k] for k in range(3)]  # ragged, across blocks
    requests = [DraftRequest(k, h, num_prompt_tokens=4, budget=6) for k, h in enumerate(histories)]
    trees = drafter.propose(requests)
    for history, tree in zip(histories, trees):
        # bfloat16 draft weights may flip a near-tie of the float32 reference: compare the first token only
        # exactly, the rest as a mostly-equal chain
        want = greedy_chain(model, history, 6)
        assert tree.parents == [-1, 0, 1, 2, 3, 4] and tree.tokens[0] == want[0]
        assert set(tree.tokens) <= set(token_map.tolist())
        assert sum(a == b for a, b in zip(tree.tokens, want)) >= 4, (tree.tokens, want)
    # A second call after accepting two drafted tokens rolls back the rest and catches up.
    extended = histories[0] + trees[0].tokens[:2]
    again = drafter.propose([DraftRequest(0, extended, num_prompt_tokens=4, budget=3)])[0]
    assert again.tokens[0] == greedy_chain(model, extended, 1)[0]
    for k in range(3):
        drafter.release(k)
    assert len(drafter.free_blocks) == 64


def test_batch_layout():
    # prompt [5, 6], response [8, 2] (T 4, P 2): loss rows 1 and 2 predict 8 and 2; 2 is outside the vocab.
    hidden = torch.arange(4.0).repeat_interleave(3).view(4, 3).to(torch.bfloat16)  # row k is all k
    corpus = DistillCorpus(torch.tensor([5, 6, 8, 2, 1, 3, 4]), torch.tensor([0, 4, 7]), torch.tensor([2, 1]),
                           torch.cat([hidden, hidden[:3]]))
    draft_index = torch.full((10,), -1)
    draft_index[torch.tensor([3, 4, 8])] = torch.tensor([0, 1, 2])
    batch = make_batch(corpus, [0, 1], draft_index)
    assert batch.token_ids.tolist() == [[5, 6, 8, 2], [1, 3, 4, 0]]
    assert batch.loss_mask.tolist() == [[False, True, True, False], [True, True, False, False]]
    assert batch.next_draft_ids.tolist() == [2, -1, 0, 1]
    assert batch.hidden[:, 0].tolist() == [1, 2, 0, 1]  # h_i of each loss row, in mask order


@torch.no_grad()
def sampled_chain(model, token_ids: list[int], steps: int, generator: torch.Generator) -> list[int]:
    """Sampling at temperature 1 from the training form, recomputing the whole history each step."""
    ids = list(token_ids)
    for _ in range(steps):
        probs = torch.softmax(model.draft_logits(model(torch.tensor([ids]))[0, -1]), dim=-1)
        ids.append(int(model.token_map[torch.multinomial(probs, 1, generator=generator)]))
    return ids[len(token_ids):]


def test_sample_with_cached_keys_draws_what_the_full_forward_would(tiny_target, tiny_corpus):
    token_map, _ = choose_draft_vocab(tiny_corpus, 40, 96)
    model = new_draft_model(tiny_target, token_map, source_layers=(1, 0)).eval()
    torch.nn.init.normal_(model.layers[0].mlp.down_proj.weight, std=0.3, generator=torch.Generator().manual_seed(0))
    prompt = tiny_corpus.sequence(0)[0].tolist()[:6]
    # Same seed, same probabilities at every step (up to float rounding): the same 10 draws.
    drawn = model.sample(prompt, 10, (), torch.Generator().manual_seed(3))
    assert drawn == sampled_chain(model, prompt, 10, torch.Generator().manual_seed(3))
    assert len(set(drawn)) > 1 and set(drawn) <= set(token_map.tolist())
    # A stop id ends the response and is kept.
    stop = drawn[3]
    assert model.sample(prompt, 10, (stop,), torch.Generator().manual_seed(3)) == drawn[: drawn.index(stop) + 1]


def test_on_policy_batch_is_the_models_text_scored_by_the_target(tiny_target, tiny_corpus):
    token_map, _ = choose_draft_vocab(tiny_corpus, 64, 96)
    model = new_draft_model(tiny_target, token_map, source_layers=(0,))
    torch.nn.init.normal_(model.layers[0].mlp.down_proj.weight, std=1.0, generator=torch.Generator().manual_seed(0))
    draft_index = torch.full((96,), -1)
    draft_index[token_map] = torch.arange(64)
    batch = on_policy_batch(model, tiny_target, tiny_corpus, [0, 1], draft_index, (), torch.Generator().manual_seed(0))
    rows = 0
    for row, k in enumerate([0, 1]):
        ids, _, prompt_len = tiny_corpus.sequence(k)
        seq = batch.token_ids[row]
        assert seq[:prompt_len].tolist() == ids[:prompt_len].tolist() and len(seq) == len(ids)  # same length here
        mask = batch.loss_mask[row]
        assert mask.nonzero().flatten().tolist() == list(range(prompt_len - 1, len(ids) - 1))
        n = int(mask.sum())
        hidden = final_hidden_states(tiny_target, seq.tolist())[prompt_len - 1 : -1]
        torch.testing.assert_close(batch.hidden[rows : rows + n], hidden)
        assert batch.next_draft_ids[rows : rows + n].tolist() == draft_index[seq[prompt_len:]].tolist()
        rows += n
    # The responses are the scrambled model's, not the target's greedy ones in the corpus.
    assert batch.token_ids[0].tolist() != tiny_corpus.sequence(0)[0].tolist()


@pytest.mark.parametrize("loss", ["hard", "soft", "on-policy"])
def test_loss_falls_and_accuracy_rises(tiny_target, tiny_corpus, tmp_path, loss):
    token_map, _ = choose_draft_vocab(tiny_corpus, 64, 96)
    model = new_draft_model(tiny_target, token_map, source_layers=(0,))
    # Scrambled: half the target already echoes the tiny target's repetitive continuations; from here the
    # model must learn.
    generator = torch.Generator().manual_seed(0)
    for linear in (model.layers[0].self_attn.o_proj, model.layers[0].mlp.down_proj):
        torch.nn.init.normal_(linear.weight, std=1.0, generator=generator)
    before = heldout_accuracy(model, tiny_corpus, 4, "cpu")
    sampled = []
    sample = model.sample
    model.sample = lambda *args: sampled.append(1) or sample(*args)
    losses = train_model(model, tiny_corpus, TrainConfig(**{**CONFIG.__dict__, "loss": loss}), tmp_path / "s.pt", {},
                         target=tiny_target)
    assert len(losses) == 8 * 3
    # on-policy: the draft model answered every prompt of steps 14, 16, ..., 24 (the second half's even steps).
    assert len(sampled) == (6 * 4 if loss == "on-policy" else 0)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    after = heldout_accuracy(model, tiny_corpus, 4, "cpu")  # on its own training data: it must fit it
    assert after[0] > before[0] + 0.2, (before, after)


def test_unroll_is_not_a_draft_model_loss(tiny_target, tiny_corpus, tmp_path):
    model = new_draft_model(tiny_target, torch.arange(96), source_layers=(0,))
    with pytest.raises(InvalidRequestError, match="hard, soft"):
        train_model(model, tiny_corpus, TrainConfig(loss="unroll"), tmp_path / "s.pt", {})


@pytest.mark.parametrize("layers", [(), (2,), (0, -1)])
def test_layers_the_target_lacks_are_a_clear_error(tiny_target, layers):
    with pytest.raises(InvalidRequestError, match="draft layers must be target layers 0 .. 1"):
        new_draft_model(tiny_target, torch.arange(96), source_layers=layers)


def test_checkpoint_round_trip_and_kind_checks(tiny_target, other_tiny_target, tmp_path):
    model = new_draft_model(tiny_target, torch.arange(48), source_layers=(1, 0))
    path = tmp_path / "draft-model.safetensors"
    save_checkpoint(path, DraftCheckpoint("draft-model", model.state_dict(), model.config.to_dict(),
                                          target_fingerprint(tiny_target), {}, ""))
    loaded = load_draft_model(path, tiny_target)
    assert loaded.config == model.config and loaded.config.source_layers == (1, 0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with pytest.raises(DraftCheckpointError, match="trained for another target"):
        load_draft_model(path, other_tiny_target)
    with pytest.raises(DraftCheckpointError, match="holds a 'draft-model' drafter, not 'medusa'"):
        load_medusa_heads(path, tiny_target)
