// Rotary position embedding as the attention kernels apply it to the queries and keys they
// take straight from the fused q/k/v projection (one call in place of MindSpore's split,
// rotate, multiply and add ops). LLaMA's rotate-half form over a head of D values:
//   out = x * cos[p] + rotate_half(x) * sin[p],  rotate_half(x) = (-x[D/2:], x[:D/2]),
// with cos/sin the model's tables (positions x D), then times ``scale``.
#pragma once

#include <cstdint>

namespace pllava {

inline void rope(const float* x, const float* cos, const float* sin, int64_t D, float scale, float* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float a = x[d] * cos[d], b = x[d + half] * sin[d];
    out[d] = (a - b) * scale;
  }
  for (int64_t d = half; d < D; ++d) {
    const float a = x[d] * cos[d], b = x[d - half] * sin[d];
    out[d] = (a + b) * scale;
  }
}

}  // namespace pllava
