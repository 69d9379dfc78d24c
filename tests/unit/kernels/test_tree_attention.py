"""Tree attention: the reference against independent computations (paged causal attention for chains,
dense softmax over each node's path for trees), then the Triton kernel, interpreted on CPU, against it.

Cache slots that hold no token of a sequence are NaN, and block-table padding points at a NaN block, so
reading any key that is not part of a row's context shows up as a mismatch.
"""

from dataclasses import dataclass

import pytest
import torch

from specserve.kernels import tree_attention
from specserve.kernels.kv_cache import quantize_kv
from specserve.kernels.paged_attention import build_attention_metadata, paged_attention_ref
from specserve.kernels.tree_attention import tree_attention_ref, tree_attention_triton

# (prefix_len, parents) per sequence; parents in topological order, -1 = no parent in this step.
Spec = tuple[int, list[int]]


def chain(n: int) -> list[int]:
    return [-1] + list(range(n - 1))


def wide(children: int) -> list[int]:
    return [-1] + [0] * children


def random_tree(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [-1] + [int(torch.randint(0, i, (), generator=gen)) for i in range(1, n)]


def ancestor_mask(parents: list[int]) -> torch.Tensor:  # [n, n] bool, node i sees itself and its ancestors
    mask = torch.eye(len(parents), dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask


def test_ancestor_mask_of_a_small_tree():
    # 0 ─ 1 ─ 3
    #   └ 2
    assert ancestor_mask([-1, 0, 0, 1]).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]


@dataclass
class Batch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_slots, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # [num_seqs, max_blocks]
    prefix_lens: torch.Tensor  # [num_seqs]
    query_start_loc: torch.Tensor  # [num_seqs + 1]
    tree_mask: torch.Tensor  # [num_tokens, max_query_len] bool
    keys: list[torch.Tensor]  # per sequence [prefix_len + num_nodes, num_kv_heads, head_dim], position order
    values: list[torch.Tensor]  # like keys
    specs: list[Spec]

    def args(self, dtype: torch.dtype | None = None) -> tuple:
        float_args = (self.q, self.k_cache, self.v_cache)
        if dtype is not None:
            float_args = tuple(t.to(dtype) for t in float_args)
        return (*float_args, self.block_tables, self.prefix_lens, self.query_start_loc, self.tree_mask)


def make_batch(
    specs: list[Spec],
    block_size: int,
    heads: int,
    kv_heads: int,
    dim: int,
    dtype: torch.dtype = torch.float32,
    fill: float = float("nan"),
    table_dtype: torch.dtype = torch.int32,
    seed: int = 0,
) -> Batch:
    """Random K/V written at shuffled blocks; unused slots hold `fill`; table padding points at a spare block."""
    gen = torch.Generator().manual_seed(seed)
    context_lens = [prefix + len(parents) for prefix, parents in specs]
    blocks_needed = [-(-ctx // block_size) for ctx in context_lens]
    free = torch.randperm(sum(blocks_needed) + 1, generator=gen).tolist()
    padding_block = free.pop()
    k_cache = torch.full(((len(free) + 1) * block_size, kv_heads, dim), fill, dtype=dtype)
    v_cache = torch.full_like(k_cache, fill)
    block_tables = torch.full((len(specs), max(blocks_needed) + 1), padding_block, dtype=table_dtype)
    keys, values = [], []
    for s, (ctx, n_blocks) in enumerate(zip(context_lens, blocks_needed)):
        block_tables[s, :n_blocks] = torch.tensor([free.pop() for _ in range(n_blocks)])
        keys.append(torch.randn(ctx, kv_heads, dim, generator=gen).to(dtype))
        values.append(torch.randn(ctx, kv_heads, dim, generator=gen).to(dtype))
        positions = torch.arange(ctx)
        slots = block_tables[s, positions // block_size].long() * block_size + positions % block_size
        k_cache[slots], v_cache[slots] = keys[-1], values[-1]
    query_lens = [len(parents) for _, parents in specs]
    num_tokens, max_query_len = sum(query_lens), max(query_lens)
    # Columns past a sequence's own nodes are random: they must never be read.
    tree_mask = torch.rand(num_tokens, max_query_len, generator=gen) < 0.5
    starts = torch.tensor([0, *query_lens]).cumsum(0)
    for s, (_, parents) in enumerate(specs):
        tree_mask[starts[s] : starts[s + 1], : len(parents)] = ancestor_mask(parents)
    return Batch(
        q=torch.randn(num_tokens, heads, dim, generator=gen).to(dtype),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        prefix_lens=torch.tensor([prefix for prefix, _ in specs]),
        query_start_loc=starts.to(torch.int32),
        tree_mask=tree_mask,
        keys=keys,
        values=values,
        specs=specs,
    )


def dense_path_attention(batch: Batch, scale: float) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Each node's row: softmax attention over its prefix keys and its path keys, gathered densely."""
    rows = []
    for (prefix, parents), keys, values in zip(batch.specs, batch.keys, batch.values):
        for path in ancestor_mask(parents):
            index = torch.cat([torch.arange(prefix), prefix + path.nonzero().flatten()])
            q = batch.q[len(rows)].float()  # [H, D]
            groups = q.shape[0] // keys.shape[1]
            k = keys[index].float().repeat_interleave(groups, 1)  # [L, H, D]
            v = values[index].float().repeat_interleave(groups, 1)
            weights = torch.softmax(torch.einsum("hd,lhd->hl", q, k) * scale, -1)
            rows.append(torch.einsum("hl,lhd->hd", weights, v))
    return torch.stack(rows)


CASES: dict[str, list[Spec]] = {
    "single_node": [(0, [-1])],
    "decodes": [(5, [-1]), (16, [-1]), (1, [-1])],
    "deep_chain": [(37, chain(20))],
    "wide_tree": [(16, wide(10))],
    "siblings_only": [(3, [-1] * 6)],  # every node sees the prefix and itself alone
    "no_prefix": [(0, chain(5)), (0, wide(3))],
    "ragged_random": [(3, random_tree(7, 1)), (0, random_tree(12, 2)), (70, [-1]), (17, random_tree(18, 3))],
}
HEAD_SHAPES = {"real_gqa": (9, 3, 64), "small_gqa": (4, 2, 12)}  # heads, kv_heads, head_dim


def test_worked_example_of_the_docstring():
    k_cache = torch.randn(32, 1, 4)
    v_cache = torch.randn(32, 1, 4)
    q = torch.randn(4, 1, 4)
    tree_mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1], [1, 0, 0]], dtype=torch.bool)
    out = tree_attention_ref(
        q, k_cache, v_cache, torch.tensor([[7, 2], [5, 0]]), torch.tensor([5, 2]), torch.tensor([0, 3, 4]),
        tree_mask, scale=0.5, block_size=4,
    )
    for row, slots in ((2, [28, 29, 30, 31, 8, 9, 11]), (3, [20, 21, 22])):
        weights = torch.softmax(k_cache[slots, 0] @ q[row, 0] * 0.5, 0)
        torch.testing.assert_close(out[row, 0], weights @ v_cache[slots, 0])


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("prefix_and_query_lens", [[(0, 7)], [(9, 1), (0, 3), (30, 5)], [(16, 16), (3, 2)]])
def test_reference_of_a_chain_is_paged_causal_attention(block_size, prefix_and_query_lens):
    specs = [(prefix, chain(query_len)) for prefix, query_len in prefix_and_query_lens]
    batch = make_batch(specs, block_size, heads=6, kv_heads=2, dim=8, fill=0.0)
    query_lens = [query_len for _, query_len in prefix_and_query_lens]
    context_lens = [prefix + query_len for prefix, query_len in prefix_and_query_lens]
    tables = [row[: -(-ctx // block_size)].tolist() for row, ctx in zip(batch.block_tables, context_lens)]
    meta = build_attention_metadata(query_lens, context_lens, tables, block_size)
    expected = paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, meta, scale=0.3)
    out = tree_attention_ref(*batch.args(), scale=0.3, block_size=block_size)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads", HEAD_SHAPES.values(), ids=HEAD_SHAPES.keys())
@pytest.mark.parametrize("specs", CASES.values(), ids=CASES.keys())
def test_reference_is_dense_attention_over_each_path(specs, heads, block_size):
    batch = make_batch(specs, block_size, *heads)
    out = tree_attention_ref(*batch.args(), scale=0.125, block_size=block_size)
    torch.testing.assert_close(out, dense_path_attention(batch, 0.125), atol=1e-5, rtol=1e-5)


def test_kernels_run_in_the_interpreter():
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    # Compiled (not interpreted) kernels could not launch on the CPU tensors these tests use.
    hint = "was defined before TRITON_INTERPRET=1 was set: see tests/unit/kernels/conftest.py"
    assert isinstance(tree_attention._tree_attention_kernel, InterpretedFunction), f"our kernel {hint}"
    assert isinstance(tl.standard.max, InterpretedFunction), f"triton was imported and its tl.max {hint}"


# float32 keeps float32 throughout (tl.dot in full precision): only summation order differs.
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads", HEAD_SHAPES.values(), ids=HEAD_SHAPES.keys())
@pytest.mark.parametrize("specs", CASES.values(), ids=CASES.keys())
def test_kernel_matches_reference(specs, heads, block_size):
    batch = make_batch(specs, block_size, *heads, seed=block_size)
    out = tree_attention_triton(*batch.args(), scale=0.125, block_size=block_size)
    expected = tree_attention_ref(*batch.args(), scale=0.125, block_size=block_size)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_kernel_takes_int64_block_tables_and_prefix_past_two_key_tiles():
    batch = make_batch([(150, random_tree(9, 4)), (64, chain(3))], 5, 4, 2, 16, table_dtype=torch.int64)
    out = tree_attention_triton(*batch.args(), scale=0.25, block_size=5)
    torch.testing.assert_close(out, tree_attention_ref(*batch.args(), scale=0.25, block_size=5), atol=1e-5, rtol=1e-5)


# Half precisions accumulate in float32 in the kernel; the reference runs in float32 on the same (already
# rounded) inputs, so the two differ by the output's rounding to the half type (atol: float32 summation
# noise). fp16 rounds to nearest: half an ulp, 2**-11 relative, so rtol 2**-10 leaves a factor 2. The
# interpreter's float32 -> bfloat16 cast truncates (GPUs round to nearest): up to one ulp, 2**-7 relative.
HALF_RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.mark.parametrize("dtype", HALF_RTOL.keys(), ids=["bf16", "fp16"])
@pytest.mark.parametrize("specs", [CASES["ragged_random"], CASES["wide_tree"]], ids=["ragged_random", "wide_tree"])
def test_kernel_in_half_precision(specs, dtype):
    batch = make_batch(specs, 16, *HEAD_SHAPES["real_gqa"], dtype=dtype)
    out = tree_attention_triton(*batch.args(), scale=0.125, block_size=16)
    expected = tree_attention_ref(*batch.args(torch.float32), scale=0.125, block_size=16)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=HALF_RTOL[dtype])


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8], ids=["bf16_cache", "int8_cache"])
@pytest.mark.parametrize("specs", [CASES["ragged_random"], CASES["wide_tree"]], ids=["ragged_random", "wide_tree"])
def test_kernel_reads_a_bfloat16_or_int8_cache_for_float32_queries(specs, cache_dtype):
    """--kv-dtype on CUDA: the kernel widens bfloat16 rows and scales int8 ones as it loads them, as the
    reference reads them (kernels/kv_cache.py); float32 math from there, so only summation order differs."""
    batch = make_batch(specs, 16, *HEAD_SHAPES["real_gqa"])
    convert = quantize_kv if cache_dtype == torch.int8 else (lambda cache: cache.to(cache_dtype))
    batch.k_cache, batch.v_cache = convert(batch.k_cache), convert(batch.v_cache)
    out = tree_attention_triton(*batch.args(), scale=0.125, block_size=16)
    expected = tree_attention_ref(*batch.args(), scale=0.125, block_size=16)
    assert out.dtype == torch.float32 and not out.isnan().any()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
