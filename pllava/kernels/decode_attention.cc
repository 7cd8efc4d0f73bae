// DecodeAttention: a decode step's attention over the KV cache blocks as they are stored, a
// MindSpore "aot" custom op for the CPU (see pllava/cpu_kernels.py, and attention_args.h for
// the cache layout; prefill_attention.cc does a prefill chunk's).
//
// MindSpore copies a written Parameter to view it as (slots, kv_heads, rows, head_dim) for
// BatchMatMul; this op reads the rows in place, and only each sequence's own positions, so a
// step reads what the live tokens need.
//
// DecodeAttention takes each row's queries, key and value as the fused q/k/v projection made
// them, applies RoPE at the row's position (rope.h), writes the key and value into the row's
// block, then attends over the row's positions 0..pos. Inputs and output: attention_args.h,
// qkv (B, H + 2 KVH, D) and positions (B,); errors are nonzero return codes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention_args.h"
#include "parallel.h"
#include "rope.h"

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

extern "C" int DecodeAttention(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                               void* stream, void* extra) {
  (void)stream;
  (void)extra;
  pllava::AttentionArgs a;
  if (const int error = pllava::parse_attention_args(nparam, params, ndims, shapes, dtypes, 3, &a)) return error;
  pllava::write_keys_values(a);
  const int64_t KVH = a.KVH, G = a.G, D = a.D;
  pllava::parallel_for(a.B * KVH, [&](int64_t bh) {
    const int64_t b = bh / KVH, h = bh % KVH;
    const int64_t n = static_cast<int64_t>(a.positions[b]) + 1;  // positions 0..pos are visible
    float* acc = a.out + bh * G * D;
    std::memset(acc, 0, sizeof(float) * G * D);
    if (n <= 0) return;
    std::vector<float> qs(G * D), score(G * n);  // the queries rotated and scaled
    for (int64_t g = 0; g < G; ++g)
      pllava::rope(a.head(b, 0, h * G + g), a.cos + (n - 1) * D, a.sin + (n - 1) * D, D, a.scale, &qs[g * D]);
    for (int64_t p = 0, j = 0; p < n; ++p) {
      const int64_t r = a.row_of(b, h, p, &j);  // moves j to p's block first
      const float* k = a.block(j, 0) + r * D;
      for (int64_t g = 0; g < G; ++g) score[g * n + p] = dot(&qs[g * D], k, D);
    }
    // softmax over the visible rows, per head, then the weighted values
    for (int64_t g = 0; g < G; ++g) {
      float* s = score.data() + g * n;
      const float best = *std::max_element(s, s + n);
      float total_exp = 0.f;
      for (int64_t p = 0; p < n; ++p) {
        s[p] = std::exp(s[p] - best);
        total_exp += s[p];
      }
      const float inv_sum = 1.f / total_exp;
      for (int64_t p = 0, j = 0; p < n; ++p) {
        const int64_t r = a.row_of(b, h, p, &j);
        axpy(s[p] * inv_sum, a.block(j, 1) + r * D, acc + g * D, D);
      }
    }
  });
  return 0;
}
