// HalfLinear: y = x W^T with W kept in half precision (float16 or bfloat16) and x, y in
// float32: a MindSpore "aot" custom op for the CPU (see pllava/cpu_kernels.py).
//
// Why: a decode step reads every weight of the language model once and does little with
// each, so its time is the weight bytes over the memory bandwidth. The checkpoints store the
// weights in half precision; kept so and widened to float32 in a register as each is used, a
// step reads half the bytes. Every product and sum is in float32 over the very values the
// checkpoint holds, so the result is an fp32 matmul's over those weights (up to the order of
// the sums, as between any two fp32 matmuls).
//
// Inputs:  x (M, K) float32
//          w (P, K, 32) float16 or bfloat16: the weight (N, K) packed in panels of 32 output
//                       columns, panel p holding W[32p + j][k] at [p][k][j] (zeros past N)
// Output:  (M, 32 P) float32
//
// The panels are split over the usable CPUs. For each panel, rows of x go through in groups
// of up to kRows: each step k widens the panel's 32 weights of k (two vectors, contiguous, so
// the panel streams from memory in order) and adds x[r][k] times them to the group's 2 x kRows
// sums, which stay in registers; no horizontal sums. Measured on this machine's kind (2
// cores) over the benchmark model's linear layers and head, against MindSpore's float32
// matmul: 1 row 23 vs ~40 ms, 8 rows 27 vs 58-76 ms, 32 rows 58 vs 78 ms, 256 rows 308 vs
// ~300 ms.

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "parallel.h"

namespace {

enum class Half { f16, bf16 };
constexpr int64_t kPanel = 32;  // output columns per panel
constexpr int kRows = 14;       // rows of x per group: 2 x 14 sums + 2 weights + 1 x in 32 registers

[[maybe_unused]] inline float widen_scalar(uint16_t h, Half type) {
  uint32_t bits;
  if (type == Half::bf16) {
    bits = static_cast<uint32_t>(h) << 16;
  } else {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0x1f) {
      bits = sign | 0x7f800000u | (mantissa << 13);  // inf, nan
    } else if (exponent != 0) {
      bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exponent = 113;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        --exponent;
      }
      bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
    }
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

#if defined(__AVX512F__)
inline __m512 widen(const uint16_t* p, Half type) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if (type == Half::f16) return _mm512_cvtph_ps(raw);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// y[r][0..32) = sum_k x[r][k] * panel[k][0..32) for R rows of x
template <int R, Half T>
void group(const uint16_t* panel, const float* x, int64_t K, float* y, int64_t N) {
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const uint16_t* at = panel + k * kPanel;
    _mm_prefetch(reinterpret_cast<const char*>(at + 16 * kPanel), _MM_HINT_T0);  // 1 KB ahead
    const __m512 w0 = widen(at, T), w1 = widen(at + 16, T);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * K + k]);
      lo[r] = _mm512_fmadd_ps(xv, w0, lo[r]);
      hi[r] = _mm512_fmadd_ps(xv, w1, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(y + r * N, lo[r]);
    _mm512_storeu_ps(y + r * N + 16, hi[r]);
  }
}
#else
template <int R, Half T>
void group(const uint16_t* panel, const float* x, int64_t K, float* y, int64_t N) {
  float acc[R][kPanel] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < kPanel; ++j) {
      const float wk = widen_scalar(panel[k * kPanel + j], T);
      for (int r = 0; r < R; ++r) acc[r][j] += x[r * K + k] * wk;
    }
  for (int r = 0; r < R; ++r) std::memcpy(y + r * N, acc[r], sizeof(acc[r]));
}
#endif

// all M rows of x against one panel, kRows at a time
template <Half T>
void rows_against(const uint16_t* panel, const float* x, int64_t K, float* y, int64_t N, int64_t M) {
  int64_t r = 0;
  for (; r + kRows <= M; r += kRows) group<kRows, T>(panel, x + r * K, K, y + r * N, N);
  const float* xs = x + r * K;
  float* ys = y + r * N;
  switch (M - r) {
    case 13: group<13, T>(panel, xs, K, ys, N); break;
    case 12: group<12, T>(panel, xs, K, ys, N); break;
    case 11: group<11, T>(panel, xs, K, ys, N); break;
    case 10: group<10, T>(panel, xs, K, ys, N); break;
    case 9: group<9, T>(panel, xs, K, ys, N); break;
    case 8: group<8, T>(panel, xs, K, ys, N); break;
    case 7: group<7, T>(panel, xs, K, ys, N); break;
    case 6: group<6, T>(panel, xs, K, ys, N); break;
    case 5: group<5, T>(panel, xs, K, ys, N); break;
    case 4: group<4, T>(panel, xs, K, ys, N); break;
    case 3: group<3, T>(panel, xs, K, ys, N); break;
    case 2: group<2, T>(panel, xs, K, ys, N); break;
    case 1: group<1, T>(panel, xs, K, ys, N); break;
    default: break;
  }
}

template <Half T>
void half_linear(const float* x, const uint16_t* w, float* y, int64_t M, int64_t panels, int64_t K) {
  const int64_t N = panels * kPanel;
  pllava::parallel_ranges(panels, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) rows_against<T>(w + p * K * kPanel, x, K, y + p * kPanel, N, M);
  });
}

bool is(const char* dtype, const char* name) { return std::strcmp(dtype, name) == 0; }

}  // namespace

// 1 where the tiles above are vector code (AVX-512), 0 where they are the plain loop: the
// model keeps float32 weights and MindSpore's matmul there (pllava.llama.half_weights_allowed).
extern "C" int HalfLinearVectorized() {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

extern "C" int HalfLinear(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                          void* stream, void* extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 3 || ndims[2] != 2) return 1;
  if (!is(dtypes[0], "float32") || !is(dtypes[2], "float32")) return 2;
  const int64_t M = shapes[0][0], K = shapes[0][1], panels = shapes[1][0];
  if (shapes[1][1] != K || shapes[1][2] != kPanel || shapes[2][0] != M || shapes[2][1] != panels * kPanel) return 3;
  const float* x = static_cast<const float*>(params[0]);
  const uint16_t* w = static_cast<const uint16_t*>(params[1]);
  float* y = static_cast<float*>(params[2]);
  if (is(dtypes[1], "float16")) {
    half_linear<Half::f16>(x, w, y, M, panels, K);
  } else if (is(dtypes[1], "bfloat16")) {
    half_linear<Half::bf16>(x, w, y, M, panels, K);
  } else {
    return 4;
  }
  return 0;
}
