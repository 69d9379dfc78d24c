"""The self-distillation corpus a learned drafter trains on: training-set prompts, the target's own
responses to them, and the target's final-norm hidden state at every token of prompt + response.

The responses are the target's, so the drafter learns what the target says, not what a dataset says
(EAGLE-style self-distillation): greedy by default, or sampled at `temperature` (seeded per prompt), so a
drafter that serves sampling requests trains on the kind of text it will then see. Hidden states come from one fresh prefill of each whole sequence
with the target in float32, stored in bfloat16 (half the memory; the regression target loses ~3 digits).
The corpus is cached as safetensors shards of SHARD_SIZE prompts under a directory named by the settings,
so a rerun with the same settings, an interrupted run, or a run asking for more prompts reuses what exists.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from specserve.engine.config import CacheConfig, EngineConfig, SamplingParams
from specserve.engine.llm_engine import LLMEngine, RequestOutput, build_model, load_tokenizer
from specserve.engine.model import LlamaModel
from specserve.engine.model_runner import allocate_kv_cache
from specserve.engine.tokenizer import Tokenizer
from specserve.errors import InvalidRequestError
from specserve.kernels.paged_attention import build_attention_metadata

FORMAT_VERSION = 1
SHARD_SIZE = 64  # prompts per cache shard: what an interrupted run loses at most
BLOCK_SIZE = 16  # of the scratch KV cache the hidden-state prefill writes


@dataclass(frozen=True)
class DistillConfig:
    """Which prompts, and how the target answers them."""

    num_prompts: int = 1200
    max_new_tokens: int = 256
    max_prompt_tokens: int = 384  # longer prompts (chat template included) are skipped
    seed: int = 0  # shuffles each source's prompts before they are interleaved; seeds sampled responses
    in_flight: int = 16  # requests the engine batches at once
    temperature: float = 0.0  # of the target's responses: 0 = greedy, else sampled (no other filter)

    def __post_init__(self) -> None:
        if min(self.num_prompts, self.max_new_tokens, self.max_prompt_tokens, self.in_flight) < 1:
            raise InvalidRequestError(f"prompts, max_new_tokens, max_prompt_tokens and in_flight must be >= 1: {self}")
        if not 0.0 <= self.temperature < math.inf:
            raise InvalidRequestError(f"distillation temperature must be >= 0, got {self.temperature}")

    def response_params(self, index: int) -> SamplingParams:
        """How the target answers prompt `index` of the corpus order (a sampled answer has its own seed)."""
        if self.temperature == 0.0:
            return SamplingParams(max_tokens=self.max_new_tokens)
        return SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature,
                              seed=self.seed * 1_000_003 + index)


@dataclass
class DistillCorpus:
    """Sequences back to back (flat ragged): sequence k is rows offsets[k] : offsets[k + 1].

    Example: prompts [5, 6] and [7], responses [8, 2] and [9, 2] -> token_ids [5, 6, 8, 2, 7, 9, 2],
    offsets [0, 4, 7], prompt_lens [2, 1].
    """

    token_ids: torch.Tensor  # [num_tokens] int64
    offsets: torch.Tensor  # [num_sequences + 1] int64
    prompt_lens: torch.Tensor  # [num_sequences] int64
    hidden: torch.Tensor  # [num_tokens, hidden] bfloat16, the target's final-norm hidden state of each token

    def __post_init__(self) -> None:
        assert self.offsets.shape == (len(self.prompt_lens) + 1,) and int(self.offsets[-1]) == len(self.token_ids)
        assert self.hidden.shape[0] == len(self.token_ids)

    @property
    def num_sequences(self) -> int:
        return len(self.prompt_lens)

    @property
    def lengths(self) -> torch.Tensor:  # [num_sequences] int64
        return self.offsets.diff()

    def sequence(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Token ids `# [T]`, hidden states `# [T, hidden]` and prompt length of sequence k."""
        start, end = int(self.offsets[k]), int(self.offsets[k + 1])
        return self.token_ids[start:end], self.hidden[start:end], int(self.prompt_lens[k])

    def response_token_ids(self) -> torch.Tensor:
        """Every generated token, in order `# [num_response_tokens]`."""
        keep = torch.ones(len(self.token_ids), dtype=torch.bool)
        for start, prompt_len in zip(self.offsets[:-1].tolist(), self.prompt_lens.tolist()):
            keep[start : start + prompt_len] = False
        return self.token_ids[keep]

    def subset(self, indices: list[int]) -> DistillCorpus:
        return concat_corpora([one_sequence(*self.sequence(k)) for k in indices])

    def data_hash(self) -> str:
        """sha256 of the token ids and sequence boundaries (int64 little-endian): names the training data."""
        digest = hashlib.sha256(self.token_ids.numpy().astype("<i8").tobytes())
        digest.update(self.offsets.numpy().astype("<i8").tobytes())
        return digest.hexdigest()


def one_sequence(token_ids: torch.Tensor, hidden: torch.Tensor, prompt_len: int) -> DistillCorpus:
    """A corpus of the one sequence `token_ids` `# [T]` with the target's `hidden` `# [T, hidden]`."""
    return DistillCorpus(token_ids, torch.tensor([0, len(token_ids)]), torch.tensor([prompt_len]), hidden)


def concat_corpora(parts: list[DistillCorpus]) -> DistillCorpus:
    assert parts, "nothing to concatenate"
    lengths = torch.cat([p.lengths for p in parts])
    return DistillCorpus(torch.cat([p.token_ids for p in parts]), torch.cat([torch.zeros(1, dtype=torch.int64),
                         lengths.cumsum(0)]), torch.cat([p.prompt_lens for p in parts]),
                         torch.cat([p.hidden for p in parts]))


# ---- prompts ------------------------------------------------------------------------------------

def prompt_text(row: dict[str, Any]) -> str:
    """The user-side prompt of one training row; '' for none. ShareGPT pieces that begin with a (dropped)
    assistant turn are skipped: their first prompt answers something we do not have."""
    if "prompts" in row:
        usable = row.get("first_speaker", "human") in ("human", "user") and row["prompts"]
        return str(row["prompts"][0]).strip() if usable else ""
    if "question" in row:
        return str(row["question"]).strip()
    instances = row.get("instances") or [{}]
    extra = str(row.get("input") or instances[0].get("input") or "").strip()
    instruction = str(row.get("instruction", "")).strip()
    return f"{instruction}\n\n{extra}" if instruction and extra else instruction


def read_prompts(train_dir: Path, seed: int) -> list[str]:
    """Every usable prompt of `train_dir/*.jsonl`: each file shuffled by `seed`, then interleaved round-robin,
    so any prefix of the list mixes chat, math and code about evenly."""
    files = sorted(Path(train_dir).glob("*.jsonl"))
    if not files:
        raise InvalidRequestError(f"no *.jsonl training prompts in {train_dir}")
    sources = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            texts = [text for line in f if line.strip() and (text := prompt_text(json.loads(line)))]
        random.Random(f"{seed}:{path.name}").shuffle(texts)
        sources.append(texts)
    return [source[i] for i in range(max(map(len, sources))) for source in sources if i < len(source)]


def select_prompts(texts: list[str], tokenizer: Tokenizer, config: DistillConfig) -> list[list[int]]:
    """The first `num_prompts` prompts, chat template applied, that fit `max_prompt_tokens`."""
    selected = []
    for text in texts:
        ids = tokenizer.render_prompt_ids([{"role": "user", "content": text}])
        if len(ids) <= config.max_prompt_tokens:
            selected.append(ids)
            if len(selected) == config.num_prompts:
                return selected
    raise InvalidRequestError(f"only {len(selected)} training prompts fit {config.max_prompt_tokens} tokens; "
                              f"asked for {config.num_prompts}")


# ---- the target's responses and hidden states ---------------------------------------------------

def generate_responses(engine: LLMEngine, prompts: list[list[int]], config: DistillConfig,
                       progress: tqdm, first_index: int = 0) -> list[list[int]]:
    """The target's responses (EOS included when reached), `in_flight` requests batched at a time;
    `prompts[i]` is prompt `first_index + i` of the corpus order."""
    responses: list[list[int]] = [[] for _ in prompts]
    waiting = list(range(len(prompts)))[::-1]
    running = 0

    def collect(index: int) -> Callable[[RequestOutput], None]:
        def on_output(out: RequestOutput) -> None:
            nonlocal running
            responses[index] += out.new_token_ids
            if out.finished:
                running -= 1
                progress.update(1)
        return on_output

    while waiting or engine.has_unfinished():
        while waiting and running < config.in_flight:
            index = waiting.pop()
            engine.add_request(prompts[index], config.response_params(first_index + index), collect(index))
            running += 1
        engine.step()
    return responses


@torch.inference_mode()
def final_hidden_states(model: LlamaModel, token_ids: list[int], num_layers: int | None = None) -> torch.Tensor:
    """The target's final-norm hidden states `# [len(token_ids), hidden]` from one prefill of the sequence;
    with `num_layers`, of its early exit after that many layers (the final norm of layer L's output)."""
    n = len(token_ids)
    num_blocks = -(-n // BLOCK_SIZE)
    layers_config = replace(model.config, num_layers=num_layers or model.config.num_layers)
    kv_cache = allocate_kv_cache(layers_config, CacheConfig(BLOCK_SIZE, num_blocks), torch.float32)
    meta = build_attention_metadata([n], [n], [list(range(num_blocks))], BLOCK_SIZE)
    _, hidden = model(torch.tensor(token_ids), torch.arange(n), kv_cache, meta, torch.tensor([n - 1]),
                      return_hidden=True)
    assert hidden is not None and hidden.shape == (n, model.config.hidden_size)
    return hidden


def distill_shard(engine: LLMEngine, prompts: list[list[int]], config: DistillConfig,
                  progress: tqdm, first_index: int = 0) -> DistillCorpus:
    responses = generate_responses(engine, prompts, config, progress, first_index)
    parts = []
    for prompt, response in zip(prompts, responses):
        token_ids = prompt + response
        hidden = final_hidden_states(engine.model, token_ids).to(torch.bfloat16)
        parts.append(one_sequence(torch.tensor(token_ids), hidden, len(prompt)))
    return concat_corpora(parts)


# ---- the shard cache ----------------------------------------------------------------------------

def corpus_dir(cache_dir: Path, train_dir: Path, config: DistillConfig, fingerprint: str) -> Path:
    """The cache folder for these settings. The prompt count is left out: shard i holds prompts
    [i * SHARD_SIZE, (i + 1) * SHARD_SIZE) of one fixed order, whatever the count."""
    files = [(p.name, p.stat().st_size) for p in sorted(Path(train_dir).glob("*.jsonl"))]
    settings = {**asdict(config), "num_prompts": None, "in_flight": None, "target": fingerprint,
                "files": files, "shard_size": SHARD_SIZE, "version": FORMAT_VERSION}
    if config.temperature == 0.0:
        del settings["temperature"]  # greedy corpora keep the folder they had before sampling existed
    return Path(cache_dir) / f"corpus-{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]}"


def save_shard(path: Path, shard: DistillCorpus) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({"token_ids": shard.token_ids, "offsets": shard.offsets, "prompt_lens": shard.prompt_lens,
               "hidden": shard.hidden.contiguous()}, str(tmp))
    tmp.replace(path)


def load_shard(path: Path, num_sequences: int) -> DistillCorpus | None:
    """The shard at `path` if it is whole and holds `num_sequences` sequences; None means remake it."""
    try:
        tensors = load_file(str(path))
        shard = DistillCorpus(tensors["token_ids"], tensors["offsets"], tensors["prompt_lens"], tensors["hidden"])
    except (FileNotFoundError, SafetensorError, KeyError, AssertionError):
        return None
    return shard if shard.num_sequences == num_sequences else None


def build_corpus(model_path: str, train_dir: Path, cache_dir: Path, config: DistillConfig,
                 fingerprint: str, model: LlamaModel | None = None) -> DistillCorpus:
    """The corpus for `config`, from cached shards where they exist; the engine is loaded only if one is missing.
    `model`: that engine's model when it is already loaded (`build_model(model_path, "float32")`)."""
    if not Path(train_dir).is_dir():
        raise InvalidRequestError(f"no training prompt directory at {train_dir}")
    folder = corpus_dir(cache_dir, train_dir, config, fingerprint)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [min(SHARD_SIZE, config.num_prompts - start) for start in range(0, config.num_prompts, SHARD_SIZE)]
    shards = [load_shard(folder / f"shard-{i:05d}.safetensors", size) for i, size in enumerate(sizes)]
    missing = [i for i, shard in enumerate(shards) if shard is None]
    if missing:
        tokenizer = load_tokenizer(model_path)
        prompts = select_prompts(read_prompts(train_dir, config.seed), tokenizer, config)
        engine_config = EngineConfig(model_path=model_path, dtype="float32")
        engine = LLMEngine(engine_config, model if model is not None else build_model(model_path, "float32"), tokenizer)
        with tqdm(total=sum(sizes[i] for i in missing), desc="distilling", unit="prompt", disable=None) as progress:
            for i in missing:
                start = i * SHARD_SIZE
                shards[i] = distill_shard(engine, prompts[start : start + sizes[i]], config, progress, start)
                save_shard(folder / f"shard-{i:05d}.safetensors", shards[i])
    return concat_corpora(shards)


# ---- the draft vocabulary -----------------------------------------------------------------------

def choose_draft_vocab(corpus: DistillCorpus, size: int, vocab_size: int) -> tuple[torch.Tensor, float]:
    """The `size` most frequent response tokens (ties: lower id first), as a sorted int64 `token_map`
    `# [size]`, and the fraction of response tokens it covers."""
    assert 0 < size <= vocab_size
    counts = np.bincount(corpus.response_token_ids().numpy(), minlength=vocab_size)
    order = np.lexsort((np.arange(vocab_size), -counts))[:size]
    coverage = float(counts[order].sum() / max(counts.sum(), 1))
    return torch.from_numpy(np.sort(order)).to(torch.int64), coverage
