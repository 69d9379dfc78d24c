"""One request's state as the scheduler and block manager see it: token history and KV bookkeeping.

Plain Python on purpose (no torch): the router will later hold the same token history, and a lost
verifier replica is rebuilt from it.
"""

from __future__ import annotations

import enum
import itertools

from specserve.engine.config import SamplingParams
from specserve.errors import InvalidRequestError

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV blocks
    RUNNING = "running"  # holds KV blocks; prefilling or decoding
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an EOS / stop token id / stop string
    LENGTH = "length"  # max_tokens reached or the context is full
    ABORT = "abort"  # cancelled by the caller


class Sequence:
    """Token history of one request plus how much of it has KV in the cache.

    Invariant: `num_computed_tokens <= num_tokens`; tokens `[0, num_computed_tokens)` have KV stored in
    the slots named by `block_table`. The last token never has KV before its forward runs.
    """

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, max_total_tokens: int) -> None:
        assert prompt_token_ids, "a sequence needs at least one prompt token"
        self.seq_id = next(_seq_ids)
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        # Hard cap from the model context: prompt + output never exceed it.
        self.max_total_tokens = max_total_tokens
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        # Tokens whose KV came from the prefix cache (a subset of the computed ones), for stats.
        self.num_cached_tokens = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens `[start, end)` of prompt + output without building the whole list."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_len]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, status={self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    if any(token >= vocab_size for token, _ in params.logit_bias):
        raise InvalidRequestError(f"logit_bias token ids must lie in [0, {vocab_size})")


def check_prompt(prompt_token_ids: list[int], max_total_tokens: int, vocab_size: int) -> None:
    """Raise InvalidRequestError unless the prompt is non-empty, leaves room for one generated token in
    `max_total_tokens`, and holds only ids in [0, vocab_size)."""
    if not prompt_token_ids:
        raise InvalidRequestError("prompt is empty")
    if len(prompt_token_ids) >= max_total_tokens:
        raise InvalidRequestError(
            f"prompt has {len(prompt_token_ids)} tokens; the context holds {max_total_tokens} "
            "including at least one generated token"
        )
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        raise InvalidRequestError(f"prompt token ids must lie in [0, {vocab_size})")
