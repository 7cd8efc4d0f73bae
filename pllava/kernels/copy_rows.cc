// CopyCacheRows: one layer's keys and values of positions first..count-1 copied from one cache
// slot to another, in place, as a MindSpore "aot" custom op for the CPU (see pllava/cpu_kernels.py
// and pllava/prefix_reuse.py).
//
// Why: a prompt that starts with the ids another slot's prompt started with (a deployment's
// system prompt) has the same keys and values there (attention is causal), so the engine
// copies those rows rather than computing them again: on the benchmark model the 260
// positions before <image> of the default prompt are ~25 MB over 12 layers, copied in 7-11 ms
// (81-87 ms into a slot never written before on a 2-core VM, whose first write of each page
// faults; the engine then copies a piece per step beside decoding streams: ``first``), where
// their prefill took ~200 ms. MindSpore's ops would copy whole cache blocks to move a few rows
// of them (a gather and a scatter per block, layer and side).
//
// Inputs: src, dst, first, count, kv_heads (1,) int32; block_rows (J,) int32 (rows of each block per
// (slot, kv head): positions + 1 spare, as attention_args.h); then k_0, v_0, k_1, v_1, ...
// (slots * kv_heads * rows_j, D) float32, written in place. Output: (1,) int32, the rows
// held by dst per kv head (count). Errors are nonzero return codes: 1 argument count, 2 ranks,
// 3 dtypes, 4 shapes, 5 a slot, first or count out of range.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "attention_args.h"

extern "C" int CopyCacheRows(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                             void* stream, void* extra) {
  (void)stream;
  (void)extra;
  using pllava::is_dtype;
  if (nparam < 9 || (nparam - 7) % 2 != 0) return 1;
  const int nblocks = (nparam - 7) / 2, out = nparam - 1;
  for (int i : {0, 1, 2, 3, 4, 5, out}) {
    if (ndims[i] != 1) return 2;
    if (!is_dtype(dtypes[i], "int32")) return 3;
  }
  if (shapes[5][0] != nblocks) return 4;
  auto scalar = [&](int i) { return static_cast<int64_t>(static_cast<const int32_t*>(params[i])[0]); };
  const int64_t src = scalar(0), dst = scalar(1), first = scalar(2), count = scalar(3), heads = scalar(4);
  const int32_t* block_rows = static_cast<const int32_t*>(params[5]);
  if (heads <= 0) return 4;
  int64_t slots = -1, D = -1, held = 0;
  for (int j = 0; j < nblocks; ++j) {
    const int k = 6 + 2 * j;
    if (ndims[k] != 2 || ndims[k + 1] != 2) return 2;
    if (!is_dtype(dtypes[k], "float32") || !is_dtype(dtypes[k + 1], "float32")) return 3;
    const int64_t rows = block_rows[j];
    if (rows < 2 || shapes[k][0] != shapes[k + 1][0] || shapes[k][1] != shapes[k + 1][1] ||
        shapes[k][0] % (heads * rows) != 0 || (D >= 0 && shapes[k][1] != D) ||
        (slots >= 0 && shapes[k][0] / (heads * rows) != slots))
      return 4;
    D = shapes[k][1];
    slots = shapes[k][0] / (heads * rows);
    held += rows - 1;
  }
  if (src < 0 || src >= slots || dst < 0 || dst >= slots || first < 0 || count > held) return 5;
  int64_t start = 0;  // the first position of block j
  for (int j = 0; j < nblocks && start < count && src != dst; ++j) {
    const int64_t rows = block_rows[j];
    const int64_t lo = std::max(first, start), hi = std::min<int64_t>(count, start + rows - 1);
    for (int side = 0; side < 2 && lo < hi; ++side) {
      float* block = static_cast<float*>(params[6 + 2 * j + side]);
      for (int64_t h = 0; h < heads; ++h)
        std::memcpy(block + ((dst * heads + h) * rows + lo - start) * D,
                    block + ((src * heads + h) * rows + lo - start) * D, sizeof(float) * (hi - lo) * D);
    }
    start += rows - 1;
  }
  static_cast<int32_t*>(params[out])[0] = static_cast<int32_t>(count);
  return 0;
}
