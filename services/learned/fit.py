"""The training loop every learned drafter shares: AdamW over batches of distilled sequences, linear warmup
then cosine decay, gradient clipping, and a training state saved every `save_every` steps so `--resume`
continues exactly where an interrupted run stopped.

The learning rate is a function of the step alone, so the training state needs no scheduler object; batch
order is a function of (seed, epoch), so a resumed run takes the same steps as an uninterrupted one. What a
batch is and what its loss is belong to the drafter (train_eagle.py, train_medusa.py): the loop only asks
for the loss of a list of sequence indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from specserve.errors import DraftCheckpointError, InvalidRequestError

# Each drafter accepts its own subset (train_eagle.py: unroll, train_draft_model.py: on-policy).
LOSSES = ("hard", "soft", "unroll", "on-policy")
WINDOW_BATCHES = 16  # batches whose sequences are sorted by length together (less padding)


@dataclass(frozen=True)
class TrainConfig:
    loss: str = "soft"  # one of LOSSES
    epochs: int = 12
    batch_size: int = 8  # sequences per step
    lr: float = 5e-3  # peak
    warmup_fraction: float = 0.05  # of all steps
    weight_decay: float = 0.0
    grad_clip: float = 0.5  # max global gradient norm (EAGLE's)
    regression_weight: float = 1.0  # w_reg (EAGLE's feature regression; unused by Medusa)
    token_weight: float = 0.1  # w_tok
    seed: int = 0
    save_every: int = 100  # steps between training-state saves
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise InvalidRequestError(f"unknown loss {self.loss!r}; expected one of {', '.join(LOSSES)}")
        if min(self.epochs, self.batch_size, self.save_every) < 1 or self.lr <= 0 or self.grad_clip <= 0:
            raise InvalidRequestError("epochs, batch_size and save_every must be >= 1, lr and grad_clip > 0")
        if self.device not in ("cpu", "cuda") or (self.device == "cuda" and not torch.cuda.is_available()):
            raise InvalidRequestError(f"device {self.device!r} is not available here (cpu, or cuda with a GPU)")

    def recipe(self) -> dict[str, Any]:
        """The settings that decide the trained weights (not how often they are saved, nor where they run)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("save_every", "device")}


def epoch_batches(lengths: torch.Tensor, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Sequence indices of each step of one epoch, ceil(num_sequences / batch_size) steps.

    Shuffled, sorted by length within windows of WINDOW_BATCHES batches (so a batch pads little), and the
    batches shuffled again; the same (seed, epoch) always gives the same batches.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda k: int(lengths[k]))
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[p] for p in torch.randperm(len(batches), generator=generator).tolist()]


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1 over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def fit(module: nn.Module, lengths: torch.Tensor, config: TrainConfig, state_path: Path, recipe: dict[str, Any],
        state: dict[str, Any] | None, step_loss: Callable[[list[int]], torch.Tensor]) -> list[float]:
    """Train `module` in place on sequences of `lengths` `# [num_sequences]` (from `state` when resuming);
    `step_loss(indices)` is the loss of one batch of sequence indices. Every `save_every` steps the training
    state goes to `state_path`. Returns the loss of every step."""
    module.to(config.device).train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(lengths) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = max(1, round(config.warmup_fraction * total_steps))
    losses: list[float] = []
    if state is not None:
        module.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        losses = list(state["losses"])
    batches: dict[int, list[list[int]]] = {}
    with tqdm(total=total_steps, initial=len(losses), desc="training", unit="step", disable=None) as progress:
        for step in range(len(losses), total_steps):
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in batches:
                batches = {epoch: epoch_batches(lengths, config.batch_size, config.seed, epoch)}
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(step, total_steps, warmup_steps)
            loss = step_loss(batches[epoch][index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
            if (step + 1) % config.save_every == 0 and step + 1 < total_steps:
                save_training_state(state_path, {"head": module.state_dict(), "optimizer": optimizer.state_dict(),
                                                 "rng": torch.get_rng_state(), "losses": losses, "recipe": recipe})
    return losses


def draft_index_of(token_map: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`# [vocab_size]` int64: the draft id of each target token, -1 outside the draft vocabulary."""
    index = torch.full((vocab_size,), -1, dtype=torch.int64)
    index[token_map.cpu()] = torch.arange(len(token_map))
    return index


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically (a temporary file renamed into place): an interrupted save keeps the previous state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_training_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DraftCheckpointError(f"no training state at {path} to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(state, dict) and {"head", "optimizer", "rng", "losses", "recipe"} <= set(state)
    except Exception as e:  # torch.load fails in many ways on garbage (pickle, zip, EOF)
        raise DraftCheckpointError(f"training state {path} is corrupt ({type(e).__name__})") from e
    return state
