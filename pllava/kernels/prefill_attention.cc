// PrefillAttention: a prefill chunk's attention over the KV cache blocks as they are stored, a
// MindSpore "aot" custom op for the CPU (see pllava/cpu_kernels.py and decode_attention.cc for
// the block layout).
//
// Why: made of MindSpore's ops, a chunk's attention copied the slot's rows of every block up to
// the chunk's context bucket into one operand, made every score of that bucket (masked or not,
// L x P per head), then passed over them for the mask, the softmax and the second product, and
// each context bucket needed its own graph. This kernel writes the chunk's keys and values into the blocks, then for each
// query row reads only positions 0..its own, in tiles, with the softmax kept running across
// tiles (its maximum and sum per row, rescaling the partial output when the maximum grows), so
// no score matrix is ever stored and one graph serves every context. A 32-row chunk at
// positions 3000-3031 of the benchmark model ran 223 -> 126 ms (side by side); alone, the
// kernel runs at ~180 GFLOPS on this machine's kind (2 cores), the products vectorised over
// 32 query rows at a time.
//
// Inputs:  q (B, L, H, D) float32        queries, H = KVH * G heads (kv head h serves heads hG..hG+G-1)
//          k, v (B, L, KVH, D) float32   the chunk's keys and values, written at each row's position
//          positions (B, L) int32        each row's position; -1: a padding row (no write, zeros out)
//          slots (B,) int32              the cache slot of each sequence
//          scale (1,) float32            applied to q.k
//          block_rows (J,) int32         rows of each block per (slot, kv head): positions + 1 spare
//          k_0, v_0, k_1, v_1, ...       the blocks, each (slots * KVH * rows_j, D) float32
// Output:  (B, L, H, D) float32          softmax(scale * q.k) . v over positions 0..pos, in fp32
//
// D must be a multiple of 16; errors are nonzero return codes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "parallel.h"

namespace {

// 16 floats: one AVX-512 register where the CPU has it, else the compiler splits it.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
constexpr int kLanes = 16;
constexpr int kRowVecs = 2;                  // query rows per work item, in vectors: 32 rows
constexpr int kRows = kRowVecs * kLanes;
constexpr int kKeys = 64;                    // key positions per tile
constexpr int kKeyGroup = 8;                 // keys whose scores stay in registers together
constexpr int kDimGroup = 8;                 // output columns whose sums stay in registers together
constexpr float kNone = -1e30f;              // a masked score (finite: no inf - inf)

inline v16 load(const float* p) {
  v16 out;
  std::memcpy(&out, p, sizeof(out));
  return out;
}

inline void store(float* p, v16 value) { std::memcpy(p, &value, sizeof(value)); }

inline v16 splat(float x) {  // (v16{} + x would add 0 first: a scalar add per broadcast)
  return v16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

inline v16 max16(v16 a, v16 b) { return a > b ? a : b; }

// e^x for x <= 0 (under -87.3 it gives e^-87.3), to about 1e-7 relative: x = n ln2 + r with
// |r| <= ln2 / 2, e^r = 1 + r + r^2 p(r) with Cephes expf's degree-5 p, 2^n put in the
// exponent bits.
inline v16 exp16(v16 x) {
  x = max16(x, splat(-87.3f));
  const v16 shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v16 shifted = x * splat(1.44269504088896341f) + shifter;
  const v16 n = shifted - shifter;
  const v16 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  v16 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  v16i bits, shifter_bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  std::memcpy(&shifter_bits, &shifter, sizeof(shifter_bits));
  const v16i pow2 = ((bits - shifter_bits) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &pow2, sizeof(scale));
  return p * scale;
}

// Everything below runs over the work item's query rows as vectors (the "T" layouts are
// [column][row]): scores[t][row] for a tile of keys, sums[d][row] of the output.

// scores[t][.] = keys_t . q for the tile's keys, qt[d][row] the queries transposed
void tile_scores(const float* qt, const float* const* keys, int64_t D, float* scores) {
  for (int t0 = 0; t0 < kKeys; t0 += kKeyGroup) {
    v16 acc[kKeyGroup][kRowVecs] = {};
    for (int64_t d = 0; d < D; ++d) {
      v16 q[kRowVecs];
      for (int c = 0; c < kRowVecs; ++c) q[c] = load(qt + d * kRows + c * kLanes);
      for (int t = 0; t < kKeyGroup; ++t) {
        const v16 k = splat(keys[t0 + t][d]);
        for (int c = 0; c < kRowVecs; ++c) acc[t][c] += k * q[c];
      }
    }
    for (int t = 0; t < kKeyGroup; ++t)
      for (int c = 0; c < kRowVecs; ++c) store(scores + (t0 + t) * kRows + c * kLanes, acc[t][c]);
  }
}

// sums[d][.] = sums[d][.] * corr + sum_t probs[t][.] v_t[d]
void tile_values(const float* probs, const float* const* values, int64_t D, const v16* corr, float* sums) {
  for (int64_t d0 = 0; d0 < D; d0 += kDimGroup) {
    v16 acc[kDimGroup][kRowVecs];
    for (int e = 0; e < kDimGroup; ++e)
      for (int c = 0; c < kRowVecs; ++c) acc[e][c] = load(sums + (d0 + e) * kRows + c * kLanes) * corr[c];
    for (int t = 0; t < kKeys; ++t) {
      v16 p[kRowVecs];
      for (int c = 0; c < kRowVecs; ++c) p[c] = load(probs + t * kRows + c * kLanes);
      for (int e = 0; e < kDimGroup; ++e) {
        const v16 v = splat(values[t][d0 + e]);
        for (int c = 0; c < kRowVecs; ++c) acc[e][c] += v * p[c];
      }
    }
    for (int e = 0; e < kDimGroup; ++e)
      for (int c = 0; c < kRowVecs; ++c) store(sums + (d0 + e) * kRows + c * kLanes, acc[e][c]);
  }
}

bool is(const char* dtype, const char* name) { return std::strcmp(dtype, name) == 0; }

}  // namespace

extern "C" int PrefillAttention(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                void* stream, void* extra) {
  (void)stream;
  (void)extra;
  if (nparam < 10 || (nparam - 8) % 2 != 0) return 1;
  const int nblocks = (nparam - 8) / 2;
  const int out_index = nparam - 1;
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4 || ndims[3] != 2 || ndims[4] != 1 || ndims[5] != 1 ||
      ndims[6] != 1 || ndims[out_index] != 4)
    return 2;
  if (!is(dtypes[0], "float32") || !is(dtypes[1], "float32") || !is(dtypes[2], "float32") ||
      !is(dtypes[3], "int32") || !is(dtypes[4], "int32") || !is(dtypes[5], "float32") || !is(dtypes[6], "int32") ||
      !is(dtypes[out_index], "float32"))
    return 3;
  const int64_t B = shapes[0][0], L = shapes[0][1], H = shapes[0][2], D = shapes[0][3];
  const int64_t KVH = shapes[1][2];
  if (KVH <= 0 || H % KVH != 0 || D % kLanes != 0) return 4;
  const int64_t G = H / KVH;
  for (int i = 1; i <= 2; ++i)
    if (shapes[i][0] != B || shapes[i][1] != L || shapes[i][2] != KVH || shapes[i][3] != D) return 4;
  if (shapes[3][0] != B || shapes[3][1] != L || shapes[4][0] != B || shapes[6][0] != nblocks) return 4;
  const int32_t* block_rows = static_cast<const int32_t*>(params[6]);
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
  for (int64_t b = 0; b < B; ++b) {
    if (slots[b] < 0 || slots[b] >= S) return 7;
    for (int64_t l = 0; l < L; ++l)
      if (positions[b * L + l] >= block_start[nblocks]) return 7;
  }
  auto block = [&](int64_t j, int which) { return static_cast<float*>(params[7 + 2 * j + which]); };
  // the cache row of (sequence b, kv head h, position p) in its block j
  auto row_of = [&](int64_t b, int64_t h, int64_t p, int64_t* j) {
    while (p >= block_start[*j + 1]) ++*j;
    while (p < block_start[*j]) --*j;
    return (slots[b] * KVH + h) * rows[*j] + (p - block_start[*j]);
  };
  // the chunk's keys and values first: its rows attend to each other's
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l) {
      const int64_t p = positions[b * L + l];
      if (p < 0) continue;
      for (int64_t h = 0, j = 0; h < KVH; ++h) {
        const int64_t r = row_of(b, h, p, &j);
        std::memcpy(block(j, 0) + r * D, k_new + ((b * L + l) * KVH + h) * D, sizeof(float) * D);
        std::memcpy(block(j, 1) + r * D, v_new + ((b * L + l) * KVH + h) * D, sizeof(float) * D);
      }
    }
  // work items: (sequence, kv head, a run of positions whose G heads make <= kRows rows)
  const int64_t span = std::max<int64_t>(1, kRows / G);
  const int64_t runs = (L + span - 1) / span;
  pllava::parallel_for(B * KVH * runs, [&](int64_t item) {
    const int64_t b = item / (KVH * runs), h = item / runs % KVH, l0 = item % runs * span;
    const int64_t nq = (std::min(L, l0 + span) - l0) * G;
    // the rows (position l, head g) transposed, and their positions (-1: none, past nq too)
    std::vector<float> qt(D * kRows, 0.f), sums(D * kRows, 0.f), scores(kKeys * kRows), zeros(D, 0.f);
    std::vector<const float*> krow(kKeys), vrow(kKeys);
    v16 pos[kRowVecs];
    int64_t last = -1, first = std::numeric_limits<int64_t>::max();  // over the real rows
    for (int64_t i = 0; i < kRows; ++i) {
      int64_t p = -1;
      if (i < nq) {
        const int64_t l = l0 + i / G, g = i % G;
        const float* row = q + ((b * L + l) * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qt[d * kRows + i] = row[d] * scale;
        p = positions[b * L + l];
      }
      pos[i / kLanes][i % kLanes] = static_cast<float>(p);
      last = std::max(last, p);
      if (i < nq) first = std::min(first, p);
    }
    v16 best[kRowVecs], total[kRowVecs], corr[kRowVecs];
    for (int c = 0; c < kRowVecs; ++c) best[c] = splat(kNone), total[c] = v16{};
    for (int64_t p0 = 0, j = 0; p0 <= last; p0 += kKeys) {
      for (int t = 0; t < kKeys; ++t) {  // keys past the last position: zeros, masked
        if (p0 + t > last) {
          krow[t] = vrow[t] = zeros.data();
          continue;
        }
        const int64_t r = row_of(b, h, p0 + t, &j);
        krow[t] = block(j, 0) + r * D;
        vrow[t] = block(j, 1) + r * D;
      }
      tile_scores(qt.data(), krow.data(), D, scores.data());
      // running softmax: a row sees key p0 + t when p0 + t <= its position (every row sees
      // every key of a tile below the first position: no mask there)
      const bool masked = p0 + kKeys - 1 > first;
      v16 top[kRowVecs];
      for (int c = 0; c < kRowVecs; ++c) top[c] = best[c];
      for (int t = 0; t < kKeys; ++t)
        for (int c = 0; c < kRowVecs; ++c) {
          float* s = scores.data() + t * kRows + c * kLanes;
          v16 x = load(s);
          if (masked) {
            x = pos[c] >= splat(static_cast<float>(p0 + t)) ? x : splat(kNone);
            store(s, x);
          }
          top[c] = max16(top[c], x);
        }
      for (int c = 0; c < kRowVecs; ++c) {
        corr[c] = exp16(best[c] - top[c]);
        best[c] = top[c];
        total[c] *= corr[c];
      }
      for (int t = 0; t < kKeys; ++t)
        for (int c = 0; c < kRowVecs; ++c) {
          float* s = scores.data() + t * kRows + c * kLanes;
          const v16 x = load(s);
          v16 e = exp16(x - best[c]);
          if (masked) e = x > splat(kNone) ? e : v16{};
          store(s, e);
          total[c] += e;
        }
      tile_values(scores.data(), vrow.data(), D, corr, sums.data());
    }
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t l = l0 + i / G, g = i % G;
      float* dst = out + ((b * L + l) * H + h * G + g) * D;
      const float sum = total[i / kLanes][i % kLanes];
      const float inv = sum > 0.f ? 1.f / sum : 0.f;  // a padding row: zeros
      for (int64_t d = 0; d < D; ++d) dst[d] = sums[d * kRows + i] * inv;
    }
  });
  return 0;
}
