"""The W8A8 linear (kernels/csrc/int8_linear_cpu.cpp) against its plain-torch reference (kernels/linear.py,
exact integer sums and the same float epilogue: equal bits), against fbgemm's path of Int8Linear (the
same bits again; on CPUs without VNNI, the exact float32 fallback instead), and itself at other batch
sizes and thread counts. K a multiple of 64 takes the AMX tiles where the CPU has them, other K the VNNI
vectors (AVX2 ones on CPUs without VNNI): all are covered by the shapes below."""

from __future__ import annotations

import pytest
import torch

from specserve.engine.quant import Int8Linear
from specserve.kernels import cpu_ops
from specserve.kernels.linear import INT8_BLOCK, INT8_GROUP, exact_int_matmul, int8_linear_ref, pack_int8_weight

pytestmark = pytest.mark.skipif(not cpu_ops.load(), reason="the C++ CPU kernels did not build here (no compiler)")


def int8_linear(x, w_int, w_scale, bias=None):
    packed, compensation = pack_int8_weight(w_int)
    return torch.ops.specserve_cpu.int8_linear(x, packed, compensation, w_scale, bias)


def inputs(rows: int, in_features: int, out_features: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen) * 3  # [M, K]
    w_int = torch.randint(-127, 128, (out_features, in_features), generator=gen, dtype=torch.int8)  # [N, K]
    w_scale = torch.rand(out_features, generator=gen) * 0.01 + 1e-4  # [N]
    return x, w_int, w_scale, torch.randn(out_features, generator=gen)  # bias [N]


def test_packing_layout():
    w_int = torch.randint(-127, 128, (21, 10), dtype=torch.int8)
    packed, compensation = pack_int8_weight(w_int)
    blocks = packed.view(2, 3, INT8_BLOCK, INT8_GROUP)  # [N / 16, K / 4, 16 channels, 4 k], padded
    for n, k in [(0, 0), (5, 9), (16, 3), (20, 7)]:
        assert blocks[n // INT8_BLOCK, k // INT8_GROUP, n % INT8_BLOCK, k % INT8_GROUP] == w_int[n, k]
    assert blocks[1, :, 5:].eq(0).all() and blocks[:, 2, :, 2:].eq(0).all()  # padding: channels 21+, k 10+
    assert torch.equal(compensation[:21], w_int.sum(dim=1, dtype=torch.int32) * 128)
    assert compensation[21:].eq(0).all()


# K: tail only, one group, the AMX step, not a multiple of 4 or 64, two AMX steps, the model's; M over the
# VNNI tile (6 rows) and the AMX tile (16 rows); N over the 4-block tiles with ragged last blocks.
@pytest.mark.parametrize("rows", [1, 5, 7, 16, 33])
@pytest.mark.parametrize("in_features", [3, 4, 64, 100, 128, 576])
@pytest.mark.parametrize("out_features", [1, 17, 70])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bits_equal_the_reference(rows: int, in_features: int, out_features: int, with_bias: bool):
    x, w_int, w_scale, bias = inputs(rows, in_features, out_features, seed=rows * 1000 + in_features + out_features)
    bias = bias if with_bias else None
    assert torch.equal(int8_linear(x, w_int, w_scale, bias), int8_linear_ref(x, w_int, w_scale, bias))


def test_extreme_rows_are_exact():
    # Every product at its largest (127 * 127 * K = 24.8M > 2^24): the int32 sums and the offset's
    # compensation must not wrap or round before the epilogue.
    w_int = torch.full((16, 1536), -127, dtype=torch.int8)
    x = torch.tensor([[-1.0] * 1536, [1.0] * 1536, [0.0] * 1536])
    out = int8_linear(x, w_int, torch.ones(16))
    assert torch.equal(out, int8_linear_ref(x, w_int, torch.ones(16)))
    row_scale = torch.tensor(1.0) / 127  # absmax 1 -> every input quantizes to -127 or 127
    assert out[0, 0] == torch.tensor(float(127 * 127 * 1536)) * row_scale and out[2].eq(0).all()


@pytest.mark.parametrize("in_features,out_features", [(576, 960), (1536, 576), (100, 50)])
def test_rows_do_not_depend_on_the_batch(in_features: int, out_features: int):
    x, w_int, w_scale, bias = inputs(300, in_features, out_features, seed=3)
    packed, compensation = pack_int8_weight(w_int)
    together = torch.ops.specserve_cpu.int8_linear(x, packed, compensation, w_scale, bias)
    for start, count in [(0, 1), (299, 1), (5, 2), (17, 9), (40, 37), (100, 64)]:
        rows = x[start : start + count].contiguous()
        part = torch.ops.specserve_cpu.int8_linear(rows, packed, compensation, w_scale, bias)
        assert torch.equal(part, together[start : start + count]), (start, count)


def test_rows_do_not_depend_on_the_thread_count():
    x, w_int, w_scale, _ = inputs(20, 576, 960, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int8_linear(x, w_int, w_scale)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, int8_linear(x, w_int, w_scale))


def test_no_rows():
    _, w_int, w_scale, _ = inputs(1, 64, 20, seed=5)
    assert int8_linear(torch.zeros(0, 64), w_int, w_scale).shape == (0, 20)


def test_bad_operands_raise():
    x, w_int, w_scale, bias = inputs(2, 64, 20, seed=6)
    packed, compensation = pack_int8_weight(w_int)
    with pytest.raises(RuntimeError, match="packed int8 weight"):
        torch.ops.specserve_cpu.int8_linear(x[:, :60].contiguous(), packed, compensation, w_scale, None)
    with pytest.raises(RuntimeError, match="compensation"):
        torch.ops.specserve_cpu.int8_linear(x, packed, compensation[:16], w_scale, None)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.specserve_cpu.int8_linear(x, packed, compensation, w_scale, bias[:5])
    with pytest.raises(RuntimeError, match="float32 input"):
        torch.ops.specserve_cpu.int8_linear(x.double(), packed, compensation, w_scale, None)


@pytest.mark.skipif(not (cpu_ops.load() and torch.ops.specserve_cpu.int8_linear_fast()),
                    reason="no AVX-512 VNNI or AVX2: Int8Linear has only its fallbacks here")
@pytest.mark.parametrize("fallback", ["fbgemm", "exact"])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (1536, 576), (100, 40)])
def test_int8linear_paths_agree(monkeypatch, fallback: str, in_features: int, out_features: int):
    # Where specserve's kernel is fast Int8Linear uses it; elsewhere fbgemm where the CPU has VNNI (exact
    # there), else exact float32 GEMMs. All must give one token the same bits, or a model's int8 outputs
    # would depend on the CPU's instruction set.
    if fallback == "fbgemm" and not cpu_ops.has_cpu_flag("avx512_vnni", "avx_vnni"):
        pytest.skip("without VNNI fbgemm's int16 pair sums saturate: Int8Linear does not use it here")
    gen = torch.Generator().manual_seed(in_features)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    bias = torch.randn(out_features, generator=gen)
    x = torch.randn(9, in_features, generator=gen) * 4
    own = Int8Linear(weight, bias)
    assert own.path == "kernel"
    monkeypatch.setattr(cpu_ops, "load", lambda: False)
    monkeypatch.setattr(cpu_ops, "has_cpu_flag", lambda *names: fallback == "fbgemm")
    other = Int8Linear(weight, bias)
    assert other.path == fallback
    assert torch.equal(own(x), other(x))


def test_exact_int_matmul_is_exact_where_float32_sums_are_not():
    # 127 * 127 * 1536 = 24.8M > 2^24: one float32 GEMM over all of K may round; the chunked one may not.
    x_int = torch.full((2, 1536), 127.0)
    x_int[1, ::2] = -127.0
    x_int[1, :3] = 1.0
    w_int = torch.full((3, 1536), 127.0)
    w_int[2, 5] = 126.0
    exact = x_int.double() @ w_int.double().T
    assert torch.equal(exact_int_matmul(x_int, w_int), exact)
