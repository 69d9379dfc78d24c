// What the paged attention kernels (tree_attention_cpu.cpp, prefill_attention_cpu.cpp) share about the
// cache: the dispatch on its element type, and the block-table check each runs before its threads start
// (a bad index would read outside the cache).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace specserve_cpu {

// fn(element), element a value of the cache's type: int8_t, at::BFloat16 or float (any other dtype is
// refused by the caller's checks first).
template <typename Fn>
void with_cache_type(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kChar) {
    fn(int8_t{});
  } else if (dtype == at::kBFloat16) {
    fn(at::BFloat16{});
  } else {
    fn(float{});
  }
}

// Sequence s's blocks for `context` positions are in its row of `tables` and inside a cache of `num_slots`.
inline void check_blocks(const int32_t* tables, int64_t s, int64_t max_blocks, int64_t context, int64_t block_size,
                         int64_t num_slots, const char* kernel) {
  const int64_t blocks = (context + block_size - 1) / block_size;
  TORCH_CHECK(blocks <= max_blocks, kernel, ": context longer than its block table");
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t block = tables[s * max_blocks + b];
    TORCH_CHECK(block >= 0 && (block + 1) * block_size <= num_slots, kernel, ": block out of range");
  }
}

}  // namespace specserve_cpu
