// PrefillAttention: a prefill chunk's attention over the KV cache blocks as they are stored, a
// MindSpore "aot" custom op for the CPU (see pllava/cpu_kernels.py, and attention_args.h for
// the cache layout).
//
// Why: made of MindSpore's ops, a chunk's attention (after RoPE's split, rotate, multiply and
// add ops, which this kernel applies itself) copied the slot's rows of every block up to the
// chunk's context bucket into one operand, made every score of that bucket (masked or not,
// L x P per head), then passed over them for the mask, the softmax and the second product, and
// each context bucket needed its own graph. This kernel writes the chunk's keys and values
// into the blocks, then for each query row reads only positions 0..its own, in tiles, with
// the softmax kept running across tiles (its maximum and sum per row, rescaling the partial
// output when the maximum grows), so no score matrix is ever stored and one graph serves
// every context. A 32-row chunk at positions 3000-3031 of the benchmark model ran 223 -> 126
// ms (side by side); alone, the kernel runs at ~180 GFLOPS on this machine's kind (2 cores),
// the products vectorised over 32 query rows at a time (16 for a chunk of 16 rows or fewer).
//
// Late in a long prompt the chunk reads far more cache than it computes on (16 rows at
// position 2560: ~21 MB of keys and values per layer), so while a tile is worked on the next
// tile's rows are prefetched, a line per step of its products (attention_tiles.h). Measured
// per layer, the two kernels alternating over cache rows not in the CPU's caches (2-core AMD
// EPYC): 16 rows at 2560 1.9 -> 1.0 ms (prefetch all at once before each tile 0.71x, 16-row
// items rather than 32 half empty 0.72x), 32 rows 0.82-0.86x (that prefetch); the prefetch
// spread over the products and whole tiles' keys addressed from one register, on a 2-core
// Xeon: 0.81x the time again at 16 rows, 0.86x at 32 (attention_tiles.h).
//
// Inputs and output: attention_args.h, qkv (B, L, H + 2 KVH, D) and positions (B, L); D must
// be a multiple of 16; errors are nonzero return codes.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention_args.h"
#include "attention_tiles.h"
#include "parallel.h"
#include "rope.h"
#include "vec.h"

namespace {

using pllava::kLanes;
using pllava::splat;
using pllava::v16;
using pllava::tiles::kKeys;
using pllava::tiles::with_rows;

// Every (sequence, kv head, run of positions) of the chunk as a work item of up to
// Tiles<V>::kRows query rows.
template <int V>
void attend(const pllava::AttentionArgs& a) {
  using Tiles = pllava::tiles::Tiles<V>;
  constexpr int kRows = Tiles::kRows;
  constexpr int kRowVecs = Tiles::kRowVecs;
  const int64_t L = a.L, KVH = a.KVH, G = a.G, D = a.D;
  // work items: (sequence, kv head, a run of positions whose G heads make <= kRows rows)
  const int64_t span = std::max<int64_t>(1, kRows / G);
  const int64_t runs = (L + span - 1) / span;
  pllava::parallel_for(a.B * KVH * runs, [&](int64_t item) {
    const int64_t b = item / (KVH * runs), h = item / runs % KVH, l0 = item % runs * span;
    const int64_t nq = (std::min(L, l0 + span) - l0) * G;
    // the rows (position l, head g) transposed, and their positions (-1: none, past nq too)
    std::vector<float> qt(D * kRows, 0.f), sums(D * kRows, 0.f), scores(kKeys * kRows), zeros(D, 0.f), rotated(D);
    // this tile's rows of keys and values, and the next tile's (prefetched as this one is worked on)
    std::vector<const float*> krow(kKeys), vrow(kKeys), knext(kKeys), vnext(kKeys);
    v16 pos[kRowVecs];
    int64_t last = -1, first = std::numeric_limits<int64_t>::max();  // over the real rows
    for (int64_t i = 0; i < kRows; ++i) {
      int64_t p = -1;
      if (i < nq) {
        const int64_t l = l0 + i / G, g = i % G;
        p = a.positions[b * L + l];
        if (p >= 0) {  // rotated and scaled (a padding row's stay zeros)
          pllava::rope(a.head(b, l, h * G + g), a.cos + p * D, a.sin + p * D, D, a.scale, rotated.data());
          for (int64_t d = 0; d < D; ++d) qt[d * kRows + i] = rotated[d];
        }
      }
      pos[i / kLanes][i % kLanes] = static_cast<float>(p);
      last = std::max(last, p);
      if (i < nq) first = std::min(first, p);
    }
    typename Tiles::RunningSoftmax softmax;
    v16 corr[kRowVecs];
    const auto rows_of = [&](int64_t p0, int64_t* j, const float** keys, const float** values) {
      for (int t = 0; t < kKeys; ++t) {  // keys past the last position: zeros, masked
        if (p0 + t > last) {
          keys[t] = values[t] = zeros.data();
          continue;
        }
        const int64_t r = a.row_of(b, h, p0 + t, j);
        keys[t] = a.block(*j, 0) + r * D;
        values[t] = a.block(*j, 1) + r * D;
      }
    };
    int64_t j = 0;  // the block of the latest row found (rows are found in order)
    rows_of(0, &j, knext.data(), vnext.data());
    for (int64_t p0 = 0; p0 <= last; p0 += kKeys) {
      krow.swap(knext);
      vrow.swap(vnext);
      rows_of(p0 + kKeys, &j, knext.data(), vnext.data());
      const int count = static_cast<int>(std::min<int64_t>(kKeys, last - p0 + 1));  // the keys to read
      // a whole tile within one block: its rows one after another (the values lie as the keys do)
      const bool consecutive = count == kKeys && krow[kKeys - 1] == krow[0] + (kKeys - 1) * D;
      with_rows(consecutive, D, krow.data(), [&](auto keys) {  // (the rest of the tile: masked below)
        Tiles::scores(qt.data(), keys, D, scores.data(), count, knext.data());
      });
      // running softmax: a row sees key p0 + t when p0 + t <= its position (every row sees
      // every key of a tile below the first position: no mask there)
      const bool masked = p0 + kKeys - 1 > first;
      softmax.exponentiate(scores.data(), masked, [&](int t, int c) {
        return pos[c] >= splat(static_cast<float>(p0 + t));
      }, corr);
      with_rows(consecutive, D, vrow.data(), [&](auto values) {
        Tiles::values(scores.data(), values, D, corr, sums.data(), count, vnext.data());
      });
    }
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t l = l0 + i / G, g = i % G;
      float* dst = a.out + ((b * L + l) * a.H + h * G + g) * D;
      const float sum = softmax.total[i / kLanes][i % kLanes];
      const float inv = sum > 0.f ? 1.f / sum : 0.f;  // a padding row: zeros
      for (int64_t d = 0; d < D; ++d) dst[d] = sums[d * kRows + i] * inv;
    }
  });
}

}  // namespace

extern "C" int PrefillAttention(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                void* stream, void* extra) {
  (void)stream;
  (void)extra;
  pllava::AttentionArgs a;
  if (const int error = pllava::parse_attention_args(nparam, params, ndims, shapes, dtypes, 4, &a)) return error;
  if (a.D % kLanes != 0) return 4;
  pllava::write_keys_values(a);  // first: the chunk's rows attend to each other's
  if (a.L * a.G <= pllava::tiles::Tiles<1>::kRows) {  // 16 rows or fewer: no padding to 32
    attend<1>(a);
  } else {
    attend<2>(a);
  }
  return 0;
}
