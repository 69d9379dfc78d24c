"""The int8 KV cache row format (kernels/kv_cache.py): quantization, reading back, and agreement with the
C++ writer."""

from __future__ import annotations

import pytest
import torch

from specserve.kernels import cpu_ops
from specserve.kernels.kv_cache import KV_SCALE_BYTES, kv_row_width, kv_rows, quantize_kv


def test_an_int8_row_holds_its_values_and_scale():
    x = torch.tensor([[0.5, -1.27, 0.0, 0.3]])
    row = quantize_kv(x)
    assert row.dtype == torch.int8 and row.shape == (1, 4 + KV_SCALE_BYTES)
    assert row[0, :4].tolist() == [50, -127, 0, 30]  # scale 1.27 / 127 = 0.01
    assert row[0, 4:].view(torch.float32).item() == pytest.approx(0.01)
    torch.testing.assert_close(kv_rows(row, torch.float32), x, atol=0.005, rtol=0)


def test_each_row_has_its_own_scale_and_rounds_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 64, generator=gen) * torch.tensor([0.01, 1.0, 100.0])[None, :, None]
    back = kv_rows(quantize_kv(x), torch.float32)
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert ((back - x).abs() <= step / 2 * (1 + 1e-5)).all()  # a small row keeps small steps
    assert kv_row_width(64, torch.int8) == 68 and kv_row_width(64, torch.float32) == 64


def test_an_all_zero_row_stays_zero():
    row = quantize_kv(torch.zeros(2, 16))
    assert (kv_rows(row, torch.float32) == 0).all() and not kv_rows(row, torch.float32).isnan().any()


@pytest.mark.skipif(not cpu_ops.load(), reason="the C++ CPU kernel did not build here (no compiler)")
def test_the_cpp_writer_stores_the_same_bits():
    """rope_write_kv quantizes V as it is (K after its rotation) exactly like quantize_kv."""
    heads, kv_heads, head_dim, tokens = 4, 2, 16, 3
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen) * 3
    identity = torch.stack([torch.ones(tokens, head_dim // 2), torch.zeros(tokens, head_dim // 2)], dim=-1)
    k, v = (torch.zeros(5, kv_heads, head_dim + KV_SCALE_BYTES, dtype=torch.int8) for _ in range(2))
    torch.ops.specserve_cpu.rope_write_kv(qkv, identity.contiguous(), k, v, torch.tensor([4, 0, 2]), heads, kv_heads)
    split = qkv.view(tokens, heads + 2 * kv_heads, head_dim)
    assert torch.equal(k[[4, 0, 2]], quantize_kv(split[:, heads : heads + kv_heads]))  # rotation by 0: K as is
    assert torch.equal(v[[4, 0, 2]], quantize_kv(split[:, heads + kv_heads :]))
