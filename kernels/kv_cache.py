"""Element types of the paged KV cache, and the int8 one's row format.

float32 and bfloat16 caches hold a (slot, KV head) row as head_dim values. An int8 cache holds it as
head_dim int8 values, then the 4 bytes of their float32 scale: `[num_slots, num_kv_heads, head_dim + 4]`,
68 bytes a row at head_dim 64 instead of 256. The scale is per token and KV head (absmax / 127, the
int8 linears' activation rule), so a row never depends on the other tokens of its step or block; the
C++ kernels write (`rope_write_kv`) and read (`tree_attention`) the same format
(kernels/csrc/quantize_row.h), and the torch reference reads it through `kv_rows`.
"""

from __future__ import annotations

import torch

from specserve.kernels.linear import quantize_rows_ref

KV_SCALE_BYTES = 4  # an int8 cache row ends with its float32 scale


def kv_row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of one (slot, KV head) cache row."""
    return head_dim + KV_SCALE_BYTES if dtype == torch.int8 else head_dim


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """K or V rows `# [..., head_dim]` float32 as int8 cache rows `# [..., head_dim + 4]`: each row
    quantized symmetrically (scale = absmax / 127, values rounded half to even, as the int8 linears'
    activations: kernels/linear.py), then its scale's bytes. Bit for bit what the C++ `rope_write_kv` writes
    (kernels/csrc/quantize_row.h)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    values, scales = quantize_rows_ref(rows)
    packed = torch.cat([values.to(torch.int8), scales.contiguous().view(torch.int8)], dim=1)
    return packed.view(*x.shape[:-1], x.shape[-1] + KV_SCALE_BYTES)


def kv_rows(cache_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows read from a cache `# [..., row width]` as `dtype` values `# [..., head_dim]`: an int8 row is
    its integers times its scale."""
    if cache_rows.dtype != torch.int8:
        return cache_rows.to(dtype)
    values = cache_rows[..., :-KV_SCALE_BYTES]
    scales = cache_rows[..., -KV_SCALE_BYTES:].contiguous().view(torch.float32)  # [..., 1]
    return (values.to(torch.float32) * scales).to(dtype)
