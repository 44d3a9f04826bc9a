// Vectorisable float math shared by the CPU kernels' epilogues (linear_logprob.cpp,
// token_smoothing.cpp), and the run-time choice of the instruction set they run with.
//
// The extension is compiled for the baseline x86-64 ISA; the vocabulary epilogues are the
// only hand-written hot loops, so each of their entry points is compiled three times
// (RK_ISA_VARIANTS: AVX-512, AVX2 + FMA, baseline) and picks one per call from cpu_isa():
// the best the CPU supports, lowered by RAG_KERNELS_CPU_ISA=avx512|avx2|default (read at the
// first call; set_cpu_isa() changes it at run time). The override exists to measure and test
// an AVX2-only (or a pre-AVX2) machine's code paths on an AVX-512 one; it never raises the
// ISA above what the CPU has.
//
// The functions live in rag_kernels::detail (inline, no anonymous namespace); RK_INLINE and
// RK_ISA_VARIANTS are macros for the kernel files.
#pragma once
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define RK_X86_DISPATCH 1
#define RK_INLINE __attribute__((always_inline)) inline
#define RK_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi2,f16c")))
#define RK_TARGET_AVX2 __attribute__((target("avx2,fma,bmi2,f16c")))
#else
#define RK_X86_DISPATCH 0
#define RK_INLINE inline
#endif

namespace rag_kernels {
namespace detail {

// Ordered: a level implies the ones below it.
enum class CpuIsa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "default";
  }
}

// What the CPU (and the OS: __builtin_cpu_supports checks XCR0 too) can run.
inline CpuIsa detected_isa() {
#if RK_X86_DISPATCH
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("fma"))
      return CpuIsa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
    return CpuIsa::kDefault;
  }();
  return isa;
#else
  return CpuIsa::kDefault;
#endif
}

// Parses an ISA name ("avx512", "avx2", "default"; "" or "auto" = what the CPU has) and
// caps it at detected_isa(). A misspelt name raises, naming the variable.
inline CpuIsa parse_isa(const std::string& raw, const char* what) {
  CpuIsa want;
  if (raw.empty() || raw == "auto") {
    want = detected_isa();
  } else if (raw == "avx512") {
    want = CpuIsa::kAvx512;
  } else if (raw == "avx2") {
    want = CpuIsa::kAvx2;
  } else if (raw == "default" || raw == "baseline") {
    want = CpuIsa::kDefault;
  } else {
    TORCH_CHECK(false, what, " must be one of 'auto', 'avx512', 'avx2', 'default', got '", raw,
                "'");
  }
  return static_cast<int>(want) < static_cast<int>(detected_isa()) ? want : detected_isa();
}

inline std::atomic<int>& isa_state() {
  static std::atomic<int> state{-1};  // -1: not read from the environment yet
  return state;
}

// The ISA the epilogues run with (and, through native_bf16_gemm, the bf16 GEMM path).
inline CpuIsa cpu_isa() {
  int s = isa_state().load(std::memory_order_relaxed);
  if (s < 0) {
    const char* env = std::getenv("RAG_KERNELS_CPU_ISA");
    s = static_cast<int>(parse_isa(env ? env : "", "RAG_KERNELS_CPU_ISA"));
    isa_state().store(s, std::memory_order_relaxed);
  }
  return static_cast<CpuIsa>(s);
}

inline void set_cpu_isa(const std::string& name) {
  isa_state().store(static_cast<int>(parse_isa(name, "cpu_isa")), std::memory_order_relaxed);
}

// exp for float: Cody-Waite range reduction + degree-6 polynomial (about 2 ulp); written
// branch-free so the row loops vectorise (setup.py compiles with -fno-trapping-math: with
// trapping math GCC may not if-convert the clamps and selects below, which kept the AVX2 and
// baseline versions of every loop scalar; AVX-512 masks hid it). Inputs are clamped to [-87, 88], which only matters
// for exp(z - lse) far below 1e-37, where it adds less than 1e-37 (every argument in the
// kernels is <= 0 up to rounding). NaN propagates.
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

// RK_ISA_VARIANTS(RET, NAME, (PARAMS), (ARGS), { BODY }) defines NAME(PARAMS) -> RET, whose
// BODY is compiled for AVX-512, AVX2 + FMA and the baseline ISA; each call runs the version
// cpu_isa() names. BODY should call RK_INLINE templates, so that they are inlined (and
// vectorised) for each ISA. Use inside an anonymous namespace.
#if RK_X86_DISPATCH
#define RK_ISA_VARIANTS(RET, NAME, PARAMS, ARGS, ...)                      \
  RK_TARGET_AVX512 RET NAME##_avx512 PARAMS __VA_ARGS__                    \
  RK_TARGET_AVX2 RET NAME##_avx2 PARAMS __VA_ARGS__                        \
  RET NAME##_default PARAMS __VA_ARGS__                                    \
  RET NAME PARAMS {                                                        \
    switch (::rag_kernels::detail::cpu_isa()) {                            \
      case ::rag_kernels::detail::CpuIsa::kAvx512: return NAME##_avx512 ARGS; \
      case ::rag_kernels::detail::CpuIsa::kAvx2: return NAME##_avx2 ARGS;     \
      default: return NAME##_default ARGS;                                 \
    }                                                                      \
  }
#else
#define RK_ISA_VARIANTS(RET, NAME, PARAMS, ARGS, ...) RET NAME PARAMS __VA_ARGS__
#endif
