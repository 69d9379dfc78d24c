"""The fused row-wise C++ ops (kernels/csrc/rowwise_cpu.cpp) against their torch references: RMSNorm and
Int8Linear's per-row input quantization, and when the model uses them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specserve.engine.model import RMSNorm
from specserve.engine.quant import quantize_rows_ref
from specserve.kernels import cpu_ops

pytestmark = pytest.mark.skipif(not cpu_ops.load(), reason="the C++ CPU kernels did not build here (no compiler)")


@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (2, 3, 48), (40, 576)])
def test_rms_norm_matches_float64(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * 3
    weight = torch.randn(shape[-1], generator=gen)
    got = torch.ops.specserve_cpu.rms_norm(x, weight, 1e-5)
    exact = F.rms_norm(x.double(), (shape[-1],), weight.double(), 1e-5)
    assert got.shape == x.shape
    # Within float32 rounding of the exact value (two roundings: the normalised value and the product).
    assert ((got.double() - exact).abs() <= 2.5e-7 * exact.abs() + 1e-30).all()
    torch.testing.assert_close(got, F.rms_norm(x, (shape[-1],), weight, 1e-5))


def test_rms_norm_rows_are_batch_invariant():
    gen = torch.Generator().manual_seed(1)
    x, weight = torch.randn(33, 576, generator=gen), torch.randn(576, generator=gen)
    batch = torch.ops.specserve_cpu.rms_norm(x, weight, 1e-5)
    for i in (0, 17, 32):
        assert torch.equal(torch.ops.specserve_cpu.rms_norm(x[i : i + 1].contiguous(), weight, 1e-5)[0], batch[i])


def test_rms_norm_of_a_zero_row_is_zero():
    out = torch.ops.specserve_cpu.rms_norm(torch.zeros(1, 8), torch.ones(8), 1e-5)
    assert torch.equal(out, torch.zeros(1, 8))


def test_quantize_rows_equals_the_torch_reference_bit_for_bit():
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(9, 576, generator=gen) * torch.logspace(-3, 3, 9)[:, None]
    rows[3] = 0.0  # an all-zero row: scale `tiny`, integers 0
    rows[4, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1: ties round half to even
    rows[4, 4:] = 0.0
    got_int, got_scale = torch.ops.specserve_cpu.quantize_rows(rows)
    want_int, want_scale = quantize_rows_ref(rows)
    assert torch.equal(got_scale, want_scale) and torch.equal(got_int, want_int)
    assert got_int[4, :4].tolist() == [127.0, 0.0, 2.0, -2.0]
    assert got_int.abs().max() == 127


def test_the_model_norm_uses_the_fused_op_only_without_gradients():
    norm = RMSNorm(16, 1e-5)
    x = torch.randn(3, 16, requires_grad=True)
    out = norm(x)  # training (the EAGLE head): torch's op, so gradients flow
    out.sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    with torch.inference_mode():
        y = torch.randn(3, 16)
        assert cpu_ops.applies(y, norm.weight)
        assert torch.equal(norm(y), torch.ops.specserve_cpu.rms_norm(y, norm.weight, 1e-5))
    assert not cpu_ops.applies(x, norm.weight)
    assert not cpu_ops.applies(torch.randn(3, 16, dtype=torch.float64))
