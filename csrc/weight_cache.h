// Prepared operands that depend on the weight only, kept between calls.
//
// Note: prepared weights
// A layer's weights are static, but the kernels want them in another form than codes: the
// FP8/INT values as float32, the 2^F remainder-class planes of an LNS weight, transposed log
// fields for the direct kernels. Preparing them takes a pass over the weight, which at batch
// 1 costs as much as the layer itself (VGG's 25088x4096 classifier: 400 MB written per call).
// So the kernels prepare a weight once and keep the result here, keyed by what makes it
// valid:
//   * the weight's codes and its parameter (offset or scale), each by storage, offset,
//     sizes, strides and version counter. A converted layer that re-encodes its weight (QAT,
//     freeze()), load_state_dict and .to() all put new tensors in place, and any in-place
//     write bumps the version, so a stale entry can never be found. Entries hold references
//     to both tensors, so a freed storage cannot be reused under a live key;
//   * a tag naming the preparation and its arguments (the table, acc_lsb, ...).
// A weight is admitted on its second use: a QAT weight, re-encoded every step, is used once
// and never fills the cache. Entries are evicted least recently used first once the cache
// holds TORCHLNS_WEIGHT_CACHE_MB megabytes (default 2048; 0 turns caching off). Inference
// tensors have no version counter, so they are never cached. Writes that bypass the
// version counter (through .data or a raw pointer) are not seen; torchlns never makes them.

#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <vector>

namespace torchlns {

// The prepared tensors for (weight, param, tag): from the cache, or build() (and maybe kept).
std::vector<at::Tensor> prepared_weight(const at::Tensor& weight, const at::Tensor& param, const std::string& tag,
                                        const std::function<std::vector<at::Tensor>()>& build);

struct WeightCacheStats {
  int64_t entries, bytes, hits, misses, builds, capacity_bytes;
};
WeightCacheStats weight_cache_stats();
void clear_weight_cache();
void set_weight_cache_capacity(int64_t bytes);

}  // namespace torchlns
