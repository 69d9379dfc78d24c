"""Fixtures: a tiny random Llama target and a self-distilled corpus of its own greedy continuations, so a
head trains in seconds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specserve.engine.config import ModelConfig
from specserve.engine.model import LlamaModel
from specserve.learned.distill_data import DistillCorpus, concat_corpora, final_hidden_states

TINY = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, max_position_embeddings=64, tie_word_embeddings=True)


def random_tiny_llama(seed: int) -> LlamaModel:
    """Random matrices (norms left at 1), plain float32 linears."""
    torch.manual_seed(seed)
    model = LlamaModel(TINY)
    for param in model.parameters():
        if param.dim() == 2:
            nn.init.normal_(param, std=0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_target() -> LlamaModel:
    return random_tiny_llama(seed=0)


@pytest.fixture(scope="session")
def other_tiny_target() -> LlamaModel:
    """Same shape as `tiny_target`, other weights: another fingerprint."""
    return random_tiny_llama(seed=1)


@pytest.fixture(scope="session")
def tiny_corpus(tiny_target: LlamaModel) -> DistillCorpus:
    """12 random 4-token prompts, each followed by the target's 12-token greedy continuation."""
    return greedy_corpus(tiny_target, num_sequences=12, prompt_len=4, response_len=12)


@torch.inference_mode()
def greedy_corpus(model: LlamaModel, num_sequences: int, prompt_len: int, response_len: int) -> DistillCorpus:
    generator = torch.Generator().manual_seed(1)
    parts = []
    for _ in range(num_sequences):
        token_ids = torch.randint(TINY.vocab_size, (prompt_len,), generator=generator).tolist()
        for _ in range(response_len):
            hidden = final_hidden_states(model, token_ids)
            token_ids.append(int(model.lm_head(hidden[-1]).argmax()))
        hidden = final_hidden_states(model, token_ids).to(torch.bfloat16)
        parts.append(DistillCorpus(torch.tensor(token_ids), torch.tensor([0, len(token_ids)]),
                                   torch.tensor([prompt_len]), hidden))
    return concat_corpora(parts)
