// Per-row symmetric int8 quantization, shared by rowwise_cpu.cpp (quantize_rows) and int8_linear_cpu.cpp:
// scale = max(absmax(row), tiny) / 127 and q[i] = round(row[i] / scale), half to even, in [-127, 127].
// Bit for bit the torch expression in kernels/linear.py's quantize_rows_ref: the maximum is exact in any
// order, the division is IEEE in both, and the AVX-512 / AVX2 rounding is the same half-to-even nearbyint.
// Vectorized because a verify or prefill call quantizes every row of every linear's input: scalar, 8
// rows of the 135M model's linears took ~1.3 ms a forward, ~15% of the int8 linears' time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace specserve_cpu {

inline float quantize_scale(const float* row, int64_t width) {
  float top = 0.0f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 tops = _mm512_setzero_ps();
  for (; i + 16 <= width; i += 16) tops = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(row + i)), tops);
  top = _mm512_reduce_max_ps(tops);
#elif defined(__AVX2__)
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 tops = _mm256_setzero_ps();
  for (; i + 8 <= width; i += 8) tops = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(row + i), magnitude), tops);
  float lanes[8];
  _mm256_storeu_ps(lanes, tops);
  for (const float lane : lanes) top = std::max(top, lane);
#endif
  for (; i < width; ++i) top = std::max(top, std::fabs(row[i]));
  return std::max(top, std::numeric_limits<float>::min()) / 127.0f;
}

#if defined(__AVX512F__)
// round(row[0..16) / scale), half to even, as 16 float32 integers.
inline __m512 rounded_quotients(const float* row, __m512 scale) {
  const __m512 quotients = _mm512_div_ps(_mm512_loadu_ps(row), scale);
  return _mm512_roundscale_ps(quotients, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#elif defined(__AVX2__)
// round(row[0..8) / scale), half to even, as 8 float32 integers.
inline __m256 rounded_quotients(const float* row, __m256 scale) {
  return _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(row), scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#endif

// q[i] as float32 integers.
inline float quantize_row(const float* row, int64_t width, float* q) {
  const float scale = quantize_scale(row, width);
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 s = _mm512_set1_ps(scale);
  for (; i + 16 <= width; i += 16) _mm512_storeu_ps(q + i, rounded_quotients(row + i, s));
#elif defined(__AVX2__)
  const __m256 s = _mm256_set1_ps(scale);
  for (; i + 8 <= width; i += 8) _mm256_storeu_ps(q + i, rounded_quotients(row + i, s));
#endif
  for (; i < width; ++i) q[i] = std::nearbyint(row[i] / scale);
  return scale;
}

// q[i] + offset as unsigned bytes (offset 128 maps [-127, 127] into [1, 255]).
inline float quantize_row(const float* row, int64_t width, uint8_t* q, int offset) {
  const float scale = quantize_scale(row, width);
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 s = _mm512_set1_ps(scale);
  const __m512i shift = _mm512_set1_epi32(offset);
  for (; i + 16 <= width; i += 16) {
    const __m512i n = _mm512_cvtps_epi32(rounded_quotients(row + i, s));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(_mm512_add_epi32(n, shift)));
  }
#elif defined(__AVX2__)
  const __m256 s = _mm256_set1_ps(scale);
  const __m256i shift = _mm256_set1_epi32(offset), low_byte = _mm256_set1_epi32(0xff);
  for (; i + 8 <= width; i += 8) {
    // The low 8 bits of each int32, as _mm512_cvtepi32_epi8 keeps them: masked to [0, 255], the unsigned
    // saturating packs below change nothing.
    const __m256i n = _mm256_and_si256(_mm256_add_epi32(_mm256_cvtps_epi32(rounded_quotients(row + i, s)), shift), low_byte);
    const __m256i words = _mm256_packus_epi32(n, n);      // [n0..3 n0..3 | n4..7 n4..7] as 16 bits
    const __m256i bytes = _mm256_packus_epi16(words, words);  // each 128-bit half starts with its 4 bytes
    const int32_t low = _mm_cvtsi128_si32(_mm256_castsi256_si128(bytes));
    const int32_t high = _mm_cvtsi128_si32(_mm256_extracti128_si256(bytes, 1));
    std::memcpy(q + i, &low, 4);
    std::memcpy(q + i + 4, &high, 4);
  }
#endif
  for (; i < width; ++i) q[i] = uint8_t(int(std::nearbyint(row[i] / scale)) + offset);
  return scale;
}

// An int8 KV cache row (rope_write_kv writes it, tree_attention reads it): one token's head_dim values
// quantized as above, then the scale's float32 bytes. kernels/kv_cache.py's quantize_kv is the same rule
// in torch, bit for bit. The bytes are quantize_row's with offset 0: its conversion to bytes keeps the low
// 8 bits, which for [-127, 127] are the int8 values.
constexpr int64_t kKvScaleBytes = 4;

inline void quantize_kv_row(const float* x, int64_t head_dim, int8_t* row) {
  const float scale = quantize_row(x, head_dim, reinterpret_cast<uint8_t*>(row), 0);
  std::memcpy(row + head_dim, &scale, sizeof scale);
}

inline float kv_row_scale(const int8_t* row, int64_t head_dim) {
  float scale;
  std::memcpy(&scale, row + head_dim, sizeof scale);
  return scale;
}

}  // namespace specserve_cpu
