"""Draft checkpoints: a head round-trips, and every way a checkpoint can be wrong is one clear
DraftCheckpointError."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from specserve.errors import DraftCheckpointError
from specserve.learned.checkpoint import FORMAT, FORMAT_VERSION, DraftCheckpoint, save_checkpoint, target_fingerprint
from specserve.learned.eagle_head import load_eagle_head
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
