"""Tree attention over the paged KV cache: the Triton kernel, its launcher and the plain-torch reference.

A verify forward scores every node of each sequence's draft tree at once (vocabulary: node, path,
tree mask, as defined in `specserve.engine.draft_tree`). Query row i of sequence s attends the
sequence's committed prefix, positions [0, prefix_len_s), and those new tokens j whose tree-mask bit
is set: its path. New token j's K/V are already in the cache at position prefix_len_s + j. A plain
prefill or decode chunk is the special case of a lower-triangular tree mask (a chain).

Worked example (block_size 4): sequence A has a 5-token prefix, block table [7, 2], and a tree of 3 new
tokens, root a0 with children a1 and a2; sequence B has a 2-token prefix, block table [5], and 1 new
token b0 (a decode). The flat batch is [a0, a1, a2, b0], query_start_loc = [0, 3, 4], prefix_lens [5, 2],
    tree_mask = [[1, 0, 0],   a0 sees a0
                 [1, 1, 0],   a1 sees a0, a1
                 [1, 0, 1],   a2 sees a0, a2 (not its sibling a1)
                 [1, 0, 0]]   b0 sees b0 (columns past B's 1 new token are never read)
A's keys sit at positions 0..7 = slots [28, 29, 30, 31, 8 | 9, 10, 11] (new tokens after the bar), so
row a2 attends slots [28, 29, 30, 31, 8, 9, 11]; row b0 attends slots [20, 21, 22].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from specserve.kernels.kv_cache import kv_row_width, kv_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU serving runs tree_attention_ref; only tree_attention_triton needs triton
    triton = None


def tree_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int, padding entries arbitrary
    prefix_lens: torch.Tensor,  # [num_seqs] int, committed tokens already in the cache
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int, cu_seqlens of the query rows
    tree_mask: torch.Tensor,  # [num_tokens, max_query_len] bool, row t may attend new token j
    scale: float,
    block_size: int,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], q.dtype
    """Plain torch: gather each sequence's keys in position order, pad its query rows, one masked SDPA."""
    _check_args(q, k_cache, v_cache, block_tables, prefix_lens, query_start_loc, tree_mask)
    num_seqs, max_query_len = prefix_lens.shape[0], tree_mask.shape[1]
    prefix_lens, query_start_loc = prefix_lens.long(), query_start_loc.long()
    query_lens = query_start_loc[1:] - query_start_loc[:-1]  # [num_seqs]
    seq_of_row = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), query_lens)  # [num_tokens]
    row_in_seq = torch.arange(q.shape[0], device=q.device) - query_start_loc[seq_of_row]  # [num_tokens]
    context_lens = prefix_lens + query_lens  # [num_seqs]
    key_pos = torch.arange(int(context_lens.max()), device=q.device)  # [max_context_len]
    in_context = key_pos[None, :] < context_lens[:, None]  # [num_seqs, max_context_len]
    slots = block_tables[:, key_pos // block_size].long() * block_size + key_pos % block_size
    slots = slots.masked_fill(~in_context, 0)  # [num_seqs, max_context_len]
    # Unwritten slots may hold anything (NaN too): padding keys must be zero, not merely masked.
    k = kv_rows(k_cache[slots], q.dtype).masked_fill(~in_context[..., None, None], 0)  # [S, L, Hkv, D]
    v = kv_rows(v_cache[slots], q.dtype).masked_fill(~in_context[..., None, None], 0)  # [S, L, Hkv, D]

    new_index = key_pos[None, :] - prefix_lens[seq_of_row, None]  # [num_tokens, L], new token j or < 0
    on_path = tree_mask.gather(1, new_index.clamp(0, max_query_len - 1))  # [num_tokens, L]
    allowed = (new_index < 0) | (on_path & (new_index < query_lens[seq_of_row, None]))  # [num_tokens, L]

    # Padding query rows see every key (their outputs are dropped) so that no softmax row is empty.
    mask = torch.ones(num_seqs, max_query_len, key_pos.shape[0], dtype=torch.bool, device=q.device)
    mask[seq_of_row, row_in_seq] = allowed  # [S, max_query_len, L]
    padded_q = q.new_zeros(num_seqs, max_query_len, *q.shape[1:])  # [S, max_query_len, H, D]
    padded_q[seq_of_row, row_in_seq] = q
    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=True,
    )  # [S, H, max_query_len, D]
    return out.transpose(1, 2)[seq_of_row, row_in_seq]


def _check_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    tree_mask: torch.Tensor,
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 3
    assert k_cache.shape[2] == kv_row_width(head_dim, k_cache.dtype), "cache rows do not fit head_dim"
    assert num_heads % k_cache.shape[1] == 0, "GQA needs num_heads to be a multiple of num_kv_heads"
    num_seqs = prefix_lens.shape[0]
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs
    assert query_start_loc.shape == (num_seqs + 1,) and tree_mask.shape[0] == num_tokens
    assert tree_mask.dtype == torch.bool and tree_mask.dim() == 2
    for t in (block_tables, prefix_lens, query_start_loc):
        assert not t.is_floating_point() and t.dtype != torch.bool, "index tensors must be integers"


def tree_attention_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32/int64, padding entries arbitrary
    prefix_lens: torch.Tensor,  # [num_seqs] int, committed tokens already in the cache
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int, cu_seqlens of the query rows
    tree_mask: torch.Tensor,  # [num_tokens, max_query_len] bool, row t may attend new token j
    scale: float,
    block_size: int,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], q.dtype
    """The Triton kernel: one program per (sequence, block of BLOCK_M query rows, head).

    Same contract as `tree_attention_ref`. The cache holds q's dtype, or (with float32 queries) bfloat16
    or int8 rows with their scale (kernels/kv_cache.py), widened as they are loaded. The host-side values
    read here (max_query_len) come from shapes, so launching never synchronises with the device.
    """
    if triton is None:
        raise RuntimeError("tree_attention_triton needs the triton package; use tree_attention_ref without it")
    _check_args(q, k_cache, v_cache, block_tables, prefix_lens, query_start_loc, tree_mask)
    assert q.dtype in (torch.float32, torch.bfloat16, torch.float16), f"unsupported dtype {q.dtype}"
    assert k_cache.dtype == v_cache.dtype, "K and V caches of one dtype"
    assert k_cache.dtype == q.dtype or (q.dtype == torch.float32 and k_cache.dtype in (torch.bfloat16, torch.int8)), \
        "the cache holds q's dtype, or bfloat16 / int8 rows for float32 queries"
    assert block_tables.dtype in (torch.int32, torch.int64)
    assert q.stride(2) == k_cache.stride(2) == v_cache.stride(2) == 1, "head_dim must be contiguous"
    assert tree_mask.stride(1) == 1 and block_tables.stride(1) == 1
    tensors = (k_cache, v_cache, block_tables, prefix_lens, query_start_loc, tree_mask)
    assert all(t.device == q.device for t in tensors), "all tensors on one device"
    assert prefix_lens.is_contiguous() and query_start_loc.is_contiguous()

    num_tokens, num_heads, head_dim = q.shape
    num_seqs, max_query_len = prefix_lens.shape[0], tree_mask.shape[1]
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    block_m = 16  # tl.dot needs at least 16 rows; decodes waste the rest, trees of ~16+ nodes fill it
    grid = (num_seqs, triton.cdiv(max_query_len, block_m), num_heads)
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, out,
        block_tables, prefix_lens, query_start_loc, tree_mask.view(torch.uint8),
        scale, block_size, head_dim,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), tree_mask.stride(0),
        HEADS_PER_KV=num_heads // k_cache.shape[1],
        QUANTIZED=k_cache.dtype == torch.int8,
        BLOCK_M=block_m,
        BLOCK_N=64,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        # Tiles are upcast to float32 before tl.dot (the interpreter would multiply bfloat16's raw bits).
        # tf32 holds bf16/fp16 K, Q and V exactly and rounds only the softmax weights, to 2**-11; it
        # would round float32 inputs too, so those take the full-precision path.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out


def _jit(fn: Callable) -> Callable:
    """triton.jit where triton is installed; without it the kernels stay plain functions nobody launches."""
    return fn if triton is None else triton.jit(fn)


@_jit
def _tree_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, prefix_lens_ptr, query_start_loc_ptr, tree_mask_ptr,
    scale, block_size, head_dim,
    stride_q_token, stride_q_head, stride_k_slot, stride_k_head,
    stride_v_slot, stride_v_head, stride_out_token, stride_out_head,
    stride_table_seq, stride_mask_token,
    HEADS_PER_KV: tl.constexpr,
    QUANTIZED: tl.constexpr,  # int8 cache rows: head_dim values, then their float32 scale's bytes
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per online-softmax step
    BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of two
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(2)
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    if tl.program_id(1) * BLOCK_M >= query_len:
        return  # the grid covers the longest sequence's rows; this one has fewer
    prefix_len = tl.load(prefix_lens_ptr + seq)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] row index i within the sequence
    row_valid = rows < query_len
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < head_dim
    tokens = (query_start + rows).to(tl.int64)  # [BLOCK_M] rows of the flat batch
    q_tile = tl.load(
        q_ptr + tokens[:, None] * stride_q_token + head * stride_q_head + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :], other=0.0,
    ).to(tl.float32)  # [BLOCK_M, BLOCK_D]
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    k_head = k_cache_ptr + (head // HEADS_PER_KV) * stride_k_head
    v_head = v_cache_ptr + (head // HEADS_PER_KV) * stride_v_head

    # A finite floor instead of -inf keeps a step whose keys are all masked from computing inf - inf.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # running max of each row's scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running numerator @ V

    # The committed prefix: every row sees every key.
    for start in range(0, prefix_len, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        key_valid = positions < prefix_len
        acc, l_i, m_i = _attend_keys(
            acc, l_i, m_i, q_tile, positions, key_valid, key_valid[None, :], table_row, block_size,
            k_head, v_head, stride_k_slot, stride_v_slot, dims, dim_valid, head_dim, scale, QUANTIZED,
            DOT_PRECISION,
        )
    # This step's new tokens: node j sits at position prefix_len + j; the tree mask picks each row's path.
    for start in range(0, query_len, BLOCK_N):
        nodes = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        node_valid = nodes < query_len
        on_path = tl.load(
            tree_mask_ptr + tokens[:, None] * stride_mask_token + nodes[None, :],
            mask=row_valid[:, None] & node_valid[None, :], other=0,
        ) != 0  # [BLOCK_M, BLOCK_N]
        acc, l_i, m_i = _attend_keys(
            acc, l_i, m_i, q_tile, prefix_len + nodes, node_valid, on_path, table_row, block_size,
            k_head, v_head, stride_k_slot, stride_v_slot, dims, dim_valid, head_dim, scale, QUANTIZED,
            DOT_PRECISION,
        )

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i is 0 only on padding rows
    tl.store(
        out_ptr + tokens[:, None] * stride_out_token + head * stride_out_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :],
    )


@_jit
def _attend_keys(
    acc, l_i, m_i, q_tile, positions, key_valid, allowed, table_row, block_size,
    k_head, v_head, stride_k_slot, stride_v_slot, dims, dim_valid, head_dim, scale,
    QUANTIZED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over BLOCK_N keys at `positions`, loaded through the block table.

    Keys outside `key_valid` are never read (they load as 0); `allowed` [BLOCK_M, BLOCK_N] masks scores.
    An int8 row's values are scaled by the float32 stored after them as they are loaded.
    """
    blocks = tl.load(table_row + positions // block_size, mask=key_valid, other=0).to(tl.int64)
    slots = blocks * block_size + positions % block_size  # [BLOCK_N]
    kv_valid = key_valid[:, None] & dim_valid[None, :]
    k_rows = k_head + slots * stride_k_slot  # [BLOCK_N] row starts
    v_rows = v_head + slots * stride_v_slot
    k = tl.load(k_rows[:, None] + dims[None, :], mask=kv_valid, other=0).to(tl.float32)
    v = tl.load(v_rows[:, None] + dims[None, :], mask=kv_valid, other=0).to(tl.float32)
    if QUANTIZED:
        k_scale = tl.load((k_rows + head_dim).to(tl.pointer_type(tl.float32)), mask=key_valid, other=0.0)
        v_scale = tl.load((v_rows + head_dim).to(tl.pointer_type(tl.float32)), mask=key_valid, other=0.0)
        k = k * k_scale[:, None]
        v = v * v_scale[:, None]
    scores = tl.dot(q_tile, tl.trans(k), input_precision=DOT_PRECISION) * scale
    scores = tl.where(allowed, scores, float("-inf"))  # [BLOCK_M, BLOCK_N]
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp(m_i - m_new)  # rescales what was accumulated under the old max
    p = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new
