"""The model and the engine give the same results with the torch attention, with the Triton tree-attention
kernel (backend "triton"; run here by the Triton interpreter on CPU, see tests/conftest.py) and with the
C++ CPU kernel (backend "cpu"), on a tiny random Llama: a ragged step mixing a fresh prefill, a token tree
and a decode, and whole speculative generations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specserve.drafters.base import DraftRequest
from specserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SamplingParams, SpecConfig
from specserve.engine.draft_tree import ROOT, DraftTree
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.model import LlamaModel
from specserve.engine.model_runner import allocate_kv_cache
from specserve.engine.verify import verify_layout
from specserve.errors import InvalidRequestError
from specserve.kernels import cpu_ops
from specserve.kernels.paged_attention import build_attention_metadata

BLOCK_SIZE = 4


def tiny_llama(vocab_size: int) -> LlamaModel:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    model = LlamaModel(config)
    for param in model.parameters():
        nn.init.normal_(param, std=0.1)
    return model.eval()


def test_a_mixed_step_is_the_same_on_both_backends():
    model = tiny_llama(vocab_size=96)
    g = torch.Generator().manual_seed(1)
    cached = {1: torch.randint(0, 96, (9,), generator=g), 2: torch.randint(0, 96, (21,), generator=g)}
    tables = {0: [7, 2, 9, 4], 1: [0, 5, 11, 13], 2: [1, 3, 6, 8, 10, 12]}  # blocks cross sequences' boundaries
    kv = allocate_kv_cache(model.config, CacheConfig(BLOCK_SIZE, 16), torch.float32)
    for seq, ids in cached.items():  # earlier steps, on the torch path
        meta = build_attention_metadata([len(ids)], [len(ids)], [tables[seq]], BLOCK_SIZE)
        model(ids, torch.arange(len(ids)), kv, meta, torch.tensor([len(ids) - 1]))
    # This step: sequence 0 prefills 13 tokens, 1 verifies root + a fork (root ─ a ─ b, root ─ c ─ d), 2 decodes.
    tree = DraftTree([5, 6, 7, 8], [ROOT, 0, ROOT, 2], [1.0] * 4)
    layout = verify_layout(3, tree)
    prefill = torch.randint(0, 96, (13,), generator=g).tolist()
    input_ids = torch.tensor(prefill + layout.token_ids + [42])
    positions = torch.tensor([*range(13), *(9 + o for o in layout.position_offsets), 21])
    query_lens, context_lens = [13, 5, 1], [13, 14, 22]
    tree_masks = [None, layout.tree_mask, None]
    logits = {}
    for backend in ("torch", "triton", "cpu"):
        step_kv = [(k.clone(), v.clone()) for k, v in kv]
        meta = build_attention_metadata(query_lens, context_lens, [tables[0], tables[1], tables[2]], BLOCK_SIZE,
                                        tree_masks, backend=backend)
        logits[backend], _ = model(input_ids, positions, step_kv, meta, torch.arange(19))
    assert (logits["torch"] - logits["triton"]).abs().max() < 1e-4
    assert (logits["torch"] - logits["cpu"]).abs().max() < 1e-4


@pytest.fixture(scope="module")
def tiny_engine_model(tokenizer) -> LlamaModel:
    return tiny_llama(vocab_size=tokenizer.vocab_size)


class ForkDrafter:
    """Proposes root ─ t+1 ─ t+2, root ─ t+3 after last token t: a real tree on every step, whatever the
    (random) model says, so the kernel sees tree masks; the verifier accepts what matches."""

    name = "fork"
    needs_hidden = False

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        trees = []
        for r in requests:
            t = r.token_ids[-1]
            tree = DraftTree([t + 1, t + 2, t + 3], [ROOT, 0, ROOT], [1.0] * 3)
            trees.append(tree if r.budget >= 3 else DraftTree())
        return trees

    def release(self, seq_id: int) -> None:
        pass


def generate(model, tokenizer, backend: str, spec: SpecConfig, prompts: list[list[int]],
             kv_dtype: str = "float32") -> tuple[list, LLMEngine]:
    config = EngineConfig(model_path="unused", cache=CacheConfig(BLOCK_SIZE, 128, kv_dtype), spec=spec,
                          attention_backend=backend)
    engine = LLMEngine(config, model, tokenizer, drafter=ForkDrafter() if spec.enabled else None)
    completions = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [c.token_ids for c in completions], engine


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("speculate", [False, True])
def test_engine_generates_the_same_on_both_backends(tiny_engine_model, tokenizer, speculate, backend, kv_dtype):
    if backend == "cpu" and not cpu_ops.load():
        pytest.skip("the C++ CPU kernel did not build here (no compiler)")
    prompts = [[10, 11, 12, 13, 10, 11, 12, 13, 10, 11], [500, 600, 700], list(range(300, 337))]
    spec = SpecConfig(method="ngram") if speculate else SpecConfig()  # the drafter is then ForkDrafter
    want, _ = generate(tiny_engine_model, tokenizer, "torch", spec, prompts, kv_dtype)
    got, engine = generate(tiny_engine_model, tokenizer, backend, spec, prompts, kv_dtype)
    assert got == want
    if speculate:
        assert engine.spec_stats.verify_steps > 0  # trees really went through the kernel


def test_batch_invariance_is_a_torch_backend_option():
    with pytest.raises(InvalidRequestError, match="only on the cpu and torch backends"):
        EngineConfig(model_path="unused", attention_backend="triton", batch_invariant=True)
    with pytest.raises(InvalidRequestError, match="torch or triton"):
        EngineConfig(model_path="unused", attention_backend="flash")


def test_kv_dtype_is_checked():
    with pytest.raises(InvalidRequestError, match="KV cache dtype must be one of float32, bfloat16"):
        CacheConfig(dtype="float8")
    for kv_dtype in ("bfloat16", "int8"):  # the Triton kernel reads both for the engine's float32 queries
        assert EngineConfig(model_path="unused", attention_backend="triton", cache=CacheConfig(dtype=kv_dtype))
