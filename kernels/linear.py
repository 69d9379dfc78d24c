"""The batch-invariant linears of kernels/csrc/ rewritten in plain torch, with the same bits: the float32
one of linear_cpu.cpp (float32 or bfloat16 weights; tests/unit/kernels/test_linear_cpu.py) and the W8A8
one of int8_linear_cpu.cpp, with its weight packing (tests/unit/kernels/test_int8_linear_cpu.py).

float32 (linear_cpu.cpp): the same summation order, so it gives the kernel's bits.

Output element (m, n), with K = 16 * chunks + tail:
    lane[j] = fma(w[n, 16 i + j], x[m, 16 i + j], lane[j])   for i = 0 .. chunks - 1, lane[j] starting at 0
    s = ((lane[0..7] + lane[8..15]) -> q[0..3] = h[0..3] + h[4..7] -> (q[0] + q[2]) + (q[1] + q[3]))
    s = fma(w[n, k], x[m, k], s)                               for k in the tail, in order
    out[m, n] = s + bias[n]
A float32 fused multiply-add is emulated in float64: the product of two float32 numbers is exact there,
and the sum is rounded to float64 and then to float32. That double rounding can differ from the one
rounding of a real FMA only when the float64 sum lands exactly halfway between two float32 numbers
(about 2^-29 of the time), which the tests' fixed inputs do not hit.
"""

from __future__ import annotations

import torch

LANES = 16
INT8_MAX = 127
INT8_BLOCK = 16  # output channels per packed block of int8_linear_cpu.cpp
INT8_GROUP = 4  # consecutive k per 32-bit lane of a block
INT8_OFFSET = 128  # inputs are offset to unsigned bytes


def _fma(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """float32 a * b + acc with one rounding (up to the rare double rounding above)."""
    return (a.double() * b.double() + acc.double()).float()


def _sum_lanes(lanes: torch.Tensor) -> torch.Tensor:  # [..., 16] float32 -> [...] float32
    h = lanes[..., :8] + lanes[..., 8:]  # [..., 8]
    q = h[..., :4] + h[..., 4:]  # [..., 4]
    return (q[..., 0] + q[..., 2]) + (q[..., 1] + q[..., 3])


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x` `# [M, K]` float32, `weight` `# [N, K]` float32 or bfloat16 (widened exactly, as the kernel does),
    `bias` `# [N]` -> `# [M, N]` float32, in the kernel's order. Slow (a Python loop over K / 16): for tests of
    small shapes only."""
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], "x [M, K] and weight [N, K]"
    weight = weight.float()
    (num_rows, width), out_features = x.shape, weight.shape[0]
    chunks = width // LANES
    xs = x[:, None, : chunks * LANES].reshape(num_rows, 1, chunks, LANES)  # [M, 1, chunks, 16]
    ws = weight[None, :, : chunks * LANES].reshape(1, out_features, chunks, LANES)  # [1, N, chunks, 16]
    lanes = torch.zeros(num_rows, out_features, LANES)  # [M, N, 16]
    for i in range(chunks):
        lanes = _fma(ws[:, :, i], xs[:, :, i], lanes)
    out = _sum_lanes(lanes)  # [M, N]
    for k in range(chunks * LANES, width):
        out = _fma(weight[None, :, k], x[:, None, k], out)
    return out if bias is None else out + bias


def quantize_rows_ref(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization of `rows` `# [M, in]`: the integers `# [M, in]` (as float32, in
    [-127, 127]) and the scales `# [M, 1]`, absmax / 127; `tiny` keeps an all-zero row at 0, not 0/0."""
    row_scale = torch.linalg.vector_norm(rows, ord=float("inf"), dim=1, keepdim=True)  # [M, 1]
    row_scale = row_scale.clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX
    return rows.div(row_scale).round_(), row_scale


def pack_int8_weight(w_int: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights `# [N, K]` in int8_linear_cpu.cpp's layout: blocks of 16 output channels (N padded with
    zero rows), each block's K (padded with zeros to a multiple of 4) as groups of 4 k x 16 channels x
    4 bytes. Returns the flat packed bytes `# [ceil(N / 16) * 16 * ceil(K / 4) * 4]` and the compensation
    `# [ceil(N / 16) * 16]` int32, 128 * sum_k w[n, k], that takes the inputs' +128 offset back out."""
    out_features, in_features = w_int.shape
    rows = -(-out_features // INT8_BLOCK) * INT8_BLOCK
    width = -(-in_features // INT8_GROUP) * INT8_GROUP
    padded = torch.zeros(rows, width, dtype=torch.int8)  # [N', K']
    padded[:out_features, :in_features] = w_int
    packed = padded.view(rows // INT8_BLOCK, INT8_BLOCK, width // INT8_GROUP, INT8_GROUP).transpose(1, 2)
    compensation = padded.sum(dim=1, dtype=torch.int32) * INT8_OFFSET  # [N']
    return packed.contiguous().view(-1), compensation


EXACT_FLOAT32_K = 1024  # 127 * 127 * 1024 < 2^24: a float32 sum of that many int8 products is exact


def exact_int_matmul(x_int: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
    """`x_int` `# [M, K]` @ `w_int` `# [N, K]`^T, both float32 tensors of integers in [-127, 127] -> `# [M, N]`
    float64, exact: float32 GEMMs over K chunks of EXACT_FLOAT32_K, where every partial sum in any order is
    an integer below 2^24, then added in float64. The speed of a float32 linear, the sums of an int8 one."""
    acc = torch.zeros(x_int.shape[0], w_int.shape[0], dtype=torch.float64)
    for start in range(0, x_int.shape[1], EXACT_FLOAT32_K):
        end = start + EXACT_FLOAT32_K
        acc += (x_int[:, start:end] @ w_int[:, start:end].T).double()
    return acc


def int8_linear_ref(
    x: torch.Tensor, w_int: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x` `# [M, K]` float32, int8 weights `w_int` `# [N, K]` with scales `w_scale` `# [N]`, `bias` `# [N]`
    -> `# [M, N]` float32: rows quantized as quantize_rows_ref, the integer dot products exact (float64
    holds them: 127 * 127 * K < 2^53), then float(acc) * w_scale, * row scale, + bias, each rounded."""
    x_int, row_scale = quantize_rows_ref(x)
    acc = x_int.double() @ w_int.double().T  # [M, N], exact integers
    out = acc.float().mul_(w_scale).mul_(row_scale)
    return out if bias is None else out.add_(bias)
