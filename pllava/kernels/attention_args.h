// The inputs both attention kernels take (decode_attention.cc, prefill_attention.cc), checked
// and laid out once:
//   qkv (B, [L,] H + 2 KVH, D) float32   each row's H query heads, then KVH keys, then KVH values,
//                                        as the fused projection made them; kv head h serves
//                                        query heads hG..hG+G-1, G = H / KVH
//   positions (B[, L]) int32             each row's position; -1: a padding row (no write, zeros out)
//   slots (B,) int32                     the cache slot of each sequence; for a decode step also
//         or (B, 3) int32                    (slot, prefix slot, prefix rows): the row reads its
//                                            positions below ``prefix rows`` (within block 0) from
//                                            ``prefix slot``, which holds the same keys and values
//                                            there (a prompt's leading text that several sequences
//                                            share: read once from memory for all of them)
//   scale (1,) float32                   applied to q.k
//   block_rows (J,) int32                rows of each block per (slot, kv head): positions + 1 spare
//   cos, sin (P, D) float32              the RoPE tables (rope.h), P > every position
//   k_0, v_0, k_1, v_1, ...              the blocks, each (slots * KVH * rows_j, D) float32, written
//                                        in place (the graph hands over the cache Parameters)
//   output (B, [L,] H, D) float32
// Block j of a layer's cache is 2-D: the rows of one (slot, kv head) are contiguous by position,
// covering positions [start_j, start_j + rows_j - 1) with start_0 = 0, then one spare row (which
// MindSpore's ops, without the kernels, write the rows that belong to no position of the block
// into).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "rope.h"

namespace pllava {

struct AttentionArgs {
  int64_t B = 0, L = 0, H = 0, KVH = 0, G = 0, NH = 0, D = 0, S = 0;  // S: cache slots
  const float* qkv = nullptr;
  const int32_t* positions = nullptr;  // (B, L)
  const int32_t* slots = nullptr;
  int64_t slot_stride = 1;  // 3 where ``slots`` also gives each row's prefix slot and rows
  float scale = 1.f;
  const float* cos = nullptr;
  const float* sin = nullptr;
  float* out = nullptr;
  std::vector<int64_t> rows, block_start;  // per block; block_start[J] = the positions held
  void** params = nullptr;

  float* block(int64_t j, int which) const { return static_cast<float*>(params[7 + 2 * j + which]); }
  // the head n of row (b, l): the H queries, then the KVH keys, then the KVH values
  const float* head(int64_t b, int64_t l, int64_t n) const { return qkv + ((b * L + l) * NH + n) * D; }
  // the first cache row of (sequence b, kv head h) in block j: its positions follow in order
  int64_t first_row(int64_t b, int64_t h, int64_t j) const { return slot_row(slot(b), h, j); }
  // the first cache row of (cache slot s, kv head h) in block j
  int64_t slot_row(int64_t s, int64_t h, int64_t j) const { return (s * KVH + h) * rows[j]; }
  int64_t slot(int64_t b) const { return slots[b * slot_stride]; }
  // where row b reads its positions below prefix_rows(b): another slot's first rows of block 0
  int64_t prefix_slot(int64_t b) const { return slot_stride == 3 ? slots[b * 3 + 1] : slot(b); }
  int64_t prefix_rows(int64_t b) const { return slot_stride == 3 ? slots[b * 3 + 2] : 0; }
  // the cache row of (sequence b, kv head h, position p), moving j to p's block first
  int64_t row_of(int64_t b, int64_t h, int64_t p, int64_t* j) const {
    while (p >= block_start[*j + 1]) ++*j;
    while (p < block_start[*j]) --*j;
    return first_row(b, h, *j) + (p - block_start[*j]);
  }
};

inline bool is_dtype(const char* dtype, const char* name) { return std::strcmp(dtype, name) == 0; }

// Fills ``a`` from a kernel's arguments; ``rank`` is qkv's (3: decode, 4: a prefill chunk).
// Returns 0, or the kernel's error code: 1 argument count, 2 ranks, 3 dtypes, 4 shapes,
// 5 a block's shape, 6 blocks of different slot counts, 7 a slot or position out of range.
inline int parse_attention_args(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                int rank, AttentionArgs* a) {
  if (nparam < 10 || (nparam - 8) % 2 != 0) return 1;
  const int nblocks = (nparam - 8) / 2, out = nparam - 1;
  const bool prefixed = rank == 3 && ndims[2] == 2;  // a decode step's (B, 3) slots
  if (ndims[0] != rank || ndims[1] != rank - 2 || (ndims[2] != 1 && !prefixed) || ndims[3] != 1 || ndims[4] != 1 ||
      ndims[5] != 2 || ndims[6] != 2 || ndims[out] != rank)
    return 2;
  const char* wanted[] = {"float32", "int32", "int32", "float32", "int32", "float32", "float32"};
  for (int i = 0; i < 7; ++i)
    if (!is_dtype(dtypes[i], wanted[i])) return 3;
  if (!is_dtype(dtypes[out], "float32")) return 3;
  const int64_t* q = shapes[0];
  a->B = q[0];
  a->L = rank == 4 ? q[1] : 1;
  a->NH = q[rank - 2];
  a->D = q[rank - 1];
  a->H = shapes[out][rank - 2];
  a->KVH = (a->NH - a->H) / 2;
  if (a->KVH <= 0 || a->NH != a->H + 2 * a->KVH || a->H % a->KVH != 0 || a->D % 2 != 0) return 4;
  a->G = a->H / a->KVH;
  for (int i = 0; i < rank - 2; ++i)
    if (shapes[out][i] != q[i] || shapes[1][i] != q[i]) return 4;
  const int64_t P = shapes[5][0];
  if (prefixed && shapes[2][1] != 3) return 4;
  a->slot_stride = prefixed ? 3 : 1;
  if (shapes[out][rank - 1] != a->D || shapes[2][0] != a->B || shapes[4][0] != nblocks || shapes[5][1] != a->D ||
      shapes[6][0] != P || shapes[6][1] != a->D)
    return 4;
  const int32_t* block_rows = static_cast<const int32_t*>(params[4]);
  a->rows.assign(nblocks, 0);
  a->block_start.assign(nblocks + 1, 0);
  a->S = -1;
  for (int j = 0; j < nblocks; ++j) {
    const int k = 7 + 2 * j;
    a->rows[j] = block_rows[j];
    if (a->rows[j] < 2 || ndims[k] != 2 || ndims[k + 1] != 2 || shapes[k][1] != a->D || shapes[k + 1][1] != a->D ||
        shapes[k][0] != shapes[k + 1][0] || !is_dtype(dtypes[k], "float32") || !is_dtype(dtypes[k + 1], "float32") ||
        shapes[k][0] % (a->KVH * a->rows[j]) != 0)
      return 5;
    const int64_t slots_here = shapes[k][0] / (a->KVH * a->rows[j]);
    if (a->S >= 0 && slots_here != a->S) return 6;
    a->S = slots_here;
    a->block_start[j + 1] = a->block_start[j] + a->rows[j] - 1;
  }
  a->params = params;
  a->qkv = static_cast<const float*>(params[0]);
  a->positions = static_cast<const int32_t*>(params[1]);
  a->slots = static_cast<const int32_t*>(params[2]);
  a->scale = static_cast<const float*>(params[3])[0];
  a->cos = static_cast<const float*>(params[5]);
  a->sin = static_cast<const float*>(params[6]);
  a->out = static_cast<float*>(params[out]);
  for (int64_t b = 0; b < a->B; ++b) {
    if (a->slot(b) < 0 || a->slot(b) >= a->S || a->prefix_slot(b) < 0 || a->prefix_slot(b) >= a->S ||
        a->prefix_rows(b) < 0 || a->prefix_rows(b) > a->block_start[1])
      return 7;
    for (int64_t l = 0; l < a->L; ++l) {
      const int64_t p = a->positions[b * a->L + l];
      if (p >= a->block_start[nblocks] || p >= P) return 7;
    }
  }
  return 0;
}

// Writes each row's key (rotated at its position) and value into its slot's block; rows at
// position -1 write nothing. A row repeated to pad a batch writes the same values.
inline void write_keys_values(const AttentionArgs& a) {
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t l = 0; l < a.L; ++l) {
      const int64_t p = a.positions[b * a.L + l];
      if (p < 0) continue;
      for (int64_t h = 0, j = 0; h < a.KVH; ++h) {
        const int64_t r = a.row_of(b, h, p, &j);
        rope(a.head(b, l, a.H + h), a.cos + p * a.D, a.sin + p * a.D, a.D, 1.f, a.block(j, 0) + r * a.D);
        std::memcpy(a.block(j, 1) + r * a.D, a.head(b, l, a.H + a.KVH + h), sizeof(float) * a.D);
      }
    }
}

}  // namespace pllava
