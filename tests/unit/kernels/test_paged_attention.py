"""Paged attention reference vs dense causal attention of each sequence alone."""

import pytest
import torch
import torch.nn.functional as F

from specserve.kernels.paged_attention import (
    _buckets_by_context,
    build_attention_metadata,
    paged_attention_ref,
    write_kv,
)


def dense_causal(q, k, v, scale):
    """q [Q, H, D] (the last Q positions), k/v [L, Hkv, D] -> [Q, H, D]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,lhd->hql", q, k) * scale
    q_pos = torch.arange(k.shape[0] - q.shape[0], k.shape[0])
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hql,lhd->qhd", F.softmax(scores, -1), v)


def test_worked_example_layout():
    meta = build_attention_metadata([1, 3], [6, 3], [[7, 2], [5]], block_size=4)
    assert meta.slot_mapping.tolist() == [9, 20, 21, 22]
    by_q = {g.query_len: g for g in meta.groups}
    assert by_q[1].kv_index.tolist() == [[28, 29, 30, 31, 8, 9]]
    assert by_q[1].mask is None and not by_q[1].is_causal
    assert by_q[3].token_index.tolist() == [1, 2, 3]
    assert by_q[3].mask is None and by_q[3].is_causal


def test_contexts_of_very_different_length_are_bucketed():
    assert _buckets_by_context([0, 1, 2, 3], [1000, 20, 900, 25]) == [[0, 2], [1, 3]]
    assert _buckets_by_context([0, 1, 2], [100, 90, 80]) == [[0, 1, 2]]
    meta = build_attention_metadata([1, 1, 1], [700, 30, 650], [[0] * 44, [1, 2], [3] * 41], block_size=16)
    assert sorted(g.kv_index.shape[1] for g in meta.groups) == [30, 700]


def test_mixed_contexts_get_an_explicit_mask():
    meta = build_attention_metadata([2, 2], [3, 5], [[0], [1, 2]], block_size=4)
    (group,) = meta.groups
    assert group.token_index.tolist() == [0, 1, 2, 3]
    assert group.kv_index.tolist() == [[0, 1, 2, 0, 0], [4, 5, 6, 7, 8]]
    assert group.mask[:, 0].int().tolist() == [
        [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]],
        [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
    ]


@pytest.mark.parametrize("batch_invariant", [False, True])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize(
    "lens",
    [[(1, 1)], [(1, 17), (5, 5), (3, 33), (1, 2)], [(16, 16), (16, 40), (1, 64)], [(1, 9), (1, 9)], [(7, 7), (7, 7)],
     [(2, 20), (2, 25)], [(1, 90), (1, 12), (1, 40), (1, 15)]],
)
def test_matches_dense_attention(block_size, heads, kv_heads, lens, batch_invariant):
    torch.manual_seed(0)
    dim, scale = 8, 8**-0.5
    num_blocks = 160
    k_cache = torch.zeros(num_blocks * block_size, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks).tolist()
    tables, full_k, full_v, queries = [], [], [], []
    for q_len, ctx in lens:
        n_blocks = -(-ctx // block_size)
        tables.append([free.pop() for _ in range(n_blocks)])
        full_k.append(torch.randn(ctx, kv_heads, dim))
        full_v.append(torch.randn(ctx, kv_heads, dim))
        queries.append(torch.randn(q_len, heads, dim))
        # The context before this step's queries is already cached.
        old = build_attention_metadata([ctx - q_len], [ctx - q_len], [tables[-1]], block_size) if ctx > q_len else None
        if old is not None:
            write_kv(k_cache, v_cache, full_k[-1][: ctx - q_len], full_v[-1][: ctx - q_len], old.slot_mapping)
    meta = build_attention_metadata([q for q, _ in lens], [c for _, c in lens], tables, block_size,
                                    batch_invariant=batch_invariant)
    new_k = torch.cat([k[c - q :] for k, (q, c) in zip(full_k, lens)])
    new_v = torch.cat([v[c - q :] for v, (q, c) in zip(full_v, lens)])
    write_kv(k_cache, v_cache, new_k, new_v, meta.slot_mapping)
    out = paged_attention_ref(torch.cat(queries), k_cache, v_cache, meta, scale)
    expected = torch.cat([dense_causal(q, k, v, scale) for q, k, v in zip(queries, full_k, full_v)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def dense_over(q, k, v, visible, scale):
    """q [H, D] attending only the key rows `visible` of k/v [L, Hkv, D] -> [H, D]."""
    groups = q.shape[0] // k.shape[1]
    k, v = k[visible].repeat_interleave(groups, 1), v[visible].repeat_interleave(groups, 1)
    weights = F.softmax(torch.einsum("hd,lhd->hl", q, k) * scale, -1)
    return torch.einsum("hl,lhd->hd", weights, v)


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_tree_mask_replaces_causality_among_new_tokens(batch_invariant):
    # Sequence 0: 5 cached tokens, then root + a fork: root ─ a ─ b, root ─ c (new tokens r, a, b, c).
    # Sequence 1: a plain decode beside it (no tree), same step.
    torch.manual_seed(0)
    heads, kv_heads, dim, block_size, scale = 6, 2, 8, 4, 8**-0.5
    tree = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    tables, lens = [[3, 0, 5], [1, 4]], [(4, 9), (1, 7)]
    k_cache = torch.zeros(8 * block_size, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    full_k = [torch.randn(c, kv_heads, dim) for _, c in lens]
    full_v = [torch.randn(c, kv_heads, dim) for _, c in lens]
    everything = build_attention_metadata([c for _, c in lens], [c for _, c in lens], tables, block_size)
    write_kv(k_cache, v_cache, torch.cat(full_k), torch.cat(full_v), everything.slot_mapping)
    queries = torch.randn(5, heads, dim)
    meta = build_attention_metadata([4, 1], [9, 7], tables, block_size,
                                    tree_masks=[[[bool(x) for x in row] for row in tree], None], batch_invariant=batch_invariant)
    out = paged_attention_ref(queries, k_cache, v_cache, meta, scale)
    for row in range(4):
        visible = list(range(5)) + [5 + j for j in range(4) if tree[row][j]]
        torch.testing.assert_close(out[row], dense_over(queries[row], full_k[0], full_v[0], visible, scale))
    torch.testing.assert_close(out[4], dense_over(queries[4], full_k[1], full_v[1], list(range(7)), scale))


def test_batch_invariant_rows_equal_one_row_decodes_bitwise():
    """With `batch_invariant`, each query row of a mixed step (a verify chain, a prefill chunk, decodes of
    other lengths, so padding and masks) equals, bit for bit, the same row computed as a lone decode.
    The model's shapes (9 heads over 3 KV heads, head_dim 64), contexts up to 300 keys."""
    torch.manual_seed(0)
    heads, kv_heads, dim, block_size, scale = 9, 3, 64, 16, 64**-0.5
    lens = [(9, 300), (1, 41), (1, 170), (24, 24), (9, 130)]  # (query rows, context) per sequence
    num_blocks = sum(-(-c // block_size) for _, c in lens)
    k_cache, v_cache = torch.randn(num_blocks * block_size, kv_heads, dim), torch.randn(num_blocks * block_size, kv_heads, dim)
    free = torch.randperm(num_blocks).tolist()
    tables = [[free.pop() for _ in range(-(-c // block_size))] for _, c in lens]
    queries = torch.randn(sum(q for q, _ in lens), heads, dim)
    chain = lambda n: [[b <= a for b in range(n)] for a in range(n)]  # noqa: E731
    masks = [chain(q) if 1 < q < c else None for q, c in lens]
    meta = build_attention_metadata([q for q, _ in lens], [c for _, c in lens], tables, block_size, masks, True)
    mixed = paged_attention_ref(queries, k_cache, v_cache, meta, scale)
    plain = build_attention_metadata([q for q, _ in lens], [c for _, c in lens], tables, block_size, masks)
    torch.testing.assert_close(mixed, paged_attention_ref(queries, k_cache, v_cache, plain, scale))
    row = 0
    for (q_len, ctx), table in zip(lens, tables):
        for i in range(q_len):
            alone = build_attention_metadata([1], [ctx - q_len + i + 1], [table], block_size, batch_invariant=True)
            out = paged_attention_ref(queries[row : row + 1], k_cache, v_cache, alone, scale)
            assert torch.equal(out[0], mixed[row]), f"row {row} differs by {(out[0] - mixed[row]).abs().max():.1e}"
            row += 1
