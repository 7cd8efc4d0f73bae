// Attention over the KV cache blocks as they are stored: MindSpore "aot" custom ops for the
// CPU (see pllava/cpu_kernels.py). DecodeAttention does a decode step's attention;
// GatherSlotRows (at the end) copies a prefill chunk's keys or values into one operand.
//
// Block j of a layer's cache is 2-D, (slots * kv_heads * rows_j, head_dim): the rows of one
// (slot, kv head) are contiguous by position. MindSpore copies a written Parameter to view it
// as (slots, kv_heads, rows, head_dim) for BatchMatMul; this op reads the rows in place, and
// only the rows the mask leaves visible, so a step reads what the live tokens need.
//
// Inputs:  q (B, KVH, G, D) float32   queries, G = heads per kv head
//          mask (B, P) float32         additive mask over the P = sum(rows_j) rows read
//          slots (B,) int32            the cache slot of each query row
//          scale (1,) float32          applied to q.k before the mask
//          k_0, v_0, k_1, v_1, ...     the blocks, each (slots * KVH * rows_j, D) float32
// Output:  (B, KVH, G, D) float32      softmax(scale * q.k + mask) . v, in fp32
//
// Rows whose mask is at most kMasked are skipped (they would get probability 0); a query row
// with no visible row gets zeros.
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr float kMasked = -1e8f;

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

// The CPUs this process may run on. Threads are started per call and joined, not kept
// spinning in a pool (an OpenMP pool's spin-wait took the cores from MindSpore's next ops:
// an 8-stream step ran 116 ms against 72 with OMP_WAIT_POLICY=passive).
int64_t usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Run body(i) for i in [0, n), split in contiguous ranges over the usable CPUs.
template <typename Body>
void parallel_for(int64_t n, const Body& body) {
  const int64_t workers = std::min<int64_t>(usable_cpus(), n);
  auto range = [&](int64_t w) {
    for (int64_t i = n * w / workers, end = n * (w + 1) / workers; i < end; ++i) body(i);
  };
  std::vector<std::thread> threads;
  for (int64_t w = 1; w < workers; ++w) threads.emplace_back(range, w);
  range(0);
  for (auto& t : threads) t.join();
}

}  // namespace

extern "C" int DecodeAttention(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                               void* stream, void* extra) {
  (void)stream;
  (void)extra;
  const int nblocks = (nparam - 5) / 2;
  if (nparam < 7 || (nparam - 5) % 2 != 0) return 1;
  const int out_index = nparam - 1;
  if (ndims[0] != 4 || ndims[1] != 2 || ndims[2] != 1 || ndims[out_index] != 4) return 2;
  if (!is(dtypes[0], "float32") || !is(dtypes[1], "float32") || !is(dtypes[2], "int32") ||
      !is(dtypes[3], "float32") || !is(dtypes[out_index], "float32"))
    return 3;
  const int64_t B = shapes[0][0], KVH = shapes[0][1], G = shapes[0][2], D = shapes[0][3];
  const int64_t P = shapes[1][1];
  if (shapes[1][0] != B || shapes[2][0] != B || P <= 0) return 4;
  int64_t total = 0;
  for (int j = 0; j < nblocks; ++j) {
    const int k = 4 + 2 * j;
    if (ndims[k] != 2 || ndims[k + 1] != 2 || shapes[k][1] != D || shapes[k + 1][1] != D ||
        shapes[k][0] != shapes[k + 1][0] || !is(dtypes[k], "float32") || !is(dtypes[k + 1], "float32"))
      return 5;
    total += shapes[k][0];
  }
  if (total % (KVH * P) != 0) return 6;
  const int64_t S = total / (KVH * P);  // cache slots
  std::vector<int64_t> rows(nblocks);
  int64_t sum_rows = 0;
  for (int j = 0; j < nblocks; ++j) {
    const int64_t n = shapes[4 + 2 * j][0];
    if (n % (S * KVH) != 0) return 7;
    rows[j] = n / (S * KVH);
    sum_rows += rows[j];
  }
  if (sum_rows != P) return 8;

  const float* q = static_cast<const float*>(params[0]);
  const float* mask = static_cast<const float*>(params[1]);
  const int32_t* slots = static_cast<const int32_t*>(params[2]);
  const float scale = static_cast<const float*>(params[3])[0];
  float* out = static_cast<float*>(params[out_index]);
  for (int64_t b = 0; b < B; ++b)
    if (slots[b] < 0 || slots[b] >= S) return 9;

  // The visible rows of each query row, found once per row (not once per head): a step at
  // a long context then costs what its sequences' own positions need.
  std::vector<int64_t> block_start(nblocks + 1, 0);
  for (int j = 0; j < nblocks; ++j) block_start[j + 1] = block_start[j] + rows[j];
  std::vector<std::vector<int32_t>> visible(B);
  for (int64_t b = 0; b < B; ++b) {
    const float* m = mask + b * P;
    for (int64_t p = 0; p < P; ++p)
      if (m[p] > kMasked) visible[b].push_back(static_cast<int32_t>(p));
  }

  parallel_for(B * KVH, [&](int64_t bh) {
    const int64_t b = bh / KVH, h = bh % KVH;
    const float* qs = q + bh * G * D;
    const float* m = mask + b * P;
    const std::vector<int32_t>& seen = visible[b];
    const int64_t n = static_cast<int64_t>(seen.size());
    float* acc = out + bh * G * D;
    std::memset(acc, 0, sizeof(float) * G * D);
    if (n == 0) return;  // nothing visible: zeros
    // where each visible row lies: its block's rows of this (slot, kv head), then the row
    std::vector<const float*> keys(n), values(n);
    for (int64_t i = 0, j = 0; i < n; ++i) {
      const int64_t p = seen[i];
      while (p >= block_start[j + 1]) ++j;
      const int64_t row = (slots[b] * KVH + h) * rows[j] + (p - block_start[j]);
      keys[i] = static_cast<const float*>(params[4 + 2 * j]) + row * D;
      values[i] = static_cast<const float*>(params[5 + 2 * j]) + row * D;
    }
    std::vector<float> score(G * n);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t g = 0; g < G; ++g) score[g * n + i] = dot(qs + g * D, keys[i], D) * scale + m[seen[i]];
    // softmax over the visible rows, per head, then the weighted values
    for (int64_t g = 0; g < G; ++g) {
      float* s = score.data() + g * n;
      const float best = *std::max_element(s, s + n);
      float total_exp = 0.f;
      for (int64_t i = 0; i < n; ++i) {
        s[i] = std::exp(s[i] - best);
        total_exp += s[i];
      }
      const float inv_sum = 1.f / total_exp;
      for (int64_t i = 0; i < n; ++i) axpy(s[i] * inv_sum, values[i], acc + g * D, D);
    }
  });
  return 0;
}

// GatherSlotRows: the rows of each query row's slot, every block in turn, into one operand:
// what ops.gather of each block followed by ops.concat made in two copies, in one.
//
// Inputs:  slots (B,) int32                   the cache slot of each row of the output
//          b_0, b_1, ...                      the blocks, each (slots * KVH * rows_j, D) float32
// Output:  (B, KVH, P, D) float32, P = sum(rows_j): block 0's rows of (slot, head), then block 1's...
extern "C" int GatherSlotRows(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                              void* stream, void* extra) {
  (void)stream;
  (void)extra;
  const int nblocks = nparam - 2;
  const int out_index = nparam - 1;
  if (nblocks < 1 || ndims[0] != 1 || ndims[out_index] != 4) return 1;
  if (!is(dtypes[0], "int32") || !is(dtypes[out_index], "float32")) return 2;
  const int64_t B = shapes[out_index][0], KVH = shapes[out_index][1], P = shapes[out_index][2],
                D = shapes[out_index][3];
  if (shapes[0][0] != B || KVH <= 0 || P <= 0) return 3;
  int64_t total = 0;
  for (int j = 0; j < nblocks; ++j) {
    if (ndims[1 + j] != 2 || shapes[1 + j][1] != D || !is(dtypes[1 + j], "float32")) return 4;
    total += shapes[1 + j][0];
  }
  if (total % (KVH * P) != 0) return 5;
  const int64_t S = total / (KVH * P);
  std::vector<int64_t> rows(nblocks), offset(nblocks);
  int64_t sum_rows = 0;
  for (int j = 0; j < nblocks; ++j) {
    if (shapes[1 + j][0] % (S * KVH) != 0) return 6;
    rows[j] = shapes[1 + j][0] / (S * KVH);
    offset[j] = sum_rows;
    sum_rows += rows[j];
  }
  if (sum_rows != P) return 7;
  const int32_t* slots = static_cast<const int32_t*>(params[0]);
  for (int64_t b = 0; b < B; ++b)
    if (slots[b] < 0 || slots[b] >= S) return 8;
  float* out = static_cast<float*>(params[out_index]);
  parallel_for(B * KVH * nblocks, [&](int64_t i) {
    const int64_t j = i % nblocks, bh = i / nblocks, b = bh / KVH, h = bh % KVH;
    const float* src = static_cast<const float*>(params[1 + j]) + (slots[b] * KVH + h) * rows[j] * D;
    std::memcpy(out + (bh * P + offset[j]) * D, src, sizeof(float) * rows[j] * D);
  });
  return 0;
}
