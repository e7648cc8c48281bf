// bf16 <-> fp32 per element for the CPU ops, written so the loops around them vectorize:
// widening is a shift, narrowing rounds to nearest even (NaN stays NaN) as c10::BFloat16
// and torch's ops round. fp32 overloads are the identity, so one template serves both.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace loraserve_cpu {

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return __builtin_bit_cast(float, static_cast<uint32_t>(x.x) << 16); }

inline uint32_t rounded_bits(float x) {  // x's bits rounded to bf16's 16 high bits
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  return nan ? 0x7fc00000u : ((bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u);
}

// What storing x as T and reading it back gives.
inline float round_as(float x, float) { return x; }
inline float round_as(float x, at::BFloat16) { return __builtin_bit_cast(float, rounded_bits(x)); }

inline void store(float* p, float x) { *p = x; }
inline void store(at::BFloat16* p, float x) {
  *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(rounded_bits(x) >> 16);
}

}  // namespace loraserve_cpu
