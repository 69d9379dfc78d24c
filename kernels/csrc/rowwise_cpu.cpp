// Row-wise ops of a decode step fused into one call each: RMSNorm, and the per-row int8 quantization of
// a linear's input (engine/quant.py, Int8Linear). At batch 1 these are a few hundred elements per row,
// so torch's chain of ops (pow, mean, add, rsqrt, mul, mul; amax, clamp, div, div, round) costs far more
// in per-op dispatch than in arithmetic. Each row is computed alone, in a fixed order: batch-invariant.
// References: F.rms_norm and Int8Linear.quantize_rows_ref (tests/unit/kernels/test_rowwise_cpu.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

namespace {

// Rows per parallel task: below this a second thread costs more than it saves.
constexpr int64_t kRowsPerTask = 16;

void check_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1, op, ": contiguous float32 input");
}

// y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension. The mean is accumulated in double,
// so the result is the correctly rounded float32 of the exact value in all but rare last-bit cases.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  const int64_t width = x.size(-1), rows = width == 0 ? 0 : x.numel() / width;
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == width,
              "rms_norm: float32 weight of the row width");
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * width;
      double squares = 0.0;
      for (int64_t i = 0; i < width; ++i) squares += double(row[i]) * double(row[i]);
      const float inv = static_cast<float>(1.0 / std::sqrt(squares / double(width) + eps));
      float* o = op + r * width;
      for (int64_t i = 0; i < width; ++i) o[i] = (row[i] * inv) * wp[i];
    }
  });
  return out;
}

// Per-row symmetric int8 quantization: scale = max(absmax(row), tiny) / 127 and q = round(x / scale)
// (half to even), returned as float32 integers in [-127, 127] with the scales `[rows, 1]`. Bit for bit
// the torch expression in Int8Linear.quantize_rows_ref.
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  check_rows(x, "quantize_rows");
  TORCH_CHECK(x.dim() == 2, "quantize_rows: a [rows, width] input");
  const int64_t rows = x.size(0), width = x.size(1);
  at::Tensor q = at::empty_like(x);
  at::Tensor scales = at::empty({rows, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* sp = scales.data_ptr<float>();
  const float tiny = std::numeric_limits<float>::min();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * width;
      float top = 0.0f;
      for (int64_t i = 0; i < width; ++i) top = std::max(top, std::fabs(row[i]));
      const float scale = std::max(top, tiny) / 127.0f;
      sp[r] = scale;
      float* o = qp + r * width;
      for (int64_t i = 0; i < width; ++i) o[i] = std::nearbyint(row[i] / scale);
    }
  });
  return {q, scales};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(specserve_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(specserve_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("quantize_rows", &quantize_rows);
}
