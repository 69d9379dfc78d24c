// Per-row symmetric int8 quantization, shared by rowwise_cpu.cpp (quantize_rows) and int8_linear_cpu.cpp:
// scale = max(absmax(row), tiny) / 127 and q[i] = round(row[i] / scale), half to even, in [-127, 127].
// Bit for bit the torch expression in engine/quant.py's quantize_rows_ref.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace specserve_cpu {

// Calls store(i, q) for every element (q a float holding an integer) and returns the row's scale.
template <typename Store>
inline float quantize_row(const float* row, int64_t width, Store store) {
  float top = 0.0f;
  for (int64_t i = 0; i < width; ++i) top = std::max(top, std::fabs(row[i]));
  const float scale = std::max(top, std::numeric_limits<float>::min()) / 127.0f;
  for (int64_t i = 0; i < width; ++i) store(i, std::nearbyint(row[i] / scale));
  return scale;
}

}  // namespace specserve_cpu
