// FullAttention: the vision tower's attention (every query over every key of its frame, no
// mask), a MindSpore "aot" custom op for the CPU (see pllava/cpu_kernels.py).
//
// Why: made of MindSpore's ops, each CLIP layer's attention transposed q, k and v to heads
// first, made every score of a frame (L x L per head, 577 x 577 at 336 px) in one product,
// passed over them for the softmax and again for the second product, and transposed back:
// about a quarter of the tower's time (16 frames of the benchmark CLIP: 3.9 s with the
// attention left out against 5.1 s, measured on a busy host). Measured (2 cores, 2 frames of 8
// heads x 577 x 64): 9.2 ms against 26 ms for MindSpore's ops run eagerly; 16 frames through
// the compiled tower and projector 3.0 -> 2.8 s. Here each work item takes 32
// query rows of one head of one frame, reads the keys and values where the projections left
// them, in tiles with the softmax kept running across tiles (attention_tiles.h, as the
// prefill kernel), and writes its rows' output in place: no score matrix, no transposes.
//
// Inputs:  q, k, v (N, L, H, D) float32   the projections' outputs, heads split off
//          scale (1,) float32             applied to q.k
// Output:  (N, L, H, D) float32
// D must be a multiple of 16; errors are nonzero return codes.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention_tiles.h"
#include "parallel.h"
#include "vec.h"

namespace {

using pllava::kLanes;
using pllava::splat;
using pllava::v16;
using pllava::tiles::kKeys;
using pllava::tiles::ScatteredRows;
using Tiles = pllava::tiles::Tiles<2>;  // 32 query rows per work item
constexpr int kRows = Tiles::kRows;
constexpr int kRowVecs = Tiles::kRowVecs;
using RunningSoftmax = Tiles::RunningSoftmax;

bool is_float32(const char* dtype) { return std::strcmp(dtype, "float32") == 0; }

}  // namespace

extern "C" int FullAttention(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                             void* stream, void* extra) {
  (void)stream;
  (void)extra;
  if (nparam != 5) return 1;
  for (int i : {0, 1, 2, 4})
    if (ndims[i] != 4 || !is_float32(dtypes[i])) return 2;
  if (ndims[3] != 1 || !is_float32(dtypes[3])) return 2;
  const int64_t N = shapes[0][0], L = shapes[0][1], H = shapes[0][2], D = shapes[0][3];
  for (int i : {1, 2, 4})
    for (int a = 0; a < 4; ++a)
      if (shapes[i][a] != shapes[0][a]) return 3;
  if (D % kLanes != 0 || L < 1) return 4;
  const float* q = static_cast<const float*>(params[0]);
  const float* k = static_cast<const float*>(params[1]);
  const float* v = static_cast<const float*>(params[2]);
  const float scale = *static_cast<const float*>(params[3]);
  float* out = static_cast<float*>(params[4]);
  const int64_t runs = (L + kRows - 1) / kRows, row = H * D;  // floats between two positions
  pllava::parallel_for(N * H * runs, [&](int64_t item) {
    const int64_t n = item / (H * runs), h = item / runs % H, l0 = item % runs * kRows;
    const int64_t nq = std::min<int64_t>(kRows, L - l0);
    const float* frame_q = q + n * L * row + h * D;
    const float* frame_k = k + n * L * row + h * D;
    const float* frame_v = v + n * L * row + h * D;
    std::vector<float> qt(D * kRows, 0.f), sums(D * kRows, 0.f), scores(kKeys * kRows), zeros(D, 0.f);
    // this tile's rows of keys and values, and the next tile's (prefetched as this one is worked on)
    std::vector<const float*> krow(kKeys), vrow(kKeys), knext(kKeys), vnext(kKeys);
    const auto rows_of = [&](int64_t p0, const float** keys, const float** values) {
      for (int t = 0; t < kKeys; ++t) {  // past the frame's last key: zeros, masked
        keys[t] = p0 + t < L ? frame_k + (p0 + t) * row : zeros.data();
        values[t] = p0 + t < L ? frame_v + (p0 + t) * row : zeros.data();
      }
    };
    for (int64_t i = 0; i < nq; ++i)  // the rows transposed and scaled (rows past L stay zeros)
      for (int64_t d = 0; d < D; ++d) qt[d * kRows + i] = frame_q[(l0 + i) * row + d] * scale;
    RunningSoftmax softmax;
    v16 corr[kRowVecs];
    rows_of(0, knext.data(), vnext.data());
    for (int64_t p0 = 0; p0 < L; p0 += kKeys) {
      krow.swap(knext);
      vrow.swap(vnext);
      rows_of(p0 + kKeys, knext.data(), vnext.data());
      const int keys = static_cast<int>(std::min<int64_t>(kKeys, L - p0));  // the tile's real keys; the rest masked
      Tiles::scores(qt.data(), ScatteredRows{krow.data()}, D, scores.data(), keys, knext.data());
      softmax.exponentiate(scores.data(), keys < kKeys, [&](int t, int) {
        return splat(static_cast<float>(t)) < splat(static_cast<float>(keys));
      }, corr);
      Tiles::values(scores.data(), ScatteredRows{vrow.data()}, D, corr, sums.data(), keys, vnext.data());
    }
    for (int64_t i = 0; i < nq; ++i) {
      const float inv = 1.f / softmax.total[i / kLanes][i % kLanes];
      float* dst = out + ((n * L + l0 + i) * H + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = sums[d * kRows + i] * inv;
    }
  });
  return 0;
}
