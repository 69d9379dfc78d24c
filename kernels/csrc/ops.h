// Entry points of specserve's CPU kernels that other kernels of this library call directly (the decoder
// layers of decoder_cpu.cpp); each is also registered as a torch op in its own file.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace specserve_cpu {

// linear_cpu.cpp: x [M, K] @ weight [N, K]^T (+ bias), float32, batch-invariant.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// int8_linear_cpu.cpp: W8A8 with per-row activation scales; packed layout of kernels/linear.py.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& compensation,
                       const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias);

// rowwise_cpu.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor rope_write_kv(const at::Tensor& qkv, const at::Tensor& rotations, at::Tensor k_cache, at::Tensor v_cache,
                         const at::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads);

// tree_attention_cpu.cpp: writes the rows of the sequences it is given into `out`.
void tree_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& block_tables, const at::Tensor& prefix_lens, const at::Tensor& row_starts,
                    const at::Tensor& query_lens, const at::Tensor& tree_mask, int64_t block_size, double scale);

}  // namespace specserve_cpu
