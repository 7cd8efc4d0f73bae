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
// block, then attends over the row's positions 0..pos: one pass over the keys for the scores,
// a softmax over them, one pass over the values. Inputs and output: attention_args.h, qkv
// (B, H + 2 KVH, D) and positions (B,); errors are nonzero return codes.
//
// A step reads every key and value of every live sequence once and does two multiply-adds
// with each, so it should run at the memory's speed. Where D is a multiple of 16 (AVX-512)
// the scores of 16 positions are made together, their lane sums folded into one vector by
// shuffles (a dot product per position ended in a chain of 16 scalar adds), the softmax's
// exponentials are taken 16 at a time (vec.h), and the weighted values are summed in
// registers across positions (a sum kept in memory waited on its own store at every
// position). Measured on the benchmark model's shapes (12 layers, 8 streams, 16 heads x 64,
// the kernel alone, 2-core AMD EPYC that reads ~62-68 GB/s): at position 700 21.7-23.2 ->
// 8.6-14.5 ms (24 -> 38-64 GB/s), at 2700 71-72 -> 32-50 ms.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "attention_args.h"
#include "parallel.h"
#include "rope.h"
#include "vec.h"

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

#if defined(__AVX512F__)
// Lane l of the result: the sum of the lanes of a[l], for 16 vectors. Each level adds pairs
// of vectors that hold the partial sums of 1, 2, 4, 8 sources, halving their count.
inline __m512 lane_sums(__m512 a[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // lane l: a[2i + l % 2]
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // lane l: a[4i + l % 4] (pairs of floats moved as doubles)
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lane m: a[8i + 4 (m / 2) + l % 4], halves
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88), _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xdd));
}
#endif

// scores[i] = q . keys[i] for ``count`` rows of D floats, contiguous
void dots(const float* q, const float* keys, int64_t count, int64_t D, float* scores) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    for (; i + 16 <= count; i += 16) {
      const float* k = keys + i * D;
      __m512 acc[16];
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 qv = _mm512_loadu_ps(q + d);
        for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + r * D + d), acc[r]);
      }
      _mm512_storeu_ps(scores + i, lane_sums(acc));
    }
  }
#endif
  for (; i < count; ++i) scores[i] = dot(q, keys + i * D, D);
}

#if defined(__AVX512F__)
// acc[0..16 V) += sum_i w[i] values[i][0..16 V), rows D apart: the sums in registers, two
// sets (even and odd rows) so that each add waits on the one two rows back
template <int V>
void weighted_rows(const float* w, const float* values, int64_t count, int64_t D, float* acc) {
  __m512 even[V], odd[V];
  for (int c = 0; c < V; ++c) even[c] = _mm512_loadu_ps(acc + 16 * c), odd[c] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 2 <= count; i += 2) {
    const __m512 w0 = _mm512_set1_ps(w[i]), w1 = _mm512_set1_ps(w[i + 1]);
    const float* v = values + i * D;
    for (int c = 0; c < V; ++c) {
      even[c] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(v + 16 * c), even[c]);
      odd[c] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(v + D + 16 * c), odd[c]);
    }
  }
  if (i < count) {
    const __m512 w0 = _mm512_set1_ps(w[i]);
    for (int c = 0; c < V; ++c) even[c] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(values + i * D + 16 * c), even[c]);
  }
  for (int c = 0; c < V; ++c) _mm512_storeu_ps(acc + 16 * c, _mm512_add_ps(even[c], odd[c]));
}
#endif

// acc[0..D) += sum_i w[i] values[i] for ``count`` rows of D floats, contiguous
void weighted_sum(const float* w, const float* values, int64_t count, int64_t D, float* acc) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    for (int64_t d = 0; d < D;) {
      const int64_t left = (D - d) / 16;
      if (left >= 8) {
        weighted_rows<8>(w, values + d, count, D, acc + d), d += 128;
      } else if (left >= 4) {
        weighted_rows<4>(w, values + d, count, D, acc + d), d += 64;
      } else if (left >= 2) {
        weighted_rows<2>(w, values + d, count, D, acc + d), d += 32;
      } else {
        weighted_rows<1>(w, values + d, count, D, acc + d), d += 16;
      }
    }
    return;
  }
#endif
  for (int64_t i = 0; i < count; ++i) axpy(w[i], values + i * D, acc, D);
}

// s[0..n) -> e^(s - max s); returns their sum
float exponentiate(float* s, int64_t n) {
  using pllava::v16;
  const float best = *std::max_element(s, s + n);
  v16 total{};
  int64_t i = 0;
  for (; i + pllava::kLanes <= n; i += pllava::kLanes) {
    const v16 e = pllava::exp16(pllava::load(s + i) - pllava::splat(best));
    pllava::store(s + i, e);
    total += e;
  }
  float sum = 0.f;
  for (int l = 0; l < pllava::kLanes; ++l) sum += total[l];
  if (i < n) {  // the last partial vector, padded with e^-inf's stand-in and not counted
    float tail[pllava::kLanes];
    for (int l = 0; l < pllava::kLanes; ++l) tail[l] = i + l < n ? s[i + l] - best : -100.f;
    const v16 e = pllava::exp16(pllava::load(tail));
    for (int64_t l = 0; i + l < n; ++l) s[i + l] = e[l], sum += e[l];
  }
  return sum;
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
  // Work items head by head, each head's rows one after another: rows that read their first
  // positions from one prefix slot find those keys and values in the CPU's caches after the
  // first of them (8 streams at position 900 with 260 shared: 56-58 -> 52 ms a step).
  pllava::parallel_for(a.B * KVH, [&](int64_t item) {
    const int64_t b = item % a.B, h = item / a.B, bh = b * KVH + h;
    const int64_t n = static_cast<int64_t>(a.positions[b]) + 1;  // positions 0..pos are visible
    float* acc = a.out + bh * G * D;
    std::memset(acc, 0, sizeof(float) * G * D);
    if (n <= 0) return;
    static thread_local std::vector<float> qs, score;  // kept between calls: no allocation per item
    qs.resize(G * D);
    score.resize(G * n);
    for (int64_t g = 0; g < G; ++g)  // the queries rotated and scaled
      pllava::rope(a.head(b, 0, h * G + g), a.cos + (n - 1) * D, a.sin + (n - 1) * D, D, a.scale, &qs[g * D]);
    // the positions lie in runs of contiguous rows: the first ``shared`` of block 0 in the
    // prefix slot, then one per block j below n in the row's own slot: the keys (which 0) or
    // values (1) of a run, where it starts, and its length
    const int64_t shared = a.prefix_slot(b) == a.slot(b) ? 0 : std::min(n, a.prefix_rows(b));
    const auto prefix = [&](int which) { return a.block(0, which) + a.slot_row(a.prefix_slot(b), h, 0) * D; };
    const auto start = [&](int64_t j) { return j == 0 ? shared : a.block_start[j]; };
    const auto run = [&](int64_t j, int which) {
      return a.block(j, which) + (a.first_row(b, h, j) + start(j) - a.block_start[j]) * D;
    };
    const auto run_length = [&](int64_t j) { return std::min(n, a.block_start[j + 1]) - start(j); };
    for (int64_t g = 0; g < G && shared > 0; ++g) dots(&qs[g * D], prefix(0), shared, D, &score[g * n]);
    for (int64_t j = 0; a.block_start[j] < n; ++j)
      for (int64_t g = 0; g < G; ++g) dots(&qs[g * D], run(j, 0), run_length(j), D, &score[g * n + start(j)]);
    for (int64_t g = 0; g < G; ++g) {
      float* s = score.data() + g * n;
      const float inv_sum = 1.f / exponentiate(s, n);
      if (shared > 0) weighted_sum(s, prefix(1), shared, D, acc + g * D);
      for (int64_t j = 0; a.block_start[j] < n; ++j)
        weighted_sum(s + start(j), run(j, 1), run_length(j), D, acc + g * D);
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] *= inv_sum;
    }
  });
  return 0;
}
