"""Weight-precision swaps: Int8Linear equals its exact integer reference, tracks float32 within stated
tolerances and is bitwise batch-invariant; PackedLinear keeps float32 at rounding level; `apply_weight_dtype`
replaces every Linear of a tiny Llama and keeps its logits close to float32.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specserve.engine.config import CacheConfig, ModelConfig
from specserve.engine.model import LlamaModel
from specserve.engine.model_runner import allocate_kv_cache
from specserve.engine.quant import (
    BF16Embedding, BF16Linear, Float32Linear, Int8Linear, PackedLinear, apply_weight_dtype, can_pack,
    rounded_prefill_attention,
)
from specserve.kernels import cpu_ops
from specserve.engine.smoothing import collect_input_absmax, smooth_
from specserve.errors import InvalidRequestError
from specserve.kernels.paged_attention import build_attention_metadata

# (in_features, out_features): tiny, and the 135M model's qkv / down projections.
SHAPES = [(64, 48), (576, 960), (1536, 576)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def activations(rows: int, features: int, outlier_scale: float | None, seed: int = 0) -> torch.Tensor:
    """Gaussian rows `# [rows, features]`; with `outlier_scale`, 4 channels scaled up as in real LLMs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    if outlier_scale is not None:
        x[:, torch.randperm(features, generator=g)[:4]] *= outlier_scale
    return x


def int8_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Int8Linear's maths in float64: same rounding of weights and rows, exact matmul."""
    w_scale = weight.abs().amax(dim=1) / 127  # [out]
    w_int = torch.round(weight / w_scale[:, None])  # [out, in]
    row_scale = x.abs().amax(dim=1, keepdim=True) / 127  # [M, 1]
    x_int = torch.round(x / row_scale)  # [M, in]
    return (x_int.double() @ w_int.double().T * w_scale.double() * row_scale.double()).float()


@pytest.mark.parametrize("in_features,out_features", SHAPES)
@pytest.mark.parametrize("outlier_scale", [None, 100.0])
def test_int8_matches_exact_integer_reference(in_features: int, out_features: int, outlier_scale: float | None):
    # Catches a wrong scale, an int16 saturation in the kernel, or a lost zero point: only float32
    # rounding of the epilogue may differ.
    weight = torch.randn(out_features, in_features) * 0.02
    x = activations(16, in_features, outlier_scale)
    torch.testing.assert_close(Int8Linear(weight, None)(x), int8_reference(x, weight), rtol=1e-5, atol=1e-6)


def test_int8_saturating_inputs_are_exact():
    # Every product is 127 * 127; an int16 pairwise accumulation (non-VNNI u8 x s8) would clip.
    weight = torch.ones(8, 1536)
    x = torch.ones(2, 1536)
    torch.testing.assert_close(Int8Linear(weight, None)(x), torch.full((2, 8), 1536.0))


# Tolerances on the relative Frobenius error versus float32, measured at ~1.1% (Gaussian) and ~4-7%
# (4 channels x100): per-token scales spend their 8 bits on the outliers, as LLM.int8() describes.
@pytest.mark.parametrize("in_features,out_features", SHAPES)
@pytest.mark.parametrize("outlier_scale,tolerance", [(None, 0.02), (100.0, 0.10)])
def test_int8_close_to_float32(in_features: int, out_features: int, outlier_scale: float | None, tolerance: float):
    weight = torch.randn(out_features, in_features) * 0.02
    x = activations(32, in_features, outlier_scale)
    assert relative_error(Int8Linear(weight, None)(x), F.linear(x, weight)) < tolerance


@pytest.mark.parametrize("in_features,out_features", SHAPES)
def test_bf16_close_to_float32(in_features: int, out_features: int):
    weight = torch.randn(out_features, in_features) * 0.02
    x = activations(32, in_features, None)
    out = BF16Linear(nn.Parameter(weight.bfloat16(), requires_grad=False), None)(x)
    assert out.dtype == torch.float32
    assert relative_error(out, F.linear(x, weight)) < 0.01


needs_onednn = pytest.mark.skipif(not can_pack(), reason="this torch build has no oneDNN prepacked linear")
needs_onednn_bf16 = pytest.mark.skipif(not can_pack(torch.bfloat16), reason="oneDNN has no bfloat16 linear on this CPU")


@needs_onednn
@pytest.mark.parametrize("in_features,out_features", SHAPES)
@pytest.mark.parametrize("rows", [1, 8, 100])
def test_packed_float32_is_float32_accurate(in_features: int, out_features: int, rows: int):
    weight, bias = torch.randn(out_features, in_features) * 0.02, torch.randn(out_features)
    x = activations(rows, in_features, None)
    out = PackedLinear(weight, bias, torch.float32)(x)
    exact = F.linear(x.double(), weight.double(), bias.double())
    # float32 accumulation in another order than F.linear: a few ulp of the sum, not bfloat16's 1e-3.
    assert out.dtype == torch.float32
    assert (out - exact).abs().max().item() < 1e-5 * in_features**0.5
    assert relative_error(out.double(), exact) < 1e-6


@needs_onednn_bf16
@pytest.mark.parametrize("in_features,out_features", SHAPES)
def test_packed_bfloat16_close_to_float32(in_features: int, out_features: int):
    weight = torch.randn(out_features, in_features) * 0.02
    x = activations(32, in_features, None).view(2, 16, in_features)
    out = PackedLinear(weight, None, torch.bfloat16)(x)
    assert out.shape == (2, 16, out_features) and out.dtype == torch.float32
    assert relative_error(out, F.linear(x, weight)) < 0.01


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_onednn_bf16)])
@pytest.mark.parametrize("in_features,out_features", SHAPES)
@pytest.mark.parametrize("batch", [2, 3, 9, 33, 65, 72, 300])  # 33+: other AMX kernels
def test_packed_is_batch_invariant(in_features: int, out_features: int, batch: int, dtype: torch.dtype):
    # A lone row (a plain decode) is padded to MIN_ROWS rows, so it takes the kernel every M >= 2 takes.
    layer = PackedLinear(torch.randn(out_features, in_features) * 0.02, None, dtype)
    x = activations(batch, in_features, None)
    together = layer(x)
    for row in (0, batch // 2, batch - 1):
        assert torch.equal(together[row], layer(x[row : row + 1])[0])


@needs_onednn
def test_packed_takes_no_rows():
    # A step whose rows all belong to prefill chunks asks the LM head for no logits at all.
    out = PackedLinear(torch.randn(8, 16), None, torch.float32)(torch.randn(0, 16))
    assert out.shape == (0, 8)


@pytest.mark.parametrize("in_features,out_features", SHAPES)
@pytest.mark.parametrize("batch", [2, 8, 16, 64, 300])
def test_int8_is_batch_invariant(in_features: int, out_features: int, batch: int):
    # Speculative verification needs a token's logits to be the same whether it is decoded alone or
    # verified among others: bitwise, not merely close.
    layer = Int8Linear(torch.randn(out_features, in_features) * 0.02, None)
    x = activations(batch, in_features, 100.0)
    together = layer(x)
    for row in (0, batch // 2, batch - 1):
        assert torch.equal(together[row], layer(x[row : row + 1])[0])


def test_int8_zero_row_gives_zeros():
    layer = Int8Linear(torch.randn(16, 32), None)
    assert torch.equal(layer(torch.zeros(3, 32)), torch.zeros(3, 16))


def test_int8_keeps_leading_dims_and_adds_bias():
    weight, bias = torch.randn(16, 32) * 0.1, torch.randn(16)
    x = torch.randn(2, 3, 32)
    out = Int8Linear(weight, bias)(x)
    assert out.shape == (2, 3, 16)
    assert relative_error(out, F.linear(x, weight, bias)) < 0.02


# ---- the module swap on a tiny Llama ------------------------------------------------------------

TINY = ModelConfig(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, max_position_embeddings=64,
)


def tiny_llama(tie_word_embeddings: bool) -> LlamaModel:
    torch.manual_seed(0)
    model = LlamaModel(replace(TINY, tie_word_embeddings=tie_word_embeddings))
    for param in model.parameters():
        nn.init.normal_(param, std=0.1)
    return model.eval()


def prefill_logits(model: LlamaModel, token_ids: list[int]) -> torch.Tensor:
    """Logits `# [len(token_ids), vocab]` of one sequence prefilled in one forward."""
    n = len(token_ids)
    cache = CacheConfig(block_size=4, num_blocks=8)
    meta = build_attention_metadata([n], [n], [list(range(cache.num_blocks))], cache.block_size)
    kv = allocate_kv_cache(model.config, cache, torch.float32)
    ids = torch.tensor(token_ids)
    logits, _ = model(ids, torch.arange(n), kv, meta, torch.arange(n))
    return logits


PROMPT = [3, 17, 42, 5, 88, 60, 1, 9]


# bfloat16: oneDNN's where this CPU has a bfloat16 linear, else specserve's kernel reading bfloat16 weights.
BFLOAT16_SWAP = PackedLinear if can_pack(torch.bfloat16) else Float32Linear if cpu_ops.load() else BF16Linear
FLOAT32_SWAP = Float32Linear if cpu_ops.load() else PackedLinear
needs_a_float32_swap = pytest.mark.skipif(not (cpu_ops.load() or can_pack()), reason="no C++ kernels, no oneDNN")


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
@pytest.mark.parametrize("dtype,swapped,tolerance", [
    ("int8", Int8Linear, 0.05), ("bfloat16", BFLOAT16_SWAP, 0.02),
    pytest.param("float32", FLOAT32_SWAP, 1e-5, marks=needs_a_float32_swap),
])
def test_swap_replaces_every_linear(tie_word_embeddings: bool, dtype: str, swapped: type, tolerance: float):
    model = tiny_llama(tie_word_embeddings)
    expected = prefill_logits(model, PROMPT)
    num_linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert apply_weight_dtype(model, dtype) is model
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, swapped) for m in model.modules()) == num_linears == 4 * TINY.num_layers + 1
    logits = prefill_logits(model, PROMPT)
    assert logits.dtype == torch.float32
    assert relative_error(logits, expected) < tolerance


ROUNDED_SDPA = torch.bfloat16 if rounded_prefill_attention() else None  # no AMX: float32 (prefill kernel) is faster


@pytest.mark.parametrize("dtype,sdpa_dtype", [("int8", ROUNDED_SDPA), ("bfloat16", ROUNDED_SDPA),
                                              ("float32", None)])
def test_rounded_weights_attend_long_prefill_chunks_in_bfloat16(dtype: str, sdpa_dtype: torch.dtype | None):
    """bfloat16 and int8 models run SDPA (prefill chunks) in bfloat16 where the CPU computes in bfloat16;
    float32 stays exact."""
    model = apply_weight_dtype(tiny_llama(tie_word_embeddings=False), dtype)
    assert [layer.self_attn.sdpa_dtype for layer in model.layers] == [sdpa_dtype] * TINY.num_layers


def test_bf16_tied_head_matches_its_embedding():
    model = apply_weight_dtype(tiny_llama(tie_word_embeddings=True), "bfloat16")
    assert isinstance(model.embed_tokens, BF16Embedding)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    hidden = activations(4, TINY.hidden_size, None)
    expected = F.linear(hidden.bfloat16(), model.embed_tokens.weight).float()
    torch.testing.assert_close(model.lm_head(hidden), expected, rtol=1e-2, atol=1e-2)
    if isinstance(model.lm_head, Float32Linear):  # the kernel reads the embedding's table, no copy
        assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


@pytest.mark.skipif(cpu_ops.load() or can_pack(), reason="float32 is swapped where either kernel exists")
def test_float32_without_a_kernel_is_a_no_op():
    model = tiny_llama(tie_word_embeddings=False)
    before = prefill_logits(model, PROMPT)
    assert apply_weight_dtype(model, "float32") is model
    assert torch.equal(prefill_logits(model, PROMPT), before)


@pytest.mark.skipif(not cpu_ops.load(), reason="the C++ CPU kernels did not build here (no compiler)")
def test_float32_tied_head_is_the_embedding_table():
    model = apply_weight_dtype(tiny_llama(tie_word_embeddings=True), "float32")
    assert isinstance(model.lm_head, Float32Linear)
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


def test_unknown_dtype_is_rejected():
    with pytest.raises(InvalidRequestError, match="float16"):
        apply_weight_dtype(tiny_llama(tie_word_embeddings=False), "float16")


# ---- SmoothQuant folding ------------------------------------------------------------------------

CALIBRATION = [7, 23, 51, 2, 90, 33, 64, 12, 45, 80, 19, 71]


def llama_with_outliers(tie_word_embeddings: bool) -> LlamaModel:
    """A tiny Llama whose layer norms amplify 3 channels x30, the outlier pattern of real LLM activations.

    The final norm is left alone: it feeds the LM head, which smoothing does not touch.
    """
    model = tiny_llama(tie_word_embeddings)
    channels = torch.tensor([5, 17, 40])
    with torch.no_grad():
        for norm in [m for layer in model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm.weight[channels] *= 30.0
    return model


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_smoothing_keeps_the_float32_function(tie_word_embeddings: bool):
    model = llama_with_outliers(tie_word_embeddings)
    embedding = model.embed_tokens.weight.clone()
    norm_weight = model.norm.weight.clone()
    expected = prefill_logits(model, PROMPT)
    smooth_(model, collect_input_absmax(model, CALIBRATION), alpha=0.5)
    torch.testing.assert_close(prefill_logits(model, PROMPT), expected, rtol=1e-4, atol=1e-4)
    # The head is not smoothed: the embedding it may share and the final norm are untouched, so the
    # hidden states the model returns stay exact.
    assert torch.equal(model.embed_tokens.weight, embedding)
    assert torch.equal(model.norm.weight, norm_weight)


def test_smoothing_moves_scale_from_activations_to_weights():
    model = llama_with_outliers(tie_word_embeddings=False)
    before = collect_input_absmax(model, CALIBRATION)
    smooth_(model, before, alpha=0.5)
    after = collect_input_absmax(model, CALIBRATION)
    # With alpha 0.5 a smoothed input's channel maxima are sqrt(max|X_c| * max|W_c|): flatter across
    # channels (max / median drops from 3-150 to 1.4-11 here) at every one of the four fold sites.
    assert before.keys() == after.keys()
    for name in before.keys() - {"lm_head"}:
        assert spread(after[name]) < spread(before[name]), name
    torch.testing.assert_close(after["lm_head"], before["lm_head"])


def spread(channel_max: torch.Tensor) -> float:
    return (channel_max.max() / channel_max.median()).item()


def test_smoothing_brings_int8_closer_to_float32():
    expected = prefill_logits(llama_with_outliers(tie_word_embeddings=True), PROMPT)
    plain = apply_weight_dtype(llama_with_outliers(tie_word_embeddings=True), "int8")
    smoothed = apply_weight_dtype(llama_with_outliers(tie_word_embeddings=True), "int8", calibration_ids=CALIBRATION)
    plain_error = relative_error(prefill_logits(plain, PROMPT), expected)
    smoothed_error = relative_error(prefill_logits(smoothed, PROMPT), expected)
    assert smoothed_error < 0.7 * plain_error


def test_smoothed_int8_is_batch_invariant():
    model = apply_weight_dtype(llama_with_outliers(tie_word_embeddings=True), "int8", calibration_ids=CALIBRATION)
    for layer in (m for m in model.modules() if isinstance(m, Int8Linear)):
        x = activations(9, layer.in_features, 30.0)
        together = layer(x)
        assert all(torch.equal(together[row], layer(x[row : row + 1])[0]) for row in range(9))
