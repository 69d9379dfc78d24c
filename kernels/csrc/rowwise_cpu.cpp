// Row-wise ops of a decode step fused into one call each: RMSNorm, the per-row int8 quantization of
// a linear's input (engine/quant.py, Int8Linear), and RoPE with the KV-cache write (engine/model.py). At batch 1 these are a few hundred elements per row,
// so torch's chain of ops (pow, mean, add, rsqrt, mul, mul; amax, clamp, div, div, round) costs far more
// in per-op dispatch than in arithmetic. Each row is computed alone, in a fixed order: batch-invariant.
// References: F.rms_norm and Int8Linear.quantize_rows_ref (tests/unit/kernels/test_rowwise_cpu.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "quantize_row.h"

namespace {

// Rows per parallel task: below this a second thread costs more than it saves.
constexpr int64_t kRowsPerTask = 16;
// Partial sums of rms_norm's squares: two AVX-512 vectors of doubles.
constexpr int64_t kLanes = 16;

void check_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1, op, ": contiguous float32 input");
}

// Per-row symmetric int8 quantization (quantize_row.h), returned as float32 integers in [-127, 127] with
// the scales `[rows, 1]`.
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  check_rows(x, "quantize_rows");
  TORCH_CHECK(x.dim() == 2, "quantize_rows: a [rows, width] input");
  const int64_t rows = x.size(0), width = x.size(1);
  at::Tensor q = at::empty_like(x);
  at::Tensor scales = at::empty({rows, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* sp = scales.data_ptr<float>();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      sp[r] = specserve_cpu::quantize_row(xp + r * width, width, qp + r * width);
    }
  });
  return {q, scales};
}

}  // namespace

namespace specserve_cpu {

// y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension. The mean is accumulated in double,
// so the result is the correctly rounded float32 of the exact value in all but rare last-bit cases.
// kLanes independent partial sums (added in a fixed order at the end) let the compiler vectorize the
// loop; one serial double sum cost ~1 us a row of 576, 6% of a long prefill.
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
      double lanes[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= width; i += kLanes) {
        for (int64_t j = 0; j < kLanes; ++j) lanes[j] += double(row[i + j]) * double(row[i + j]);
      }
      for (; i < width; ++i) lanes[0] += double(row[i]) * double(row[i]);
      double squares = 0.0;
      for (double lane : lanes) squares += lane;
      const float inv = static_cast<float>(1.0 / std::sqrt(squares / double(width) + eps));
      float* o = op + r * width;
      for (int64_t i = 0; i < width; ++i) o[i] = (row[i] * inv) * wp[i];
    }
  });
  return out;
}

// The attention prologue of one layer: RoPE on the Q and K heads of the fused QKV projection's output
// (channel pairs adjacent, engine/model.py), K and V written to their cache slots, Q returned
// `[num_tokens, num_heads, head_dim]`. Replaces ~12 small torch ops (slices, complex views, the
// rotation, two index_copy_, a contiguous copy). A pair (x, y) rotated by (c, s) is (xc - ys, xs + yc),
// the complex product the torch path computes.
at::Tensor rope_write_kv(const at::Tensor& qkv, const at::Tensor& rotations, at::Tensor k_cache, at::Tensor v_cache,
                         const at::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads) {
  check_rows(qkv, "rope_write_kv");
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kChar) &&
                  v_cache.scalar_type() == dtype && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes(),
              "rope_write_kv: contiguous float32, bfloat16 or int8 caches of one shape and dtype");
  const int64_t tokens = qkv.size(0), num_slots = k_cache.size(0);
  // An int8 cache row holds head_dim values and their scale (quantize_row.h).
  const int64_t head_dim = k_cache.size(2) - (dtype == at::kChar ? kKvScaleBytes : 0);
  TORCH_CHECK(k_cache.size(1) == num_kv_heads && head_dim > 0 && head_dim % 2 == 0 &&
                  qkv.numel() == tokens * (num_heads + 2 * num_kv_heads) * head_dim,
              "rope_write_kv: qkv does not fit the heads");
  TORCH_CHECK(rotations.scalar_type() == at::kFloat && rotations.is_contiguous() &&
                  rotations.numel() == tokens * head_dim, "rope_write_kv: float32 (cos, sin) pairs per token");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == tokens,
              "rope_write_kv: one int64 slot per token");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "rope_write_kv: slot out of range");
  }
  at::Tensor q = at::empty({tokens, num_heads, head_dim}, qkv.options());
  const float* in = qkv.data_ptr<float>();
  const float* rot = rotations.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  const int64_t width = (num_heads + 2 * num_kv_heads) * head_dim, row_width = k_cache.size(2);
  // A bfloat16 cache stores each float32 value rounded to nearest even, as torch's `.to(torch.bfloat16)`;
  // an int8 cache each (token, KV head) row quantized, K after its rotation.
  auto run = [&](auto* kp, auto* vp) {
    constexpr bool quantized = std::is_same_v<std::remove_pointer_t<decltype(kp)>, int8_t>;
    at::parallel_for(0, tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<float> rotated(head_dim);
      for (int64_t t = begin; t < end; ++t) {
        const float* row = in + t * width;
        const float* cs = rot + t * head_dim;  // [head_dim / 2, 2]
        auto rotate = [&](const float* x, auto* out) {
          for (int64_t i = 0; i < head_dim / 2; ++i) {
            const float a = x[2 * i], b = x[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
            out[2 * i] = a * c - b * s;
            out[2 * i + 1] = a * s + b * c;
          }
        };
        for (int64_t h = 0; h < num_heads; ++h) rotate(row + h * head_dim, qp + (t * num_heads + h) * head_dim);
        const float* v_in = row + (num_heads + num_kv_heads) * head_dim;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          const int64_t at = (slots[t] * num_kv_heads + h) * row_width;
          if constexpr (quantized) {
            rotate(row + (num_heads + h) * head_dim, rotated.data());
            quantize_kv_row(rotated.data(), head_dim, kp + at);
            quantize_kv_row(v_in + h * head_dim, head_dim, vp + at);
          } else {
            rotate(row + (num_heads + h) * head_dim, kp + at);
            std::copy(v_in + h * head_dim, v_in + (h + 1) * head_dim, vp + at);
          }
        }
      }
    });
  };
  if (dtype == at::kChar) {
    run(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>());
  } else if (dtype == at::kBFloat16) {
    run(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
  } else {
    run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  }
  return q;
}

}  // namespace specserve_cpu

TORCH_LIBRARY_FRAGMENT(specserve_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
  m.def("rope_write_kv(Tensor qkv, Tensor rotations, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
        "int num_heads, int num_kv_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(specserve_cpu, CPU, m) {
  m.impl("rms_norm", &specserve_cpu::rms_norm);
  m.impl("quantize_rows", &quantize_rows);
  m.impl("rope_write_kv", &specserve_cpu::rope_write_kv);
}
