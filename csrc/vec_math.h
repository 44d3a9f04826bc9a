// Vectorisable float math shared by the CPU kernels' epilogues (linear_logprob.cpp,
// token_smoothing.cpp): AVX-512/AVX2 function clones and branch-free exp / tanh. The
// functions live in rag_kernels::detail (inline, no anonymous namespace); RK_CLONES and
// RK_INLINE are macros for the kernel files.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// The extension is compiled for the baseline ISA; the vocabulary epilogue is the only
// hand-written hot loop, so it gets AVX-512 / AVX2 clones picked at load time.
#define RK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define RK_INLINE __attribute__((always_inline)) inline
#else
#define RK_CLONES
#define RK_INLINE inline
#endif

namespace rag_kernels {
namespace detail {

// exp for float: Cody-Waite range reduction + degree-6 polynomial (about 2 ulp); written
// branch-free so the row loops vectorise. Inputs are clamped to the normal range, which
// only matters for exp(z - lse) far below 1e-37, where it adds less than 1e-37.
RK_INLINE float rk_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const int32_t eb = (tb - 0x4B400000 + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &eb, sizeof(scale));
  return p * scale;
}
RK_INLINE double rk_exp(double x) { return std::exp(x); }

// tanh for float: odd Taylor polynomial for |x| < 0.3 (error < 1e-9 relative), otherwise
// (1 - e^{-2|x|}) / (1 + e^{-2|x|}) where the cancellation costs at most ~3 ulp.
RK_INLINE float rk_tanh(float x) {
  const float a = x < 0.0f ? -x : x;
  const float e = rk_exp(-2.0f * a);
  const float big = (1.0f - e) / (1.0f + e);
  const float x2 = a * a;
  float q = -1382.0f / 155925.0f;
  q = q * x2 + 62.0f / 2835.0f;
  q = q * x2 - 17.0f / 315.0f;
  q = q * x2 + 2.0f / 15.0f;
  q = q * x2 - 1.0f / 3.0f;
  const float small = a + a * x2 * q;
  const float r = a < 0.3f ? small : big;
  return x < 0.0f ? -r : r;
}
RK_INLINE double rk_tanh(double x) { return std::tanh(x); }

}  // namespace detail
}  // namespace rag_kernels
