// W8A8 linear for the CPU (engine/quant.py, Int8Linear): int8 weights with one scale per output channel,
// each input row quantized to int8 with its own scale (quantize_row.h), exact int32 dot products, then
//     out[m, n] = float(acc[m, n]) * w_scale[n] * row_scale[m]  (+ bias[n]),   rounded in that order.
// Integer sums are exact in any order, and the epilogue is per element, so a row's output never depends on
// M, the other rows, the tiling or the thread count: batch-invariant by construction. The bits equal
// fbgemm's fixed-input-scale linear, which Int8Linear uses where this kernel has no fast path, and
// int8_linear_ref in kernels/linear.py (tests/unit/kernels/test_int8_linear_cpu.py).
//
// Weight layout (kernels/linear.py, pack_int8_weight): blocks of 16 output channels; within a block, for
// each group of 4 consecutive k, the 16 channels' 4 bytes — 64 bytes, one 512-bit vector. A block's whole
// K is contiguous. Inputs are offset by +128 to unsigned bytes, as AVX-512 VNNI's vpdpbusd multiplies
// unsigned by signed bytes; `compensation[n]` = 128 * sum_k w[n, k] takes the offset back out.
//
// Three paths, chosen by the CPU and K only, never by M: AMX tiles (16 rows x 64 k x 16 channels per
// instruction) where the CPU has them, Linux grants them and K is a multiple of 64; else AVX-512 VNNI
// vectors, a register tile of kRows rows x kBlocks blocks reusing each weight vector kRows times; on
// AVX2-only CPUs signed inputs, no offset (see tile_avx2). All three give the same sums. They
// stream a thread's weights in L2-sized chunks, running every row of x over a chunk before the next.
// All 121 linears of the 135M model, 2 cores of an AMX Xeon, ms at M = 1 / 4 / 8 / 16 / 64 / 256 (two
// runs): AMX 5.7 / 6.3 / 6.6 / 7.3-7.5 / 15.0-15.5 / 57-59; fbgemm's W8A8 linear (Int8Linear's before)
// 10.0 / 13.6-14.6 / 16.1-16.5 / 19.0-19.3 / 40.5 / 141; the VNNI path alone, measured before the row
// quantization was vectorized, 5.2 / 6.6 / 9.4 / 15.4 / 45.5 / 182. M = 1 moves ~24 GB/s of weights.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SPECSERVE_VNNI 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define SPECSERVE_AVX2 1
#endif

#include "ops.h"
#include "quantize_row.h"

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int kBlock = 16;  // output channels per packed block
constexpr int kGroup = 4;   // consecutive k per 32-bit lane of a block
constexpr int kOffset = 128;

#if defined(SPECSERVE_VNNI)
constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// The epilogue of one block of 16 channels for `rows` rows: out[r, c] = float(sums[r][c] - compensation[c])
// * w_scale[c] * row_scale[r] (+ bias[c]), for the first `channels` channels.
inline void finish(const __m512i* sums, int rows, int64_t n_out, int channels, const int32_t* compensation,
                   const float* w_scale, const float* row_scale, const float* bias, float* out) {
  const __mmask16 mask = __mmask16((1u << channels) - 1);
  const __m512i comp = _mm512_maskz_loadu_epi32(mask, compensation);
  const __m512 scale = _mm512_maskz_loadu_ps(mask, w_scale);
  const __m512 add = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
  for (int r = 0; r < rows; ++r) {
    __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums[r], comp));
    // Rounding-mode forms: the compiler may not fuse these into one FMA, which would change the bits.
    v = _mm512_mul_round_ps(_mm512_mul_round_ps(v, scale, kRound), _mm512_set1_ps(row_scale[r]), kRound);
    if (bias != nullptr) v = _mm512_add_round_ps(v, add, kRound);
    _mm512_mask_storeu_ps(out + r * n_out, mask, v);
  }
}

constexpr int kRows = 6, kBlocks = 4;  // 24 accumulators + 4 weight vectors + 1 broadcast of 32 registers

// Outputs [R rows] x [B blocks of 16 channels]. `x`: R rows of `kp` offset bytes; `w`: B consecutive
// blocks; `channels`: how many of the last block's 16 channels exist.
template <int R, int B>
void tile(const uint8_t* x, int64_t kp, const int8_t* w, const int32_t* compensation, const float* w_scale,
          const float* row_scale, const float* bias, float* out, int64_t n_out, int channels) {
  __m512i acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_si512();
  const int64_t block_bytes = kp * kBlock;
  for (int64_t k = 0; k < kp; k += kGroup) {
    __m512i wv[B];
    for (int b = 0; b < B; ++b) wv[b] = _mm512_loadu_si512(w + b * block_bytes + k * kBlock);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, x + r * kp + k, sizeof(four));
      const __m512i xv = _mm512_set1_epi32(four);
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], xv, wv[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    __m512i sums[R];
    for (int r = 0; r < R; ++r) sums[r] = acc[r][b];
    finish(sums, R, n_out, b == B - 1 ? channels : kBlock, compensation + b * kBlock, w_scale + b * kBlock,
           row_scale, bias != nullptr ? bias + b * kBlock : nullptr, out + b * kBlock);
  }
}

using TileFn = void (*)(const uint8_t*, int64_t, const int8_t*, const int32_t*, const float*, const float*,
                        const float*, float*, int64_t, int);

template <int R, int... Bs>
constexpr std::array<TileFn, kBlocks> tile_row(std::integer_sequence<int, Bs...>) {
  return {&tile<R, Bs + 1>...};
}
template <int... Rs>
constexpr std::array<std::array<TileFn, kBlocks>, kRows> tile_table(std::integer_sequence<int, Rs...>) {
  return {tile_row<Rs + 1>(std::make_integer_sequence<int, kBlocks>())...};
}
constexpr auto kTiles = tile_table(std::make_integer_sequence<int, kRows>());

#if defined(SPECSERVE_VNNI) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define SPECSERVE_AMX 1
// AMX: one tdpbusd multiplies a tile of up to 16 rows x 64 offset input bytes by 64 k x 16 channels
// (exactly 16 consecutive 64-byte groups of a packed block, so the weight layout serves both paths) into
// 16 rows x 16 int32 sums. Tiles 0-3: sums of 4 blocks; 4: the input; 5-7: weights.
constexpr int kAmxK = 64;
constexpr int kAmxRows = 16;

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void amx_configure(int rows) {
  TileConfig config;
  for (int t = 0; t < 5; ++t) {
    config.rows[t] = uint8_t(rows);
    config.colsb[t] = 64;
  }
  for (int t = 5; t < 8; ++t) {
    config.rows[t] = kAmxK / kGroup;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

// Linux hands out AMX state only to processes that ask for it once.
bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return permitted;
}

// Sums of the configured rows x B blocks into `sums` [16 rows][64 int32] (row stride 256 bytes).
template <int B>
void amx_tile(const uint8_t* x, int64_t kp, const int8_t* w, int32_t* sums) {
  const int64_t block_bytes = kp * kBlock;
  _tile_zero(0);
  if constexpr (B > 1) _tile_zero(1);
  if constexpr (B > 2) _tile_zero(2);
  if constexpr (B > 3) _tile_zero(3);
  for (int64_t k = 0; k < kp; k += kAmxK) {
    const int8_t* wk = w + k * kBlock;
    _tile_loadd(4, x + k, kp);
    _tile_loadd(5, wk, 64);
    _tile_dpbusd(0, 4, 5);
    if constexpr (B > 1) {
      _tile_loadd(6, wk + block_bytes, 64);
      _tile_dpbusd(1, 4, 6);
    }
    if constexpr (B > 2) {
      _tile_loadd(7, wk + 2 * block_bytes, 64);
      _tile_dpbusd(2, 4, 7);
    }
    if constexpr (B > 3) {
      _tile_loadd(5, wk + 3 * block_bytes, 64);
      _tile_dpbusd(3, 4, 5);
    }
  }
  _tile_stored(0, sums, 256);
  if constexpr (B > 1) _tile_stored(1, sums + 16, 256);
  if constexpr (B > 2) _tile_stored(2, sums + 32, 256);
  if constexpr (B > 3) _tile_stored(3, sums + 48, 256);
}

using AmxTileFn = void (*)(const uint8_t*, int64_t, const int8_t*, int32_t*);
constexpr std::array<AmxTileFn, 4> kAmxTiles = {&amx_tile<1>, &amx_tile<2>, &amx_tile<3>, &amx_tile<4>};
#endif
#elif defined(SPECSERVE_AVX2)
// AVX2 without VNNI: vpmaddubsw multiplies unsigned by signed bytes into int16 sums of pairs, which
// saturate for offset inputs (2 * 255 * 127 > 32767; fbgemm's AVX2 path does, which is why torch's x86
// quantization keeps activations to 7 bits on such CPUs). The inputs stay signed here (kInputOffset 0, no
// compensation) and vpsignb moves each input's sign onto the weight: |x| * (w * sign(x)), at most
// 2 * 127 * 127 = 32258 a pair, exact; vpmaddwd with ones then adds pairs into int32 lanes, one lane per
// channel as vpdpbusd's. So the sums, and with the same epilogue the bits, are the VNNI path's.
constexpr int kInputOffset = 0;
// All 121 linears of the 135M model, 2 cores of an AVX2 AMD EPYC, ms at M = 1 / 4 / 8 / 16 / 256 (best of
// noisy runs): 6.2 / 6.4 / 11.0 / 20.0 / 315 with 6-row tiles; 4 rows 6.6 / 6.6 / 11.3 / 20.6 / 342; without
// the prefetch of the next block M = 1 took 10.2. From M ~ 8 on the multiplies bound it (vpmaddubsw and
// vpmaddwd share one port here: 16 products a cycle, float32's FMA rate). fbgemm (saturating) 16.6 / 19.6 /
// 20.1 / 27.2 / 359.
constexpr int kRows = 6, kBlocks = 1;

// The multiplications of the epilogue, each rounded on its own: GCC may contract a plain `a * b + c` of
// vectors into one FMA, which would change the bits against the reference.
inline __m256 rounded(__m256 v) {
  asm("" : "+x"(v));
  return v;
}

// Outputs [R rows] x [one block of 16 channels]. `x`: R rows of `kp` signed bytes; `w`: the block.
template <int R>
void tile_avx2(const uint8_t* x, int64_t kp, const int8_t* w, const float* w_scale, const float* row_scale,
               const float* bias, float* out, int64_t n_out, int channels, const int8_t* next) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < kp; k += kGroup) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * kBlock));       // channels 0-7
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * kBlock + 32));  // 8-15
    if (next != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next + k * kBlock), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, x + r * kp + k, sizeof(four));
      const __m256i xv = _mm256_set1_epi32(four);
      const __m256i magnitude = _mm256_abs_epi8(xv);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w0, xv)), ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w1, xv)), ones));
    }
  }
  for (int half = 0; half < 2; ++half) {
    const int count = std::min(8, channels - 8 * half);
    if (count <= 0) break;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 scale = _mm256_maskload_ps(w_scale + 8 * half, mask);
    const __m256 add = bias != nullptr ? _mm256_maskload_ps(bias + 8 * half, mask) : _mm256_setzero_ps();
    for (int r = 0; r < R; ++r) {
      __m256 v = rounded(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][half]), scale));
      v = rounded(_mm256_mul_ps(v, _mm256_set1_ps(row_scale[r])));
      if (bias != nullptr) v = _mm256_add_ps(v, add);
      _mm256_maskstore_ps(out + r * n_out + 8 * half, mask, v);
    }
  }
}

template <int... Rs>
constexpr std::array<decltype(&tile_avx2<1>), kRows> avx2_tiles(std::integer_sequence<int, Rs...>) {
  return {&tile_avx2<Rs + 1>...};
}
constexpr auto kAvx2Tiles = avx2_tiles(std::make_integer_sequence<int, kRows>());
#else
constexpr int kRows = 1, kBlocks = 1;

// Portable path (neither AVX-512 VNNI nor AVX2): the same integers and epilogue, one output at a time.
// Int8Linear uses its fallbacks instead where `int8_linear_fast()` is false (engine/quant.py), so this only
// keeps the op correct everywhere.
void tile_generic(const uint8_t* x, int64_t kp, const int8_t* w, const int32_t* compensation, const float* w_scale,
                  const float* row_scale, const float* bias, float* out, int64_t, int channels) {
  for (int c = 0; c < channels; ++c) {
    int32_t acc = 0;
    for (int64_t k = 0; k < kp; ++k) {
      acc += int32_t(x[k]) * int32_t(w[(k / kGroup) * kGroup * kBlock + c * kGroup + k % kGroup]);
    }
    const volatile float v = (float(acc - compensation[c]) * w_scale[c]) * row_scale[0];  // no FMA with the bias
    out[c] = bias != nullptr ? v + bias[c] : v;
  }
}
#endif

#if !defined(SPECSERVE_AVX2)
constexpr int kInputOffset = kOffset;  // inputs as unsigned bytes; `compensation` takes the offset back out
#endif

// A thread walks its blocks in chunks of about this many weight bytes (kept in L2) and runs all rows of x
// over each chunk before the next, so large M reads the weight from memory once per thread.
constexpr int64_t kChunkBytes = 256 * 1024;
constexpr int64_t kBlocksPerTask = 8;  // fewer per thread and a second thread costs more than it saves
constexpr int64_t kRowsPerTask = 16;

bool fast() {
#if defined(SPECSERVE_VNNI) || defined(SPECSERVE_AVX2)
  return true;
#else
  return false;
#endif
}

}  // namespace

namespace specserve_cpu {

// x [M, K] float32; packed [ceil(N / 16) * ceil(K / 4) * 64] int8; compensation [ceil(N / 16) * 16] int32;
// w_scale [N] float32; bias [N] float32 or none -> [M, N] float32.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& compensation,
                       const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2,
              "int8_linear: contiguous [M, K] float32 input");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.dim() == 1,
              "int8_linear: contiguous float32 w_scale [N]");
  const int64_t M = x.size(0), K = x.size(1), N = w_scale.size(0);
  const int64_t kp = (K + kGroup - 1) / kGroup * kGroup, blocks = (N + kBlock - 1) / kBlock;
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.numel() == blocks * kBlock * kp,
              "int8_linear: packed int8 weight of ceil(N / 16) * 16 * ceil(K / 4) * 4 bytes for the input's K");
  TORCH_CHECK(compensation.scalar_type() == at::kInt && compensation.is_contiguous() &&
                  compensation.numel() == blocks * kBlock,
              "int8_linear: int32 compensation [ceil(N / 16) * 16]");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "int8_linear: contiguous float32 bias [N]");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;

  // Each row quantized once (offset to unsigned bytes except on AVX2); K's padding to a multiple of 4 is the
  // offset itself (zero), and meets zero weights anyway.
  std::vector<uint8_t> xq(static_cast<size_t>(M * kp), uint8_t{kInputOffset});
  std::vector<float> row_scale(static_cast<size_t>(M));
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      row_scale[m] = specserve_cpu::quantize_row(xp + m * K, K, xq.data() + m * kp, kInputOffset);
    }
  });

  const int8_t* wp = packed.data_ptr<int8_t>();
  const int32_t* cp = compensation.data_ptr<int32_t>();
  const float* sp = w_scale.data_ptr<float>();
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t block_bytes = kBlock * kp;
  const int64_t chunk = std::max<int64_t>(kBlocks, kChunkBytes / block_bytes / kBlocks * kBlocks);
#if defined(SPECSERVE_AMX)
  if (kp % kAmxK == 0 && amx_permitted()) {
    at::parallel_for(0, blocks, kBlocksPerTask, [&](int64_t begin, int64_t end) {
      int32_t sums[kAmxRows * kBlocks * kBlock];
      __m512i vectors[kAmxRows];
      int configured = 0;
      for (int64_t c0 = begin; c0 < end; c0 += chunk) {
        const int64_t c1 = std::min(end, c0 + chunk);
        for (int64_t m = 0; m < M; m += kAmxRows) {
          const int rows = int(std::min<int64_t>(kAmxRows, M - m));
          if (rows != configured) amx_configure(configured = rows);
          for (int64_t b = c0; b < c1; b += kBlocks) {
            const int count = int(std::min<int64_t>(kBlocks, c1 - b));
            kAmxTiles[count - 1](xq.data() + m * kp, kp, wp + b * block_bytes, sums);
            for (int j = 0; j < count; ++j) {
              const int64_t n0 = (b + j) * kBlock;
              for (int r = 0; r < rows; ++r) vectors[r] = _mm512_loadu_si512(sums + r * kBlocks * kBlock + j * kBlock);
              finish(vectors, rows, N, int(std::min<int64_t>(kBlock, N - n0)), cp + n0, sp + n0, row_scale.data() + m,
                     bp ? bp + n0 : nullptr, op + m * N + n0);
            }
          }
        }
      }
      if (configured != 0) _tile_release();
    });
    return out;
  }
#endif
  at::parallel_for(0, blocks, kBlocksPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = begin; c0 < end; c0 += chunk) {
      const int64_t c1 = std::min(end, c0 + chunk);
      for (int64_t m = 0; m < M; m += kRows) {
        const int rows = int(std::min<int64_t>(kRows, M - m));
        for (int64_t b = c0; b < c1; b += kBlocks) {
          const int count = int(std::min<int64_t>(kBlocks, c1 - b));
          const int channels = int(std::min<int64_t>(kBlock, N - (b + count - 1) * kBlock));
          const int64_t n0 = b * kBlock;
#if defined(SPECSERVE_VNNI)
          kTiles[rows - 1][count - 1](xq.data() + m * kp, kp, wp + b * block_bytes, cp + n0, sp + n0,
                                      row_scale.data() + m, bp ? bp + n0 : nullptr, op + m * N + n0, N, channels);
#elif defined(SPECSERVE_AVX2)
          // Only the first pass over a chunk reads it from memory: it prefetches the next block.
          const int8_t* next = m == 0 && b + 1 < end ? wp + (b + 1) * block_bytes : nullptr;
          kAvx2Tiles[rows - 1](xq.data() + m * kp, kp, wp + b * block_bytes, sp + n0, row_scale.data() + m,
                               bp ? bp + n0 : nullptr, op + m * N + n0, N, channels, next);
#else
          tile_generic(xq.data() + m * kp, kp, wp + b * block_bytes, cp + n0, sp + n0, row_scale.data() + m,
                       bp ? bp + n0 : nullptr, op + m * N + n0, N, channels);
#endif
        }
      }
    }
  });
  return out;
}

}  // namespace specserve_cpu

TORCH_LIBRARY_FRAGMENT(specserve_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor packed, Tensor compensation, Tensor w_scale, Tensor? bias) -> Tensor");
  m.def("int8_linear_fast() -> bool", &fast);  // no tensor to dispatch on: one kernel for every backend
}

TORCH_LIBRARY_IMPL(specserve_cpu, CPU, m) { m.impl("int8_linear", &specserve_cpu::int8_linear); }
