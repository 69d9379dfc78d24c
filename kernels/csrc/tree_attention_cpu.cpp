// Paged tree attention for short query chunks on the CPU: decode rows, draft-tree verify rows.
//
// Same contract as tree_attention_ref (kernels/tree_attention.py), for a subset of the batch's sequences:
// query row r of sequence s attends the s's committed prefix, positions [0, prefix_len), and those of
// its new tokens j (at position prefix_len + j) whose tree-mask bit tree_mask[r][j] is set. Keys are
// read where they lie in the paged cache, through the block table: nothing is gathered or copied.
//
// Work item = (sequence, KV head, part): the item scores its share of the sequence's (query row, query
// head) pairs for the query heads that share that KV head, in one pass over the keys, so each prefix K/V
// row is read once per item (GQA, and a verify step's tree rows share their prefix). Prefix keys are
// scored 8 at a time with one shuffle reduction for the 8. Scores go to a per-thread buffer, compacted
// per row to the keys it sees; the softmax is two-pass (max, then exp) and the output is the
// exp-weighted sum of V over the sum of the weights.
//
// AVX2 (no AVX-512): GCC lowers the 16-lane vector type through the stack, so the hot loops use 8-lane
// halves (the same per-element operations, so the same bits) and intrinsics widen int8 and bfloat16.
// 30 layers of 8 decode rows over contexts of 43-711 tokens, 9 query / 3 KV heads, 2 cores of an AVX2 AMD
// EPYC, ms (noisy host): float32 cache 35-39 -> 10-11, bfloat16 37 -> 11-16, int8 75-79 -> 10-11.
//
// Every row is computed alone, in a fixed order of keys (position order, which is path order for a
// tree: a node's ancestors come before it), with fixed-width partial sums: a row's output does not
// depend on the other rows of the call or on the thread count. A verify row therefore equals the
// decode row of the same token bit for bit, given the same K/V.

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
#include <type_traits>
#include <utility>
#include <vector>

#include "ops.h"
#include "paged_cache.h"
#include "quantize_row.h"

namespace {

// 16 float32 lanes: one AVX-512 register, two AVX2 ones; GCC lowers the type to what the CPU has.
typedef float Lanes __attribute__((vector_size(64)));
typedef float Half __attribute__((vector_size(32)));
typedef float Quarter __attribute__((vector_size(16)));
constexpr int kLanes = 16;

inline Lanes load_lanes(const float* x) {
  Lanes v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

// 8 lanes of a cache row or query as float32: the low or high half of load_lanes.
inline Half load_half(const float* x) {
  Half v;
  std::memcpy(&v, x, sizeof v);
  return v;
}
inline Half load_half(const at::BFloat16* x) {
#if defined(__AVX2__)
  const __m128i narrow = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return reinterpret_cast<Half>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(narrow), 16));
#else
  typedef uint16_t Bits16 __attribute__((vector_size(16)));
  typedef uint32_t Bits32 __attribute__((vector_size(32)));
  Bits16 narrow;
  std::memcpy(&narrow, x, sizeof narrow);
  const Bits32 wide = __builtin_convertvector(narrow, Bits32) << 16;
  Half v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
#endif
}
inline Half load_half(const int8_t* x) {
#if defined(__AVX2__)  // GCC's generic conversion sign-extends byte by byte in scalar registers here
  const __m128i narrow = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x));
  return reinterpret_cast<Half>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(narrow)));
#else
  typedef int8_t Bytes8 __attribute__((vector_size(8)));
  Bytes8 narrow;
  std::memcpy(&narrow, x, sizeof narrow);
  return __builtin_convertvector(narrow, Half);
#endif
}

// 16 bfloat16 values widened to float32 (exact: a bfloat16 is the top half of a float32's bits).
inline Lanes load_lanes(const at::BFloat16* x) {
#if defined(__AVX512F__)
  const __m256i narrow = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(narrow), 16);
  return reinterpret_cast<Lanes>(_mm512_castsi512_ps(wide));
#else
  return __builtin_shufflevector(load_half(x), load_half(x + 8), 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#endif
}

// 16 int8 values of an int8 cache row as float32 (exact); the row's scale is applied by the caller.
inline Lanes load_lanes(const int8_t* x) {
#if defined(__AVX512F__)
  const __m128i narrow = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return reinterpret_cast<Lanes>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(narrow)));
#else
  return __builtin_shufflevector(load_half(x), load_half(x + 8), 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#endif
}

inline void store_lanes(float* x, Lanes v) { std::memcpy(x, &v, sizeof v); }


// Sum of the lanes in a fixed pairwise tree (halving shuffles, not a serial chain).
inline float reduce_lanes(Lanes v) {
  const Half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// exp(x) for x <= 0 (scores minus their max): range reduction x = n ln2 + r, |r| <= ln2 / 2, and a
// degree-6 polynomial for exp(r); relative error ~2 ulp. Branch-free, so its loop vectorizes.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // below this exp(x) underflows float32's normal range; the weight is ~0
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split into exact high and low parts
  float p = 1.98756912e-4f;
  p = p * r + 1.39819994e-3f;
  p = p * r + 8.33345205e-3f;
  p = p * r + 4.16657962e-2f;
  p = p * r + 1.66666657e-1f;
  p = p * r + 5.0e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) << 23;  // times 2^n
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}

// Sum of x[0..n): lane l adds elements l, l + 16, ...; the order depends on n only.
inline float sum(const float* x, int64_t n) {
  Lanes acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load_lanes(x + i);
  float tail[kLanes] = {};
  std::memcpy(tail, x + i, sizeof(float) * (n - i));
  return reduce_lanes(acc + load_lanes(tail));
}

// Dot product of two head_dim vectors; kD is head_dim when known at compile time (a multiple of 16),
// else 0 and `n` says it. `b` is a cache row: float32 or bfloat16 (widened exactly, then the same math).
template <int kD, typename KV>
inline float dot(const float* a, const KV* b, int64_t n) {
  if constexpr (kD > 0) {
    Lanes acc = {};
    for (int d = 0; d < kD; d += kLanes) acc += load_lanes(a + d) * load_lanes(b + d);
    return reduce_lanes(acc);
  } else {
    float acc[kLanes] = {};
    for (int64_t d = 0; d < n; ++d) acc[d % kLanes] += a[d] * static_cast<float>(b[d]);
    return reduce_lanes(load_lanes(acc));
  }
}

// out += w * v over a head_dim vector; with kD known the accumulator lives in registers.
template <int kD>
struct Accumulator {
#if defined(__AVX512F__)
  Lanes lanes[kD / kLanes] = {};
#else
  // Without AVX-512 a 16-lane vector is lowered through the stack (`w * lanes` even broadcast w with 16
  // scalar stores: most of a batch-8 decode step's attention on an AVX2 EPYC): 8-lane halves instead,
  // native there, each element the same product and sum.
  Half halves[kD / 8] = {};
#endif
  Accumulator() = default;
  explicit Accumulator(int64_t) {}
  template <typename KV>
  void add(float w, const KV* v) {
#if defined(__AVX512F__)
#pragma GCC unroll 8
    for (int c = 0; c < kD / kLanes; ++c) lanes[c] += w * load_lanes(v + c * kLanes);
#else
#pragma GCC unroll 8
    for (int c = 0; c < kD / 8; ++c) halves[c] += w * load_half(v + c * 8);
#endif
  }
  void store(float* out, float scale) const {
#if defined(__AVX512F__)
    for (int c = 0; c < kD / kLanes; ++c) store_lanes(out + c * kLanes, lanes[c] * scale);
#else
    for (int c = 0; c < kD / 8; ++c) {
      const Half scaled = halves[c] * scale;
      std::memcpy(out + c * 8, &scaled, sizeof scaled);
    }
#endif
  }
};

template <>
struct Accumulator<0> {
  std::vector<float> values;
  Accumulator() = default;
  explicit Accumulator(int64_t n) : values(n, 0.0f) {}
  template <typename KV>
  void add(float w, const KV* v) {
    for (size_t d = 0; d < values.size(); ++d) values[d] += w * static_cast<float>(v[d]);
  }
  void store(float* out, float scale) const {
    for (size_t d = 0; d < values.size(); ++d) out[d] = values[d] * scale;
  }
};

template <typename KV>  // the cache's element type: float, at::BFloat16 or int8_t
struct Problem {
  const float* q;       // [num_tokens, num_heads, head_dim]
  const KV* k;          // [num_slots, num_kv_heads, row_width]
  const KV* v;
  float* out;
  const int32_t* tables;  // [num_seqs, max_blocks]
  const int32_t* prefixes;
  const int32_t* starts;
  const int32_t* lens;
  const bool* mask;     // [num_tokens, mask_stride]
  int64_t num_heads, num_kv_heads, per_kv, head_dim, max_blocks, mask_stride, block_size;
  float scale;
  int64_t row_width;  // elements of one (slot, KV head) cache row: head_dim, plus the scale's 4 bytes for int8
};

// An int8 cache row's values are widened exactly and its scale applied outside the dot products: to a
// key's score (after the dot product with q) and to a value's softmax weight (after their sum).
template <typename KV>
constexpr bool kQuantized = std::is_same_v<KV, int8_t>;

template <typename KV>
inline float row_scale(const KV* row, int64_t head_dim) {
  if constexpr (kQuantized<KV>) {
    return specserve_cpu::kv_row_scale(row, head_dim);
  } else {
    return 1.0f;
  }
}

// Scores of 8 keys at once, each bit for bit `dot<kD>` of that key: the same per-lane products, summed
// in the same order, then reduced with exactly reduce_lanes' pairs (its halves, then quarters, then
// (q0 + q2) + (q1 + q3)), but by shuffles across the 8 keys instead of one key at a time.
constexpr int kTile = 8;

// From each key's halves h[t] = lanes [0, 8) + lanes [8, 16) on (reduce_lanes_8 and the AVX2 scoring).
inline Half reduce_halves_8(const Half (&h)[kTile]) {
  Half q[kTile / 2];  // q[t / 2] = [quarters of key t, quarters of key t + 1]
  for (int t = 0; t < kTile; t += 2) {
    q[t / 2] = __builtin_shufflevector(h[t], h[t + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
               __builtin_shufflevector(h[t], h[t + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  // s[i] = [key 4i: q0+q2, q1+q3, key 4i+2: .., .., key 4i+1: .., .., key 4i+3: .., ..]
  Half s[2];
  for (int i = 0; i < 2; ++i) {
    s[i] = __builtin_shufflevector(q[2 * i], q[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(q[2 * i], q[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  // keys in the order 0, 2, 1, 3, 4, 6, 5, 7
  const Half r = __builtin_shufflevector(s[0], s[1], 0, 2, 4, 6, 8, 10, 12, 14) +
                 __builtin_shufflevector(s[0], s[1], 1, 3, 5, 7, 9, 11, 13, 15);
  return __builtin_shufflevector(r, r, 0, 2, 1, 3, 4, 6, 5, 7);
}

inline Half reduce_lanes_8(const Lanes (&acc)[kTile]) {
  Half h[kTile];
  for (int t = 0; t < kTile; ++t) {
    h[t] = __builtin_shufflevector(acc[t], acc[t], 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(acc[t], acc[t], 8, 9, 10, 11, 12, 13, 14, 15);
  }
  return reduce_halves_8(h);
}

// The largest of x[0..n) (n > 0). A maximum is exact in any order, so 16 lanes at a time give the
// serial scan's value without its chain of dependent compares.
inline float max_of(const float* x, int64_t n) {
  float top = x[0];
  int64_t i = 0;
  if (n >= kLanes) {
    Lanes m = load_lanes(x);
    for (i = kLanes; i + kLanes <= n; i += kLanes) {
      const Lanes v = load_lanes(x + i);
      m = m > v ? m : v;
    }
    for (int l = 0; l < kLanes; ++l) top = std::max(top, m[l]);
  }
  for (; i < n; ++i) top = std::max(top, x[i]);
  return top;
}

// From this many units on, a tile of keys is copied (widened) to a buffer before they score it.
constexpr int kCopyUnits = 3;

// Units whose V sums share each V row load: 6 x 4 accumulators (head_dim 64) and the row fit 32 registers.
// AVX2 has 16 registers of half the width: one unit's 4 accumulators are 8 of them, so one unit a group
// (more spill every accumulator through the stack: `perf annotate` of a batch-8 step on an AVX2 EPYC).
#if defined(__AVX512F__)
constexpr int kGroup = 6;
#else
constexpr int kGroup = 1;
#endif

// One work item: the units [unit_begin, unit_end) of sequence s and KV head kv_head, unit u being query
// row u / per_kv and query head u % per_kv of those sharing the KV head. An item scores its units in
// one pass over the keys, so each prefix K row is read once per item (GQA, and a verify step's tree rows
// share their prefix). How units are split into items never changes a unit's result.
template <int kD, typename KV>
void attend(const Problem<KV>& p, int64_t s, int64_t kv_head, int64_t unit_begin, int64_t unit_end,
            std::vector<float>& scores, std::vector<int64_t>& seen) {
  const int64_t prefix = p.prefixes[s], rows = p.lens[s], first_row = p.starts[s], width = prefix + rows;
  const int64_t per_kv = p.per_kv, head_dim = p.head_dim, block_size = p.block_size;
  const int64_t units = unit_end - unit_begin;
  if (units <= 0) return;
  const int32_t* table = p.tables + s * p.max_blocks;
  const int64_t slot_stride = p.num_kv_heads * p.row_width;  // elements between the K rows of adjacent slots
  auto slot_of = [&](int64_t pos) { return int64_t(table[pos / block_size]) * block_size + pos % block_size; };
  auto k_row = [&](int64_t slot) { return p.k + (slot * p.num_kv_heads + kv_head) * p.row_width; };
  auto v_row = [&](int64_t slot) { return p.v + (slot * p.num_kv_heads + kv_head) * p.row_width; };
  auto row_of = [&](int64_t u) { return (unit_begin + u) / per_kv; };
  auto q_vec = [&](int64_t u) {
    const int64_t unit = unit_begin + u;
    return p.q + ((first_row + unit / per_kv) * p.num_heads + kv_head * per_kv + unit % per_kv) * head_dim;
  };
  auto visible = [&](int64_t r, int64_t j) { return p.mask[(first_row + r) * p.mask_stride + j]; };
  // fn(start, base, count) for each block of the prefix: positions start .. start + count - 1 sit in
  // slots base .. base + count - 1 (no division per key). With `ahead` (K or V), the next block's rows of
  // this KV head are prefetched first: blocks lie anywhere in the cache, so the hardware prefetcher,
  // which follows one block's rows, stalls at every block boundary (int8 rows: ~1.5x the attention time
  // of 8 sequences at 600 tokens without it).
  auto for_blocks = [&](auto&& fn, const KV* ahead = nullptr) {
    for (int64_t start = 0; start < prefix; start += block_size) {
      if (ahead != nullptr && start + block_size < prefix) {
        const int64_t next = int64_t(table[start / block_size + 1]) * block_size;
        const int64_t count = std::min(block_size, prefix - start - block_size);
        for (int64_t o = 0; o < count; ++o) {
          const KV* first = ahead + ((next + o) * p.num_kv_heads + kv_head) * p.row_width;
          const char* row = reinterpret_cast<const char*>(first);
          __builtin_prefetch(row);
          __builtin_prefetch(row + p.row_width * sizeof(KV) - 1);
        }
      }
      fn(start, int64_t(table[start / block_size]) * block_size, std::min(block_size, prefix - start));
    }
  };
  scores.resize(units * width);  // [units, width]: each unit's visible keys, compacted
  seen.assign(units, prefix);

  // Scores: each prefix key is read once for all units, in tiles of kTile slots that lie together in a
  // block; then each unit's visible new tokens. With several units, a tile is first copied (bfloat16,
  // int8: widened) to a contiguous buffer, so the units' loops read it at fixed offsets.
  std::vector<const float*> q_of(units);
  for (int64_t u = 0; u < units; ++u) q_of[u] = q_vec(u);
  auto key_score = [&](float dot, const KV* k) {  // an int8 key's scale multiplies its scaled dot product
    if constexpr (kQuantized<KV>) {
      return (dot * p.scale) * row_scale(k, head_dim);
    } else {
      return dot * p.scale;
    }
  };
  // out: the first unit's 8 scores; key_scales: the 8 keys' int8 scales (unused otherwise)
  auto score_tile = [&](const auto* k0, auto stride, float* out, const Half& key_scales) {
    for (int64_t u = 0; u < units; ++u) {
#if defined(__AVX512F__)
      Lanes qc[kD / kLanes];
      for (int c = 0; c < kD / kLanes; ++c) qc[c] = load_lanes(q_of[u] + c * kLanes);
      Lanes acc[kTile] = {};
      for (int c = 0; c < kD / kLanes; ++c) {
        for (int t = 0; t < kTile; ++t) acc[t] += qc[c] * load_lanes(k0 + t * stride + c * kLanes);
      }
      Half scaled = reduce_lanes_8(acc) * p.scale;  // lane by lane, as key_score's scalar products
#else
      // AVX2: 8 keys' 16-lane sums and q would take 24 of 16 registers. Lanes [0, 8) of every chunk
      // first, then lanes [8, 16): each lane's products in the same order, so the same sums.
      Half h[kTile];
      for (int half = 0; half < 2; ++half) {
        Half qc[kD / kLanes];
        for (int c = 0; c < kD / kLanes; ++c) qc[c] = load_half(q_of[u] + c * kLanes + 8 * half);
        Half acc[kTile] = {};
        for (int c = 0; c < kD / kLanes; ++c) {
          for (int t = 0; t < kTile; ++t) acc[t] += qc[c] * load_half(k0 + t * stride + c * kLanes + 8 * half);
        }
        for (int t = 0; t < kTile; ++t) h[t] = half == 0 ? acc[t] : h[t] + acc[t];
      }
      Half scaled = reduce_halves_8(h) * p.scale;
#endif
      if constexpr (kQuantized<KV>) scaled *= key_scales;
      std::memcpy(out + u * width, &scaled, sizeof scaled);
    }
  };
  for_blocks([&](int64_t start, int64_t base, int64_t count) {
    int64_t o = 0;
    if constexpr (kD > 0) {
      for (; o + kTile <= count; o += kTile) {
        const KV* k0 = k_row(base + o);
        Half key_scales = {};
        if constexpr (kQuantized<KV>) {
          for (int t = 0; t < kTile; ++t) key_scales[t] = row_scale(k0 + t * slot_stride, head_dim);
        }
        if (units >= kCopyUnits) {
          alignas(64) float tile[kTile * kD];
          for (int t = 0; t < kTile; ++t) {
            for (int c = 0; c < kD / kLanes; ++c) {
              store_lanes(tile + t * kD + c * kLanes, load_lanes(k0 + t * slot_stride + c * kLanes));
            }
          }
          score_tile(tile, std::integral_constant<int64_t, kD>{}, scores.data() + start + o, key_scales);
        } else {
          score_tile(k0, slot_stride, scores.data() + start + o, key_scales);
        }
      }
    }
    for (; o < count; ++o) {
      const KV* k = k_row(base + o);
      for (int64_t u = 0; u < units; ++u) scores[u * width + start + o] = key_score(dot<kD>(q_of[u], k, head_dim), k);
    }
  }, p.k);
  for (int64_t u = 0; u < units; ++u) {
    const int64_t r = row_of(u);
    for (int64_t j = 0; j < rows; ++j) {
      if (!visible(r, j)) continue;
      const KV* k = k_row(slot_of(prefix + j));
      scores[u * width + seen[u]++] = key_score(dot<kD>(q_of[u], k, head_dim), k);
    }
  }
  // Softmax weights, unnormalised: exp(score - the unit's max), and their sum. For an int8 cache each
  // weight then takes its value row's scale, so the sums below add weight x scale x the row's integers.
  std::vector<float> totals(units);
  std::vector<float> value_scales;
  if constexpr (kQuantized<KV>) {
    value_scales.resize(prefix);
    for_blocks([&](int64_t start, int64_t base, int64_t count) {
      for (int64_t o = 0; o < count; ++o) value_scales[start + o] = row_scale(v_row(base + o), head_dim);
    }, p.v);
  }
  for (int64_t u = 0; u < units; ++u) {
    float* w = scores.data() + u * width;
    const float top = max_of(w, seen[u]);
    for (int64_t i = 0; i < seen[u]; ++i) w[i] = exp_nonpositive(w[i] - top);
    totals[u] = sum(w, seen[u]);
    if constexpr (kQuantized<KV>) {
      for (int64_t i = 0; i < prefix; ++i) w[i] *= value_scales[i];
      int64_t index = prefix;
      for (int64_t j = 0; j < rows; ++j) {
        if (visible(row_of(u), j)) w[index++] *= row_scale(v_row(slot_of(prefix + j)), head_dim);
      }
    }
  }
  // The weighted sums of V, for G units at a time: each prefix V row is loaded once and added to the G
  // units' accumulators (unit by unit, every V row would stream through the cache once per unit). Then
  // each unit's visible new tokens. A unit adds its keys in the same order whatever its group.
  auto weigh = [&](int64_t u0, auto group) {
    constexpr int G = decltype(group)::value;
    Accumulator<kD> acc[G];
    if constexpr (kD == 0) {
      for (auto& a : acc) a = Accumulator<kD>(head_dim);
    }
    const float* w = scores.data() + u0 * width;
    for_blocks([&](int64_t start, int64_t base, int64_t count) {
      for (int64_t o = 0; o < count; ++o) {
        const KV* v = v_row(base + o);
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) acc[g].add(w[g * width + start + o], v);
      }
    });
    for (int g = 0; g < G; ++g) {
      const int64_t u = u0 + g, r = row_of(u), unit = unit_begin + u;
      const float* wu = w + g * width;
      int64_t index = prefix;
      for (int64_t j = 0; j < rows; ++j) {
        if (visible(r, j)) acc[g].add(wu[index++], v_row(slot_of(prefix + j)));
      }
      acc[g].store(p.out + ((first_row + r) * p.num_heads + kv_head * per_kv + unit % per_kv) * head_dim,
                   1.0f / totals[u]);
    }
  };
  int64_t u = 0;
  if constexpr (kD > 0) {
    for (; u + kGroup <= units; u += kGroup) weigh(u, std::integral_constant<int, kGroup>{});
    switch (units - u) {  // the rest as one group
      case 5: weigh(u, std::integral_constant<int, 5>{}); u += 5; break;
      case 4: weigh(u, std::integral_constant<int, 4>{}); u += 4; break;
      case 3: weigh(u, std::integral_constant<int, 3>{}); u += 3; break;
      case 2: weigh(u, std::integral_constant<int, 2>{}); u += 2; break;
      default: break;
    }
  }
  for (; u < units; ++u) weigh(u, std::integral_constant<int, 1>{});
}

}  // namespace

namespace specserve_cpu {

void tree_attention(
    at::Tensor out,              // [num_tokens, num_heads, head_dim] float32, rows of these sequences written
    const at::Tensor& q,         // [num_tokens, num_heads, head_dim] float32
    const at::Tensor& k_cache,   // [num_slots, num_kv_heads, head_dim] float32 or bfloat16, or int8 rows of
                                 // head_dim values and a float32 scale: [num_slots, num_kv_heads, head_dim + 4]
    const at::Tensor& v_cache,   // the same
    const at::Tensor& block_tables,  // [num_seqs, max_blocks] int32
    const at::Tensor& prefix_lens,   // [num_seqs] int32
    const at::Tensor& row_starts,    // [num_seqs] int32, first row of each sequence in q
    const at::Tensor& query_lens,    // [num_seqs] int32
    const at::Tensor& tree_mask,     // [num_tokens, max_query_len] bool, indexed by q's row
    int64_t block_size, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "tree_attention_cpu: float32 q and out");
  const auto cache_dtype = k_cache.scalar_type();
  TORCH_CHECK((cache_dtype == at::kFloat || cache_dtype == at::kBFloat16 || cache_dtype == at::kChar) &&
                  v_cache.scalar_type() == cache_dtype,
              "tree_attention_cpu: a float32, bfloat16 or int8 cache, K and V alike");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes() && k_cache.dim() == 3, "tree_attention_cpu: q, out, cache shapes");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "tree_attention_cpu: contiguous q, out and cache");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && prefix_lens.scalar_type() == at::kInt &&
                  row_starts.scalar_type() == at::kInt && query_lens.scalar_type() == at::kInt,
              "tree_attention_cpu: int32 index tensors");
  TORCH_CHECK(block_tables.is_contiguous() && prefix_lens.is_contiguous() && row_starts.is_contiguous() &&
                  query_lens.is_contiguous() && tree_mask.is_contiguous() && tree_mask.scalar_type() == at::kBool,
              "tree_attention_cpu: contiguous index tensors and a bool tree mask");
  const int64_t num_heads = q.size(1), head_dim = q.size(2), num_kv_heads = k_cache.size(1);
  const int64_t row_width = head_dim + (cache_dtype == at::kChar ? specserve_cpu::kKvScaleBytes : 0);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && k_cache.size(2) == row_width && v_cache.sizes() == k_cache.sizes(),
              "tree_attention_cpu: cache shape does not fit q");
  const int64_t num_seqs = prefix_lens.size(0), num_slots = k_cache.size(0);
  TORCH_CHECK(row_starts.size(0) == num_seqs && query_lens.size(0) == num_seqs && block_tables.size(0) == num_seqs &&
                  tree_mask.size(0) == q.size(0), "tree_attention_cpu: per-sequence tensors disagree");
  auto run = [&](auto element) {  // element: a value of the cache's type, to name it
    using KV = decltype(element);
    Problem<KV> p{q.data_ptr<float>(), k_cache.data_ptr<KV>(), v_cache.data_ptr<KV>(), out.data_ptr<float>(),
                  block_tables.data_ptr<int32_t>(), prefix_lens.data_ptr<int32_t>(), row_starts.data_ptr<int32_t>(),
                  query_lens.data_ptr<int32_t>(), tree_mask.data_ptr<bool>(),
                  num_heads, num_kv_heads, num_heads / num_kv_heads, head_dim, block_tables.size(1),
                  tree_mask.size(1), block_size, static_cast<float>(scale), row_width};
    // Checked here, before any thread starts: a bad index would read outside the cache.
    for (int64_t s = 0; s < num_seqs; ++s) {
      const int64_t prefix = p.prefixes[s], rows = p.lens[s], start = p.starts[s];
      TORCH_CHECK(prefix >= 0 && rows >= 0 && rows <= p.mask_stride, "tree_attention_cpu: bad lengths");
      TORCH_CHECK(start >= 0 && start + rows <= q.size(0), "tree_attention_cpu: rows outside q");
      specserve_cpu::check_blocks(p.tables, s, p.max_blocks, prefix + rows, block_size, num_slots,
                                  "tree_attention_cpu");
      for (int64_t r = 0; r < rows; ++r) {
        TORCH_CHECK(p.mask[(start + r) * p.mask_stride + r], "tree_attention_cpu: a query row must see its own token");
      }
    }
    // Work item = (sequence, KV head, part): a sequence's units for one KV head are split into `parts`
    // near-equal runs when there are too few (sequence, KV head) pairs to keep every thread busy (batch 1:
    // 3 KV heads on 2 threads would leave one idle half the time).
    const int64_t pairs = num_seqs * num_kv_heads;
    const int64_t parts = std::max<int64_t>(1, (2 * at::get_num_threads() + pairs - 1) / pairs);
    const int64_t items = pairs * parts;
    auto unit_range = [&](int64_t item) {
      const int64_t s = item / parts / num_kv_heads, part = item % parts;
      const int64_t units = int64_t(p.lens[s]) * p.per_kv;
      return std::make_pair(units * part / parts, units * (part + 1) / parts);
    };
    // Items go to threads as contiguous runs of about equal cost, not of equal count: sequences of a batch
    // differ in length (a batch of 8 Spec-Bench prompts spends 59% of its keys in the first 4), and an even
    // count split left one thread idle for ~15% of the call. Cost = keys x (units + 3): reading a key costs
    // about as much as scoring it for three units. The split never changes a unit's result.
    std::vector<double> cost_before(items + 1, 0.0);
    for (int64_t item = 0; item < items; ++item) {
      const int64_t s = item / parts / num_kv_heads;
      const auto [unit_begin, unit_end] = unit_range(item);
      cost_before[item + 1] = cost_before[item] + double(p.prefixes[s] + p.lens[s]) * double(unit_end - unit_begin + 3);
    }
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
    auto first_item = [&](int64_t thread) {  // the first item whose cost midpoint is in this thread's share
      const double share = cost_before[items] * double(thread) / double(threads);
      int64_t item = 0;
      while (item < items && (cost_before[item] + cost_before[item + 1]) / 2 < share) ++item;
      return item;
    };
    at::parallel_for(0, threads, 1, [&](int64_t thread_begin, int64_t thread_end) {
      std::vector<float> scores;
      std::vector<int64_t> seen;
      for (int64_t item = first_item(thread_begin); item < first_item(thread_end); ++item) {
        const int64_t s = item / parts / num_kv_heads, kv_head = item / parts % num_kv_heads;
        const auto [unit_begin, unit_end] = unit_range(item);
        switch (head_dim) {
          case 64: attend<64>(p, s, kv_head, unit_begin, unit_end, scores, seen); break;
          case 128: attend<128>(p, s, kv_head, unit_begin, unit_end, scores, seen); break;
          default: attend<0>(p, s, kv_head, unit_begin, unit_end, scores, seen);
        }
      }
    });
  };
  specserve_cpu::with_cache_type(cache_dtype, run);
}

}  // namespace specserve_cpu

TORCH_LIBRARY_FRAGMENT(specserve_cpu, m) {
  m.def("tree_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor prefix_lens, Tensor row_starts, Tensor query_lens, Tensor tree_mask, int block_size, "
        "float scale) -> ()");
}

TORCH_LIBRARY_IMPL(specserve_cpu, CPU, m) { m.impl("tree_attention", &specserve_cpu::tree_attention); }
