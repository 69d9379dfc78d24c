"""The C++ CPU tree-attention kernel (kernels/csrc/tree_attention_cpu.cpp) against the plain-torch
reference `tree_attention_ref`, its batch invariance, its input checks, and the "cpu" backend's split
of a step between the kernel and SDPA groups; the C++ prefill kernel (kernels/csrc/prefill_attention_cpu.cpp)
for long causal chunks against the same reference, in its AVX-512 and AVX2 builds.

Cache slots that hold no token of a sequence are NaN, so a key read from outside a row's context shows
up as a NaN in the output.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from specserve.engine.draft_tree import DraftTree
from specserve.kernels import cpu_ops
from specserve.kernels.kv_cache import quantize_kv
from specserve.kernels.paged_attention import (
    CPU_KERNEL_MAX_QUERY,
    build_attention_metadata,
    prefill_kernel_applies,
    paged_attention,
    paged_attention_ref,
    resolve_attention_backend,
)
from specserve.kernels.tree_attention import tree_attention_ref

pytestmark = pytest.mark.skipif(not cpu_ops.load(), reason="the C++ CPU kernel did not build here (no compiler)")


def ancestor_mask(parents: list[int]) -> torch.Tensor:  # [n, n] bool, node i sees itself and its ancestors
    return torch.tensor(DraftTree(list(range(len(parents))), parents, [1.0] * len(parents)).ancestor_mask())


def chain(n: int) -> list[int]:
    return [-1] + list(range(n - 1))


def random_tree(n: int, gen: torch.Generator) -> list[int]:
    return [-1] + [int(torch.randint(0, i, (), generator=gen)) for i in range(1, n)]


class Case:
    """Sequences (prefix_len, parents of the new tokens) laid out in a NaN-filled paged cache."""

    def __init__(self, seqs: list[tuple[int, list[int]]], num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int, seed: int = 0, cache_dtype: torch.dtype = torch.float32) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.block_size = block_size
        query_lens = [len(parents) for _, parents in seqs]
        context_lens = [prefix + q for (prefix, _), q in zip(seqs, query_lens)]
        blocks_needed = [-(-ctx // block_size) for ctx in context_lens]
        num_blocks = sum(blocks_needed) + 3
        order = torch.randperm(num_blocks, generator=gen).tolist()  # blocks scattered, out of order
        self.tables, used = [], 0
        for n in blocks_needed:
            self.tables.append(order[used : used + n])
            used += n
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.full(shape, float("nan"))
        self.v = torch.full(shape, float("nan"))
        for table, ctx in zip(self.tables, context_lens):
            for pos in range(ctx):
                slot = table[pos // block_size] * block_size + pos % block_size
                self.k[slot] = torch.randn(num_kv_heads, head_dim, generator=gen)
                self.v[slot] = torch.randn(num_kv_heads, head_dim, generator=gen)
        if cache_dtype == torch.int8:  # NaN rows get a NaN scale: still NaN when read
            self.k, self.v = quantize_kv(self.k), quantize_kv(self.v)
        else:
            self.k, self.v = self.k.to(cache_dtype), self.v.to(cache_dtype)  # the reference reads the same values
        self.q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen)
        self.prefix_lens = [prefix for prefix, _ in seqs]
        self.query_lens = query_lens
        self.masks = [ancestor_mask(parents) for _, parents in seqs]
        self.scale = head_dim**-0.5

    def tensors(self) -> dict[str, torch.Tensor]:
        starts = [0]
        for q in self.query_lens:
            starts.append(starts[-1] + q)
        max_blocks = max(len(t) for t in self.tables)
        tables = torch.zeros(len(self.tables), max_blocks, dtype=torch.int32)
        for i, t in enumerate(self.tables):
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        mask = torch.zeros(starts[-1], max(self.query_lens), dtype=torch.bool)
        for start, m in zip(starts, self.masks):
            mask[start : start + m.shape[0], : m.shape[0]] = m
        return dict(block_tables=tables, prefix_lens=torch.tensor(self.prefix_lens, dtype=torch.int32),
                    query_start_loc=torch.tensor(starts, dtype=torch.int32), tree_mask=mask)

    def reference(self) -> torch.Tensor:
        t = self.tensors()
        return tree_attention_ref(self.q, self.k, self.v, t["block_tables"], t["prefix_lens"], t["query_start_loc"],
                                  t["tree_mask"], self.scale, self.block_size)

    def kernel(self, seqs: list[int] | None = None) -> torch.Tensor:
        """The kernel over sequences `seqs` (default all); rows of other sequences stay NaN."""
        out, per_sequence = self._rows_of(seqs)
        torch.ops.specserve_cpu.tree_attention(out, self.q, self.k, self.v, *per_sequence,
                                               self.tensors()["tree_mask"], self.block_size, self.scale)
        return out

    def prefill_kernel(self, seqs: list[int] | None = None) -> torch.Tensor:
        """The prefill kernel over sequences `seqs` (default all; causal chunks); other rows stay NaN."""
        out, per_sequence = self._rows_of(seqs)
        torch.ops.specserve_cpu.prefill_attention(out, self.q, self.k, self.v, *per_sequence, self.block_size,
                                                  self.scale)
        return out

    def _rows_of(self, seqs: list[int] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A NaN output, and the kernels' per-sequence tensors of `seqs` (default all): block tables, prefix
        lengths, first rows, query lengths."""
        t = self.tensors()
        index = torch.tensor(list(range(len(self.tables))) if seqs is None else seqs)
        per_sequence = [t["block_tables"][index].contiguous(), t["prefix_lens"][index].contiguous(),
                        t["query_start_loc"][:-1][index].contiguous(),
                        torch.tensor(self.query_lens, dtype=torch.int32)[index]]
        return torch.full_like(self.q, float("nan")), per_sequence


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("head_dim", [64, 16, 24])  # 64: the compiled-for head size; 16, 24: the generic path
@pytest.mark.parametrize("heads", [(9, 3), (4, 4)])
@pytest.mark.parametrize("block_size", [16, 4])
def test_kernel_matches_the_reference(head_dim, heads, block_size, cache_dtype):
    gen = torch.Generator().manual_seed(head_dim + block_size)
    seqs = [
        (37, [-1]),  # a decode
        (0, chain(1)),  # the first token of a sequence
        (130, random_tree(12, gen)),  # a draft tree crossing block boundaries
        (5, chain(16)),  # a prefill chunk, causal
        (64, [-1, 0, 0, 0, 1, 4]),  # a wide tree whose prefix fills whole blocks
        (200, [-1]),
    ]
    case = Case(seqs, *heads, head_dim=head_dim, block_size=block_size, cache_dtype=cache_dtype)
    got, want = case.kernel(), case.reference()
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_kernel_writes_only_its_sequences_rows():
    case = Case([(10, [-1]), (20, chain(3)), (30, [-1])], 6, 2, head_dim=64, block_size=16)
    got, want = case.kernel(seqs=[0, 2]), case.reference()
    torch.testing.assert_close(got[[0, 4]], want[[0, 4]], atol=2e-6, rtol=1e-5)
    assert got[1:4].isnan().all()  # sequence 1's rows were not the kernel's to write


@pytest.mark.parametrize("prefix, parents, node", [
    (50, [-1, 0, 0, 1, 3], 4),  # node 4's path: 0, 1, 3, 4 (not its cousin 2); alone, a partial block
    # a chain of 9 from position 48: alone, its first 8 tokens are a whole 8-key tile of prefix keys
    # (scored 8 at a time with one shuffle reduction) where the verify row scored them one by one
    (48, [-1, 0, 1, 2, 3, 4, 5, 6, 7], 8),
])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_a_row_does_not_depend_on_the_rest_of_the_batch(prefix, parents, node, cache_dtype):
    """Bitwise: a tree row of a verify step (beside other sequences) equals the decode of that token
    alone, with only its path in the cache, at any thread count."""
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    path.reverse()
    tree = Case([(prefix, parents), (300, [-1]), (7, chain(4))], 9, 3, head_dim=64, block_size=16, seed=5,
                cache_dtype=cache_dtype)
    got_tree = tree.kernel()
    alone = Case([(prefix + len(path) - 1, [-1])], 9, 3, head_dim=64, block_size=16, seed=6)
    alone.tables = [tree.tables[0][: (prefix + len(path) + 15) // 16]]  # the same blocks; the path follows the prefix
    alone.k, alone.v, alone.q = tree.k.clone(), tree.v.clone(), tree.q[node : node + 1].clone()
    table = tree.tables[0]
    for depth, step in enumerate(path):
        src = table[(prefix + step) // 16] * 16 + (prefix + step) % 16
        dst = table[(prefix + depth) // 16] * 16 + (prefix + depth) % 16
        alone.k[dst], alone.v[dst] = tree.k[src], tree.v[src]
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):  # 3: more threads than cores, another split of the items
            torch.set_num_threads(threads)
            assert torch.equal(alone.kernel()[0], got_tree[node])
    finally:
        torch.set_num_threads(previous)


def test_a_cache_of_mixed_or_unsupported_dtypes_is_refused():
    case = Case([(20, [-1])], 4, 2, head_dim=16, block_size=4)
    t = case.tensors()
    out = torch.empty_like(case.q)
    unscaled = case.k.to(torch.int8)  # int8 rows without their scale's 4 bytes
    for (k, v), message in (((case.k, case.v.bfloat16()), "float32, bfloat16 or int8 cache"),
                            ((case.k.half(), case.v.half()), "float32, bfloat16 or int8 cache"),
                            ((unscaled, unscaled), "cache shape does not fit q")):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.specserve_cpu.tree_attention(out, case.q, k, v, t["block_tables"], t["prefix_lens"],
                                                   t["query_start_loc"][:-1].contiguous(),
                                                   torch.tensor(case.query_lens, dtype=torch.int32), t["tree_mask"],
                                                   case.block_size, case.scale)


def test_bad_metadata_is_an_error_not_a_crash():
    case = Case([(20, [-1])], 4, 2, head_dim=16, block_size=4)
    t = case.tensors()
    out = torch.empty_like(case.q)
    args = dict(prefix_lens=t["prefix_lens"], row_starts=t["query_start_loc"][:-1].contiguous(),
                query_lens=torch.tensor([1], dtype=torch.int32), tree_mask=t["tree_mask"])
    bad_table = t["block_tables"].clone()
    bad_table[0, 2] = 10_000  # a block past the cache
    with pytest.raises(RuntimeError, match="block out of range"):
        torch.ops.specserve_cpu.tree_attention(out, case.q, case.k, case.v, bad_table, *args.values(), 4, 0.25)
    with pytest.raises(RuntimeError, match="longer than its block table"):
        torch.ops.specserve_cpu.tree_attention(out, case.q, case.k, case.v, t["block_tables"][:, :2].contiguous(),
                                               *args.values(), 4, 0.25)
    with pytest.raises(RuntimeError, match="must see its own token"):
        torch.ops.specserve_cpu.tree_attention(out, case.q, case.k, case.v, t["block_tables"], args["prefix_lens"],
                                               args["row_starts"], args["query_lens"], ~t["tree_mask"], 4, 0.25)


def test_the_cpu_backend_splits_a_step_between_kernel_and_sdpa():
    """A long prefill chunk goes to SDPA, decodes, trees and short chunks to the kernel; the combined
    output equals the torch backend's."""
    long_chunk = CPU_KERNEL_MAX_QUERY + 9
    seqs = [(0, chain(long_chunk)), (40, [-1, 0, 0, 1]), (17, [-1]), (3, chain(5))]
    case = Case(seqs, 9, 3, head_dim=64, block_size=16)
    query_lens = case.query_lens
    context_lens = [p + q for p, q in zip(case.prefix_lens, query_lens)]
    tree_masks = [None, case.masks[1].tolist(), None, None]
    metas = {backend: build_attention_metadata(query_lens, context_lens, case.tables, 16, tree_masks, backend=backend)
             for backend in ("torch", "cpu")}
    cpu = metas["cpu"]
    assert cpu.cpu_args is not None and cpu.cpu_args.row_starts.tolist() == [long_chunk, long_chunk + 4,
                                                                               long_chunk + 5]
    assert [g.token_index.numel() for g in cpu.groups] == [long_chunk]
    got = paged_attention(case.q, case.k, case.v, cpu, case.scale)
    want = paged_attention_ref(case.q, case.k, case.v, metas["torch"], case.scale)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_sdpa_dtype_rounds_the_sdpa_groups_only():
    """bfloat16 SDPA (bfloat16 and int8 models' long prefill chunks): the group's rows move by bfloat16
    rounding, the kernel's rows keep their bits, the output stays float32."""
    long_chunk = CPU_KERNEL_MAX_QUERY + 9
    case = Case([(0, chain(long_chunk)), (40, [-1, 0, 0, 1]), (17, [-1])], 9, 3, head_dim=64, block_size=16)
    context_lens = [p + q for p, q in zip(case.prefix_lens, case.query_lens)]
    tree_masks = [None, case.masks[1].tolist(), None]
    meta = build_attention_metadata(case.query_lens, context_lens, case.tables, 16, tree_masks, backend="cpu")
    exact = paged_attention(case.q, case.k, case.v, meta, case.scale)
    rounded = paged_attention(case.q, case.k, case.v, meta, case.scale, torch.bfloat16)
    assert rounded.dtype == torch.float32
    assert torch.equal(rounded[long_chunk:], exact[long_chunk:])
    error = (rounded[:long_chunk] - exact[:long_chunk]).abs().max().item()
    assert 0 < error < 0.05


def test_auto_backend_falls_back_to_torch_without_the_kernel(tmp_path):
    """A failed build (here: a compiler that always fails) warns once and leaves attention on torch."""
    script = (
        "import warnings\n"
        "from specserve.kernels.paged_attention import resolve_attention_backend\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    print(resolve_attention_backend('auto'), len([w for w in caught if 'plain torch' in str(w.message)]))\n"
    )
    env = {**os.environ, "SPECSERVE_HOME": str(tmp_path), "CXX": "false"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["torch", "1"]
    env = {**os.environ, "SPECSERVE_CPU_KERNELS": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["torch", "0"]


def test_auto_backend_picks_the_kernel_for_a_float32_bfloat16_or_int8_cache():
    assert resolve_attention_backend("auto") == "cpu"
    assert resolve_attention_backend("auto", kv_dtype=torch.bfloat16) == "cpu"
    assert resolve_attention_backend("auto", kv_dtype=torch.int8) == "cpu"
    assert resolve_attention_backend("auto", kv_dtype=torch.float16) == "torch"
    assert resolve_attention_backend("torch") == "torch"


def test_batch_invariant_steps_send_every_row_to_the_kernel():
    seqs = [(0, chain(CPU_KERNEL_MAX_QUERY + 9)), (17, [-1])]
    case = Case(seqs, 9, 3, head_dim=64, block_size=16)
    context_lens = [p + q for p, q in zip(case.prefix_lens, case.query_lens)]
    meta = build_attention_metadata(case.query_lens, context_lens, case.tables, 16, backend="cpu",
                                    batch_invariant=True)
    assert meta.groups == [] and meta.cpu_args.query_lens.tolist() == case.query_lens
    torch.testing.assert_close(paged_attention(case.q, case.k, case.v, meta, case.scale), case.reference(),
                               atol=2e-6, rtol=1e-5)


needs_prefill_kernel = pytest.mark.skipif(not prefill_kernel_applies(64),
                                          reason="the prefill kernel needs AVX-512 or AVX2 with FMA")

# Causal chunks: fresh prompts and chunks after earlier context, lengths around the kernel's tiles (16
# rows of 3 query heads, 16 or 8 keys), block boundaries crossed.
PREFILL_SEQS = [(0, 100), (37, 45), (250, 17), (0, 16), (16, 33), (3, 1), (130, 64)]


@needs_prefill_kernel
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("heads,head_dim", [((9, 3), 64), ((4, 4), 64), ((8, 2), 128), ((14, 2), 64)])
@pytest.mark.parametrize("block_size", [16, 5])
def test_prefill_kernel_matches_the_reference(heads, head_dim, block_size, cache_dtype):
    case = Case([(prefix, chain(n)) for prefix, n in PREFILL_SEQS], *heads, head_dim=head_dim,
                block_size=block_size, seed=block_size + head_dim, cache_dtype=cache_dtype)
    got, want = case.prefill_kernel(), case.reference()
    assert not got.isnan().any()  # no key outside a row's context (NaN slots) was read
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@needs_prefill_kernel
def test_prefill_kernel_writes_only_its_sequences_rows_and_checks_its_input():
    case = Case([(0, chain(40)), (10, chain(20)), (5, chain(30))], 9, 3, head_dim=64, block_size=16)
    got = case.prefill_kernel([0, 2])
    assert got[40:60].isnan().all() and not got[:40].isnan().any() and not got[60:].isnan().any()
    torch.testing.assert_close(got[60:], case.reference()[60:], atol=2e-6, rtol=1e-5)
    t = case.tensors()
    out = torch.empty_like(case.q)
    args = [t["prefix_lens"], t["query_start_loc"][:-1].contiguous(), torch.tensor(case.query_lens, dtype=torch.int32)]
    with pytest.raises(RuntimeError, match="block out of range"):
        torch.ops.specserve_cpu.prefill_attention(out, case.q, case.k, case.v, t["block_tables"] + 1000, *args,
                                                  16, case.scale)
    with pytest.raises(RuntimeError, match="head_dim 64 or 128"):
        torch.ops.specserve_cpu.prefill_attention(out[..., :32].contiguous(), case.q[..., :32].contiguous(),
                                                  case.k[..., :32].contiguous(), case.v[..., :32].contiguous(),
                                                  t["block_tables"], *args, 16, case.scale)


@needs_prefill_kernel
def test_the_cpu_backend_sends_long_chunks_to_the_prefill_kernel_unless_sdpa_rounds():
    """Long chunks leave SDPA for the prefill kernel (float32 attention); with `sdpa_dtype` bfloat16 (rounded
    weights on AMX hosts) they stay on SDPA. Either way the kernel's rows and the output's dtype hold."""
    long_chunk = CPU_KERNEL_MAX_QUERY + 9
    case = Case([(0, chain(long_chunk)), (40, [-1, 0, 0, 1]), (30, chain(70))], 9, 3, head_dim=64, block_size=16)
    context_lens = [p + q for p, q in zip(case.prefix_lens, case.query_lens)]
    tree_masks = [None, case.masks[1].tolist(), None]
    meta = build_attention_metadata(case.query_lens, context_lens, case.tables, 16, tree_masks, backend="cpu")
    assert meta.prefill_args.row_starts.tolist() == [0, long_chunk + 4]
    got = paged_attention(case.q, case.k, case.v, meta, case.scale)
    long_rows = torch.cat([torch.arange(long_chunk), torch.arange(long_chunk + 4, len(case.q))])
    torch.testing.assert_close(got, case.reference(), atol=2e-6, rtol=1e-5)
    assert torch.equal(got[long_rows], case.prefill_kernel([0, 2])[long_rows])
    rounded = paged_attention(case.q, case.k, case.v, meta, case.scale, torch.bfloat16)
    assert torch.equal(rounded[long_chunk:long_chunk + 4], got[long_chunk:long_chunk + 4])
    error = (rounded[long_rows] - got[long_rows]).abs().max().item()
    assert 0 < error < 0.05  # bfloat16 SDPA, not the kernel


@needs_prefill_kernel
@pytest.mark.skipif(not cpu_ops.has_cpu_flag("avx512f") or not cpu_ops.has_cpu_flag("fma"),
                    reason="the AVX2 build is run beside the native AVX-512 one")
def test_prefill_kernel_avx2_build_matches_the_reference(tmp_path):
    """The AVX2 path (8-lane vectors) built on its own, loaded in a process without the native library."""
    library = tmp_path / "prefill_avx2.so"
    source = os.path.join(os.path.dirname(cpu_ops.__file__), "csrc", "prefill_attention_cpu.cpp")
    flags = [f for f in cpu_ops._flags() if f != "-march=native"]
    subprocess.run([os.environ.get("CXX", "g++"), source, "-o", str(library), "-march=x86-64-v3", *flags],
                   check=True, capture_output=True)
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        f"torch.ops.load_library({str(library)!r})\n"
        "from test_cpu_attention import Case, PREFILL_SEQS, chain\n"
        "for dtype in (torch.float32, torch.int8):\n"
        "    seqs = [(p, chain(n)) for p, n in PREFILL_SEQS]\n"
        "    case = Case(seqs, 9, 3, head_dim=64, block_size=16, cache_dtype=dtype)\n"
        "    got = case.prefill_kernel()\n"
        "    assert not got.isnan().any()\n"
        "    torch.testing.assert_close(got, case.reference(), atol=2e-6, rtol=1e-5)\n"
        "print('ok', torch.ops.specserve_cpu.prefill_attention_fast())\n"
    )
    env = {**os.environ, "SPECSERVE_CPU_KERNELS": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "True"]
