"""Attention of a ragged batch over a paged KV cache: metadata layout and the plain-torch reference.

The KV cache of one layer is a flat array of token slots `[num_slots, num_kv_heads, head_dim]`; slot
`block_id * block_size + offset` holds one token (an int8 cache's rows also carry their scale:
kernels/kv_cache.py). A sequence's context is named by its block table.
Sequences of one step are grouped by query length so each group is one batched SDPA call; within a
group, keys are gathered in position order and padded to the longest context, with a mask.

Worked example (block_size 4): sequence A has 6 tokens of context with block table [7, 2] and queries its
last 1 token; sequence B has 3 tokens, block table [5], and queries all 3 (a prefill). The flat batch is
[A5, B0, B1, B2]; slot_mapping = [2*4+1, 5*4+0, 5*4+1, 5*4+2] = [9, 20, 21, 22]. Two groups:
  Q=1: token_index [0], kv_index [[28, 29, 30, 31, 8, 9]], mask None (a decode sees every key)
  Q=3: token_index [1, 2, 3], kv_index [[20, 21, 22]], mask None and is_causal (a fresh prefill).
With contexts of different lengths in one group, an explicit boolean mask hides padding and the future.

`paged_attention` is what the model calls: this torch reference; for metadata built with
backend="triton", the tree-attention kernel of kernels/tree_attention.py over the same cache (CUDA;
on CPU only under TRITON_INTERPRET=1, which the tests use); for backend="cpu", the C++ kernel of
kernels/csrc/tree_attention_cpu.cpp for decode and draft-tree rows, which reads keys in place instead of
gathering them, and for longer prefill chunks, which are compute-bound, the blocked C++ kernel of
kernels/csrc/prefill_attention_cpu.cpp where it applies (`prefill_kernel_applies`), else this torch path
(one SDPA per group). "auto" is "cpu" where the kernels build, else "torch".
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specserve.kernels import cpu_ops
from specserve.kernels.kv_cache import kv_row_width, kv_rows, quantize_kv


@dataclass
class AttentionGroup:
    """Sequences of one step that share a query length, attended in one batched call."""

    token_index: torch.Tensor  # [num_seqs * query_len] int64, rows of the flat batch, sequence-major
    kv_index: torch.Tensor  # [num_seqs, max_context_len] int64 cache slots in position order (pad: 0)
    # [num_seqs, 1, query_len, max_context_len] bool, True where attention is allowed; None when every
    # sequence of the group has the same context, where `is_causal` alone says it (faster SDPA path).
    mask: torch.Tensor | None
    query_len: int
    is_causal: bool = False  # only with mask None: queries are the whole context (a fresh prefill)


@dataclass
class KernelArgs:
    """The flat layout the Triton tree-attention kernel reads (kernels/tree_attention.py, worked example)."""

    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    prefix_lens: torch.Tensor  # [num_seqs] int32, tokens in the cache before this step's
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, where each sequence's rows start
    tree_mask: torch.Tensor  # [num_tokens, max_query_len] bool, row t may attend its sequence's new token j
    block_size: int


@dataclass
class CpuKernelArgs:
    """The C++ CPU kernel's rows: whole sequences of the batch, named by where their rows start."""

    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    prefix_lens: torch.Tensor  # [num_seqs] int32, tokens in the cache before this step's
    row_starts: torch.Tensor  # [num_seqs] int32, each sequence's first row in the flat batch
    query_lens: torch.Tensor  # [num_seqs] int32
    tree_mask: torch.Tensor  # [num_tokens, max_query_len] bool, by flat-batch row; other sequences' rows unused
    block_size: int


@dataclass
class CpuPrefillArgs:
    """The sequences of the torch groups again, for the C++ prefill kernel (kernels/csrc/prefill_attention_cpu.cpp),
    which `paged_attention` runs instead of the groups' SDPA where it applies (`prefill_kernel_applies`)."""

    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    prefix_lens: torch.Tensor  # [num_seqs] int32
    row_starts: torch.Tensor  # [num_seqs] int32
    query_lens: torch.Tensor  # [num_seqs] int32
    block_size: int


ATTENTION_BACKENDS = ("torch", "triton", "cpu")
# Chunks of at most this many new tokens (and every draft tree) go to the CPU tree kernel; longer prefill
# chunks to the prefill kernel (or SDPA). A tree-kernel row costs O(context) dot products without
# matrix-multiply blocking.
CPU_KERNEL_MAX_QUERY = 16


# Cache element types the C++ kernel reads (bfloat16 widened exactly to float32 as it is loaded, int8
# widened and scaled).
CPU_KV_DTYPES = (torch.float32, torch.bfloat16, torch.int8)


def resolve_attention_backend(name: str, kv_dtype: torch.dtype = torch.float32) -> str:
    """ "auto" -> "cpu" where the C++ kernel builds and loads (for a float32, bfloat16 or int8 cache), else
    "torch"; "cpu" is checked to load; other names unchanged."""
    if name == "auto":
        return "cpu" if kv_dtype in CPU_KV_DTYPES and cpu_ops.load() else "torch"
    if name == "cpu" and not cpu_ops.load():
        raise RuntimeError("attention backend 'cpu' needs the C++ CPU kernel, which did not build here")
    return name


@dataclass
class AttentionMetadata:
    """Everything attention needs for one forward; built once per step on the host, shared by layers."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot each new token's K/V is written to
    groups: list[AttentionGroup]  # the torch path's (empty with kernel_args)
    num_tokens: int
    batch_invariant: bool = False  # attend in float64 (see `_attend_group_float64`)
    kernel_args: KernelArgs | None = None  # set: the Triton kernel attends instead of the torch groups
    cpu_args: CpuKernelArgs | None = None  # set: the C++ kernel attends these sequences, the groups the rest
    prefill_args: CpuPrefillArgs | None = None  # backend "cpu": the groups' sequences, for the prefill kernel


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    tree_masks: list[list[list[bool]] | None] | None = None,
    batch_invariant: bool = False,
    backend: str = "torch",
) -> AttentionMetadata:
    """Metadata for sequences whose last `query_lens[i]` of `context_lens[i]` tokens are new this step.

    Queries are causal by default: the query at position p sees keys at positions <= p of its own
    sequence. `tree_masks[i]` (`# [query_lens[i], query_lens[i]]`, or None for causal) replaces that
    rule among sequence i's new tokens: new query a sees new key b iff tree_masks[i][a][b]; every
    query still sees all of the sequence's earlier keys. A speculative verify step uses it for token
    trees (see engine/verify.py), whose nodes sit in the cache in node order, not in path order.
    Backend "triton": the kernel's flat layout instead of the torch groups; backend "cpu": the C++ kernel
    for sequences with a tree or at most CPU_KERNEL_MAX_QUERY new tokens, the torch groups for the others.
    `batch_invariant` sends every sequence to the C++ kernel (backend "cpu"), whose rows are invariant by
    construction, or selects the float64 torch path (`_attend_group_float64`, backend "torch").
    """
    assert len(query_lens) == len(context_lens) == len(block_tables)
    assert backend in ATTENTION_BACKENDS and not (batch_invariant and backend == "triton")
    tree_masks = tree_masks or [None] * len(query_lens)
    assert len(tree_masks) == len(query_lens)
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    slot_mapping = torch.cat(
        [
            slots_of(table, torch.arange(ctx - q, ctx), block_size)
            for q, ctx, table in zip(query_lens, context_lens, block_tables)
        ]
    )
    if backend == "triton":
        args = _kernel_args(query_lens, context_lens, block_tables, block_size, tree_masks)
        return AttentionMetadata(slot_mapping=slot_mapping, groups=[], num_tokens=starts[-1], kernel_args=args)
    cpu_args = prefill_args = None
    grouped = range(len(query_lens))
    if backend == "cpu":
        # Batch-invariant: every row by the kernel, whose rows never depend on what else is in the step.
        on_kernel = [batch_invariant or q <= CPU_KERNEL_MAX_QUERY or m is not None
                     for q, m in zip(query_lens, tree_masks)]
        if any(on_kernel):
            cpu_args = _cpu_kernel_args(query_lens, context_lens, block_tables, block_size, tree_masks, starts, on_kernel)
        grouped = [i for i, kernel in enumerate(on_kernel) if not kernel]
        if grouped:
            prefill_args = CpuPrefillArgs(
                block_tables=_int32_tables([block_tables[i] for i in grouped]),
                prefix_lens=torch.tensor([context_lens[i] - query_lens[i] for i in grouped], dtype=torch.int32),
                row_starts=torch.tensor([starts[i] for i in grouped], dtype=torch.int32),
                query_lens=torch.tensor([query_lens[i] for i in grouped], dtype=torch.int32),
                block_size=block_size,
            )
    by_query_len: dict[int, list[int]] = defaultdict(list)
    for i in grouped:
        by_query_len[query_lens[i]].append(i)
    groups = [
        _group([starts[i] for i in bucket], [context_lens[i] for i in bucket],
               [block_tables[i] for i in bucket], q, block_size, [tree_masks[i] for i in bucket])
        for q, members in by_query_len.items()
        for bucket in _buckets_by_context(members, context_lens)
    ]
    return AttentionMetadata(slot_mapping=slot_mapping, groups=groups, num_tokens=starts[-1],
                             batch_invariant=batch_invariant, cpu_args=cpu_args, prefill_args=prefill_args)


# A bucket's padded keys (members x longest context) may exceed its real keys by at most this factor;
# gathering padding costs memory bandwidth, each extra bucket one more SDPA call per layer.
MAX_PADDING_RATIO = 1.5


def _buckets_by_context(members: list[int], context_lens: list[int]) -> list[list[int]]:
    """Split sequences of one query length into buckets of similar context length.

    Example: contexts [1000, 20, 900, 25] -> buckets [[0, 2], [1, 3]] (padded 2000 + 50 keys, not 4000).
    """
    ordered = sorted(members, key=lambda i: -context_lens[i])
    buckets: list[list[int]] = []
    for i in ordered:
        if buckets:
            bucket = buckets[-1]
            longest = context_lens[bucket[0]]
            real = sum(context_lens[j] for j in bucket) + context_lens[i]
            if longest * (len(bucket) + 1) <= MAX_PADDING_RATIO * real:
                bucket.append(i)
                continue
        buckets.append([i])
    # Batch order inside a bucket, so a single bucket covering the batch needs no gather/scatter.
    return [sorted(bucket) for bucket in buckets]


def _kernel_args(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    tree_masks: list[list[list[bool]] | None],
) -> KernelArgs:
    """The kernel's layout: one row per sequence of the block table, and each new token's row of its tree
    mask (causal among the new tokens when the sequence has no tree)."""
    tables = _int32_tables(block_tables)
    mask = torch.zeros(sum(query_lens), max(query_lens), dtype=torch.bool)  # [num_tokens, max_query_len]
    row = 0
    for q, tree_mask in zip(query_lens, tree_masks):
        mask[row : row + q, :q] = _new_token_mask(q, tree_mask)
        row += q
    prefix_lens = torch.tensor([c - q for q, c in zip(query_lens, context_lens)], dtype=torch.int32)
    starts = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return KernelArgs(tables, prefix_lens, starts, mask, block_size)


def _int32_tables(block_tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one `# [num_seqs, max_blocks]` int32 tensor, padded with 0."""
    tables = torch.zeros(len(block_tables), max(len(t) for t in block_tables), dtype=torch.int32)
    for i, table in enumerate(block_tables):
        tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
    return tables


def _new_token_mask(query_len: int, tree_mask: list[list[bool]] | None) -> torch.Tensor:
    """Which new tokens each new token sees `# [query_len, query_len]`: its tree mask, else causal."""
    return torch.ones(query_len, query_len, dtype=torch.bool).tril() if tree_mask is None else torch.tensor(tree_mask)


def _cpu_kernel_args(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    tree_masks: list[list[list[bool]] | None],
    starts: list[int],
    on_kernel: list[bool],
) -> CpuKernelArgs:
    members = [i for i, kernel in enumerate(on_kernel) if kernel]
    tables = _int32_tables([block_tables[i] for i in members])
    max_query_len = max(query_lens[i] for i in members)
    mask = torch.zeros(starts[-1], max_query_len, dtype=torch.bool)  # [num_tokens, max_query_len]
    for i in members:
        mask[starts[i] : starts[i] + query_lens[i], : query_lens[i]] = _new_token_mask(query_lens[i], tree_masks[i])
    as_int32 = lambda values: torch.tensor(values, dtype=torch.int32)  # noqa: E731
    return CpuKernelArgs(
        block_tables=tables,
        prefix_lens=as_int32([context_lens[i] - query_lens[i] for i in members]),
        row_starts=as_int32([starts[i] for i in members]),
        query_lens=as_int32([query_lens[i] for i in members]),
        tree_mask=mask,
        block_size=block_size,
    )


def slots_of(block_table: list[int], positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots `# [len(positions)]` of one sequence's token positions, through its block table."""
    table = torch.tensor(block_table, dtype=torch.int64)
    return table[positions // block_size] * block_size + positions % block_size


def _group(
    starts: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    query_len: int,
    block_size: int,
    tree_masks: list[list[list[bool]] | None],
) -> AttentionGroup:
    num_seqs = len(starts)
    max_ctx = max(context_lens)
    max_blocks = -(-max_ctx // block_size)
    table = torch.zeros(num_seqs, max_blocks, dtype=torch.int64)  # [num_seqs, max_blocks]
    for i, bt in enumerate(block_tables):
        n = min(len(bt), max_blocks)
        table[i, :n] = torch.tensor(bt[:n], dtype=torch.int64)
    key_pos = torch.arange(max_ctx)  # [max_ctx]
    kv_index = table[:, key_pos // block_size] * block_size + key_pos % block_size  # [num_seqs, max_ctx]
    ctx = torch.tensor(context_lens, dtype=torch.int64)  # [num_seqs]
    query_pos = ctx[:, None] - query_len + torch.arange(query_len)  # [num_seqs, query_len]
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [num_seqs, query_len, max_ctx]
    for i, tree_mask in enumerate(tree_masks):
        if tree_mask is not None:
            prefix = context_lens[i] - query_len
            mask[i, :, prefix : context_lens[i]] = torch.tensor(tree_mask, dtype=torch.bool)
    kv_index = kv_index.masked_fill(key_pos[None, :] >= ctx[:, None], 0)
    token_index = (torch.tensor(starts)[:, None] + torch.arange(query_len)).reshape(-1)
    has_tree = any(m is not None for m in tree_masks)
    if len(set(context_lens)) == 1 and query_len in (1, max_ctx) and not has_tree:
        # Decodes see every key; a fresh prefill is plain causal: no mask tensor needed.
        return AttentionGroup(token_index, kv_index, None, query_len, is_causal=query_len > 1)
    return AttentionGroup(token_index, kv_index, mask[:, None], query_len)


def write_kv(
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens]
) -> None:
    if k_cache.dtype == torch.int8:
        k, v = quantize_kv(k), quantize_kv(v)
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    sdpa_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """One layer's attention: the Triton kernel for metadata built with backend "triton", the C++ kernel
    and torch groups for backend "cpu", else the torch reference. `sdpa_dtype`: what the torch groups'
    SDPA computes in (see `_attend_group`), None for the queries' dtype."""
    if meta.cpu_args is not None or meta.prefill_args is not None:
        return _paged_attention_cpu(q, k_cache, v_cache, meta, scale, sdpa_dtype)
    args = meta.kernel_args
    if args is None:
        return paged_attention_ref(q, k_cache, v_cache, meta, scale, sdpa_dtype)
    from specserve.kernels.tree_attention import tree_attention_triton  # imports triton

    return tree_attention_triton(q, k_cache, v_cache, args.block_tables, args.prefix_lens, args.query_start_loc,
                                 args.tree_mask, scale, args.block_size)


def _paged_attention_cpu(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sdpa_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """The tree kernel writes its sequences' rows of `out`; the prefill kernel or the torch groups the others."""
    q = q.contiguous()
    out = torch.empty_like(q)
    args = meta.cpu_args
    if args is not None:
        torch.ops.specserve_cpu.tree_attention(out, q, k_cache, v_cache, args.block_tables, args.prefix_lens,
                                               args.row_starts, args.query_lens, args.tree_mask, args.block_size,
                                               scale)
    chunks = meta.prefill_args
    if chunks is not None and sdpa_dtype is None and prefill_kernel_applies(q.shape[2]):
        torch.ops.specserve_cpu.prefill_attention(out, q, k_cache, v_cache, chunks.block_tables, chunks.prefix_lens,
                                                  chunks.row_starts, chunks.query_lens, chunks.block_size, scale)
    else:
        _attend_groups(out, q, k_cache, v_cache, meta, scale, sdpa_dtype)
    return out


def prefill_kernel_applies(head_dim: int) -> bool:
    """Whether long causal chunks go to the C++ prefill kernel rather than SDPA: the kernels loaded, built
    with native vectors (AVX-512, or AVX2 with FMA), and a head_dim it has (64, 128). Where it applies it
    is 1.4-2.3x faster than SDPA on a 2-core Zen 5 EPYC (docs/benchmarks.md)."""
    return head_dim in (64, 128) and cpu_ops.load() and _prefill_kernel_fast()


@functools.cache
def _prefill_kernel_fast() -> bool:
    return bool(torch.ops.specserve_cpu.prefill_attention_fast())


def _attend_groups(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], the groups' rows written
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sdpa_dtype: torch.dtype | None,
) -> None:
    for group in meta.groups:
        attended = _attend(q[group.token_index], k_cache, v_cache, group, meta, scale, sdpa_dtype)
        out.index_copy_(0, group.token_index, attended)


def _attend(
    q: torch.Tensor,  # [num_seqs * query_len, num_heads, head_dim], the group's rows
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: AttentionGroup,
    meta: AttentionMetadata,
    scale: float,
    sdpa_dtype: torch.dtype | None,
) -> torch.Tensor:
    """One group: float64 where the step must be batch-invariant, else SDPA in `sdpa_dtype`."""
    if meta.batch_invariant:
        return _attend_group_float64(q, k_cache, v_cache, group, scale)
    return _attend_group(q, k_cache, v_cache, group, scale, sdpa_dtype)


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    sdpa_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Plain-torch paged attention: gather each group's keys, one masked SDPA per group (GQA native)."""
    assert q.shape[0] == meta.num_tokens and kv_row_width(q.shape[2], k_cache.dtype) == k_cache.shape[2]
    if len(meta.groups) == 1 and meta.groups[0].token_index.numel() == meta.num_tokens:
        return _attend(q, k_cache, v_cache, meta.groups[0], meta, scale, sdpa_dtype)  # tokens already in group order
    out = torch.empty_like(q)
    _attend_groups(out, q, k_cache, v_cache, meta, scale, sdpa_dtype)
    return out


def _attend_group(
    q: torch.Tensor,  # [num_seqs * query_len, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: AttentionGroup,
    scale: float,
    sdpa_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # [num_seqs * query_len, num_heads, head_dim], q's dtype
    """One SDPA over the group, computed in `sdpa_dtype` (None: q's dtype): Q, K and V are rounded to it
    and the output widened back. bfloat16 runs torch's CPU flash attention on AMX/AVX-512 bf16 units, 2-3x
    faster than float32 on prompts of 500-1100 tokens (2-core AMX Xeon); models whose linears already round
    their inputs (bfloat16, int8 weights) use it for long prefill chunks (engine/quant.py)."""
    num_seqs, _ = group.kv_index.shape
    dtype = sdpa_dtype or q.dtype
    qg = q.to(dtype).view(num_seqs, group.query_len, *q.shape[1:]).transpose(1, 2)  # [S, H, Q, D]
    flat_index = group.kv_index.view(-1)
    k, v = (kv_rows(cache.index_select(0, flat_index), dtype).view(*group.kv_index.shape, -1, q.shape[2])
            .transpose(1, 2) for cache in (k_cache, v_cache))  # [S, Hkv, L, D]
    out = F.scaled_dot_product_attention(
        qg, k, v, attn_mask=group.mask, is_causal=group.is_causal, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2).reshape(q.shape).to(q.dtype)


def _attend_group_float64(
    q: torch.Tensor,  # [num_seqs * query_len, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: AttentionGroup,
    scale: float,
) -> torch.Tensor:  # [num_seqs * query_len, num_heads, head_dim], q's dtype
    """`_attend_group` computed in float64 and rounded once at the end: a batch-invariant attention.

    float32 SDPA (and matmul) on CPU is not bitwise invariant: a query row's output changes in the last
    bits with the number of query rows beside it, the padding of its keys and the mask form, because the
    kernels pick their blocking and reduction order by shape. A plain decode (1 query row) and a verify
    forward (1 + draft rows) then differ by ~1e-7, which int8's per-token activation rounding (and bf16's)
    amplifies into different tokens. Here the same shape dependence exists, but at float64 rounding
    (~1e-16 relative); the float32 result differs only when the exact value lies within that of a float32
    rounding boundary (about 1 element in 1e9). It is memory-bound on the float64 copies of K/V: 1.5-7x the
    float32 SDPA time on a 2-core EPYC, by shape (decode, verify, batch 1 or 8; timings there are noisy).
    """
    num_seqs, max_ctx = group.kv_index.shape
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    per_kv, query_len = num_heads // num_kv_heads, group.query_len
    # Gathered head-major, [Hkv, S, L, D], so every matmul below is one strided batch without copies.
    flat_index = group.kv_index.view(-1)
    k, v = (kv_rows(cache.index_select(0, flat_index), torch.float64).view(num_seqs, max_ctx, num_kv_heads, head_dim)
            .permute(2, 0, 1, 3).contiguous() for cache in (k_cache, v_cache))
    # Head h reads KV head h // per_kv; a KV head's query rows side by side: [Hkv, S, per_kv * Q, D].
    qg = (q.to(torch.float64).view(num_seqs, query_len, num_kv_heads, per_kv, head_dim)
          .permute(2, 0, 3, 1, 4).reshape(num_kv_heads, num_seqs, per_kv * query_len, head_dim))
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale)  # [Hkv, S, per_kv * Q, L]
    allowed = group.mask
    if allowed is None and group.is_causal:
        allowed = torch.ones(query_len, max_ctx, dtype=torch.bool).tril(max_ctx - query_len)
    if allowed is not None:
        allowed = allowed.reshape(1, -1, 1, query_len, max_ctx)  # [1, S or 1, 1, Q, L]
        scores.view(num_kv_heads, num_seqs, per_kv, query_len, max_ctx).masked_fill_(~allowed, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [Hkv, S, per_kv * Q, D]
    out = out.view(num_kv_heads, num_seqs, per_kv, query_len, head_dim).permute(1, 3, 0, 2, 4)
    return out.reshape(q.shape).to(q.dtype)
