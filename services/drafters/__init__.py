"""Draft sources, one module each, all behind `drafters.base.Drafter`; `build_drafter` picks one by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from specserve.engine.config import LEARNED_METHODS, check_exit_layer
from specserve.errors import InvalidRequestError

FEATURE_DRAFTERS = ("eagle", "medusa")  # learned drafters that read the target's hidden states

if TYPE_CHECKING:
    from specserve.drafters.base import Drafter
    from specserve.engine.config import ModelConfig, SpecConfig
    from specserve.engine.model import LlamaModel
    from specserve.engine.tokenizer import Tokenizer


def build_drafter(spec: SpecConfig, model: LlamaModel | None, tokenizer: Tokenizer) -> Drafter | None:
    """The drafter `spec.method` names (None for "off"). Modules load lazily: "off" imports none. `model`
    may be None where `reads_weights(spec)` is False (a drafter replica of those loads no weights).

    "auto" merges the n-gram drafter with retrieval when `spec.datastore_path` is set and with the learned
    drafter in `spec.draft_checkpoint`, of whatever kind it holds, when that is set (hypothesis reduction,
    drafters/auto.py; the CLI picks the checkpoint, `learned.checkpoint.best_default_checkpoint`); "rest" needs the
    datastore; "early-exit" drafts with the target's first `spec.exit_layer` layers (its weights, not a
    copy); "eagle", "medusa", "draft-model" and "exit-head" load the drafter in `spec.draft_checkpoint`,
    trained for this target (learned/).
    """
    from specserve.drafters.ngram import NgramDrafter

    assert model is not None or not reads_weights(spec), f"{spec.method} needs the target model"
    check_sources(spec, None if model is None else model.config)
    if spec.method == "off":
        return None
    if spec.method == "ngram":
        return NgramDrafter()
    if spec.method == "rest":
        return _rest(spec.datastore_path, tokenizer)
    if spec.method == "early-exit":
        from specserve.drafters.early_exit import EXIT_LAYERS_SKIPPED, EarlyExitConfig, EarlyExitDrafter

        exit_layer = spec.exit_layer if spec.exit_layer is not None else model.config.num_layers - EXIT_LAYERS_SKIPPED
        return EarlyExitDrafter(model, EarlyExitConfig(exit_layer=exit_layer))
    if spec.method in LEARNED_METHODS:
        return _learned(spec.method, spec.draft_checkpoint, model)
    if spec.method == "auto":
        from specserve.drafters.auto import MergedDrafter

        sources: list[Drafter] = [NgramDrafter()]
        if spec.datastore_path is not None:
            sources.append(_rest(spec.datastore_path, tokenizer))
        if spec.draft_checkpoint is not None:
            from specserve.learned.checkpoint import checkpoint_kind

            sources.append(_learned(checkpoint_kind(spec.draft_checkpoint), spec.draft_checkpoint, model))
        return MergedDrafter(sources)
    raise InvalidRequestError(f"drafter {spec.method!r} is not available in this version")


def check_sources(spec: SpecConfig, model_config: ModelConfig | None) -> None:
    """What `build_drafter(spec, ...)` will read, checked from paths and headers alone, so that a bad setting
    fails before the target's weights load (seconds): the datastore file exists, a checkpoint's header is
    ours and names the drafter, the exit layer is one of the model's. Building the drafter checks in full
    (checksums, the target's fingerprint). `model_config` may be None where `reads_weights(spec)` is False."""
    if spec.method == "rest" and spec.datastore_path is None:
        raise InvalidRequestError("the rest drafter needs a datastore (specserve datastore build ...)")
    if spec.method in ("rest", "auto") and spec.datastore_path is not None:
        from specserve.drafters.datastore import check_datastore_file

        check_datastore_file(spec.datastore_path)
    if spec.method == "early-exit" and spec.exit_layer is not None:
        assert model_config is not None
        check_exit_layer(spec.exit_layer, model_config.num_layers)
    if spec.method in LEARNED_METHODS:
        if spec.draft_checkpoint is None:
            raise InvalidRequestError(f"the {spec.method} drafter needs a checkpoint "
                                      f"(specserve train-draft --kind {spec.method})")
        from specserve.learned.checkpoint import check_header

        check_header(spec.draft_checkpoint, spec.method)
    if spec.method == "auto" and spec.draft_checkpoint is not None:
        from specserve.learned.checkpoint import checkpoint_kind

        checkpoint_kind(spec.draft_checkpoint)


def reads_weights(spec: SpecConfig) -> bool:
    """Whether the drafter `build_drafter(spec, ...)` builds reads the target's weights: not "off", n-gram,
    retrieval, or "auto" without a learned checkpoint (n-gram + retrieval), which read tokens only."""
    return spec.method not in ("off", "ngram", "rest") and not (spec.method == "auto" and spec.draft_checkpoint is None)


def needs_hidden(spec: SpecConfig) -> bool:
    """Whether the drafter `build_drafter(spec, ...)` builds drafts from the target's hidden states (its
    verifiers must keep them), told without building it: EAGLE and Medusa, alone or inside auto (whose
    checkpoint's header says its kind)."""
    if spec.method == "auto" and spec.draft_checkpoint is not None:
        from specserve.learned.checkpoint import checkpoint_kind

        return checkpoint_kind(spec.draft_checkpoint) in FEATURE_DRAFTERS
    return spec.method in FEATURE_DRAFTERS


def _rest(path: str, tokenizer: Tokenizer) -> Drafter:
    from specserve.drafters.datastore import TokenDatastore, tokenizer_fingerprint
    from specserve.drafters.rest import RestDrafter

    return RestDrafter(TokenDatastore.load(path, tokenizer_fingerprint(tokenizer)))


def _learned(kind: str, path: str, model: LlamaModel) -> Drafter:
    """The trained drafter of `kind` (LEARNED_METHODS) in checkpoint `path`, for `model`."""
    if kind == "eagle":
        from specserve.drafters.eagle import EagleDrafter
        from specserve.learned.eagle_head import load_eagle_head

        return EagleDrafter(load_eagle_head(path, model))
    if kind == "medusa":
        from specserve.drafters.medusa import MedusaDrafter
        from specserve.learned.medusa_heads import load_medusa_heads

        return MedusaDrafter(load_medusa_heads(path, model))
    if kind == "draft-model":
        from specserve.drafters.draft_model import DraftModelDrafter
        from specserve.learned.draft_model import load_draft_model

        return DraftModelDrafter(load_draft_model(path, model))
    assert kind == "exit-head", kind
    from specserve.drafters.exit_head import ExitHeadDrafter
    from specserve.learned.exit_head import load_exit_head

    return ExitHeadDrafter(load_exit_head(path, model), model)
