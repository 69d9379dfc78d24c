"""Draft checkpoints: a head round-trips, and every way a checkpoint can be wrong is one clear
DraftCheckpointError."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from specserve.errors import DraftCheckpointError
from specserve.learned.checkpoint import (
    FORMAT, FORMAT_VERSION, DraftCheckpoint, best_checkpoint, best_default_checkpoint, checkpoint_kind,
    default_checkpoint_path, expected_accepted, heldout_of, load_checkpoint, metadata_of, save_checkpoint,
    target_fingerprint,
)
from specserve.learned.eagle_head import load_eagle_head
from specserve.learned.medusa_heads import new_medusa_heads
from specserve.learned.train_draft import head_from_target


@pytest.fixture
def checkpoint_path(tiny_target, tmp_path):
    head = head_from_target(tiny_target, torch.arange(0, 96, 2), seed=0)
    path = tmp_path / "eagle.safetensors"
    save_checkpoint(path, DraftCheckpoint("eagle", head.state_dict(), head.config.to_dict(),
                                          target_fingerprint(tiny_target), {"loss": "soft"}, "abc"))
    return path


def test_round_trip(tiny_target, checkpoint_path):
    head = load_eagle_head(checkpoint_path, tiny_target)
    expected = head_from_target(tiny_target, torch.arange(0, 96, 2), seed=0)
    assert head.token_map.tolist() == list(range(0, 96, 2))
    for name, tensor in expected.state_dict().items():
        assert torch.equal(tensor, head.state_dict()[name]), name


def test_missing_file(tiny_target, tmp_path):
    with pytest.raises(DraftCheckpointError, match="does not exist"):
        load_eagle_head(tmp_path / "nope.safetensors", tiny_target)


def test_garbage_bytes(tiny_target, tmp_path):
    path = tmp_path / "eagle.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all" + bytes(range(256)))
    with pytest.raises(DraftCheckpointError, match="corrupt or not a safetensors file"):
        load_eagle_head(path, tiny_target)


def test_truncated_file(tiny_target, checkpoint_path):
    data = checkpoint_path.read_bytes()
    checkpoint_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DraftCheckpointError, match="corrupt"):
        load_eagle_head(checkpoint_path, tiny_target)


def test_wrong_kind(tiny_target, tmp_path):
    path = tmp_path / "medusa.safetensors"
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": "medusa", "config": json.dumps({}),
                "target_fingerprint": target_fingerprint(tiny_target), "recipe": "{}", "data_hash": ""}
    save_file({"w": torch.zeros(2)}, str(path), metadata=metadata)
    with pytest.raises(DraftCheckpointError, match="holds a 'medusa' drafter, not 'eagle'"):
        load_eagle_head(path, tiny_target)


def test_plain_safetensors_is_not_a_draft_checkpoint(tiny_target, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(DraftCheckpointError, match="not a specserve draft checkpoint"):
        load_eagle_head(path, tiny_target)


def test_another_target(other_tiny_target, checkpoint_path):
    with pytest.raises(DraftCheckpointError, match="trained for another target model"):
        load_eagle_head(checkpoint_path, other_tiny_target)


# ---- held-out agreement and `--spec auto`'s pick -------------------------------------------------------

def save_medusa(target, path, heldout=None):
    from dataclasses import asdict

    heads = new_medusa_heads(target, torch.arange(0, 96, 3), num_heads=2)
    tensors = {**heads.state_dict(), "token_map": heads.token_map}
    save_checkpoint(path, DraftCheckpoint("medusa", tensors, asdict(heads.config), target_fingerprint(target),
                                          {}, "", heldout or {}))
    return path


def test_heldout_agreement_round_trips_and_old_checkpoints_have_none(tiny_target, checkpoint_path, tmp_path):
    path = save_medusa(tiny_target, tmp_path / "medusa.safetensors", {"step1": 0.31, "step2": 0.2})
    assert load_checkpoint(path, "medusa", target_fingerprint(tiny_target)).heldout == {"step1": 0.31, "step2": 0.2}
    assert checkpoint_kind(path) == "medusa" and checkpoint_kind(checkpoint_path) == "eagle"
    assert heldout_of(metadata_of(checkpoint_path)) == {}  # saved without a record
    assert expected_accepted({"step1": 0.5, "step2": 0.4}) == pytest.approx(0.7)
    assert expected_accepted({}) == 0.0


def test_auto_takes_the_trained_kind_with_the_best_heldout_agreement(tiny_target, checkpoint_path, tmp_path):
    home = tmp_path / "home"
    assert best_default_checkpoint(home) is None  # nothing trained: auto drafts without a learned drafter
    eagle = default_checkpoint_path(home, "eagle")
    eagle.parent.mkdir(parents=True)
    eagle.write_bytes(checkpoint_path.read_bytes())  # no held-out record: ranks last among recorded ones
    assert best_default_checkpoint(home) == str(eagle)
    medusa = save_medusa(tiny_target, default_checkpoint_path(home, "medusa"), {"step1": 0.3, "step2": 0.2})
    assert best_default_checkpoint(home) == str(medusa)
    better = {"eagle": save_medusa(tiny_target, tmp_path / "a.safetensors", {"step1": 0.3, "step2": 0.5}),
              "medusa": medusa, "draft-model": tmp_path / "missing.safetensors"}
    assert best_checkpoint(better) == str(better["eagle"])
    same = save_medusa(tiny_target, tmp_path / "b.safetensors", {"step1": 0.3, "step2": 0.2})
    tied = {"medusa": medusa, "eagle": same}
    assert best_checkpoint(tied) == str(tied["eagle"])  # a tie goes to the kind listed first (EAGLE)


def test_auto_merges_a_medusa_checkpoint_and_keeps_hidden_states(tiny_target, tmp_path):
    from specserve.drafters import build_drafter, needs_hidden
    from specserve.drafters.medusa import MedusaDrafter
    from specserve.engine.config import SpecConfig

    path = str(save_medusa(tiny_target, tmp_path / "medusa.safetensors", {"step1": 0.3}))
    spec = SpecConfig(method="auto", draft_checkpoint=path)
    drafter = build_drafter(spec, tiny_target, tokenizer=None)
    assert [type(d).__name__ for d in drafter.drafters] == ["NgramDrafter", "MedusaDrafter"]
    assert isinstance(drafter.drafters[1], MedusaDrafter) and drafter.needs_hidden and needs_hidden(spec)
    assert not needs_hidden(SpecConfig(method="auto"))
