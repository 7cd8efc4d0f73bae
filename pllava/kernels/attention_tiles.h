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
//
// Late in a long prompt a chunk's tiles come from memory, not the CPU's caches, so each step
// of the products also prefetches one line of the next tile's rows: its reads spread over
// this tile's work. Issued all at once before the tile (512 prefetches for 64 rows of keys and
// values at 64 floats), the prefetches stalled the core until most had arrived, so the reads
// and the products took turns. And where a tile's keys lie one after another (within one cache
// block) at a width known when compiled, the products address every key from one register:
// with a pointer per key, the 16 pointers a step reads did not fit the registers beside the 16
// sums and were reloaded from the stack. Measured on a 2-core Xeon, the 12 layers of the
// benchmark model (16 heads of 64) against the kernel before: 16 rows at position 2400
// 20.0 -> 16.3 ms, 32 rows 27.2 -> 23.5 ms, 256 rows 164 -> 161 ms (there the products, not
// the reads, take the time).
#pragma once

#include <cstdint>

#include "vec.h"

namespace pllava::tiles {

constexpr int kKeys = 64;          // key positions per tile
constexpr float kNone = -1e30f;    // a masked score (finite: no inf - inf)

// A tile's rows where they lie: ``rows[t]`` is row t's first float.
struct ScatteredRows {
  const float* const* rows;
  const float* operator[](int t) const { return rows[t]; }
  // column d of rows t0, t0 + 1, ...
  struct Column {
    const float* const* rows;
    int64_t d;
    float operator[](int t) const { return rows[t][d]; }
  };
  Column column(int t0, int64_t d) const { return {rows + t0, d}; }
};

// A tile's rows one after another, D floats apart (D known when compiled).
template <int64_t D>
struct ConsecutiveRows {
  const float* first;
  const float* operator[](int t) const { return first + t * D; }
  struct Column {
    const float* at;
    float operator[](int t) const { return at[t * D]; }
  };
  Column column(int t0, int64_t d) const {
    const float* at = first + t0 * D + d;
    asm("" : "+r"(at));  // hides at's relation to the last step's: one register, rows at fixed offsets
    return {at};
  }
};

// work(rows) with the tile's rows as ConsecutiveRows where they are (``consecutive``) and the
// width is one compiled for (64, 128: the served models' head widths), else as ScatteredRows
template <typename Work>
void with_rows(bool consecutive, int64_t D, const float* const* rows, const Work& work) {
  if (consecutive && D == 64) {
    work(ConsecutiveRows<64>{rows[0]});
  } else if (consecutive && D == 128) {
    work(ConsecutiveRows<128>{rows[0]});
  } else {
    work(ScatteredRows{rows});
  }
}

template <int V>
struct Tiles {
  static constexpr int kRowVecs = V;
  static constexpr int kRows = V * kLanes;
  static constexpr int kKeyGroup = 16 / V;  // keys whose scores stay in registers together
  static constexpr int kDimGroup = 16 / V;  // output columns whose sums stay in registers together

  // scores[t][.] = keys_t . q for the tile's first ``count`` keys (rounded up to kKeyGroup:
  // ``keys`` must hold that many rows), qt[d][row] the queries transposed; each step
  // prefetches a line of ``next``'s rows (kKeys of them: the next tile's)
  template <typename Rows>
  static void scores(const float* qt, Rows keys, int64_t D, float* scores, int count, const float* const* next) {
    for (int t0 = 0; t0 < count; t0 += kKeyGroup) {
      v16 acc[kKeyGroup][V] = {};
      for (int64_t d = 0; d < D; ++d) {  // rows t0.. of next, a line per step: D / kLanes lines each
        if (d % kLanes < kKeyGroup) __builtin_prefetch(next[t0 + d % kLanes] + d / kLanes * kLanes);
        v16 q[V];
        for (int c = 0; c < V; ++c) q[c] = load(qt + d * kRows + c * kLanes);
        const auto column = keys.column(t0, d);
        for (int t = 0; t < kKeyGroup; ++t) {
          const v16 k = splat(column[t]);
          for (int c = 0; c < V; ++c) acc[t][c] += k * q[c];
        }
      }
      for (int t = 0; t < kKeyGroup; ++t)
        for (int c = 0; c < V; ++c) store(scores + (t0 + t) * kRows + c * kLanes, acc[t][c]);
    }
  }

  // sums[d][.] = sums[d][.] * corr + sum_t probs[t][.] v_t[d] over the tile's first ``count``
  // keys, prefetching ``next`` as scores() does
  template <typename Rows>
  static void values(const float* probs, Rows values, int64_t D, const v16* corr, float* sums, int count,
                     const float* const* next) {
    for (int64_t d0 = 0; d0 < D; d0 += kDimGroup) {
      v16 acc[kDimGroup][V];
      for (int e = 0; e < kDimGroup; ++e)
        for (int c = 0; c < V; ++c) acc[e][c] = load(sums + (d0 + e) * kRows + c * kLanes) * corr[c];
      const bool fetch = d0 % kLanes == 0;  // line d0 / kLanes of each row of next
      for (int t = 0; t < count; ++t) {
        if (fetch) __builtin_prefetch(next[t] + d0);
        v16 p[V];
        for (int c = 0; c < V; ++c) p[c] = load(probs + t * kRows + c * kLanes);
        const float* row = values[t] + d0;
        for (int e = 0; e < kDimGroup; ++e) {
          const v16 v = splat(row[e]);
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
