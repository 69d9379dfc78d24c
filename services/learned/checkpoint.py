"""Draft checkpoints: one safetensors file of a learned drafter's own tensors plus string metadata saying
what it is (kind, head config), which target it was trained for, how (recipe) and on what (data hash).

A drafter refuses a checkpoint made for another target: the fingerprint covers the target's geometry and
its embedding table (rounded to bfloat16, so float32, bfloat16 and int8 loads of one checkpoint agree).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from specserve.engine.config import LEARNED_METHODS
from specserve.engine.model import LlamaModel
from specserve.errors import DraftCheckpointError

FORMAT = "specserve-draft"
FORMAT_VERSION = 1
KINDS = LEARNED_METHODS  # every learned drafter, by its --spec name


@dataclass
class DraftCheckpoint:
    kind: str  # one of KINDS
    tensors: dict[str, torch.Tensor]  # the drafter's own weights (state_dict names)
    config: dict[str, Any]  # the drafter's shape (e.g. EagleConfig.to_dict())
    target_fingerprint: str
    recipe: dict[str, Any]  # how it was trained: losses, steps, seed, ...
    data_hash: str  # sha256 of the training corpus as tokenized


def target_fingerprint(model: LlamaModel) -> str:
    """sha256 of the target's architecture and bfloat16-rounded embedding table."""
    digest = hashlib.sha256(json.dumps(_geometry(model), sort_keys=True).encode())
    digest.update(model.embed_tokens.weight.detach().to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def _geometry(model: LlamaModel) -> dict[str, Any]:
    c = model.config
    return {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_layers": c.num_layers, "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "rope_theta": c.rope_theta}


def save_checkpoint(path: str | Path, checkpoint: DraftCheckpoint) -> None:
    """Write atomically (a temporary file renamed into place), so an interrupted save leaves the old one."""
    assert checkpoint.kind in KINDS
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": checkpoint.kind,
                "config": json.dumps(checkpoint.config), "target_fingerprint": checkpoint.target_fingerprint,
                "recipe": json.dumps(checkpoint.recipe), "data_hash": checkpoint.data_hash}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in checkpoint.tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_checkpoint(path: str | Path, kind: str, fingerprint: str | None) -> DraftCheckpoint:
    """Read and check a checkpoint; `fingerprint` None skips the target check (inspection only)."""
    path = Path(path)
    if not path.is_file():
        raise DraftCheckpointError(
            f"draft checkpoint {path} does not exist (make one: specserve train-draft --kind {kind})")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        config, recipe = json.loads(metadata.get("config", "null")), json.loads(metadata.get("recipe", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise DraftCheckpointError(f"draft checkpoint {path} is corrupt or not a safetensors file ({e})") from e
    if metadata.get("format") != FORMAT or metadata.get("format_version") != str(FORMAT_VERSION):
        raise DraftCheckpointError(f"{path} is not a specserve draft checkpoint (format {FORMAT} v{FORMAT_VERSION})")
    if metadata.get("kind") != kind:
        raise DraftCheckpointError(f"{path} holds a {metadata.get('kind')!r} drafter, not {kind!r}")
    if fingerprint is not None and metadata.get("target_fingerprint") != fingerprint:
        theirs = str(metadata.get("target_fingerprint"))[:12]
        raise DraftCheckpointError(
            f"{path} was trained for another target model (fingerprint {theirs}, this model {fingerprint[:12]})")
    return DraftCheckpoint(kind, tensors, config, metadata["target_fingerprint"], recipe, metadata.get("data_hash", ""))


def default_checkpoint_path(home: Path, kind: str) -> Path:
    """Where `--spec KIND` looks without `--draft-checkpoint`, and where `train-draft` writes by default.
    One per kind: a checkpoint for another target is refused by its fingerprint when loaded."""
    return home / "drafters" / f"{kind}.safetensors"
