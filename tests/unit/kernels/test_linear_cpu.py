"""The batch-invariant float32 linear (kernels/csrc/linear_cpu.cpp) against its plain-torch reference
(kernels/linear.py, the same summation order: equal bits), float64 (accuracy) and itself at other batch
sizes and thread counts (invariance), and the model module that uses it (engine/quant.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specserve.engine.quant import Float32Linear, can_pack, decode_linear
from specserve.kernels import cpu_ops
from specserve.kernels.linear import linear_ref

pytestmark = pytest.mark.skipif(not cpu_ops.load(), reason="the C++ CPU kernels did not build here (no compiler)")

# The 135M model's shapes (fused QKV, o, fused gate-up, down, a slice of the head's rows) as (in, out).
MODEL_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 4099)]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.specserve_cpu.linear(x, weight, bias)


def inputs(rows: int, in_features: int, out_features: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen)  # [M, K]
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05  # [N, K]
    return x, weight, torch.randn(out_features, generator=gen)  # bias [N]


# K = 0 (no products), 3 (tail only), 16 (one lane chunk, no tail), 100 (chunks + tail of 4); N and M
# around the register tiles' sizes (6 x 4, and 8 x 3 at M = 7-8) so ragged edge tiles are covered.
@pytest.mark.parametrize("rows", [1, 2, 5, 7, 8, 13])
@pytest.mark.parametrize("in_features", [0, 3, 16, 100])
@pytest.mark.parametrize("out_features", [1, 3, 5, 9])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bits_equal_the_reference(rows: int, in_features: int, out_features: int, with_bias: bool):
    x, weight, bias = inputs(rows, in_features, out_features, seed=rows * 1000 + in_features * 10 + out_features)
    bias = bias if with_bias else None
    assert torch.equal(linear(x, weight, bias), linear_ref(x, weight, bias))


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("in_features", [3, 100])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bfloat16_weights_give_the_float32_kernels_bits_on_the_widened_weight(rows, in_features, with_bias):
    # Where oneDNN has no bfloat16 linear (AVX2-only CPUs) the bfloat16 model runs on this kernel.
    x, weight, bias = inputs(rows, in_features, 9, seed=rows + in_features)
    weight = weight.bfloat16()
    bias = bias if with_bias else None
    out = linear(x, weight, bias)
    assert torch.equal(out, linear(x, weight.float(), bias))
    assert torch.equal(out, linear_ref(x, weight, bias))
    # Widened, not rounded back: the result differs from a float32 weight that was never rounded.
    assert not torch.equal(out, linear(x, weight.float() * (1 + 2**-12), bias))


@pytest.mark.parametrize("in_features,out_features", MODEL_SHAPES[:2])
def test_bits_equal_the_reference_at_model_shapes(in_features: int, out_features: int):
    x, weight, _ = inputs(3, in_features, out_features, seed=in_features + out_features)
    assert torch.equal(linear(x, weight), linear_ref(x, weight))


@pytest.mark.parametrize("in_features,out_features", MODEL_SHAPES)
def test_float32_accurate(in_features: int, out_features: int):
    x, weight, bias = inputs(9, in_features, out_features, seed=7)
    exact = F.linear(x.double(), weight.double(), bias.double())
    got = linear(x, weight, bias)
    # Pairwise-ish (16 lanes, then a tree) summation: no worse than torch's own float32 linear.
    torch_error = (F.linear(x, weight, bias).double() - exact).abs().max().item()
    assert (got.double() - exact).abs().max().item() <= max(torch_error, 1e-6)


@pytest.mark.parametrize("in_features,out_features", MODEL_SHAPES)
def test_rows_do_not_depend_on_the_batch(in_features: int, out_features: int):
    # A decode row (M = 1), a verify chunk (M ~ 9), a batch of them and a prefill chunk (M = 300) all
    # give a token the same bits: what lossless speculative decoding stands on.
    x, weight, _ = inputs(300, in_features, out_features, seed=3)
    together = linear(x, weight)
    for start, count in [(0, 1), (299, 1), (5, 2), (17, 9), (60, 7), (70, 8), (40, 37), (100, 64)]:
        part = linear(x[start : start + count].contiguous(), weight)
        assert torch.equal(part, together[start : start + count]), (start, count)


def test_rows_do_not_depend_on_the_thread_count():
    x, weight, _ = inputs(20, 576, 960, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear(x, weight)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, linear(x, weight))


def test_no_rows_no_outputs():
    # A step whose rows all belong to prefill chunks asks the LM head for no logits at all.
    assert linear(torch.randn(0, 16), torch.randn(8, 16)).shape == (0, 8)


@pytest.mark.parametrize("x,weight,message", [
    (torch.randn(2, 16).double(), torch.randn(4, 16), "float32 input"),
    (torch.randn(16, 2).t(), torch.randn(4, 16), "contiguous"),
    (torch.randn(2, 16), torch.randn(4, 15), "input's K"),
    (torch.randn(2, 16), torch.randn(16, 4).t(), "weight"),
    (torch.randn(2, 16), torch.randn(4, 16).half(), "float32 or bfloat16 weight"),
])
def test_bad_operands_are_refused(x: torch.Tensor, weight: torch.Tensor, message: str):
    with pytest.raises(RuntimeError, match=message):
        linear(x, weight)


def test_bad_bias_is_refused():
    with pytest.raises(RuntimeError, match="bias"):
        linear(torch.randn(2, 16), torch.randn(4, 16), torch.randn(3))


def test_module_keeps_leading_dimensions_and_shares_the_weight():
    _, weight, bias = inputs(1, 100, 9, seed=5)
    layer = decode_linear(weight, bias, torch.float32)
    assert isinstance(layer, Float32Linear)
    assert layer.weight.data_ptr() == weight.data_ptr()  # a tied head adds no copy of the table
    x = torch.randn(2, 3, 100)
    out = layer(x)
    assert out.shape == (2, 3, 9)
    assert torch.equal(out.view(6, 9), linear_ref(x.view(6, 100), weight, bias))


@pytest.mark.skipif(can_pack(torch.bfloat16), reason="oneDNN's bfloat16 linear runs bfloat16 on this CPU")
def test_bfloat16_runs_on_this_kernel_where_onednn_has_no_bfloat16():
    _, weight, bias = inputs(1, 100, 9, seed=6)
    layer = decode_linear(weight, bias, torch.bfloat16)
    assert isinstance(layer, Float32Linear) and layer.weight.dtype == torch.bfloat16
    x = torch.randn(5, 100)
    assert torch.equal(layer(x), linear_ref(x, weight.bfloat16(), bias))
