// Causal attention of long prefill chunks over the paged KV cache on the CPU, blocked like a matrix
// multiply (flash-attention style): tiles of query vectors against tiles of keys, an online softmax.
//
// Contract: for each sequence s given, query row j (position prefix_lens[s] + j) of its query_lens[s]
// rows, which start at row row_starts[s] of q, attends the sequence's keys at positions
// [0, prefix_lens[s] + j]; the chunk's own keys are already in the cache. Float32 q and out; a float32,
// bfloat16 or int8 cache (kernels/kv_cache.py's layouts). Reference: paged_attention_ref in
// kernels/paged_attention.py (tests/unit/kernels/test_prefill_attention_cpu.py compares them).
//
// Why: long chunks used torch's SDPA on keys gathered out of the cache. On a 2-core Zen 5 EPYC it
// reached 85-130 GFLOP/s (a chunk with earlier context needs an explicit mask, which SDPA's CPU kernel
// does not skip), a quarter of a float32 prefill and half of an int8 one, while the float32 linears of
// the same prefill run at ~350. tree_attention_cpu.cpp scores one query vector against one key at a time
// (dot products, fine for a handful of decode or draft rows); here a tile of 48 query vectors meets a
// tile of 16 keys as a small matrix product, each loaded key or value vector feeding a dozen FMAs.
//
// Two phases per call. (1) For each (sequence, KV head): its keys transposed into a contiguous
// [head_dim, keys] buffer (so one vector load holds one dimension of W consecutive keys) and its values
// copied into [keys, head_dim]; bfloat16 and int8 rows are widened (and scaled) as they are copied.
// (2) Work item = (sequence, KV head, tile of query rows): the tile's query vectors (rows x the query
// heads sharing the KV head) walk the key tiles up to the tile's last row; per key tile: scores, causal
// mask on the diagonal tile, running max and sum, the output rescaled and the weighted values added.
// A row's result depends on its tile's layout (where the rescales happen), not on other sequences.
//
// Vectors are GCC vector types of W lanes: 16 (one AVX-512 register) or 8 (one AVX2 register); FMAs are
// explicit (ISO C++ does not contract a * b + c). `prefill_attention_fast()` says whether either width
// is native here; elsewhere kernels/paged_attention.py keeps SDPA for these chunks.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "paged_cache.h"
#include "quantize_row.h"

namespace {

#if defined(__AVX512F__)
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
typedef float Vec __attribute__((vector_size(W * 4)));
typedef int32_t IVec __attribute__((vector_size(W * 4)));

constexpr int kScoreGroup = 12;  // query vectors scored together: 12 accumulators + a key vector + a broadcast
constexpr int kTileVectors = 48;  // query vectors per work item (16 rows x 3 query heads per KV head)

inline Vec load(const float* x) {
  Vec v;
  std::memcpy(&v, x, sizeof v);
  return v;
}
inline void store(float* x, Vec v) { std::memcpy(x, &v, sizeof v); }
inline Vec splat(float x) { return Vec{} + x; }

inline Vec fma(Vec a, Vec b, Vec c) {  // a * b + c, one rounding
#if defined(__AVX512F__)
  return reinterpret_cast<Vec>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                               reinterpret_cast<__m512>(c)));
#elif defined(__AVX2__) && defined(__FMA__)
  return reinterpret_cast<Vec>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                               reinterpret_cast<__m256>(c)));
#else
  Vec out;
  for (int l = 0; l < W; ++l) out[l] = std::fma(a[l], b[l], c[l]);
  return out;
#endif
}

inline float max_lanes(Vec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v));
#else  // 8 lanes: halving shuffles
  v = v > __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3) ? v : __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v = v > __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5) ? v : __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  return std::max(v[0], v[1]);
#endif
}
inline float sum_lanes(Vec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  return v[0] + v[1];
#endif
}

// exp(x) for x <= 0, lane by lane: the polynomial of tree_attention_cpu.cpp's exp_nonpositive (relative
// error ~2 ulp), with the rounding to the nearest integer done by adding and subtracting 1.5 * 2^23.
inline Vec exp_nonpositive(Vec x) {
  x = x > splat(-87.0f) ? x : splat(-87.0f);
  const Vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const Vec r = fma(n, splat(2.12194440e-4f), fma(n, splat(-0.693359375f), x));
  Vec p = splat(1.98756912e-4f);
  p = fma(p, r, splat(1.39819994e-3f));
  p = fma(p, r, splat(8.33345205e-3f));
  p = fma(p, r, splat(4.16657962e-2f));
  p = fma(p, r, splat(1.66666657e-1f));
  p = fma(p, r, splat(5.0e-1f));
  p = fma(p * r, r, r + 1.0f);
  const IVec bits = reinterpret_cast<IVec>(p) + (__builtin_convertvector(n, IVec) << 23);
  return reinterpret_cast<Vec>(bits);
}

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) { return static_cast<float>(x); }
inline float widen(int8_t x) { return static_cast<float>(x); }

template <typename KV>
struct Problem {
  const float* q;  // [num_tokens, num_heads, head_dim]
  const KV* k;     // [num_slots, num_kv_heads, row_width]
  const KV* v;
  float* out;
  const int32_t* tables;  // [num_seqs, max_blocks]
  const int32_t* prefixes;
  const int32_t* starts;
  const int32_t* lens;
  int64_t num_heads, num_kv_heads, per_kv, head_dim, max_blocks, block_size, row_width;
  float scale;
};

// Phase 1 for one (sequence, KV head): keys transposed to kt[d * padded + position], values to
// vc[position * head_dim + d], float32; positions from the sequence's context up to `padded` are zeros.
// W keys at a time: their rows are widened into a small buffer with contiguous (vectorized) loops, then
// written out a dimension at a time as one W-lane store (key by key, the transposed stores touched
// head_dim cache lines per key: a 2,000-token prefix behind a 17-row chunk cost more than SDPA).
template <typename KV>
void stage(const Problem<KV>& p, int64_t s, int64_t kv_head, int64_t padded, float* kt, float* vc) {
  const int64_t context = p.prefixes[s] + p.lens[s], head_dim = p.head_dim;
  const int32_t* table = p.tables + s * p.max_blocks;
  std::vector<float> keys(W * head_dim);
  for (int64_t k0 = 0; k0 < padded; k0 += W) {
    for (int l = 0; l < W; ++l) {
      const int64_t pos = k0 + l;
      float* key = keys.data() + l * head_dim;
      float* value = vc + pos * head_dim;
      if (pos >= context) {
        std::fill(key, key + head_dim, 0.0f);
        std::fill(value, value + head_dim, 0.0f);
        continue;
      }
      const int64_t slot = int64_t(table[pos / p.block_size]) * p.block_size + pos % p.block_size;
      const int64_t offset = (slot * p.num_kv_heads + kv_head) * p.row_width;
      const KV* k = p.k + offset;
      const KV* v = p.v + offset;
      if constexpr (std::is_same_v<KV, int8_t>) {
        const float k_scale = specserve_cpu::kv_row_scale(k, head_dim), v_scale = specserve_cpu::kv_row_scale(v, head_dim);
        for (int64_t d = 0; d < head_dim; ++d) key[d] = widen(k[d]) * k_scale;
        for (int64_t d = 0; d < head_dim; ++d) value[d] = widen(v[d]) * v_scale;
      } else {
        for (int64_t d = 0; d < head_dim; ++d) key[d] = widen(k[d]);
        for (int64_t d = 0; d < head_dim; ++d) value[d] = widen(v[d]);
      }
    }
    for (int64_t d = 0; d < head_dim; ++d) {
      Vec column;
      for (int l = 0; l < W; ++l) column[l] = keys[l * head_dim + d];
      store(kt + d * padded + k0, column);
    }
  }
}

struct Scratch {
  std::vector<float> queries, outputs, weights, maxima, totals, rescales;
};

// Phase 2, one work item: query rows [row0, row0 + rows) of sequence s, the query heads of `kv_head`.
// Query vector u is row u / per_kv, query head kv_head * per_kv + u % per_kv; `vectors` rounds their
// count up to a multiple of kScoreGroup / 2 (the padding vectors are zeros, computed and dropped).
template <int kD, typename KV>
void attend_tile(const Problem<KV>& p, int64_t s, int64_t kv_head, int64_t row0, int64_t rows, int64_t padded,
                 const float* kt, const float* vc, Scratch& scratch) {
  constexpr int kChunks = kD / W;  // vectors per head_dim row
  constexpr int kWeighGroup = std::max(1, (W == 16 ? 24 : 12) / kChunks);  // output accumulators in registers
  const int64_t per_kv = p.per_kv, prefix = p.prefixes[s];
  const int64_t used = rows * per_kv;
  // Padded to a multiple of half a score group (a 1-row tile scores 6 vectors, not 12).
  const int64_t vectors = (used + kScoreGroup / 2 - 1) / (kScoreGroup / 2) * (kScoreGroup / 2);
  static_assert((kScoreGroup / 2) % kWeighGroup == 0, "weigh groups tile the half score groups");
  scratch.queries.assign(vectors * kD, 0.0f);
  scratch.outputs.assign(vectors * kD, 0.0f);
  scratch.weights.resize(vectors * W);
  scratch.maxima.assign(vectors, -std::numeric_limits<float>::infinity());
  scratch.totals.assign(vectors, 0.0f);
  scratch.rescales.resize(vectors);
  float* queries = scratch.queries.data();
  float* outputs = scratch.outputs.data();
  float* weights = scratch.weights.data();
  const int64_t first_row = p.starts[s] + row0;
  for (int64_t u = 0; u < used; ++u) {
    const float* src = p.q + ((first_row + u / per_kv) * p.num_heads + kv_head * per_kv + u % per_kv) * kD;
    for (int d = 0; d < kD; ++d) queries[u * kD + d] = src[d] * p.scale;
  }
  IVec lane{};
  for (int l = 0; l < W; ++l) lane[l] = l;
  const int64_t keys = prefix + row0 + rows;  // the tile's last row sees keys [0, keys)
  for (int64_t k0 = 0; k0 < keys; k0 += W) {
    const bool diagonal = k0 + W - 1 > prefix + row0;  // some key here is after some row's position
    auto score = [&](int64_t g, auto group) {  // scores, running max and sum of vectors [g, g + G)
      constexpr int G = decltype(group)::value;
      Vec acc[G] = {};
      for (int d = 0; d < kD; ++d) {
        const Vec key = load(kt + d * padded + k0);
#pragma GCC unroll 12
        for (int i = 0; i < G; ++i) acc[i] = fma(splat(queries[(g + i) * kD + d]), key, acc[i]);
      }
      for (int i = 0; i < G; ++i) {
        const int64_t u = g + i;
        Vec score = acc[i];
        IVec hidden{};
        if (diagonal) {
          hidden = (lane + int32_t(k0)) > int32_t(prefix + row0 + u / per_kv);
          score = hidden ? splat(-std::numeric_limits<float>::infinity()) : score;
        }
        const float top = std::max(scratch.maxima[u], max_lanes(score));
        Vec weight = exp_nonpositive(score - top);
        if (diagonal) weight = hidden ? Vec{} : weight;
        const float rescale = exp_nonpositive(splat(scratch.maxima[u] - top))[0];
        scratch.rescales[u] = rescale;
        scratch.totals[u] = scratch.totals[u] * rescale + sum_lanes(weight);
        scratch.maxima[u] = top;
        store(weights + u * W, weight);
      }
    };
    int64_t g = 0;
    for (; g + kScoreGroup <= vectors; g += kScoreGroup) score(g, std::integral_constant<int, kScoreGroup>{});
    if (g < vectors) score(g, std::integral_constant<int, kScoreGroup / 2>{});  // vectors is a multiple of 6
    const int64_t key_count = std::min<int64_t>(W, keys - k0);
    for (int64_t g = 0; g < vectors; g += kWeighGroup) {
      Vec o[kWeighGroup][kChunks];
      for (int i = 0; i < kWeighGroup; ++i) {
        const Vec rescale = splat(scratch.rescales[g + i]);
        for (int c = 0; c < kChunks; ++c) o[i][c] = load(outputs + (g + i) * kD + c * W) * rescale;
      }
      for (int64_t t = 0; t < key_count; ++t) {
        const float* value = vc + (k0 + t) * kD;
#pragma GCC unroll 8
        for (int c = 0; c < kChunks; ++c) {
          const Vec v = load(value + c * W);
          for (int i = 0; i < kWeighGroup; ++i) o[i][c] = fma(splat(weights[(g + i) * W + t]), v, o[i][c]);
        }
      }
      for (int i = 0; i < kWeighGroup; ++i) {
        for (int c = 0; c < kChunks; ++c) store(outputs + (g + i) * kD + c * W, o[i][c]);
      }
    }
  }
  for (int64_t u = 0; u < used; ++u) {
    float* dst = p.out + ((first_row + u / per_kv) * p.num_heads + kv_head * per_kv + u % per_kv) * kD;
    const float inverse = 1.0f / scratch.totals[u];
    for (int d = 0; d < kD; ++d) dst[d] = outputs[u * kD + d] * inverse;
  }
}

template <typename KV>
void run(const Problem<KV>& p, int64_t num_seqs) {
  const int64_t head_dim = p.head_dim, heads = p.num_kv_heads;
  const int64_t pairs = num_seqs * heads;
  // Phase 1: every (sequence, KV head)'s keys and values, staged in one buffer kept by the calling thread.
  std::vector<int64_t> padded(num_seqs), offset(pairs + 1, 0);
  for (int64_t s = 0; s < num_seqs; ++s) padded[s] = (p.prefixes[s] + p.lens[s] + W - 1) / W * W;
  for (int64_t pair = 0; pair < pairs; ++pair) offset[pair + 1] = offset[pair] + 2 * padded[pair / heads] * head_dim;
  thread_local std::vector<float> staged;
  if (staged.size() < size_t(offset[pairs])) staged.resize(offset[pairs]);
  float* base = staged.data();
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t s = pair / heads, n = padded[s] * head_dim;
      stage(p, s, pair % heads, padded[s], base + offset[pair], base + offset[pair] + n);
    }
  });
  // Phase 2: items (sequence, KV head, tile of rows), dealt to threads in turn: a sequence's later tiles
  // see more keys, and alternating them keeps two threads about even.
  const int64_t tile_rows = std::max<int64_t>(1, kTileVectors / p.per_kv);
  struct Item {
    int64_t pair, row0, rows;
  };
  std::vector<Item> items;
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t len = p.lens[pair / heads];
    for (int64_t row0 = 0; row0 < len; row0 += tile_rows) items.push_back({pair, row0, std::min(tile_rows, len - row0)});
  }
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), int64_t(items.size())));
  at::parallel_for(0, threads, 1, [&](int64_t thread_begin, int64_t thread_end) {
    Scratch scratch;
    for (int64_t thread = thread_begin; thread < thread_end; ++thread) {
      for (size_t i = thread; i < items.size(); i += threads) {
        const Item& item = items[i];
        const int64_t s = item.pair / heads, n = padded[s] * head_dim;
        const float* kt = base + offset[item.pair];
        const float* vc = kt + n;
        if (head_dim == 64) {
          attend_tile<64>(p, s, item.pair % heads, item.row0, item.rows, padded[s], kt, vc, scratch);
        } else {
          attend_tile<128>(p, s, item.pair % heads, item.row0, item.rows, padded[s], kt, vc, scratch);
        }
      }
    }
  });
}

bool fast() {  // whether this build's vectors are native registers (AVX-512 or AVX2 with FMA)
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  return true;
#else
  return false;
#endif
}

}  // namespace

namespace specserve_cpu {

void prefill_attention(
    at::Tensor out,                  // [num_tokens, num_heads, head_dim] float32, rows of these sequences written
    const at::Tensor& q,             // [num_tokens, num_heads, head_dim] float32
    const at::Tensor& k_cache,       // [num_slots, num_kv_heads, row_width] float32, bfloat16 or int8 rows
    const at::Tensor& v_cache,       // the same
    const at::Tensor& block_tables,  // [num_seqs, max_blocks] int32
    const at::Tensor& prefix_lens,   // [num_seqs] int32
    const at::Tensor& row_starts,    // [num_seqs] int32, first row of each sequence in q
    const at::Tensor& query_lens,    // [num_seqs] int32
    int64_t block_size, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "prefill_attention_cpu: float32 q and out");
  const auto cache_dtype = k_cache.scalar_type();
  TORCH_CHECK((cache_dtype == at::kFloat || cache_dtype == at::kBFloat16 || cache_dtype == at::kChar) &&
                  v_cache.scalar_type() == cache_dtype,
              "prefill_attention_cpu: a float32, bfloat16 or int8 cache, K and V alike");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes() && k_cache.dim() == 3, "prefill_attention_cpu: q, out, cache shapes");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "prefill_attention_cpu: contiguous q, out and cache");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && prefix_lens.scalar_type() == at::kInt &&
                  row_starts.scalar_type() == at::kInt && query_lens.scalar_type() == at::kInt &&
                  block_tables.is_contiguous() && prefix_lens.is_contiguous() && row_starts.is_contiguous() &&
                  query_lens.is_contiguous(),
              "prefill_attention_cpu: contiguous int32 index tensors");
  const int64_t num_heads = q.size(1), head_dim = q.size(2), num_kv_heads = k_cache.size(1);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "prefill_attention_cpu: head_dim 64 or 128");
  const int64_t row_width = head_dim + (cache_dtype == at::kChar ? specserve_cpu::kKvScaleBytes : 0);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && k_cache.size(2) == row_width && v_cache.sizes() == k_cache.sizes(),
              "prefill_attention_cpu: cache shape does not fit q");
  const int64_t num_seqs = prefix_lens.size(0), num_slots = k_cache.size(0), max_blocks = block_tables.size(1);
  TORCH_CHECK(row_starts.size(0) == num_seqs && query_lens.size(0) == num_seqs && block_tables.size(0) == num_seqs,
              "prefill_attention_cpu: per-sequence tensors disagree");
  auto go = [&](auto element) {  // element: a value of the cache's type, to name it
    using KV = decltype(element);
    Problem<KV> p{q.data_ptr<float>(), k_cache.data_ptr<KV>(), v_cache.data_ptr<KV>(), out.data_ptr<float>(),
                  block_tables.data_ptr<int32_t>(), prefix_lens.data_ptr<int32_t>(), row_starts.data_ptr<int32_t>(),
                  query_lens.data_ptr<int32_t>(), num_heads, num_kv_heads, num_heads / num_kv_heads, head_dim,
                  max_blocks, block_size, row_width, static_cast<float>(scale)};
    // Checked here, before any thread starts: a bad index would read outside the cache.
    for (int64_t s = 0; s < num_seqs; ++s) {
      const int64_t prefix = p.prefixes[s], rows = p.lens[s], start = p.starts[s];
      TORCH_CHECK(prefix >= 0 && rows >= 1, "prefill_attention_cpu: bad lengths");
      TORCH_CHECK(start >= 0 && start + rows <= q.size(0), "prefill_attention_cpu: rows outside q");
      specserve_cpu::check_blocks(p.tables, s, max_blocks, prefix + rows, block_size, num_slots,
                                  "prefill_attention_cpu");
    }
    run(p, num_seqs);
  };
  specserve_cpu::with_cache_type(cache_dtype, go);
}

}  // namespace specserve_cpu

TORCH_LIBRARY_FRAGMENT(specserve_cpu, m) {
  m.def("prefill_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor prefix_lens, Tensor row_starts, Tensor query_lens, int block_size, float scale) -> ()");
  m.def("prefill_attention_fast() -> bool", &fast);  // no tensor to dispatch on: one kernel for every backend
}

TORCH_LIBRARY_IMPL(specserve_cpu, CPU, m) { m.impl("prefill_attention", &specserve_cpu::prefill_attention); }
