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
//
// Where the CPU has AMX (Intel's tile units: bf16 products summed in float32), a call of 64
// rows or more runs on the tiles instead, to the same float32 precision: each float32 x is
// cut exactly into three bfloat16 parts (x = hi + mid + lo, 8 + 8 + 8 significant bits) and
// each float16 weight into two (w = hi + lo, 8 + 3 bits; a bfloat16 weight is one part), and
// the sum of the part products, all but lo x lo (below float32's rounding), is accumulated in
// float32 by the tiles: five tile products per float32 product, each ~16x an AVX-512 FMA's
// work. Measured one core against the loop above (benchmark shapes, 256 rows): 1.3-1.6x;
// the weights are widened and cut per call (a tenth of the time at 256 rows on the host
// first measured, about a quarter on a later one: README, "Numerics and choices"). Rows go
// through the tiles in blocks of 32, and below 32 rows the vector loop was faster: on a
// 2-core Xeon with AMX, the benchmark model's four projections (float16 weights, x 12 layers),
// tiles against the vector loop: 16 rows 31-35 vs 23 ms, 24 rows 33-35 vs 30, 32 rows 36-39
// vs 39, 64 rows 52-60 vs 70-73; in the decoder, a 16-position prompt chunk alone at position
// ~2000 57-58 vs 49-50 ms and with the 8 decode rows of the streams beside it (24 rows)
// 61.5-64.5 vs 57-60, a 32-position chunk alone 68-72 vs 75-78. Later, on an Emerald Rapids
// host under load, a 32-position chunk beside 7 streams' decode rows (40 rows) ran 1.2-1.4x
// slower on the tiles, and scattered more (at position 2000, median 175 vs 135 ms, one
// process, thresholds alternating; alone 32 rows were equal, 117 vs 118): the streams wait
// on that call, and a late, slow one is a long gap between their tokens (six admissions'
// longest waits 2.8-3.6x the step, median 3.3; since, 2.6-3.3x, median 2.9), so only calls
// of 64 rows or more take the tiles: prompt chunks of 64 or more, alone or beside
// decode rows, and the vision tower's frames.

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define PLLAVA_AMX 1
#endif

#include "parallel.h"

namespace {

enum class Half { f16, bf16 };
constexpr int64_t kPanel = 32;  // output columns per panel
constexpr int kRows = 14;       // rows of x per group: 2 x 14 sums + 2 weights + 1 x in 32 registers
constexpr int64_t kAmxRows = 64;  // calls of at least this many rows run on the tiles, where there are any
// How far ahead of its reads a group asks for the panel (in steps of k, 64 bytes each): 8 KB,
// ~1000 cycles of a 14-row group's products, past the memory's latency. A group that reads
// a panel once (up to 14 rows) streams it from memory; 1 KB ahead it waited on it: 8 KB ahead,
// benchmark shapes, 8 rows 8.1 -> 7.1 ms, 17 rows 16.0 -> 11.5, 24 rows 19.9 -> 15.3, 72 rows
// 52.9 -> 45.3, 256 rows 180 -> 172, the head at 9 rows 2.0 -> 1.3 (4 KB ahead about the same).
constexpr int64_t kAhead = 128;

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
    _mm_prefetch(reinterpret_cast<const char*>(at + kAhead * kPanel), _MM_HINT_T0);
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

#if defined(PLLAVA_AMX)
namespace amx {

constexpr int64_t kBlockRows = 32;  // rows of x per block: two 16-row tiles
constexpr int64_t kStep = 32;       // positions k per tile product (16 pairs)

// The kernel may use the tile registers (asked once per process; Linux 5.16+), unless the
// environment says PLLAVA_AMX=0 (to compare, or to rule the tiles out).
bool permitted() {
  static const bool ok = [] {
    const char* setting = std::getenv("PLLAVA_AMX");
    if (setting != nullptr && std::strcmp(setting, "0") == 0) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
  return ok;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// All 8 tiles: 16 rows of 64 bytes (16 float32 sums, or 32 bfloat16 / 16 pairs).
void configure() {
  TileConfig config;
  for (int i = 0; i < 8; ++i) config.rows[i] = 16, config.bytes_per_row[i] = 64;
  _tile_loadconfig(&config);
}

inline __m512i top16(__m512 v) {  // the bfloat16 part of each lane (truncated: v - part is exact)
  return _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
}

inline __m512 as_float(__m512i bits) { return _mm512_castsi512_ps(bits); }

// Rows [r0, r1) of x (M, K) cut into 3 bfloat16 planes, each laid out as 1 KB tiles
// [row / 16][k / 32][16][32], rows past M zero.
void cut_rows(const float* x, int64_t M, int64_t K, uint16_t* const planes[3], int64_t r0, int64_t r1) {
  const int64_t steps = K / kStep;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = r < M ? _mm512_loadu_ps(x + r * K + k) : _mm512_setzero_ps();
      const __m512i hi = top16(v);
      const __m512 rest = _mm512_sub_ps(v, as_float(hi));
      const __m512i mid = top16(rest);
      const __m512i lo = top16(_mm512_sub_ps(rest, as_float(mid)));
      const int64_t at = ((r / 16) * steps + k / kStep) * 512 + (r % 16) * kStep + k % kStep;
      const __m512i parts[3] = {hi, mid, lo};
      for (int i = 0; i < 3; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(planes[i] + at), _mm512_cvtepi32_epi16(_mm512_srli_epi32(parts[i], 16)));
    }
}

// A panel's weights (K, 32) as tile operands: for each 16-column half, K/2 rows of 16
// (k, k+1) pairs, the hi parts then (float16 only) the lo parts.
template <Half T>
void cut_panel(const uint16_t* panel, int64_t K, uint16_t* hi, uint16_t* lo) {
  for (int64_t k = 0; k < K; k += 2)
    for (int half = 0; half < 2; ++half) {
      const uint16_t* at = panel + k * kPanel + half * 16;
      const __m512 w0 = widen(at, T), w1 = widen(at + kPanel, T);
      const __m512i h0 = top16(w0), h1 = top16(w1);
      const int64_t row = (half * (K / 2) + k / 2) * 32;
      _mm512_store_si512(reinterpret_cast<__m512i*>(hi + row), _mm512_or_si512(h1, _mm512_srli_epi32(h0, 16)));
      if (T == Half::f16) {
        const __m512i l0 = top16(_mm512_sub_ps(w0, as_float(h0))), l1 = top16(_mm512_sub_ps(w1, as_float(h1)));
        _mm512_store_si512(reinterpret_cast<__m512i*>(lo + row), _mm512_or_si512(l1, _mm512_srli_epi32(l0, 16)));
      }
    }
}

// sums (32 rows x 32 columns in tiles 0-3) += x parts of rows block . the panel's parts over all K
template <Half T>
void block(const uint16_t* const planes[3], int64_t block_index, int64_t K, const uint16_t* hi, const uint16_t* lo) {
  const int64_t steps = K / kStep, tile = 512;  // elements per 1 KB tile
  const uint16_t* const weight_parts[2] = {hi, lo};
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t top = (2 * block_index * steps + s) * tile, bottom = top + steps * tile;
    for (int w = 0; w < (T == Half::f16 ? 2 : 1); ++w) {
      _tile_loadd(4, weight_parts[w] + s * tile, 64);
      _tile_loadd(5, weight_parts[w] + (steps + s) * tile, 64);
      for (int i = 0; i < (w == 0 ? 3 : 2); ++i) {  // hi, mid, lo x; lo x lo dropped
        _tile_loadd(6, planes[i] + top, 64);
        _tile_loadd(7, planes[i] + bottom, 64);
        _tile_dpbf16ps(0, 6, 4);
        _tile_dpbf16ps(1, 6, 5);
        _tile_dpbf16ps(2, 7, 4);
        _tile_dpbf16ps(3, 7, 5);
      }
    }
  }
}

template <Half T>
void half_linear(const float* x, const uint16_t* w, float* y, int64_t M, int64_t panels, int64_t K) {
  const int64_t N = panels * kPanel, blocks = (M + kBlockRows - 1) / kBlockRows, padded = blocks * kBlockRows;
  static thread_local std::vector<uint16_t> storage;  // kept between calls: no allocation per call
  storage.resize(3 * padded * K + 32);
  uint16_t* base = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t{63});
  uint16_t* const planes[3] = {base, base + padded * K, base + 2 * padded * K};
  pllava::parallel_ranges(padded / 16, [&](int64_t begin, int64_t end) { cut_rows(x, M, K, planes, 16 * begin, 16 * end); });
  pllava::parallel_ranges(panels, [&](int64_t begin, int64_t end) {
    configure();
    static thread_local std::vector<uint16_t> cut;
    const int64_t per_panel = (T == Half::f16 ? 2 : 1) * K * kPanel;
    cut.resize((end - begin) * per_panel + 32);
    uint16_t* parts = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(cut.data()) + 63) & ~uintptr_t{63});
    for (int64_t p = begin; p < end; ++p)
      cut_panel<T>(w + p * K * kPanel, K, parts + (p - begin) * per_panel, parts + (p - begin) * per_panel + K * kPanel);
    alignas(64) float spill[kBlockRows * kPanel];
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t p = begin; p < end; ++p) {
        const uint16_t* hi = parts + (p - begin) * per_panel;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        block<T>(planes, b, K, hi, hi + K * kPanel);
        const int64_t row = b * kBlockRows, rows = std::min(kBlockRows, M - row);
        float* out = rows == kBlockRows ? y + row * N + p * kPanel : spill;  // a last partial block: copied
        const int64_t stride = (rows == kBlockRows ? N : kPanel) * 4;
        _tile_stored(0, out, stride);
        _tile_stored(1, out + 16, stride);
        _tile_stored(2, out + 16 * stride / 4, stride);
        _tile_stored(3, out + 16 * stride / 4 + 16, stride);
        if (rows < kBlockRows)
          for (int64_t r = 0; r < rows; ++r) std::memcpy(y + (row + r) * N + p * kPanel, spill + r * kPanel, kPanel * 4);
      }
    _tile_release();
  });
}

}  // namespace amx
#endif

// R rows of x (R <= kRows) against one panel
template <Half T>
void rows_group(int R, const uint16_t* panel, const float* x, int64_t K, float* y, int64_t N) {
  switch (R) {
    case 14: group<14, T>(panel, x, K, y, N); break;
    case 13: group<13, T>(panel, x, K, y, N); break;
    case 12: group<12, T>(panel, x, K, y, N); break;
    case 11: group<11, T>(panel, x, K, y, N); break;
    case 10: group<10, T>(panel, x, K, y, N); break;
    case 9: group<9, T>(panel, x, K, y, N); break;
    case 8: group<8, T>(panel, x, K, y, N); break;
    case 7: group<7, T>(panel, x, K, y, N); break;
    case 6: group<6, T>(panel, x, K, y, N); break;
    case 5: group<5, T>(panel, x, K, y, N); break;
    case 4: group<4, T>(panel, x, K, y, N); break;
    case 3: group<3, T>(panel, x, K, y, N); break;
    case 2: group<2, T>(panel, x, K, y, N); break;
    case 1: group<1, T>(panel, x, K, y, N); break;
    default: break;
  }
}
static_assert(kRows == 14, "rows_group covers 1..14 rows");

// all M rows of x against one panel, in the fewest groups of at most kRows rows, their sizes
// as even as can be (17 rows: 9 + 8, not 14 + 3, whose small group reads the whole panel for
// few products)
template <Half T>
void rows_against(const uint16_t* panel, const float* x, int64_t K, float* y, int64_t N, int64_t M) {
  const int64_t groups = (M + kRows - 1) / kRows;
  for (int64_t g = 0, r = 0; g < groups; ++g) {
    const int64_t rows = (M - r) / (groups - g);
    rows_group<T>(static_cast<int>(rows), panel, x + r * K, K, y + r * N, N);
    r += rows;
  }
}

template <Half T>
void half_linear(const float* x, const uint16_t* w, float* y, int64_t M, int64_t panels, int64_t K) {
#if defined(PLLAVA_AMX)
  if (M >= kAmxRows && K % amx::kStep == 0 && amx::permitted()) return amx::half_linear<T>(x, w, y, M, panels, K);
#endif
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

// 1 where calls of kAmxRows rows or more run on the AMX tiles (built for them, and the OS lets
// this process use them), 0 where every call runs the vector or plain loop.
extern "C" int HalfLinearTiles() {
#if defined(PLLAVA_AMX)
  return amx::permitted() ? 1 : 0;
#else
  return 0;
#endif
}

// Nanoseconds per tile product (a 16x32 by 32x16 bfloat16 product summed into float32) over
// `count` of them on the calling thread, operands in the tile registers: how much of its
// core's tile unit this process gets right now; -1 where calls never take the tiles. On the
// 2-core Xeon hosts here it read ~7 ns in calm stretches and 15-17 in others, switching from
// one second to the next with the machine otherwise idle (the host's other work): a prompt's
// projections follow it, and the benchmark samples it beside its TTFT runs.
extern "C" double TileProductNs(int64_t count) {
#if defined(PLLAVA_AMX)
  if (!amx::permitted() || count <= 0) return -1;
  amx::configure();
  alignas(64) uint16_t ones[512];  // operands 1.0 (over zeros the unit ran ~20% faster)
  std::fill(ones, ones + 512, uint16_t{0x3f80});
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < count; i += 4) {
    _tile_dpbf16ps(0, 6, 4);
    _tile_dpbf16ps(1, 6, 5);
    _tile_dpbf16ps(2, 7, 4);
    _tile_dpbf16ps(3, 7, 5);
  }
  alignas(64) float sink[256];
  _tile_stored(0, sink, 64);  // the products' results are used: none is left out
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
  _tile_release();
  return ns / static_cast<double>((count + 3) / 4 * 4);
#else
  (void)count;
  return -1;
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
