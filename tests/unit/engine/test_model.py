"""Our Llama against transformers on the same weights: logits and greedy continuations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specserve.engine.config import CacheConfig, EngineConfig, SamplingParams
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.loader import load_checkpoint
from specserve.engine.model import LlamaModel
from specserve.engine.model_runner import allocate_kv_cache
from specserve.kernels.paged_attention import build_attention_metadata

NUM_PROMPTS = 5


def full_logits(model: LlamaModel, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits at every position of one sequence, prefilled in one forward over a paged cache."""
    n = len(ids)
    num_blocks = -(-n // block_size)
    kv = allocate_kv_cache(model.config, CacheConfig(block_size=block_size, num_blocks=num_blocks), torch.float32)
    table = list(reversed(range(num_blocks)))  # non-contiguous on purpose
    meta = build_attention_metadata([n], [n], [table], block_size)
    logits, _ = model(torch.tensor(ids), torch.arange(n), kv, meta, torch.arange(n))
    return logits


@pytest.fixture(scope="module")
def prompt_ids(tokenizer, spec_bench_prompts) -> list[list[int]]:
    return [tokenizer.render_prompt_ids([{"role": "user", "content": p}]) for p in spec_bench_prompts[:NUM_PROMPTS]]


def test_logits_match_transformers(llama_model, hf_model, prompt_ids):
    for ids in prompt_ids:
        ours = full_logits(llama_model, ids)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0]
        assert (ours - ref).abs().max().item() < 2e-3


def test_greedy_64_tokens_match_transformers(llama_model, tokenizer, hf_model, prompt_ids):
    engine = LLMEngine(EngineConfig(model_path="unused"), llama_model, tokenizer)
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    ours = engine.generate(prompt_ids, params)
    for ids, completion in zip(prompt_ids, ours):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )[0, len(ids):].tolist()
        assert completion.token_ids == ref


def test_safetensors_tiny_random_llama_matches_transformers(tmp_path: Path):
    torch.manual_seed(0)
    hf_config = LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, tie_word_embeddings=False,
    )
    reference = LlamaForCausalLM(hf_config).eval()
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    config, state_dict = load_checkpoint(tmp_path)
    model = LlamaModel(config)
    model.load_hf_state_dict(state_dict)
    ids = torch.randint(0, 96, (40,)).tolist()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(full_logits(model.eval(), ids, block_size=4), expected, atol=1e-4, rtol=1e-4)
