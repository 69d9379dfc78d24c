"""The batch-invariant float32 linear of kernels/csrc/linear_cpu.cpp, rewritten in plain torch: the same
summation order, so it gives the kernel's bits (tests/unit/kernels/test_linear_cpu.py).

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


def _fma(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """float32 a * b + acc with one rounding (up to the rare double rounding above)."""
    return (a.double() * b.double() + acc.double()).float()


def _sum_lanes(lanes: torch.Tensor) -> torch.Tensor:  # [..., 16] float32 -> [...] float32
    h = lanes[..., :8] + lanes[..., 8:]  # [..., 8]
    q = h[..., :4] + h[..., 4:]  # [..., 4]
    return (q[..., 0] + q[..., 2]) + (q[..., 1] + q[..., 3])


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x` `# [M, K]` float32, `weight` `# [N, K]` float32, `bias` `# [N]` -> `# [M, N]` float32, in the
    kernel's order. Slow (a Python loop over K / 16): for tests of small shapes only."""
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], "x [M, K] and weight [N, K]"
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
