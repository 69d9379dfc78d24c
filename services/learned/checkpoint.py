"""Draft checkpoints: one safetensors file of a learned drafter's own tensors plus string metadata saying
what it is (kind, head config), which target it was trained for, how (recipe) and on what (data hash).

A drafter refuses a checkpoint made for another target: the fingerprint covers the target's geometry and
its embedding table (rounded to bfloat16, so float32, bfloat16 and int8 loads of one checkpoint agree).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from specserve.engine import loader
from specserve.engine.config import LEARNED_METHODS, ModelConfig
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
    # Held-out top-1 agreement with the target by draft step ({"step1": .., "step2": ..}); empty in
    # checkpoints written before it was recorded.
    heldout: dict[str, float] = field(default_factory=dict)


def target_fingerprint(model: LlamaModel) -> str:
    """sha256 of the target's architecture and bfloat16-rounded embedding table."""
    return fingerprint_of(model.config, model.embed_tokens.weight)


def checkpoint_fingerprint(model_path: str | Path) -> str:
    """`target_fingerprint` of the model at `model_path` (any weight dtype), from its config and embedding
    table alone: for processes that do not load the rest (an n-gram drafter replica)."""
    return fingerprint_of(loader.load_config(model_path), loader.load_embedding(model_path))


def fingerprint_of(config: ModelConfig, embedding: torch.Tensor) -> str:
    digest = hashlib.sha256(json.dumps(_geometry(config), sort_keys=True).encode())
    digest.update(embedding.detach().to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def _geometry(c: ModelConfig) -> dict[str, Any]:
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
                "recipe": json.dumps(checkpoint.recipe), "data_hash": checkpoint.data_hash,
                "heldout": json.dumps(checkpoint.heldout)}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in checkpoint.tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_checkpoint(path: str | Path, kind: str, fingerprint: str | None) -> DraftCheckpoint:
    """Read and check a checkpoint; `fingerprint` None skips the target check (inspection only)."""
    path = Path(path)
    metadata = check_header(path, kind)
    try:
        tensors = load_file(str(path))
        config, recipe = json.loads(metadata.get("config", "null")), json.loads(metadata.get("recipe", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise DraftCheckpointError(f"draft checkpoint {path} is corrupt or not a safetensors file ({e})") from e
    if fingerprint is not None and metadata.get("target_fingerprint") != fingerprint:
        theirs = str(metadata.get("target_fingerprint"))[:12]
        raise DraftCheckpointError(
            f"{path} was trained for another target model (fingerprint {theirs}, this model {fingerprint[:12]})")
    return DraftCheckpoint(kind, tensors, config, metadata["target_fingerprint"], recipe, metadata.get("data_hash", ""),
                           heldout_of(metadata))


def check_header(path: str | Path, kind: str) -> dict[str, str]:
    """The metadata of a checkpoint that exists, is one of ours and holds a `kind` drafter (its header alone:
    cheap enough to check before the target loads); raises DraftCheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DraftCheckpointError(
            f"draft checkpoint {path} does not exist (make one: specserve train-draft --kind {kind})")
    metadata = metadata_of(path)  # a corrupt or foreign file fails here, with its reason
    if metadata.get("kind") != kind:
        raise DraftCheckpointError(f"{path} holds a {metadata.get('kind')!r} drafter, not {kind!r}")
    return metadata


def metadata_of(path: str | Path) -> dict[str, str]:
    """A draft checkpoint's string metadata, read from its header alone (no tensors)."""
    path = Path(path)
    if not path.is_file():
        raise DraftCheckpointError(f"draft checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise DraftCheckpointError(f"draft checkpoint {path} is corrupt or not a safetensors file ({e})") from e
    if metadata.get("format") != FORMAT or metadata.get("format_version") != str(FORMAT_VERSION):
        raise DraftCheckpointError(f"{path} is not a specserve draft checkpoint (format {FORMAT} v{FORMAT_VERSION})")
    return metadata


def heldout_of(metadata: dict[str, str]) -> dict[str, float]:
    try:
        heldout = json.loads(metadata.get("heldout", "{}"))
    except ValueError:
        return {}
    return {k: float(v) for k, v in heldout.items()} if isinstance(heldout, dict) else {}


def checkpoint_kind(path: str | Path) -> str:
    """Which learned drafter a checkpoint holds (one of KINDS), from its header."""
    kind = metadata_of(path).get("kind", "")
    if kind not in KINDS:
        raise DraftCheckpointError(f"{path} holds an unknown drafter kind {kind!r}")
    return kind


def expected_accepted(heldout: dict[str, float]) -> float:
    """Drafted tokens a step is expected to keep, from held-out agreement: step 1 is kept with its
    accuracy a1, step 2 after it with about a2 (measured on the drafter's own step-1 output): a1 (1 + a2)."""
    a1 = heldout.get("step1", 0.0)
    return a1 * (1.0 + heldout.get("step2", 0.0))


def best_default_checkpoint(home: Path) -> str | None:
    """The default checkpoint `--spec auto` merges in: the best (`best_checkpoint`) of the kinds trained
    here (`train-draft` writes `default_checkpoint_path`). None when no learned drafter is trained."""
    return best_checkpoint({kind: default_checkpoint_path(home, kind) for kind in KINDS})


def best_checkpoint(candidates: Mapping[str, Path]) -> str | None:
    """Of the existing files among `candidates` (kind -> checkpoint path), the one expected to keep the
    most drafted tokens a step by its held-out agreement (`expected_accepted`); on a tie, or between
    checkpoints without that record, the first in KINDS order (EAGLE first)."""
    present = [(kind, Path(path)) for kind, path in candidates.items() if Path(path).is_file()]
    if not present:
        return None
    ranked = sorted(present, key=lambda item: (-expected_accepted(heldout_of(metadata_of(item[1]))),
                                               KINDS.index(item[0])))
    return str(ranked[0][1])


def default_checkpoint_path(home: Path, kind: str) -> Path:
    """Where `--spec KIND` looks without `--draft-checkpoint`, and where `train-draft` writes by default.
    One per kind: a checkpoint for another target is refused by its fingerprint when loaded."""
    return home / "drafters" / f"{kind}.safetensors"
