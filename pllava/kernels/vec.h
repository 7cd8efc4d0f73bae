// 16-float vectors for the kernels in this folder (GCC/Clang vector extensions: one AVX-512
// register where the CPU has it, else the compiler splits it), and e^x over them.
#pragma once

#include <cstdint>
#include <cstring>

namespace pllava {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
constexpr int kLanes = 16;

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

}  // namespace pllava
