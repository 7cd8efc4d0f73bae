// Attention over the KV cache blocks as they are stored: MindSpore "aot" custom ops for the
// CPU (see pllava/cpu_kernels.py). DecodeAttention does a decode step's attention
// (prefill_attention.cc a prefill chunk's).
//
// Block j of a layer's cache is 2-D, (slots * kv_heads * rows_j, head_dim): the rows of one
// (slot, kv head) are contiguous by position. MindSpore copies a written Parameter to view it
// as (slots, kv_heads, rows, head_dim) for BatchMatMul; these ops read the rows in place, and
// a decode step only each sequence's own positions, so it reads what the live tokens need.
//
// DecodeAttention writes each query row's new key and value into its block, then attends.
// Inputs:  q (B, KVH, G, D) float32     queries, G = heads per kv head
//          k, v (B, KVH, D) float32     the new keys and values, written at each row's position
//          positions (B,) int32         each row's position; -1: a dummy row (no write, zeros out)
//          slots (B,) int32             the cache slot of each row
//          scale (1,) float32           applied to q.k
//          block_rows (J,) int32        rows of each block per (slot, kv head): positions + 1 spare
//          k_0, v_0, k_1, v_1, ...      the blocks, each (slots * KVH * rows_j, D) float32, written in
//                                       place (the graph hands over the cache Parameters themselves)
// Output:  (B, KVH, G, D) float32       softmax(scale * q.k) . v over positions 0..pos, in fp32
//
// Block j covers positions [start_j, start_j + rows_j - 1) with start_0 = 0; the last row of
// each (slot, head) is the spare row, where a prefill chunk's scatter puts the writes that
// belong to no position of the block. A position past the last block is an error (7).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"

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

bool is(const char* dtype, const char* name) { return std::strcmp(dtype, name) == 0; }

}  // namespace

extern "C" int DecodeAttention(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                               void* stream, void* extra) {
  (void)stream;
  (void)extra;
  if (nparam < 10 || (nparam - 8) % 2 != 0) return 1;
  const int nblocks = (nparam - 8) / 2;
  const int out_index = nparam - 1;
  if (ndims[0] != 4 || ndims[1] != 3 || ndims[2] != 3 || ndims[3] != 1 || ndims[4] != 1 || ndims[5] != 1 ||
      ndims[6] != 1 || ndims[out_index] != 4)
    return 2;
  if (!is(dtypes[0], "float32") || !is(dtypes[1], "float32") || !is(dtypes[2], "float32") ||
      !is(dtypes[3], "int32") || !is(dtypes[4], "int32") || !is(dtypes[5], "float32") || !is(dtypes[6], "int32") ||
      !is(dtypes[out_index], "float32"))
    return 3;
  const int64_t B = shapes[0][0], KVH = shapes[0][1], G = shapes[0][2], D = shapes[0][3];
  for (int i = 1; i <= 2; ++i)
    if (shapes[i][0] != B || shapes[i][1] != KVH || shapes[i][2] != D) return 4;
  if (shapes[3][0] != B || shapes[4][0] != B || shapes[6][0] != nblocks) return 4;
  const int32_t* block_rows = static_cast<const int32_t*>(params[6]);
  // block j holds slots * KVH * rows_j rows: positions [start_j, start_j + rows_j - 1) of each
  // (slot, kv head), then the spare row
  std::vector<int64_t> rows(nblocks), block_start(nblocks + 1, 0);
  int64_t S = -1;
  for (int j = 0; j < nblocks; ++j) {
    const int k = 7 + 2 * j;
    rows[j] = block_rows[j];
    if (rows[j] < 2 || ndims[k] != 2 || ndims[k + 1] != 2 || shapes[k][1] != D || shapes[k + 1][1] != D ||
        shapes[k][0] != shapes[k + 1][0] || !is(dtypes[k], "float32") || !is(dtypes[k + 1], "float32") ||
        shapes[k][0] % (KVH * rows[j]) != 0)
      return 5;
    const int64_t slots_here = shapes[k][0] / (KVH * rows[j]);
    if (S >= 0 && slots_here != S) return 6;
    S = slots_here;
    block_start[j + 1] = block_start[j] + rows[j] - 1;
  }
  const float* q = static_cast<const float*>(params[0]);
  const float* k_new = static_cast<const float*>(params[1]);
  const float* v_new = static_cast<const float*>(params[2]);
  const int32_t* positions = static_cast<const int32_t*>(params[3]);
  const int32_t* slots = static_cast<const int32_t*>(params[4]);
  const float scale = static_cast<const float*>(params[5])[0];
  float* out = static_cast<float*>(params[out_index]);
  for (int64_t b = 0; b < B; ++b)
    if (slots[b] < 0 || slots[b] >= S || positions[b] >= block_start[nblocks]) return 7;
  // the cache row of (row b, kv head h, position p): its block's rows of (slot, head), then p's
  auto row_of = [&](int64_t b, int64_t h, int64_t p, int64_t* j) {
    while (p >= block_start[*j + 1]) ++*j;
    return (slots[b] * KVH + h) * rows[*j] + (p - block_start[*j]);
  };
  auto block = [&](int64_t j, int which) { return static_cast<float*>(params[7 + 2 * j + which]); };
  // the new keys and values first (a row repeated to pad the batch writes the same values)
  for (int64_t b = 0; b < B; ++b) {
    if (positions[b] < 0) continue;  // a dummy row: writes nothing, attends to nothing
    for (int64_t h = 0; h < KVH; ++h) {
      int64_t j = 0;
      const int64_t r = row_of(b, h, positions[b], &j);
      std::memcpy(block(j, 0) + r * D, k_new + (b * KVH + h) * D, sizeof(float) * D);
      std::memcpy(block(j, 1) + r * D, v_new + (b * KVH + h) * D, sizeof(float) * D);
    }
  }
  pllava::parallel_for(B * KVH, [&](int64_t bh) {
    const int64_t b = bh / KVH, h = bh % KVH;
    const int64_t n = static_cast<int64_t>(positions[b]) + 1;  // positions 0..pos are visible
    const float* qs = q + bh * G * D;
    float* acc = out + bh * G * D;
    std::memset(acc, 0, sizeof(float) * G * D);
    if (n <= 0) return;
    std::vector<float> score(G * n);
    for (int64_t p = 0, j = 0; p < n; ++p) {
      const int64_t r = row_of(b, h, p, &j);  // moves j to p's block first
      const float* k = block(j, 0) + r * D;
      for (int64_t g = 0; g < G; ++g) score[g * n + p] = dot(qs + g * D, k, D) * scale;
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
        const int64_t r = row_of(b, h, p, &j);
        axpy(s[p] * inv_sum, block(j, 1) + r * D, acc + g * D, D);
      }
    }
  });
  return 0;
}
