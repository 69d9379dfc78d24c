// The decoder layers of one forward in one call (engine/model.py, LlamaModel.forward), for steps whose
// every row the attention kernel takes: decode rows and draft-tree verify rows, with float32 or int8
// weights on specserve's own linear kernels, bfloat16 ones on oneDNN's or (where oneDNN has no bfloat16
// linear) on specserve's float32 kernel reading bfloat16 weights.
//
// Why: a batch-1 decode step of the 135M model was ~24 ms in float32 (~9 ms in int8), of which ~19 ms
// (~6 ms) are the linears moving the weights; most of the rest was Python and torch's per-op dispatch
// around ~14 small calls per layer x 30 layers (module calls, views, chunk, silu, mul, adds). Here each
// layer is the same kernel calls the per-layer Python path makes, in the same order, on the same
// tensors: RMSNorm, QKV projection, RoPE + KV write, attention, output projection, residual add, RMSNorm,
// gate/up projection, SiLU(gate) * up, down projection, residual add. The results are the same bits
// (tests/unit/engine/test_fused_layers.py compares them), so nothing downstream can tell the two apart.
//
// Linears: `linears` holds, layer by layer, the QKV, output, gate/up and down projections, all of one
// kind, told by the first tensor's dtype: a float32 weight `[N, K]` each (linear_cpu.cpp); for int8 three
// tensors each: packed weight, compensation, weight scales (int8_linear_cpu.cpp); for bfloat16 oneDNN's
// prepacked weight, called as engine/quant.py's PackedLinear calls it, or a plain `[N, K]` bfloat16 weight
// for linear_cpu.cpp. `norms` holds each layer's two RMSNorm weights. Bias-free.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#include "ops.h"

namespace {

constexpr int64_t kLinearsPerLayer = 4;  // QKV, output, gate/up, down
// engine/quant.py's MIN_ROWS and BF16_MAX_ROWS: oneDNN's bfloat16 linear is fed at least 4 rows (short
// inputs padded with copies of the last row) and at most 32 at a time, which keeps it batch-invariant.
constexpr int64_t kPackedMinRows = 4;
constexpr int64_t kPackedMaxRows = 32;

at::Tensor onednn_rows(const at::Tensor& rows, const at::Tensor& packed) {  // [m <= 32, K] bf16 -> [m, N] bf16
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  const int64_t m = rows.size(0);
  at::Tensor input = rows;
  if (m > 0 && m < kPackedMinRows) {
    input = at::cat({rows, rows.narrow(0, m - 1, 1).expand({kPackedMinRows - m, rows.size(1)})});
  }
  torch::jit::Stack stack{input, packed, c10::IValue(), std::string("none"), c10::List<c10::optional<at::Scalar>>(),
                          std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor().narrow(0, 0, m);
}

at::Tensor onednn_bf16_linear(const at::Tensor& x, const at::Tensor& packed) {  // float32 in and out
  const at::Tensor rows = x.to(at::kBFloat16);
  if (rows.size(0) <= kPackedMaxRows) return onednn_rows(rows, packed).to(at::kFloat);
  std::vector<at::Tensor> pieces;
  for (const at::Tensor& piece : rows.split(kPackedMaxRows)) pieces.push_back(onednn_rows(piece, packed));
  return at::cat(pieces).to(at::kFloat);
}

at::Tensor decoder_layers(const at::Tensor& x_in, const at::Tensor& rotations, at::TensorList k_caches,
                          at::TensorList v_caches, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                          const at::Tensor& prefix_lens, const at::Tensor& row_starts, const at::Tensor& query_lens,
                          const at::Tensor& tree_mask, int64_t block_size, double scale, at::TensorList norms,
                          at::TensorList linears, int64_t num_heads, int64_t num_kv_heads, double eps) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(layers >= 1 && v_caches.size() == k_caches.size(), "decoder_layers: one K and one V cache per layer");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * layers, "decoder_layers: two norm weights per layer");
  TORCH_CHECK(!linears.empty(), "decoder_layers: no linear weights");
  const auto kind = linears[0].scalar_type();
  TORCH_CHECK(kind == at::kFloat || kind == at::kChar || kind == at::kBFloat16,
              "decoder_layers: float32, int8 or bfloat16 linear operands");
  const bool int8 = kind == at::kChar;
  const bool onednn = linears[0].is_mkldnn();
  const int64_t per_linear = int8 ? 3 : 1;
  TORCH_CHECK(static_cast<int64_t>(linears.size()) == layers * kLinearsPerLayer * per_linear,
              "decoder_layers: ", per_linear, " tensor(s) per linear, 4 linears per layer");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "decoder_layers: a [tokens, hidden] float32 input");
  const int64_t tokens = x_in.size(0);

  auto project = [&](const at::Tensor& rows, int64_t index) {  // index = layer * 4 + which
    if (onednn) return onednn_bf16_linear(rows, linears[index]);
    if (!int8) return specserve_cpu::linear(rows, linears[index], c10::nullopt);
    const int64_t i = index * 3;
    return specserve_cpu::int8_linear(rows, linears[i], linears[i + 1], linears[i + 2], c10::nullopt);
  };

  at::Tensor x = x_in.contiguous().clone();  // the residual stream, updated in place (adds round the same)
  for (int64_t layer = 0; layer < layers; ++layer) {
    const int64_t first = layer * kLinearsPerLayer;
    at::Tensor qkv = project(specserve_cpu::rms_norm(x, norms[2 * layer], eps), first);
    at::Tensor q = specserve_cpu::rope_write_kv(qkv, rotations, k_caches[layer], v_caches[layer], slot_mapping,
                                                num_heads, num_kv_heads);
    at::Tensor attended = at::empty_like(q);
    specserve_cpu::tree_attention(attended, q, k_caches[layer], v_caches[layer], block_tables, prefix_lens, row_starts,
                                  query_lens, tree_mask, block_size, scale);
    x.add_(project(attended.view({tokens, -1}), first + 1));

    at::Tensor gate_up = project(specserve_cpu::rms_norm(x, norms[2 * layer + 1], eps), first + 2);
    const int64_t width = gate_up.size(1) / 2;
    // The same ATen calls as the Python path's F.silu(gate) * up on the same views: the same bits.
    at::Tensor act = at::silu(gate_up.narrow(1, 0, width)).mul_(gate_up.narrow(1, width, width));
    x.add_(project(act, first + 3));
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(specserve_cpu, m) {
  m.def("decoder_layers(Tensor x, Tensor rotations, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slot_mapping, "
        "Tensor block_tables, Tensor prefix_lens, Tensor row_starts, Tensor query_lens, Tensor tree_mask, "
        "int block_size, float scale, Tensor[] norms, Tensor[] linears, int num_heads, int num_kv_heads, "
        "float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(specserve_cpu, CPU, m) { m.impl("decoder_layers", &decoder_layers); }

// oneDNN's prepacked bfloat16 weights are opaque MkldnnCPU tensors, which send the call to that key.
TORCH_LIBRARY_IMPL(specserve_cpu, MkldnnCPU, m) { m.impl("decoder_layers", &decoder_layers); }
