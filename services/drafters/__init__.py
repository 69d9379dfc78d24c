"""Draft sources, one module each, all behind `drafters.base.Drafter`; `build_drafter` picks one by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from specserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from specserve.drafters.base import Drafter
    from specserve.engine.config import SpecConfig
    from specserve.engine.model import LlamaModel
    from specserve.engine.tokenizer import Tokenizer


def build_drafter(spec: SpecConfig, model: LlamaModel, tokenizer: Tokenizer) -> Drafter | None:
    """The drafter `spec.method` names (None for "off"). Modules load lazily: "off" imports none.

    "auto" merges the n-gram drafter with retrieval when `spec.datastore_path` is set and with the EAGLE
    head when `spec.draft_checkpoint` is (hypothesis reduction, drafters/auto.py); "rest" needs the
    datastore; "early-exit" drafts with the target's first `spec.exit_layer` layers (its weights, not a
    copy); "eagle", "medusa", "draft-model" and "exit-head" load the drafter in `spec.draft_checkpoint`,
    trained for this target (learned/).
    """
    from specserve.drafters.ngram import NgramDrafter

    if spec.method == "off":
        return None
    if spec.method == "ngram":
        return NgramDrafter()
    if spec.method == "rest":
        if spec.datastore_path is None:
            raise InvalidRequestError("the rest drafter needs a datastore (specserve datastore build ...)")
        return _rest(spec.datastore_path, tokenizer)
    if spec.method == "early-exit":
        from specserve.drafters.early_exit import EXIT_LAYERS_SKIPPED, EarlyExitConfig, EarlyExitDrafter

        exit_layer = spec.exit_layer if spec.exit_layer is not None else model.config.num_layers - EXIT_LAYERS_SKIPPED
        return EarlyExitDrafter(model, EarlyExitConfig(exit_layer=exit_layer))
    if spec.method == "eagle":
        if spec.draft_checkpoint is None:
            raise InvalidRequestError("the eagle drafter needs a checkpoint (specserve train-draft --kind eagle)")
        return _eagle(spec.draft_checkpoint, model)
    if spec.method == "medusa":
        if spec.draft_checkpoint is None:
            raise InvalidRequestError("the medusa drafter needs a checkpoint (specserve train-draft --kind medusa)")
        from specserve.drafters.medusa import MedusaDrafter
        from specserve.learned.medusa_heads import load_medusa_heads

        return MedusaDrafter(load_medusa_heads(spec.draft_checkpoint, model))
    if spec.method == "draft-model":
        if spec.draft_checkpoint is None:
            raise InvalidRequestError("the draft-model drafter needs a checkpoint "
                                      "(specserve train-draft --kind draft-model)")
        from specserve.drafters.draft_model import DraftModelDrafter
        from specserve.learned.draft_model import load_draft_model

        return DraftModelDrafter(load_draft_model(spec.draft_checkpoint, model))
    if spec.method == "exit-head":
        if spec.draft_checkpoint is None:
            raise InvalidRequestError("the exit-head drafter needs a checkpoint "
                                      "(specserve train-draft --kind exit-head)")
        from specserve.drafters.exit_head import ExitHeadDrafter
        from specserve.learned.exit_head import load_exit_head

        return ExitHeadDrafter(load_exit_head(spec.draft_checkpoint, model), model)
    if spec.method == "auto":
        from specserve.drafters.auto import MergedDrafter

        sources: list[Drafter] = [NgramDrafter()]
        if spec.datastore_path is not None:
            sources.append(_rest(spec.datastore_path, tokenizer))
        if spec.draft_checkpoint is not None:
            sources.append(_eagle(spec.draft_checkpoint, model))
        return MergedDrafter(sources)
    raise InvalidRequestError(f"drafter {spec.method!r} is not available in this version")


def needs_hidden(spec: SpecConfig) -> bool:
    """Whether the drafter `build_drafter(spec, ...)` builds drafts from the target's hidden states (its
    verifiers must keep them), told without building it: EAGLE and Medusa, alone or (EAGLE) inside auto."""
    return spec.method in ("eagle", "medusa") or (spec.method == "auto" and spec.draft_checkpoint is not None)


def _rest(path: str, tokenizer: Tokenizer) -> Drafter:
    from specserve.drafters.datastore import TokenDatastore, tokenizer_fingerprint
    from specserve.drafters.rest import RestDrafter

    return RestDrafter(TokenDatastore.load(path, tokenizer_fingerprint(tokenizer)))


def _eagle(path: str, model: LlamaModel) -> Drafter:
    from specserve.drafters.eagle import EagleDrafter
    from specserve.learned.eagle_head import load_eagle_head

    return EagleDrafter(load_eagle_head(path, model))
