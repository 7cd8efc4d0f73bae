// The tiles of attention shared by the prefill chunk's and the vision tower's kernels
// (prefill_attention.cc, full_attention.cc): for a work item of up to ``Tiles<V>::kRows`` query
// rows (kept transposed, [column][row], so that each product is vectorised over the rows), the
// scores of a tile of kKeys keys, and the running sum of the values weighted by their
// probabilities.
//
// V, the rows in vectors, is 2 (32 rows) for long chunks and frames, 1 (16 rows) for a chunk of
// 16 rows or fewer, whose 32-row items were half padding (16 rows at position 2560 of the
// benchmark model: 0.72x the time per layer). Each keeps 16 sums in registers: 16 / V keys (or
// output columns) by V row vectors.
#pragma once

#include <cstdint>

#include "vec.h"

namespace pllava::tiles {

constexpr int kKeys = 64;          // key positions per tile
constexpr float kNone = -1e30f;    // a masked score (finite: no inf - inf)

template <int V>
struct Tiles {
  static constexpr int kRowVecs = V;
  static constexpr int kRows = V * kLanes;
  static constexpr int kKeyGroup = 16 / V;  // keys whose scores stay in registers together
  static constexpr int kDimGroup = 16 / V;  // output columns whose sums stay in registers together

  // scores[t][.] = keys_t . q for the tile's first ``count`` keys (rounded up to kKeyGroup),
  // qt[d][row] the queries transposed
  static void scores(const float* qt, const float* const* keys, int64_t D, float* scores, int count = kKeys) {
    for (int t0 = 0; t0 < count; t0 += kKeyGroup) {
      v16 acc[kKeyGroup][V] = {};
      for (int64_t d = 0; d < D; ++d) {
        v16 q[V];
        for (int c = 0; c < V; ++c) q[c] = load(qt + d * kRows + c * kLanes);
        for (int t = 0; t < kKeyGroup; ++t) {
          const v16 k = splat(keys[t0 + t][d]);
          for (int c = 0; c < V; ++c) acc[t][c] += k * q[c];
        }
      }
      for (int t = 0; t < kKeyGroup; ++t)
        for (int c = 0; c < V; ++c) store(scores + (t0 + t) * kRows + c * kLanes, acc[t][c]);
    }
  }

  // sums[d][.] = sums[d][.] * corr + sum_t probs[t][.] v_t[d] over the tile's first ``count`` keys
  static void values(const float* probs, const float* const* values, int64_t D, const v16* corr, float* sums,
                     int count = kKeys) {
    for (int64_t d0 = 0; d0 < D; d0 += kDimGroup) {
      v16 acc[kDimGroup][V];
      for (int e = 0; e < kDimGroup; ++e)
        for (int c = 0; c < V; ++c) acc[e][c] = load(sums + (d0 + e) * kRows + c * kLanes) * corr[c];
      for (int t = 0; t < count; ++t) {
        v16 p[V];
        for (int c = 0; c < V; ++c) p[c] = load(probs + t * kRows + c * kLanes);
        for (int e = 0; e < kDimGroup; ++e) {
          const v16 v = splat(values[t][d0 + e]);
          for (int c = 0; c < V; ++c) acc[e][c] += v * p[c];
        }
      }
      for (int e = 0; e < kDimGroup; ++e)
        for (int c = 0; c < V; ++c) store(sums + (d0 + e) * kRows + c * kLanes, acc[e][c]);
    }
  }

  // The softmax of a work item's rows kept running across tiles: each row's largest score so
  // far and its sum of e^(score - largest).
  struct RunningSoftmax {
    v16 best[V], total[V];

    RunningSoftmax() {
      for (int c = 0; c < V; ++c) best[c] = splat(kNone), total[c] = v16{};
    }

    // A tile's scores -> e^(score - the new largest) in place, and ``corr``: the factor that
    // rescales the sums so far. With ``masked``, ``visible(t, c)`` (a lane mask) hides keys:
    // their probability is 0.
    template <typename Visible>
    void exponentiate(float* scores, bool masked, const Visible& visible, v16* corr) {
      v16 top[V];
      for (int c = 0; c < V; ++c) top[c] = best[c];
      for (int t = 0; t < kKeys; ++t)
        for (int c = 0; c < V; ++c) {
          float* s = scores + t * kRows + c * kLanes;
          v16 x = load(s);
          if (masked) {
            x = visible(t, c) ? x : splat(kNone);
            store(s, x);
          }
          top[c] = max16(top[c], x);
        }
      for (int c = 0; c < V; ++c) {
        corr[c] = exp16(best[c] - top[c]);
        best[c] = top[c];
        total[c] *= corr[c];
      }
      for (int t = 0; t < kKeys; ++t)
        for (int c = 0; c < V; ++c) {
          float* s = scores + t * kRows + c * kLanes;
          const v16 x = load(s);
          v16 e = exp16(x - best[c]);
          if (masked) e = x > splat(kNone) ? e : v16{};
          store(s, e);
          total[c] += e;
        }
    }
  };
};

}  // namespace pllava::tiles
