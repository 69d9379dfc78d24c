"""The fused row-wise C++ ops (kernels/csrc/rowwise_cpu.cpp) against their torch references: RMSNorm and
Int8Linear's per-row input quantization, and when the model uses them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specserve.engine.config import ModelConfig
from specserve.engine.model import RMSNorm, Rotary, apply_rope
from specserve.kernels.linear import quantize_rows_ref
from specserve.kernels import cpu_ops
from specserve.kernels.kv_cache import kv_row_width, kv_rows
from specserve.kernels.paged_attention import write_kv

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


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_rope_write_kv_matches_the_torch_path(cache_dtype):
    heads, kv_heads, head_dim, tokens, slots = 9, 3, 64, 5, 40
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    positions = torch.tensor([0, 7, 8, 300, 2047])
    config = ModelConfig(vocab_size=8, hidden_size=heads * head_dim, intermediate_size=8, num_layers=1,
                         num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, max_position_embeddings=2048)
    rope = Rotary(config).tables(positions)
    slot_mapping = torch.tensor([3, 17, 18, 0, 39])
    width = kv_row_width(head_dim, cache_dtype)
    caches = {name: (torch.zeros(slots, kv_heads, width, dtype=cache_dtype),
                     torch.zeros(slots, kv_heads, width, dtype=cache_dtype))
              for name in ("fused", "torch")}
    got_q = torch.ops.specserve_cpu.rope_write_kv(qkv, torch.view_as_real(rope), *caches["fused"], slot_mapping,
                                                  heads, kv_heads)
    split = qkv.view(tokens, -1, head_dim)
    qk = apply_rope(split[:, : heads + kv_heads], rope)
    write_kv(*caches["torch"], qk[:, heads:], split[:, heads + kv_heads :], slot_mapping)
    torch.testing.assert_close(got_q, qk[:, :heads], atol=1e-6, rtol=1e-6)
    # bfloat16: both round the rotated float32 to nearest even; K may differ where the two float32 values
    # (equal to ~1e-6) straddle a rounding boundary, by one bfloat16 step.
    # int8: the same, by one step of the row's scale (at most the largest |K| / 127).
    close = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.bfloat16: dict(atol=1e-6, rtol=2**-7),
             torch.int8: dict(atol=float(qk[:, heads:].abs().max()) / 127, rtol=0)}[cache_dtype]
    torch.testing.assert_close(kv_rows(caches["fused"][0], torch.float32), kv_rows(caches["torch"][0], torch.float32),
                               **close)
    assert torch.equal(caches["fused"][1], caches["torch"][1])  # V is copied (and rounded alike), not computed
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[slot_mapping] = False
    assert (caches["fused"][0][untouched] == 0).all()


def test_rope_write_kv_refuses_a_slot_outside_the_cache():
    qkv, rope = torch.randn(1, 5 * 8), torch.view_as_real(torch.ones(1, 1, 4, dtype=torch.complex64))
    k, v = torch.zeros(4, 1, 8), torch.zeros(4, 1, 8)
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.specserve_cpu.rope_write_kv(qkv, rope, k, v, torch.tensor([4]), 3, 1)
