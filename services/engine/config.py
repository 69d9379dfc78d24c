"""One frozen, validated configuration dataclass per concern.

Built once (from CLI flags, later env / Helm values) and passed down explicitly; nothing below reads the
environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from specserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from specserve.engine.acceptance import LossyConfig

WEIGHT_DTYPES = ("float32", "bfloat16", "int8")
# KV cache element types. bfloat16 halves the bytes attention reads each decode step (and the memory a
# sequence holds), int8 (a scale per token and KV head) cuts them to 68 / 256; their K/V are rounded, so
# even float32 weights are no longer exact against the reference.
KV_DTYPES = ("float32", "bfloat16", "int8")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family checkpoint (the fields HF `LlamaConfig` and GGUF `llama.*` share)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style `rope_scaling` dict flattened to a hashable tuple of (key, value) pairs; () means none.
    rope_scaling: tuple[tuple[str, object], ...] = ()
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "GQA needs num_heads divisible by num_kv_heads"
        assert self.head_dim % 2 == 0, "RoPE needs an even head_dim"
        assert min(self.vocab_size, self.hidden_size, self.num_layers) > 0

    @property
    def rope_scaling_dict(self) -> dict[str, object]:
        return dict(self.rope_scaling)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: `num_blocks` blocks of `block_size` token slots per layer, of element type `dtype`
    (KV_DTYPES): float32, exact; bfloat16, half the memory and the bytes a batched decode step's attention
    reads; int8, each token's K and V rows per KV head quantized with their own scale (absmax / 127), about
    a quarter. Every attention backend reads all three (the engine's queries are float32)."""

    block_size: int = 16
    num_blocks: int = 2048
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.num_blocks <= 0:
            raise InvalidRequestError("block_size and num_blocks must be positive")
        if self.dtype not in KV_DTYPES:
            raise InvalidRequestError(f"KV cache dtype must be one of {', '.join(KV_DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits for one engine step."""

    max_num_seqs: int = 64
    # Token budget of one forward: decodes take one token each, prefill chunks fill the rest.
    max_num_batched_tokens: int = 512

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise InvalidRequestError("max_num_seqs and max_num_batched_tokens must be positive")


# OpenAI's limit on top_logprobs; each costs a topk entry per generated token.
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters; temperature 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # None: no log probabilities; n: each generated token's (engine/logprobs.py) and the n most likely
    # tokens of its position (0-20, OpenAI's top_logprobs).
    logprobs: int | None = None
    # OpenAI's penalties on tokens generated so far: logit -= presence_penalty if the token occurred,
    # and frequency_penalty times its count; both in [-2, 2], 0 = off. repetition_penalty (vLLM, HF): a
    # token of the prompt or the output has a positive logit divided by it, a negative one multiplied;
    # > 0, 1 = off. All apply to the raw logits before temperature and filters (engine/sampler.py).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # OpenAI's logit_bias: (token id, bias in [-100, 100]) pairs added to those tokens' logits after the
    # penalties; -100 bans a token, +100 all but forces it.
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be > 0, got {self.max_tokens}")
        if not self.temperature >= 0.0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not -100.0 <= bias <= 100.0 for _, bias in self.logit_bias):
            raise InvalidRequestError("logit_bias values must be in [-100, 100]")
        tokens = [token for token, _ in self.logit_bias]
        if any(not isinstance(t, int) or t < 0 for t in tokens) or len(set(tokens)) != len(tokens):
            raise InvalidRequestError("logit_bias token ids must be integers >= 0, each at most once")
        if not self.repetition_penalty > 0.0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Penalties or a logit bias apply (`sampler.adjust_logits`)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or bool(self.logit_bias))


SPEC_METHODS = ("off", "ngram", "rest", "early-exit", "eagle", "medusa", "draft-model", "exit-head", "auto")
# The drafters trained by `specserve train-draft --kind KIND`, each loading a checkpoint of its kind (learned/).
LEARNED_METHODS = ("eagle", "medusa", "draft-model", "exit-head")
SPECULATION_BUDGETS = ("cost", "static")


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding: which drafter proposes, and how many drafted tokens a step may verify."""

    method: str = "off"  # one of SPEC_METHODS
    # Most tree nodes verified per sequence per step (the per-sequence budget). 5, not 8: on the 2-core
    # CPU a forward of 1-5 rows costs about one decode, 9 rows ~1.15-1.4x, and nodes 6-8 are rarely
    # accepted; 8 Spec-Bench prompts at budget 8 -> 5: ngram 41.6 -> 44.8 tok/s, rest 32.2 -> 34.5,
    # eagle 33.4 -> 37.1, auto 38.1 -> 41.4 (tau 1.68 -> 1.64 for ngram). A GPU verifies wider trees
    # at almost no cost: raise it there.
    num_draft_tokens: int = 5
    # Drafted tokens verified per step over the whole batch; a sequence's budget is this shared out
    # over the decoding sequences (capped by num_draft_tokens), so speculation fades as the batch grows
    # and stops when the batch alone fills the forward.
    max_draft_tokens_per_step: int = 64
    # "cost" (engine/draft_budget.py): each step drafts only the nodes whose expected accepted tokens pay
    # for the rows they add, by this engine's measured cost of a verify row and each request's acceptance
    # record, within the static budget below; "static": that budget, `budget_per_sequence`, every step.
    # Why: what a verify row costs differs by host (the module says how much), so the best fixed budget
    # does too: on a 2-core Zen 5 EPYC 3 nodes beat the default 5 by 5-6% of n-gram throughput.
    speculation_budget: str = "cost"
    datastore_path: str | None = None  # retrieval datastore for "rest" / "auto" (None: the default one)
    lossy: LossyConfig | None = None  # relaxed acceptance (engine/acceptance.py); None = lossless
    # Decoder layers the "early-exit" drafter runs before the final norm and LM head (1 .. num_layers - 1,
    # checked against the model when the drafter is built); None: num_layers - EXIT_LAYERS_SKIPPED.
    # drafters/early_exit.py says how the default was picked.
    exit_layer: int | None = None
    # The trained checkpoint of a learned drafter (LEARNED_METHODS; "auto": of any kind, its header says
    # which); the CLI fills in the default one of the kind (learned/checkpoint.py, `default_checkpoint_path`;
    # auto: `best_default_checkpoint`), made by `specserve train-draft`.
    draft_checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise InvalidRequestError(f"unknown drafter {self.method!r}; expected one of {', '.join(SPEC_METHODS)}")
        if self.num_draft_tokens <= 0 or self.max_draft_tokens_per_step <= 0:
            raise InvalidRequestError(
                f"draft budgets must be > 0, got num_draft_tokens={self.num_draft_tokens}, "
                f"max_draft_tokens_per_step={self.max_draft_tokens_per_step}"
            )
        if self.speculation_budget not in SPECULATION_BUDGETS:
            raise InvalidRequestError(f"speculation_budget must be one of {', '.join(SPECULATION_BUDGETS)}, "
                                      f"got {self.speculation_budget!r}")
        if self.exit_layer is not None and self.exit_layer < 1:
            raise InvalidRequestError(f"exit_layer must be >= 1, got {self.exit_layer}")

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    def budget_per_sequence(self, num_decoding: int) -> int:
        """Nodes each of `num_decoding` sequences may draft this step (0 = plain decoding)."""
        if not self.enabled or num_decoding == 0:
            return 0
        return min(self.num_draft_tokens, self.max_draft_tokens_per_step // num_decoding)


def check_exit_layer(exit_layer: int, num_layers: int) -> None:
    """An early exit (drafter or trained head) runs 1 .. num_layers - 1 of the target's layers."""
    if not 1 <= exit_layer < num_layers:
        raise InvalidRequestError(f"exit_layer must be in [1, {num_layers - 1}] for this {num_layers}-layer model, "
                                  f"got {exit_layer}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to build an `LLMEngine`."""

    model_path: str
    dtype: str = "float32"
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    spec: SpecConfig = SpecConfig()
    # Attention whose rows do not depend on the other rows of their forward (a verify step's drafts,
    # other sequences, padding, prefill chunking): greedy speculation then equals plain greedy decoding
    # token for token at every dtype. Without it float32 differs only in near-ties, but int8 and
    # bfloat16 rounding can turn an attention difference in the last bit into another token. On the
    # "cpu" backend every row, prefill chunks too, goes to the C++ kernel, invariant by construction
    # (prefill attention costs more there than in SDPA); on "torch" attention runs in float64, 1.5-7x
    # as long, by shape (kernels/paged_attention.py, `_attend_group_float64`).
    batch_invariant: bool = False
    # "auto": "cpu" where its C++ kernel builds, else "torch".
    # "cpu": decode and draft-tree rows by the C++ kernel of kernels/csrc/, longer prefill chunks by SDPA.
    # "torch": the plain-torch paged attention, the reference. "triton": the tree-attention kernel of
    # kernels/tree_attention.py, for a cache on a CUDA device; on CPU it runs only under
    # TRITON_INTERPRET=1 (tests). The engine itself keeps its cache on the CPU today.
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in WEIGHT_DTYPES:
            raise InvalidRequestError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.dtype!r}")
        if self.attention_backend not in ("auto", "cpu", "torch", "triton"):
            raise InvalidRequestError(
                f"attention_backend must be auto, cpu, torch or triton, got {self.attention_backend!r}")
        if self.batch_invariant and self.attention_backend == "triton":
            raise InvalidRequestError("batch_invariant attention exists only on the cpu and torch backends")
