// RmsNorm and SiluMul: the language model's two element-wise blocks as single MindSpore "aot"
// custom ops for the CPU (see pllava/cpu_kernels.py).
//
// Why: made of MindSpore's ops, each RMSNorm was six ops (square, mean, add, rsqrt, two
// scalings) and each MLP's activation four (two slices of the fused gate/up projection, a
// sigmoid and two products); at one or a few rows per call (decode) each op costs far more to
// launch than to run. Both are one pass over their rows here, in float32 in the reference's
// order: RMSNorm y = (x * 1/sqrt(mean(x^2) + eps)) * w, and silu(g) * u = g * sigmoid(g) * u.
//
// RmsNorm   inputs: x (..., D) float32, weight (D,) float32, eps (1,) float32
//           output: (..., D) float32
// SiluMul   inputs: gate_up (..., 2I) float32: gate in the first I columns, up in the last I
//           output: (..., I) float32

#include <cmath>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "vec.h"

namespace {

using pllava::exp16;
using pllava::kLanes;
using pllava::load;
using pllava::splat;
using pllava::store;
using pllava::v16;

// Rows go over the threads only when there is enough work to pay for starting them.
constexpr int64_t kParallelFloats = 1 << 16;

template <typename Body>
void over_rows(int64_t rows, int64_t floats_per_row, const Body& body) {
  if (rows * floats_per_row < kParallelFloats) {
    for (int64_t r = 0; r < rows; ++r) body(r);
  } else {
    pllava::parallel_for(rows, body);
  }
}

bool is(const char* dtype, const char* name) { return std::strcmp(dtype, name) == 0; }

int64_t count(int ndim, const int64_t* shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

// sigmoid(g) = 1 / (1 + e^-g), from e^-|g| (which exp16 takes) so it never overflows
inline v16 silu(v16 g) {
  const v16 e = exp16(g < splat(0.f) ? g : -g);
  const v16 one = splat(1.f);
  return g * ((g < splat(0.f) ? e : one) / (one + e));
}

}  // namespace

extern "C" int RmsNorm(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                       void* extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4) return 1;
  if (ndims[0] < 1 || ndims[1] != 1 || ndims[2] != 1 || ndims[3] != ndims[0]) return 2;
  if (!is(dtypes[0], "float32") || !is(dtypes[1], "float32") || !is(dtypes[2], "float32") ||
      !is(dtypes[3], "float32"))
    return 3;
  const int64_t D = shapes[0][ndims[0] - 1];
  if (D <= 0 || shapes[1][0] != D || count(ndims[3], shapes[3]) != count(ndims[0], shapes[0])) return 4;
  const int64_t rows = count(ndims[0], shapes[0]) / D;
  const float* x = static_cast<const float*>(params[0]);
  const float* w = static_cast<const float*>(params[1]);
  const float eps = static_cast<const float*>(params[2])[0];
  float* out = static_cast<float*>(params[3]);
  over_rows(rows, D, [&](int64_t r) {
    const float* xr = x + r * D;
    float* yr = out + r * D;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < D; ++d) sum += xr[d] * xr[d];
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(D) + eps);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) yr[d] = (xr[d] * inv) * w[d];
  });
  return 0;
}

extern "C" int SiluMul(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                       void* extra) {
  (void)stream;
  (void)extra;
  if (nparam != 2) return 1;
  if (ndims[0] < 1 || ndims[1] != ndims[0]) return 2;
  if (!is(dtypes[0], "float32") || !is(dtypes[1], "float32")) return 3;
  const int64_t I = shapes[1][ndims[1] - 1];
  if (I <= 0 || shapes[0][ndims[0] - 1] != 2 * I || count(ndims[0], shapes[0]) != 2 * count(ndims[1], shapes[1]))
    return 4;
  const int64_t rows = count(ndims[1], shapes[1]) / I;
  const float* gate_up = static_cast<const float*>(params[0]);
  float* out = static_cast<float*>(params[1]);
  over_rows(rows, 2 * I, [&](int64_t r) {
    const float* g = gate_up + r * 2 * I;
    const float* u = g + I;
    float* y = out + r * I;
    int64_t i = 0;
    for (; i + kLanes <= I; i += kLanes) store(y + i, silu(load(g + i)) * load(u + i));
    for (; i < I; ++i) {  // the tail, one lane at a time
      v16 one = splat(g[i]);
      y[i] = silu(one)[0] * u[i];
    }
  });
  return 0;
}
