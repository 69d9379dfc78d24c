// Batch-invariant float32 linear for the CPU: out[m, n] = sum_k x[m, k] * weight[n, k] (+ bias[n]).
//
// Every output element is computed by the same sequence of float operations whatever M, the other rows
// of the call, the tiling or the thread count: 16 lane accumulators, lane j fused-multiply-adds the
// products at k = j, j + 16, j + 32, ... in k order; the 16 lanes are summed in a fixed pairwise tree
// (lane j + 8 onto j, then + 4, then (0 + 2) + (1 + 3)); a K that is not a multiple of 16 adds its last
// products one by one after that; the bias is added last. So a decode row (M = 1) equals the same token's
// row in a verify or prefill call bit for bit, which lossless speculative decoding needs. The lanes are
// one AVX-512 register, two AVX2 ones, or a plain array: all three give the same bits.
//
// Speed: torch's float32 linears are not batch-invariant (MKL's GEMV at M = 1 and its GEMM at M > 1 sum
// in other orders) and oneDNN's prepacked one is, but streams the weights at M = 1 a quarter slower than
// MKL's GEMV on an AMX Xeon. All 121 linears of the 135M model, 2 cores, ms at M = 1 / 4 / 8 / 16 / 64 /
// 256: MKL 20.5 / 38.1 / 49.4 / 52.1 / 88.9 / 270; oneDNN prepacked 25.2 / 27.4 / 31.3 / 38.6 / 85 / 250;
// this kernel 19.3 / 21.6 / 27.4 / 35.9 / 85 / 299. Decoding (small M) streams the row-major weight once,
// M rows at a time, with software prefetch of the next tile; a register tile of kRows x kCols outputs
// reuses each loaded weight vector kRows times and each input vector kCols times. Large M (prefill) stays
// compute-bound and slower than oneDNN's blocked GEMM: the price of one kernel for every M.
// bfloat16 weights: the same kernel reads each weight as bfloat16 and widens it to float32 (exact: the 16
// bits move to the top of a float), so the bits are those of the float32 kernel on `weight.float()`, at
// half the bytes streamed. engine/quant.py uses it for bfloat16 where oneDNN has no bfloat16 linear (CPUs
// without AVX-512 BF16 or AVX-NE-CONVERT, such as AVX2-only ones).
// Reference: linear_ref in kernels/linear.py reproduces these bits in plain torch
// (tests/unit/kernels/test_linear_cpu.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "ops.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

constexpr int kLanes = 16;

// A weight as float32: itself, or a bfloat16 (its 16 bits are a float32's top half) widened exactly.
inline float widen(float w) { return w; }
inline float widen(uint16_t w) {
  const uint32_t bits = uint32_t(w) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

#if defined(__AVX512F__)
struct Lanes {
  __m512 v;
};
inline Lanes lanes_zero() { return {_mm512_setzero_ps()}; }
inline Lanes lanes_load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Lanes lanes_load(const uint16_t* p) {  // 16 bfloat16 -> float32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))};
}
inline Lanes lanes_fma(Lanes a, Lanes b, Lanes acc) { return {_mm512_fmadd_ps(a.v, b.v, acc.v)}; }
inline __m256 lanes_fold(Lanes a) {  // lane j + 8 onto lane j
  return _mm256_add_ps(_mm512_castps512_ps256(a.v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)));
}
inline void prefetch(const void* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
constexpr int kRows = 6, kCols = 4;  // 24 accumulators + 4 weight vectors + 1 input vector of 32 registers
// (and 8 x 3 for M = 7-8, see linear())
#elif defined(__AVX2__) && defined(__FMA__)
struct Lanes {
  __m256 lo, hi;
};
inline Lanes lanes_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Lanes lanes_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline __m256 widen8(const uint16_t* p) {  // 8 bfloat16 -> float32
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline Lanes lanes_load(const uint16_t* p) { return {widen8(p), widen8(p + 8)}; }
inline __m256 half_load(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 half_load(const uint16_t* p) { return widen8(p); }
inline Lanes lanes_fma(Lanes a, Lanes b, Lanes acc) {
  return {_mm256_fmadd_ps(a.lo, b.lo, acc.lo), _mm256_fmadd_ps(a.hi, b.hi, acc.hi)};
}
inline __m256 lanes_fold(Lanes a) { return _mm256_add_ps(a.lo, a.hi); }
inline void prefetch(const void* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
// 12 accumulators + 1 weight half + 1 input half of 16 registers (see tile()). All 121 linears of the 135M
// model, 2 cores of an AVX2 AMD EPYC, ms at M = 1 / 4 / 8 / 16 / 256, float32 weights (bfloat16 ones), best
// of noisy runs: 6 x 1 tiles 19.9 / 22.8 / 29.9 / 46.7 / 616 (12.0 / 12.0 / 23.0 / 38.9 / 593); 2 x 2 tiles
// holding both halves at once, as before, 26.2 / 37.5 / 57.0 / 85.1 / 1339 (21.8 / 33.0 / 51.7 / 90.4 / 928);
// MKL's float32 F.linear 45.9 / 75.6 / 70.9 / 101.8 / 575.
constexpr int kRows = 6, kCols = 1;
#else
struct Lanes {
  float v[kLanes];
};
inline Lanes lanes_zero() { return {}; }
inline Lanes lanes_load(const float* p) {
  Lanes a;
  std::copy(p, p + kLanes, a.v);
  return a;
}
inline Lanes lanes_load(const uint16_t* p) {
  Lanes a;
  for (int j = 0; j < kLanes; ++j) a.v[j] = widen(p[j]);
  return a;
}
inline Lanes lanes_fma(Lanes a, Lanes b, Lanes acc) {
  for (int j = 0; j < kLanes; ++j) acc.v[j] = std::fma(a.v[j], b.v[j], acc.v[j]);
  return acc;
}
inline void prefetch(const void* p) { __builtin_prefetch(p); }
constexpr int kRows = 2, kCols = 2;
#endif

// The fixed pairwise sum of the 16 lanes (see the top of the file).
inline float lanes_sum(Lanes a) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  const __m256 h = lanes_fold(a);                                                       // h[j] = a[j] + a[j + 8]
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));  // q[j] = h[j] + h[j + 4]
  const __m128 t = _mm_add_ps(q, _mm_movehl_ps(q, q));                                  // t[j] = q[j] + q[j + 2]
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));                              // t[0] + t[1]
#else
  float q[4];
  for (int j = 0; j < 4; ++j) q[j] = (a.v[j] + a.v[j + 8]) + (a.v[j + 4] + a.v[j + 12]);
  return (q[0] + q[2]) + (q[1] + q[3]);
#endif
}

#if defined(__AVX512F__)
// lanes_sum of four accumulators, [sum a, sum b, sum c, sum d], with the same additions in the same
// order, but shared shuffles: the epilogue of a tile is ~15% of its time at K = 576 one output at a time.
inline __m128 lanes_sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // [a[j] + a[j + 8] | b[j] + b[j + 8]], and the same for c, d
  const __m512 hab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 hcd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  // 128-bit lane i holds q[j] = h[j] + h[j + 4] of accumulator i
  const __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(hab, hcd, 0x88), _mm512_shuffle_f32x4(hab, hcd, 0xDD));
  const __m512 t = _mm512_add_ps(q, _mm512_permute_ps(q, 0x4E));  // q[0] + q[2], q[1] + q[3]
  const __m512 s = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));  // (q[0] + q[2]) + (q[1] + q[3])
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), s));
}
#endif

// Outputs [R rows of x] x [C rows of weight]; `next` (or nullptr) is the next tile's weight, prefetched
// while this one streams. W: float (float32 weights) or uint16_t (bfloat16 ones).
template <typename W, int R, int C>
void tile(const float* x, const W* w, int64_t K, float* out, int64_t N, const float* bias, const W* next) {
  Lanes acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = lanes_zero();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    if (next != nullptr)
      for (int c = 0; c < C; ++c) prefetch(next + c * K + k);
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
    // AVX2 has 16 registers and a 16-lane accumulator takes two: the low 8 lanes of this k step, then the
    // high 8 (each lane's FMAs in the same order, so the same bits), to hold 3 x 2 accumulators unspilled.
    for (int h = 0; h < 2; ++h) {
      __m256 wv[C];
      for (int c = 0; c < C; ++c) wv[c] = half_load(w + c * K + k + 8 * h);
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_loadu_ps(x + r * K + k + 8 * h);
        for (int c = 0; c < C; ++c) {
          __m256& a = h == 0 ? acc[r][c].lo : acc[r][c].hi;
          a = _mm256_fmadd_ps(wv[c], xv, a);
        }
      }
    }
#else
    Lanes wv[C];
    for (int c = 0; c < C; ++c) wv[c] = lanes_load(w + c * K + k);
    for (int r = 0; r < R; ++r) {
      const Lanes xv = lanes_load(x + r * K + k);
      for (int c = 0; c < C; ++c) acc[r][c] = lanes_fma(wv[c], xv, acc[r][c]);
    }
#endif
  }
#if defined(__AVX512F__)
  if constexpr (C == 4) {
    if (k == K) {  // no tail: one tree for four outputs at once
      for (int r = 0; r < R; ++r) {
        __m128 s = lanes_sum4(acc[r][0].v, acc[r][1].v, acc[r][2].v, acc[r][3].v);
        if (bias != nullptr) s = _mm_add_ps(s, _mm_loadu_ps(bias));
        _mm_storeu_ps(out + r * N, s);
      }
      return;
    }
  }
#endif
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = lanes_sum(acc[r][c]);
      for (int64_t j = k; j < K; ++j) s = std::fma(widen(w[c * K + j]), x[r * K + j], s);
      out[r * N + c] = bias != nullptr ? s + bias[c] : s;
    }
}

template <typename W>
using TileFnOf = void (*)(const float*, const W*, int64_t, float*, int64_t, const float*, const W*);

// Shape<W, Rows, Cols>::tiles[r - 1][c - 1] = tile<W, r, c>: full tiles and the ragged ones at the bottom
// and right edges.
template <typename W, int Rows, int Cols>
struct Shape {
  using TileFn = TileFnOf<W>;
  template <int R, int... Cs>
  static constexpr std::array<TileFn, Cols> row(std::integer_sequence<int, Cs...>) {
    return {&tile<W, R, Cs + 1>...};
  }
  template <int... Rs>
  static constexpr std::array<std::array<TileFn, Cols>, Rows> table(std::integer_sequence<int, Rs...>) {
    return {row<Rs + 1>(std::make_integer_sequence<int, Cols>())...};
  }
  static constexpr std::array<std::array<TileFn, Cols>, Rows> tiles = table(std::make_integer_sequence<int, Rows>());
};

// A thread walks its weight rows in chunks of about this many bytes (kept in L2) and runs all rows of
// x over each chunk before the next, so large M reads the weight from memory once per thread.
constexpr int64_t kChunkBytes = 256 * 1024;
// Weight tiles per parallel task: fewer and a second thread costs more than it saves.
constexpr int64_t kTilesPerTask = 8;

// out [M, N] = x [M, K] . weight [N, K]^T (+ bias) in register tiles of Rows x Cols outputs.
template <int Rows, int Cols, typename W>
void run(const float* xp, const W* wp, const float* bp, float* op, int64_t M, int64_t K, int64_t N) {
  const int64_t col_tiles = (N + Cols - 1) / Cols;
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / (Cols * std::max<int64_t>(K, 1) * int64_t(sizeof(W))));
  at::parallel_for(0, col_tiles, kTilesPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = begin; t0 < end; t0 += chunk) {
      const int64_t t1 = std::min(end, t0 + chunk);
      for (int64_t m = 0; m < M; m += Rows) {
        const int rows = int(std::min<int64_t>(Rows, M - m));
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n0 = t * Cols;
          const int cols = int(std::min<int64_t>(Cols, N - n0));
          // Only the first pass over a chunk reads it from memory; later row groups find it in cache.
          const W* next = m == 0 && t + 1 < end ? wp + (n0 + Cols) * K : nullptr;
          Shape<W, Rows, Cols>::tiles[rows - 1][cols - 1](xp + m * K, wp + n0 * K, K, op + m * N + n0, N,
                                                       bp ? bp + n0 : nullptr, next);
        }
      }
    }
  });
}

template <typename W>
void run_weights(const float* xp, const W* wp, const float* bp, float* op, int64_t M, int64_t K, int64_t N) {
#if defined(__AVX512F__)
  // 7 or 8 rows (a verify of 6-7 drafted tokens) in one 8 x 3 row group rather than a 6-row and a 1-2 row
  // group, which stream each weight chunk twice: all linears 26.2-27.5 -> 25.1-26.1 ms at M = 7-8; other M
  // gain nothing or lose. The tile shape never changes an output's bits (the sum order is per element).
  if (M == 7 || M == 8) return run<8, 3>(xp, wp, bp, op, M, K, N);
#elif defined(__AVX2__) && defined(__FMA__)
  if (M == 1) return run<1, 4>(xp, wp, bp, op, M, K, N);  // more outputs in flight when no row is reused
#endif
  run<kRows, kCols>(xp, wp, bp, op, M, K, N);
}

}  // namespace

namespace specserve_cpu {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "linear: contiguous [M, K] float32 input");
  TORCH_CHECK((weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16) && weight.is_contiguous() &&
                  weight.dim() == 2 && weight.size(1) == x.size(1),
              "linear: contiguous [N, K] float32 or bfloat16 weight with the input's K");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == weight.size(0)),
              "linear: contiguous float32 bias [N]");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const float* xp = x.data_ptr<float>();
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  if (weight.scalar_type() == at::kBFloat16) {
    run_weights(xp, reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), bp, op, M, K, N);
  } else {
    run_weights(xp, weight.data_ptr<float>(), bp, op, M, K, N);
  }
  return out;
}

}  // namespace specserve_cpu

TORCH_LIBRARY_FRAGMENT(specserve_cpu, m) { m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(specserve_cpu, CPU, m) { m.impl("linear", &specserve_cpu::linear); }
