"""`specserve train-draft`: distil a corpus from the target, choose the draft vocabulary, train an EAGLE head,
Medusa heads, a distilled draft model or an early-exit head (`kind`), score it on held-out sequences, and
write the checkpoint (learned/checkpoint.py). Every kind trains on the same cached corpus.

Medusa heads (default recipe: 4 heads, soft loss, lr 1e-3, 4 epochs, batch 8), one run on the 800-prompt
corpus below (OMP_NUM_THREADS=1, the 2 cores shared with tests for part of it): 15 min of training (~2 s a
step); held-out top-1 agreement head 1 / head 2: 30.8% / 19.7%.

Distilled draft model: which target layers to copy, one run each on 256 prompts (230 trained, 26 held out),
1 epoch (29 steps, soft loss, lr 5e-4; OMP_NUM_THREADS=1 beside the corpus build, ~5.5 s a step), held-out
step-1 / step-2 (given step 1 right) accuracy: layers 0,1,2,3 19.2% / 23.9%; 0,1,2,29 17.5% / 25.5%;
0,10,20,29 14.7% / 17.4%; 0,29 15.4% / 25.4%; 0,1,2,29 at lr 2e-3 14.1% / 10.8%. Untrained, 0,1,2,3 (the
target's untrained early exit after layer 4) agrees 4.2% of the time, the others ~0%. Default: layers
0,1,2,3, lr 5e-4, 3 epochs.

Early-exit head: which layer, one run each on the same 256 prompts, 3 epochs (87 steps, soft loss, ~0.9 s a
step at 2 threads), held-out top-1 accuracy (untrained exit in brackets): lr 1e-3: L 6 17.8% (3.6%), L 10
19.5% (4.9%), L 14 21.9% (9.7%); lr 1e-2: L 4 34.8% (4.2%), L 8 34.2% (4.1%), L 12 38.5% (7.6%); L 8 at lr
3e-3 30.1%, at 3e-2 33.2%. The head, not the depth, is most of it: default L 4 (drafting costs 4 layers
and the head's 8192 rows, ~0.14 of a target forward), lr 1e-2, 4 epochs. On the 800-prompt corpus (760
sequences trained, 40 held out): soft 35.3% in 3.9 min, hard 35.7% (same steps).

EAGLE head:

The default recipe is sized to finish within an hour on 2 CPU cores. Measured on SmolLM2-135M (float32,
AMD EPYC, 2 cores, OMP_NUM_THREADS=2, nothing else running):
  distillation: greedy generation 161 tok/s with 16 requests in flight (responses average ~160 tokens; many
    end before 256), the hidden-state prefill 720 tok/s (prompt + response average ~235 tokens): ~1.4 s
    per prompt in all.
  training, batches of 8 sequences: 0.63 s/step with --loss soft (~2,900 tok/s), 0.5 hard, 1.4 unroll.
  On 256 prompts (243 trained, 13 held out), 10 epochs = 310 steps, held-out step-1 / step-2 top-1 accuracy:
    soft lr 1e-3 29% / 16%, 3e-3 37% / 23%, 8e-3 42% / 26%; hard 1e-3 30% / 17%; unroll 3e-3 32% / 29%
    (step 2 gains what step 1 loses). 3 epochs: lr 3e-4 5% / 1%, 1e-3 13% / 4%: steps are what is short.
Default: 1200 prompts (~28 min) and 12 epochs of the ~1140 trained sequences (~1,710 steps, ~18 min),
lr 5e-3 (between the two best measured), about 47 min in all; a cached corpus skips the first part.
One run at OMP_NUM_THREADS=1 (2.4 s/prompt, 1.2 s/step), --prompts 800 --epochs 10, 256 prompts cached:
193k tokens (133k generated), 950 steps, 42 min; last-epoch loss 0.52, held-out step-1 / step-2 accuracy
45% / 29% (40 held-out sequences, 93% of their tokens in the draft vocabulary).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from specserve.engine import loader
from specserve.engine.config import check_exit_layer
from specserve.engine.model import LlamaModel
from specserve.errors import DraftCheckpointError, InvalidRequestError
from specserve.learned.checkpoint import KINDS, DraftCheckpoint, save_checkpoint, target_fingerprint
from specserve.learned.draft_model import DraftModelConfig
from specserve.learned.distill_data import DistillConfig, DistillCorpus, build_corpus, choose_draft_vocab
from specserve.learned.eagle_head import EagleHead, new_eagle_head
from specserve.learned.fit import TrainConfig, load_training_state
from specserve.learned.medusa_heads import new_medusa_heads

# Each kind's default recipe (the CLI's flags override fields of it).
TRAIN_DEFAULTS = {"eagle": TrainConfig(), "medusa": TrainConfig(epochs=4, lr=1e-3),
                  "draft-model": TrainConfig(epochs=3, lr=5e-4), "exit-head": TrainConfig(epochs=4, lr=1e-2)}
# The target layers a draft model starts from (SmolLM2-135M has 30): measured above.
DRAFT_LAYERS = (0, 1, 2, 3)
EXIT_LAYER = 4  # of SmolLM2-135M's 30, where an exit head reads the residual stream: measured above

FC_INIT_STD = 0.02  # fc starts small: the copied layer first sees a faint mix of feature and embedding


@dataclass(frozen=True)
class TrainDraftConfig:
    model_path: str
    train_dir: Path  # *.jsonl training prompts
    cache_dir: Path  # distilled corpora (learned/distill_data.py)
    out: Path  # the checkpoint; the training state sits beside it while training runs
    distill: DistillConfig
    train: TrainConfig
    kind: str = "eagle"  # one of KINDS
    draft_vocab_size: int = 8192
    heldout_fraction: float = 0.05  # of the sequences, never trained on
    medusa_heads: int = 4  # K, for kind "medusa": head k guesses the token k past the root
    draft_layers: tuple[int, ...] = DRAFT_LAYERS  # for kind "draft-model": target layers its layers start as
    exit_layer: int = EXIT_LAYER  # for kind "exit-head": the target layers the head reads after
    resume: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"unknown drafter kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind != "eagle" and self.train.loss == "unroll":
            raise InvalidRequestError(f"{self.kind} trains with --loss hard or soft (unroll is EAGLE's)")
        if self.kind != "draft-model" and self.train.loss == "on-policy":
            raise InvalidRequestError(f"{self.kind} trains with --loss hard or soft (on-policy is the draft model's)")
        if self.draft_vocab_size < 1 or not 0 < self.heldout_fraction < 1 or self.medusa_heads < 1:
            raise InvalidRequestError("draft_vocab_size and medusa_heads must be >= 1, heldout_fraction in (0, 1)")

    @property
    def state_path(self) -> Path:
        return self.out.with_name(self.out.name + ".train-state.pt")


@dataclass
class TrainDraftReport:
    checkpoint: str
    sequences: int  # distilled prompt + response sequences
    tokens: int  # all of their tokens
    response_tokens: int
    draft_vocab_coverage: float  # of the training responses' tokens
    final_loss: float  # mean over the last epoch's steps
    heldout_step1_accuracy: float
    heldout_step2_accuracy: float  # 0 where the drafter guesses one token only (one Medusa head)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each phase


def load_float32_target(model_path: str) -> LlamaModel:
    """The target with plain float32 `nn.Linear` weights (the serving engine packs them; the head copies them)."""
    model_config, state_dict = loader.load_checkpoint(model_path)
    model = LlamaModel(model_config)
    model.load_hf_state_dict(state_dict)
    return model.eval()


def head_from_target(target: LlamaModel, token_map: torch.Tensor, seed: int) -> EagleHead:
    """A head whose decoder layer starts as the target's last one (it already turns a residual stream into
    what the final norm reads) and whose fc starts small and random."""
    torch.manual_seed(seed)
    head = new_eagle_head(target, token_map)
    torch.nn.init.normal_(head.fc.weight, std=FC_INIT_STD)
    last = target.layers[-1]
    for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
        getattr(head, name).load_state_dict(getattr(last, name).state_dict())
    return head


def split_heldout(corpus: DistillCorpus, fraction: float, seed: int) -> tuple[DistillCorpus, DistillCorpus]:
    """(train, held-out) sequences, drawn by `seed`; sequences with under 2 response tokens (nothing to
    draft) are dropped."""
    usable = [k for k in range(corpus.num_sequences) if int(corpus.lengths[k] - corpus.prompt_lens[k]) >= 2]
    if len(usable) < 2:
        raise InvalidRequestError(f"the corpus has {len(usable)} sequences with a response to learn; need 2+")
    order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed)).tolist()
    num_heldout = max(1, round(fraction * len(usable)))
    return (corpus.subset(sorted(usable[i] for i in order[num_heldout:])),
            corpus.subset(sorted(usable[i] for i in order[:num_heldout])))


def train_draft(config: TrainDraftConfig) -> TrainDraftReport:
    state = load_training_state(config.state_path) if config.resume else None  # fail before the slow parts
    # The drafter's layers must exist in this target: tell from its header, before loading and distilling.
    target_config = loader.load_config(config.model_path)
    if config.kind == "draft-model":
        DraftModelConfig.for_target(target_config, config.draft_layers, config.draft_vocab_size)
    if config.kind == "exit-head":
        check_exit_layer(config.exit_layer, target_config.num_layers)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    target = load_float32_target(config.model_path)
    fingerprint = target_fingerprint(target)
    corpus = build_corpus(config.model_path, config.train_dir, config.cache_dir, config.distill, fingerprint)
    seconds["corpus"] = time.perf_counter() - start
    train_set, heldout = split_heldout(corpus, config.heldout_fraction, config.train.seed)
    token_map, coverage = choose_draft_vocab(train_set, config.draft_vocab_size, target.config.vocab_size)
    data_hash = corpus.data_hash()
    recipe = recipe_of(config, data_hash)
    if state is not None and state["recipe"] != recipe:
        changed = sorted(k for k in recipe if state["recipe"].get(k) != recipe[k])
        raise DraftCheckpointError(f"training state {config.state_path} was made with another recipe "
                                   f"(differs in {', '.join(changed)}); drop --resume to start over")
    train = {"eagle": train_eagle_kind, "medusa": train_medusa_kind, "draft-model": train_draft_model_kind,
             "exit-head": train_exit_head_kind}[config.kind]
    losses, accuracy, tensors, head_config, seconds_taken = train(config, target, train_set, heldout, token_map,
                                                                  recipe, state)
    seconds.update(seconds_taken)
    heldout = {f"step{i + 1}": round(a, 4) for i, a in enumerate(accuracy[:2])}
    checkpoint = DraftCheckpoint(config.kind, tensors, head_config, fingerprint, recipe, data_hash, heldout)
    save_checkpoint(config.out, checkpoint)
    config.state_path.unlink(missing_ok=True)
    steps_per_epoch = len(losses) // config.train.epochs
    return TrainDraftReport(
        checkpoint=str(config.out), sequences=corpus.num_sequences, tokens=len(corpus.token_ids),
        response_tokens=len(corpus.response_token_ids()), draft_vocab_coverage=round(coverage, 4),
        final_loss=round(sum(losses[-steps_per_epoch:]) / steps_per_epoch, 4),
        heldout_step1_accuracy=round(accuracy[0], 4),
        heldout_step2_accuracy=round(accuracy[1], 4) if len(accuracy) > 1 else 0.0,
        seconds={phase: round(s, 1) for phase, s in seconds.items()},
    )


Trained = tuple[list[float], list[float], dict[str, torch.Tensor], dict[str, Any], dict[str, float]]


def train_eagle_kind(config: TrainDraftConfig, target: LlamaModel, train_set: DistillCorpus, heldout: DistillCorpus,
                     token_map: torch.Tensor, recipe: dict[str, Any], state: dict[str, Any] | None) -> Trained:
    """(step losses, held-out accuracy of draft steps 1 and 2, checkpoint tensors, head config, phase seconds)."""
    from specserve.learned.train_eagle import heldout_accuracy, train_head

    head = head_from_target(target, token_map, config.train.seed)
    return _train_and_score(head, train_head, heldout_accuracy, config, train_set, heldout, recipe, state)


def train_medusa_kind(config: TrainDraftConfig, target: LlamaModel, train_set: DistillCorpus, heldout: DistillCorpus,
                      token_map: torch.Tensor, recipe: dict[str, Any], state: dict[str, Any] | None) -> Trained:
    """As `train_eagle_kind`, for Medusa heads (accuracy of every head, head 1 first)."""
    from specserve.learned.train_medusa import heldout_accuracy, train_heads

    heads = new_medusa_heads(target, token_map, config.medusa_heads)
    return _train_and_score(heads, train_heads, heldout_accuracy, config, train_set, heldout, recipe, state)


def train_draft_model_kind(config: TrainDraftConfig, target: LlamaModel, train_set: DistillCorpus,
                           heldout: DistillCorpus, token_map: torch.Tensor, recipe: dict[str, Any],
                           state: dict[str, Any] | None) -> Trained:
    """As `train_eagle_kind`, for the distilled draft model (accuracy of chain steps 1 and 2)."""
    from specserve.engine.llm_engine import load_tokenizer
    from specserve.learned.draft_model import new_draft_model
    from specserve.learned.train_draft_model import heldout_accuracy, train_model

    model = new_draft_model(target, token_map, config.draft_layers)
    stop_ids = load_tokenizer(config.model_path).eos_token_ids if config.train.loss == "on-policy" else ()

    def train(model, corpus, *rest):  # on-policy steps sample from the model and score with the target
        return train_model(model, corpus, *rest, target=target, stop_ids=stop_ids)

    return _train_and_score(model, train, heldout_accuracy, config, train_set, heldout, recipe, state)


def train_exit_head_kind(config: TrainDraftConfig, target: LlamaModel, train_set: DistillCorpus,
                         heldout: DistillCorpus, token_map: torch.Tensor, recipe: dict[str, Any],
                         state: dict[str, Any] | None) -> Trained:
    """As `train_eagle_kind`, for a trained early-exit head (its step-1 accuracy only: it drafts one token
    per forward of the target's first L layers)."""
    from specserve.learned.exit_head import new_exit_head
    from specserve.learned.train_exit_head import heldout_accuracy, train_exit_head

    head = new_exit_head(target, token_map, config.exit_layer)
    return _train_and_score(head, lambda head, corpus, *rest: train_exit_head(head, target, corpus, *rest),
                            lambda head, corpus, *_: heldout_accuracy(head, target, corpus),
                            config, train_set, heldout, recipe, state)


def _train_and_score(module: Any, train: Callable[..., list[float]], score: Callable[..., Sequence[float]],
                     config: TrainDraftConfig, train_set: DistillCorpus, heldout: DistillCorpus,
                     recipe: dict[str, Any], state: dict[str, Any] | None) -> Trained:
    """Train `module` with its kind's `train`, score it on `heldout` with `score`, and time both."""
    start = time.perf_counter()
    losses = train(module, train_set, config.train, config.state_path, recipe, state)
    trained = time.perf_counter()
    accuracy = list(score(module, heldout, config.train.batch_size, config.train.device))
    seconds = {"train": trained - start, "eval": time.perf_counter() - trained}
    return losses, accuracy, _cpu(module.state_dict()), module.config.to_dict(), seconds


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.cpu() for name, t in state.items()}


def recipe_of(config: TrainDraftConfig, data_hash: str) -> dict[str, Any]:
    """Everything that decides the trained weights, as the checkpoint records it."""
    distill = {k: v for k, v in asdict(config.distill).items() if k != "in_flight"}
    kind: dict[str, Any] = {"kind": config.kind}
    if config.kind == "medusa":
        kind["medusa_heads"] = config.medusa_heads
    if config.kind == "draft-model":
        kind["draft_layers"] = list(config.draft_layers)
    if config.kind == "exit-head":
        kind["exit_layer"] = config.exit_layer
    return {**config.train.recipe(), **kind, "distill": distill, "draft_vocab_size": config.draft_vocab_size,
            "heldout_fraction": config.heldout_fraction, "data_hash": data_hash}
