"""The decoder layers in one C++ call (kernels/csrc/decoder_cpu.cpp, LlamaModel._fused_layers) give the
same bits as the per-layer modules: logits, hidden states and the K/V written, for a ragged step of decode
rows and a draft tree, on random weights of the real model's shapes (float32 and int8) and on the real
model; the fused call is taken where it should be and only there."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from specserve.engine.config import CacheConfig, ModelConfig
from specserve.engine.model import LlamaModel
from specserve.engine.model_runner import allocate_kv_cache
from specserve.engine.quant import apply_weight_dtype, can_pack, has_bfloat16_linear
from specserve.kernels import cpu_ops
from specserve.kernels.paged_attention import build_attention_metadata

pytestmark = pytest.mark.skipif(not cpu_ops.load(), reason="the C++ CPU kernels did not build here")

# Two layers of SmolLM2-135M's shapes (hidden 576, 9 heads over 3 KV heads of 64, MLP 1536): int8 takes
# the AMX / VNNI paths it takes on the real model.
REAL_SHAPES = ModelConfig(
    vocab_size=256, hidden_size=576, intermediate_size=1536, num_layers=2, num_heads=9, num_kv_heads=3,
    head_dim=64, max_position_embeddings=256,
)
CACHE = CacheConfig(block_size=16, num_blocks=16)
TABLES = [[0, 1, 2, 3], [5, 4, 7]]  # sequence B's blocks out of order, so the block table matters


def random_llama(dtype: str, config: ModelConfig = REAL_SHAPES) -> LlamaModel:
    torch.manual_seed(0)
    model = LlamaModel(config)
    for name, param in model.named_parameters():
        nn.init.normal_(param, mean=1.0 if "norm" in name else 0.0, std=0.05)
    return apply_weight_dtype(model.eval(), dtype)


def prefilled_cache(model: LlamaModel, prompts: list[list[int]], kv_dtype: torch.dtype = torch.float32):
    """The KV cache after prefilling each prompt in its own forward (per-layer path: > 16 rows go to SDPA)."""
    kv = allocate_kv_cache(model.config, CACHE, kv_dtype)
    for prompt, table in zip(prompts, TABLES):
        n = len(prompt)
        meta = build_attention_metadata([n], [n], [table], CACHE.block_size, backend="cpu")
        model(torch.tensor(prompt), torch.arange(n), kv, meta, torch.tensor([n - 1]))
    return kv


def mixed_step(model: LlamaModel, kv, lens: list[int], layers: int | None = None):
    """One step: sequence A decodes one token, sequence B verifies a 4-node tree (root, two children,
    a grandchild); returns (logits of every row, hidden states, the caches)."""
    tree = [[True, False, False, False], [True, True, False, False], [True, False, True, False],
            [True, True, False, True]]
    meta = build_attention_metadata([1, 4], [lens[0] + 1, lens[1] + 4], TABLES, CACHE.block_size,
                                    tree_masks=[None, tree], backend="cpu")
    ids = torch.tensor([7, 11, 13, 17, 19])
    positions = torch.tensor([lens[0], lens[1], lens[1] + 1, lens[1] + 1, lens[1] + 2])
    caches = kv if layers is None else kv[:layers]
    logits, hidden = model(ids, positions, caches, meta, torch.arange(5), return_hidden=True)
    return logits, hidden


def clone(kv):
    return [(k.clone(), v.clone()) for k, v in kv]


def run_both(model: LlamaModel, layers: int | None = None, kv_dtype: torch.dtype = torch.float32):
    prompts = [list(range(3, 40)), list(range(50, 71))]
    kv = prefilled_cache(model, prompts, kv_dtype)
    lens = [len(p) for p in prompts]
    results = {}
    for fuse in (True, False):
        model.fuse_layers = fuse
        caches = clone(kv)
        results[fuse] = (*mixed_step(model, caches, lens, layers), caches)
    model.fuse_layers = True
    return results


def assert_same_bits(results) -> None:
    (logits_f, hidden_f, kv_f), (logits_p, hidden_p, kv_p) = results[True], results[False]
    assert torch.equal(logits_f, logits_p)
    assert torch.equal(hidden_f, hidden_p)
    for (kf, vf), (kp, vp) in zip(kv_f, kv_p):
        assert torch.equal(kf, kp) and torch.equal(vf, vp)


def count_fused_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = LlamaModel._fused_layers

    def counted(self, *args, **kwargs):
        calls.append(len(args[2]))  # layers run
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "_fused_layers", counted)
    return calls


@pytest.mark.parametrize("dtype", ["float32", "int8", "bfloat16"])
def test_fused_layers_equal_the_layer_modules(dtype: str, monkeypatch):
    if dtype == "int8" and not torch.ops.specserve_cpu.int8_linear_fast():
        pytest.skip("int8 runs on fbgemm here, which the fused call does not take")
    if dtype == "bfloat16" and not has_bfloat16_linear():
        pytest.skip("no bfloat16 kernel: bfloat16 runs on F.linear, which the fused call does not take")
    model = random_llama(dtype)
    calls = count_fused_calls(monkeypatch)
    results = run_both(model)
    assert calls == [2]  # the fused step only: prefill (SDPA groups) and the per-layer step are not fused
    assert_same_bits(results)
    assert results[True][0].abs().max() > 0  # a real computation, not two zero tensors


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_fused_layers_over_a_rounded_cache_equal_the_layer_modules(kv_dtype, monkeypatch):
    model = random_llama("float32")
    calls = count_fused_calls(monkeypatch)
    results = run_both(model, kv_dtype=kv_dtype)
    assert calls == [2] and results[True][2][0][0].dtype == kv_dtype
    assert_same_bits(results)


def test_fused_early_exit_runs_only_the_first_layers(monkeypatch):
    model = random_llama("float32", replace(REAL_SHAPES, num_layers=3))
    calls = count_fused_calls(monkeypatch)
    results = run_both(model, layers=2)
    assert calls == [2]
    assert_same_bits(results)
    untouched = results[True][2][2]  # the third layer's cache: written by prefill only, not by the step
    assert torch.equal(untouched[0], results[False][2][2][0])


def test_fused_equals_layer_modules_on_the_real_model(llama_model, monkeypatch):
    calls = count_fused_calls(monkeypatch)
    model = llama_model
    prompts = [list(range(1000, 1040)), list(range(2000, 2021))]
    kv = allocate_kv_cache(model.config, CACHE, torch.float32)
    for prompt, table in zip(prompts, TABLES):
        n = len(prompt)
        meta = build_attention_metadata([n], [n], [table], CACHE.block_size, backend="cpu")
        model(torch.tensor(prompt), torch.arange(n), kv, meta, torch.tensor([n - 1]))
    results = {}
    for fuse in (True, False):
        model.fuse_layers = fuse
        caches = clone(kv)
        results[fuse] = (*mixed_step(model, caches, [40, 21]), caches)
    model.fuse_layers = True
    assert calls == [model.config.num_layers]
    assert_same_bits(results)


@pytest.mark.skipif(not can_pack(torch.bfloat16), reason="no oneDNN bfloat16 linear on this CPU")
def test_bfloat16_pieces_of_32_rows_equal_the_layer_modules(monkeypatch):
    """A step of 37 rows (one decode row, 36 rows of a chain draft): oneDNN's bfloat16 linear is fed
    pieces of at most 32 rows, short ones padded to 4, in both paths."""
    model = random_llama("bfloat16")
    calls = count_fused_calls(monkeypatch)
    prompts = [list(range(3, 40)), list(range(50, 71))]
    kv = prefilled_cache(model, prompts)
    chain = [[j <= i for j in range(36)] for i in range(36)]
    meta = build_attention_metadata([1, 36], [38, 21 + 36], [[0, 1, 2, 3], [5, 4, 7, 8]], CACHE.block_size,
                                    tree_masks=[None, chain], backend="cpu")
    ids, positions = torch.arange(100, 137), torch.tensor([37, *range(21, 57)])
    results = {}
    for fuse in (True, False):
        model.fuse_layers = fuse
        caches = clone(kv)
        results[fuse] = (*model(ids, positions, caches, meta, torch.arange(37), return_hidden=True), caches)
    model.fuse_layers = True
    assert calls == [2]
    assert_same_bits(results)


def test_not_fused_for_fallback_int8_or_a_biased_linear(monkeypatch):
    calls = count_fused_calls(monkeypatch)
    with monkeypatch.context() as patch:  # int8 built as where specserve's kernel has no fast path
        patch.setattr(cpu_ops, "load", lambda: False)
        fallback = random_llama("int8")
    assert fallback.layers[0].mlp.down_proj.path in ("fbgemm", "exact")
    run_both(fallback)
    biased = random_llama("float32")
    biased.layers[1].mlp.down_proj.bias = nn.Parameter(torch.zeros(REAL_SHAPES.hidden_size), requires_grad=False)
    results = run_both(biased)
    assert calls == []
    assert torch.isfinite(results[True][0]).all()


def test_swapped_linears_are_picked_up(monkeypatch):
    """The gathered operands follow a module swap: plain `nn.Linear`s are not fused; after the swap to
    int8 the same model fuses its int8 weights."""
    if not torch.ops.specserve_cpu.int8_linear_fast():
        pytest.skip("int8 runs on fbgemm here")
    torch.manual_seed(0)
    model = LlamaModel(REAL_SHAPES).eval()
    calls = count_fused_calls(monkeypatch)
    run_both(model)
    assert calls == [] and model._fused[1] is None
    apply_weight_dtype(model, "int8")
    assert_same_bits(run_both(model))
    assert calls == [2] and model._fused[1][1][0].dtype == torch.int8


def test_bad_operands_are_a_clear_error():
    model = random_llama("float32")
    kv = allocate_kv_cache(model.config, CACHE, torch.float32)
    meta = build_attention_metadata([1], [1], [TABLES[0]], CACHE.block_size, backend="cpu")
    norms, linears = model._fused_operands(torch.zeros(1, REAL_SHAPES.hidden_size), kv, meta)
    rope = model.rotary.tables(torch.tensor([0]))
    with pytest.raises(RuntimeError, match="4 linears per layer"):
        model._fused_layers(torch.zeros(1, REAL_SHAPES.hidden_size), rope, kv, meta, norms, linears[:-1])
    with pytest.raises(RuntimeError, match="two norm weights per layer"):
        model._fused_layers(torch.zeros(1, REAL_SHAPES.hidden_size), rope, kv, meta, norms[:1], linears)
