// Micro-kernel GEMMs with fp32 outputs for the CPU LM-head kernels (linear_logprob.cpp,
// token_smoothing.cpp) on B operands packed into panels of kPanel columns: ATen's oneDNN BRGEMM
// micro-kernel (at::native::cpublas::brgemm, the one CPU flash attention uses) on AVX-512 CPUs,
// this project's AVX2 + FMA fp32 kernel (avx2_gemm.h) on the others.
//
// Why not at::mm: bf16 at::mm rounds its output to bf16, which would round every logit and make
// the dh / dW sums over vocabulary tiles bf16 accumulations; the micro-kernels keep fp32
// outputs and accumulate into them (add_C). For fp32, ATen's GEMM is MKL's, which runs
// AVX2-class code on AMD CPUs even where they have AVX-512 (here about half oneDNN's rate at the
// kernels' tile shapes), and on AVX2 CPUs repacks both operands on every tile-sized call (the
// AVX2 kernel reads the panels packed once per tile: ≈ 1.15x MKL's rate there).
//
// Dispatch (per call, gemm_path below):
//   * bf16 inputs: bf16 x bf16 -> fp32 oneDNN GEMMs ("native bf16") when cpu_isa() is
//     AVX-512 and the CPU has AVX512_BF16 or AMX-BF16 (bf16 dot products); dz is rounded to
//     bf16 for the two gradient GEMMs, as plain PyTorch's bf16 backward rounds it.
//   * fp32 inputs, and bf16 / fp16 inputs without native bf16 matmul: fp32 micro-kernel GEMMs
//     (16-bit weights are converted to fp32 while packing: one tile at a time, never the whole
//     weight): oneDNN's when cpu_isa() is AVX-512, else the AVX2 kernel when cpu_isa() is at
//     least AVX2; ATen GEMMs in fp32 on older CPUs. A 16-bit input thus never runs slower than
//     the same values in fp32.
//   * fp64: ATen GEMMs.
// oneDNN's paths also need oneDNN enabled (torch.backends.mkldnn) and a probe GEMM through the
// micro-kernel that gives the exact result (false when this torch build has no micro-kernel, or
// ONEDNN_MAX_CPU_ISA is below AVX-512); without them fp32 takes the AVX2 kernel.
// RAG_KERNELS_CPU_ISA=avx2 (or set_cpu_isa) therefore gives an AVX2-only CPU's paths (the AVX2
// kernel, bf16 converted); RAG_KERNELS_CPU_GEMM=fp32 keeps bf16 inputs off bf16 operands (the
// path of an AVX-512 CPU without bf16 matmul) and RAG_KERNELS_CPU_GEMM=aten forces ATen GEMMs
// on any CPU.
#pragma once
#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <type_traits>

#include "avx2_gemm.h"
#include "vec_math.h"

namespace rag_kernels {
namespace detail {

// Columns per packed B panel: the widest leading dimension the micro-kernel takes for a packed
// B (16, 32, 48 or 64).
constexpr int64_t kPanel = 64;
// Rows of A per micro-kernel call: an A block then stays in L2 across the N panels.
constexpr int64_t kGemmRows = 256;

// K runs in pairs for bf16 (VNNI: each 32-bit B entry holds k and k + 1), singly for fp32.
template <typename In>
constexpr int64_t kPair = std::is_same_v<In, c10::BFloat16> ? 2 : 1;

template <typename In>
inline int64_t pad_k(int64_t K) {
  return (K + kPair<In> - 1) / kPair<In> * kPair<In>;
}

// Elements of the packed form of a [K, N] B operand, and of one of its panels.
template <typename In>
inline int64_t packed_elems(int64_t K, int64_t N) {
  return (N + kPanel - 1) / kPanel * pad_k<In>(K) * kPanel;
}
template <typename In>
inline int64_t panel_elems(int64_t K) {
  return pad_k<In>(K) * kPanel;
}

// Panel layout: entry (k, n) of panel p (columns p kPanel ...) at
// (k / P) * kPanel * P + (n % kPanel) * P + k % P, P = kPair<In>; entries past K or N are 0.
// pack_b_rows: B given row-major, src[k * ld + n]. pack_b_cols: B given as its transpose,
// src[n * ld + k] (a weight tile [vt, H] as the B of logits = h W^T). S -> In converts
// (bf16 / fp16 -> fp32, or a copy).
#if RK_X86_DISPATCH
// Lane j of the interleave of 16-bit vectors a, b (_mm512_permutex2var_epi16: indices >= 32
// pick b): a[j / 2] for even j, b[j / 2] for odd j; entries 0-31 give the low half, 32-63 the
// high half.
struct InterleaveIndex {
  uint16_t v[64];
  constexpr InterleaveIndex() : v() {
    for (int j = 0; j < 64; ++j) v[j] = static_cast<uint16_t>((j >> 1) | ((j & 1) << 5));
  }
};
inline constexpr InterleaveIndex kInterleave{};

// One VNNI row of a full bf16 panel: o[2 n] = r0[n], o[2 n + 1] = r1[n], n < kPanel (= 64),
// 32 entries of each row per 512-bit register.
RK_TARGET_AVX512 inline void interleave_panel_row(const void* r0, const void* r1, void* o) {
  static_assert(kPanel == 64, "two 512-bit registers per 64 16-bit entries");
  const __m512i lo = _mm512_loadu_si512(kInterleave.v), hi = _mm512_loadu_si512(kInterleave.v + 32);
  for (int h = 0; h < 2; ++h) {
    const __m512i a = _mm512_loadu_si512(static_cast<const char*>(r0) + 64 * h);
    const __m512i b = _mm512_loadu_si512(static_cast<const char*>(r1) + 64 * h);
    char* out = static_cast<char*>(o) + 128 * h;
    _mm512_storeu_si512(out, _mm512_permutex2var_epi16(a, lo, b));
    _mm512_storeu_si512(out + 64, _mm512_permutex2var_epi16(a, hi, b));
  }
}
#endif

template <typename In, typename S>
inline void pack_b_rows(const S* src, int64_t ld, int64_t K, int64_t N, In* out) {
  constexpr int64_t P = kPair<In>;
  const int64_t Kp = pad_k<In>(K);
#if RK_X86_DISPATCH
  // bf16 rows into bf16 panels (the W tile of dh = dz W_t, the h blocks of dW): full panels
  // and row pairs in registers (the scalar loop below was 5 % of a bf16 backward).
  const bool vec = std::is_same_v<S, In> && P == 2 && cpu_isa() == CpuIsa::kAvx512;
#else
  constexpr bool vec = false;
#endif
  (void)vec;
  for (int64_t p0 = 0; p0 < N; p0 += kPanel, out += Kp * kPanel) {
    const int64_t nb = std::min(kPanel, N - p0);
    for (int64_t k0 = 0; k0 < Kp; k0 += P) {
      In* o = out + k0 * kPanel;
      const S* r0 = src + k0 * ld + p0;
      if constexpr (P == 2) {
        const S* r1 = r0 + ld;
        const bool has1 = k0 + 1 < K;
#if RK_X86_DISPATCH
        if (vec && has1 && nb == kPanel) {
          interleave_panel_row(r0, r1, o);
          continue;
        }
#endif
        for (int64_t n = 0; n < nb; ++n) {
          o[2 * n] = static_cast<In>(r0[n]);
          o[2 * n + 1] = has1 ? static_cast<In>(r1[n]) : In(0);
        }
        for (int64_t n = 2 * nb; n < 2 * kPanel; ++n) o[n] = In(0);
      } else {
        for (int64_t n = 0; n < nb; ++n) o[n] = static_cast<In>(r0[n]);
        for (int64_t n = nb; n < kPanel; ++n) o[n] = In(0);
      }
    }
  }
}

// Transpose in 8 x 8 blocks, converting S -> D: dst[c * kPanel + r] = src[r * lds + c],
// r < rows <= kPanel, c < cols (a panel of pack_b_cols when one B entry is 32 bits: a bf16 pair
// or an fp32 copied as uint32_t, or a 16-bit weight converted to fp32).
template <typename D, typename S>
inline void transpose_to_panel(const S* src, int64_t lds, int64_t rows, int64_t cols, D* dst) {
  constexpr int64_t B = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += B) {
    const int64_t r1 = std::min(rows, r0 + B);
    for (int64_t c0 = 0; c0 < cols; c0 += B) {
      const int64_t c1 = std::min(cols, c0 + B);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) dst[c * kPanel + r] = static_cast<D>(src[r * lds + c]);
    }
  }
}

#if RK_X86_DISPATCH
// 16 x 16 fp32 transpose in registers: r[i] holds row i on entry, column i on return.
RK_TARGET_AVX512 RK_INLINE void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // per 128-bit lane k, u[4 g + j] holds column 4 k + j of rows 4 g .. 4 g + 3
  for (int g = 0; g < 16; g += 4) {
    const __m512d a = _mm512_castps_pd(t[g]), b = _mm512_castps_pd(t[g + 1]);
    const __m512d c = _mm512_castps_pd(t[g + 2]), d = _mm512_castps_pd(t[g + 3]);
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 lo01 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44);
    const __m512 hi01 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
    const __m512 lo23 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
    const __m512 hi23 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_f32x4(lo01, lo23, 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(lo01, lo23, 0xDD);
    r[8 + j] = _mm512_shuffle_f32x4(hi01, hi23, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(hi01, hi23, 0xDD);
  }
}

// transpose_to_panel for 32-bit entries (above): full 16 x 16 blocks in registers.
RK_TARGET_AVX512 inline void transpose_to_panel32_avx512(const uint32_t* src, int64_t lds,
                                                         int64_t rows, int64_t cols,
                                                         uint32_t* dst) {
  const int64_t rf = rows / 16 * 16, cf = cols / 16 * 16;
  __m512 r[16];
  for (int64_t r0 = 0; r0 < rf; r0 += 16)
    for (int64_t c0 = 0; c0 < cf; c0 += 16) {
      for (int i = 0; i < 16; ++i)
        r[i] = _mm512_castsi512_ps(_mm512_loadu_si512(src + (r0 + i) * lds + c0));
      transpose16(r);
      for (int j = 0; j < 16; ++j)
        _mm512_storeu_si512(dst + (c0 + j) * kPanel + r0, _mm512_castps_si512(r[j]));
    }
  // the ragged edges: columns cf.. of the full rows, then the rows rf..
  transpose_to_panel<uint32_t>(src + cf, lds, rf, cols - cf, dst + cf * kPanel);
  transpose_to_panel<uint32_t>(src + rf * lds, lds, rows - rf, cols, dst + rf);
}
#endif

template <typename In, typename S>
inline void pack_b_cols(const S* src, int64_t ld, int64_t K, int64_t N, In* out) {
  constexpr int64_t P = kPair<In>;
  const int64_t Kp = pad_k<In>(K);
  for (int64_t p0 = 0; p0 < N; p0 += kPanel, out += Kp * kPanel) {
    const int64_t nb = std::min(kPanel, N - p0);
    // Same-type entries of 32 bits (a bf16 pair, an fp32) with even rows: a 32-bit transpose;
    // fp32 entries from a 16-bit weight: a converting one (blocked, instead of walking each
    // column with writes kPanel apart).
    constexpr bool k32 = std::is_same_v<S, In> && sizeof(In) * P == 4;
    constexpr bool kConvert = !std::is_same_v<S, In> && P == 1;
    if ((k32 && (P == 1 || ((ld & 1) == 0 && (K & 1) == 0))) || kConvert) {
      if constexpr (kConvert)
        transpose_to_panel<In>(src + p0 * ld, ld, nb, K, out);
#if RK_X86_DISPATCH
      else if (cpu_isa() == CpuIsa::kAvx512)
        transpose_to_panel32_avx512(reinterpret_cast<const uint32_t*>(src + p0 * ld), ld / P, nb,
                                    K / P, reinterpret_cast<uint32_t*>(out));
#endif
      else
        transpose_to_panel<uint32_t>(reinterpret_cast<const uint32_t*>(src + p0 * ld), ld / P,
                                     nb, K / P, reinterpret_cast<uint32_t*>(out));
      if (nb < kPanel)
        for (int64_t k2 = 0; k2 < Kp / P; ++k2)
          for (int64_t n = nb; n < kPanel; ++n)
            for (int64_t j = 0; j < P; ++j) out[(k2 * kPanel + n) * P + j] = In(0);
      continue;
    }
    for (int64_t n = 0; n < kPanel; ++n) {
      In* o = out + n * P;
      if (n < nb) {
        const S* col = src + (p0 + n) * ld;
        for (int64_t k = 0; k < K; ++k) o[(k / P) * kPanel * P + k % P] = static_cast<In>(col[k]);
        for (int64_t k = K; k < Kp; ++k) o[(k / P) * kPanel * P + k % P] = In(0);
      } else {
        for (int64_t k = 0; k < Kp; ++k) o[(k / P) * kPanel * P + k % P] = In(0);
      }
    }
  }
}

// C[M, N] (+)= A[M, K] B[K, N], fp32 C (ldc), A row-major (lda; K = pad_k(K): a padded
// column of A must be finite, a packed B's pad rows are 0). B in panels of kPanel columns:
// panel p at B + p * panel_stride with leading dimension ldb. Packed: ldb = kPanel,
// panel_stride = panel_elems(K) (more when B is a K-slice of a bigger packing). fp32 B may
// also be a plain row-major [K, N] (ld): ldb = ld, panel_stride = kPanel.
// onednn_gemm: through oneDNN's micro-kernel; micro_gemm (below): the micro-kernel of this
// call's path.
template <typename In>
inline void onednn_gemm(int64_t M, int64_t N, int64_t K, const In* A, int64_t lda, const In* B,
                        int64_t ldb, int64_t panel_stride, float* C, int64_t ldc, bool add_C) {
  for (int64_t m0 = 0; m0 < M; m0 += kGemmRows) {
    const int64_t mb = std::min(kGemmRows, M - m0);
    for (int64_t p = 0, n0 = 0; n0 < N; ++p, n0 += kPanel)
      at::native::cpublas::brgemm(mb, std::min(kPanel, N - n0), K, lda, ldb, ldc, add_C,
                                  A + m0 * lda, B + p * panel_stride, C + m0 * ldc + n0,
                                  /*is_vnni=*/kPair<In> == 2);
  }
}

// Small GEMMs through oneDNN's micro-kernel (ragged M, N, K; small integers, so exact), compared
// with the exact product: B packed by rows and by columns, and (fp32) B unpacked. False if
// one throws or disagrees.
template <typename In>
inline bool micro_gemm_probe() {
  try {
    constexpr int64_t M = 3, N = 70, K = 5, Kp = 6;
    In a[M * Kp], b[K * N], bt[N * K], bp[2 * Kp * kPanel];
    for (int64_t i = 0; i < M * Kp; ++i) a[i] = (i % Kp) < K ? In(float((i % 7) - 3)) : In(0);
    // rows differ (N % 11 != 0): a packing that swaps or drops rows fails
    for (int64_t i = 0; i < K * N; ++i) b[i] = In(float((i % 11) - 5));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) bt[n * K + k] = b[k * N + n];
    float c[M * N];
    const auto check = [&]() {
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          float e = 0;
          for (int64_t k = 0; k < K; ++k) e += float(a[i * Kp + k]) * float(b[k * N + j]);
          if (c[i * N + j] != e) return false;
        }
      return true;
    };
    bool ok = true;
    pack_b_rows<In>(b, N, K, N, bp);
    onednn_gemm<In>(M, N, pad_k<In>(K), a, Kp, bp, kPanel, panel_elems<In>(K), c, N, false);
    ok = ok && check();
    pack_b_cols<In>(bt, K, K, N, bp);
    onednn_gemm<In>(M, N, pad_k<In>(K), a, Kp, bp, kPanel, panel_elems<In>(K), c, N, false);
    ok = ok && check();
    if constexpr (kPair<In> == 1) {
      onednn_gemm<In>(M, N, K, a, Kp, b, N, kPanel, c, N, false);
      ok = ok && check();
    }
    at::native::cpublas::brgemm_release(kPair<In> == 2);
    return ok;
  } catch (const std::exception&) {
    return false;
  }
}

inline bool cpu_has_bf16_matmul() {
#if RK_X86_DISPATCH
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

// RAG_KERNELS_CPU_GEMM (read at the first call; set_cpu_gemm changes it): "auto" (default),
// "fp32" (micro-kernel GEMMs, but never on bf16 operands: bf16 inputs take the fp32 path of a
// CPU without bf16 matmul) or "aten" (ATen GEMMs only).
enum class GemmMode : int { kAuto = 0, kFp32 = 1, kAten = 2 };

inline GemmMode parse_gemm_mode(const std::string& v, const char* what) {
  if (v.empty() || v == "auto") return GemmMode::kAuto;
  if (v == "fp32") return GemmMode::kFp32;
  if (v == "aten") return GemmMode::kAten;
  TORCH_CHECK(false, what, " must be one of 'auto', 'fp32', 'aten', got '", v, "'");
  return GemmMode::kAuto;
}

inline std::atomic<int>& gemm_mode_state() {
  static std::atomic<int> state{-1};
  return state;
}

inline GemmMode gemm_mode() {
  int s = gemm_mode_state().load(std::memory_order_relaxed);
  if (s < 0) {
    const char* env = std::getenv("RAG_KERNELS_CPU_GEMM");
    s = static_cast<int>(parse_gemm_mode(env ? env : "", "RAG_KERNELS_CPU_GEMM"));
    gemm_mode_state().store(s, std::memory_order_relaxed);
  }
  return static_cast<GemmMode>(s);
}

inline void set_cpu_gemm(const std::string& name) {
  gemm_mode_state().store(static_cast<int>(parse_gemm_mode(name, "cpu_gemm")),
                          std::memory_order_relaxed);
}

inline const char* gemm_mode_name(GemmMode m) {
  return m == GemmMode::kFp32 ? "fp32" : m == GemmMode::kAten ? "aten" : "auto";
}

// ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) below AVX-512: oneDNN's micro-kernel would run AVX2
// code (or fall back to ATen's GEMM per panel), slower than the AVX2 kernel.
inline bool onednn_below_avx512() {
  static const bool below = [] {
    for (const char* name : {"ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"}) {
      const char* env = std::getenv(name);
      if (!env || !*env) continue;
      std::string v(env);
      for (auto& ch : v) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
      if (!(v == "ALL" || v.find("AVX512") != std::string::npos ||
            v.find("AVX10") != std::string::npos || v.find("AMX") != std::string::npos))
        return true;
    }
    return false;
  }();
  return below;
}

inline bool onednn_usable() {
  return cpu_isa() == CpuIsa::kAvx512 && gemm_mode() != GemmMode::kAten &&
         !onednn_below_avx512() && at::globalContext().userEnabledMkldnn();
}

// bf16 inputs run bf16 micro-kernel GEMMs.
inline bool native_bf16_gemm() {
  if (!onednn_usable() || gemm_mode() != GemmMode::kAuto || !cpu_has_bf16_matmul()) return false;
  static const bool ok = micro_gemm_probe<c10::BFloat16>();
  return ok;
}

// fp32 (and converted 16-bit) inputs run oneDNN's fp32 micro-kernel GEMMs.
inline bool onednn_fp32_gemm() {
  if (!onednn_usable()) return false;
  static const bool ok = micro_gemm_probe<float>();
  return ok;
}

// ... or, without them, the AVX2 kernel (avx2_gemm.h).
inline bool avx2_fp32_gemm() {
  return RK_X86_DISPATCH && static_cast<int>(cpu_isa()) >= static_cast<int>(CpuIsa::kAvx2) &&
         gemm_mode() != GemmMode::kAten && !onednn_fp32_gemm();
}

inline bool fp32_micro_gemm() { return onednn_fp32_gemm() || avx2_fp32_gemm(); }

// Which fp32 GEMM kernel fp32 inputs run: "onednn", "avx2" or "aten".
inline const char* fp32_gemm_name() {
  return onednn_fp32_gemm() ? "onednn" : avx2_fp32_gemm() ? "avx2" : "aten";
}

// The GEMM path of a call with input dtype dt.
enum class GemmPath { kAten, kMicroF32, kMicroBf16 };
inline GemmPath gemm_path(at::ScalarType dt) {
  if (dt == at::kDouble) return GemmPath::kAten;
  if (dt == at::kBFloat16 && native_bf16_gemm()) return GemmPath::kMicroBf16;
  return fp32_micro_gemm() ? GemmPath::kMicroF32 : GemmPath::kAten;
}

// C[M, N] (+)= A[M, K] B[K, N] through the micro-kernel of this call's path (onednn_gemm's
// contract): bf16 operands always run oneDNN's (gemm_path only picks them where it runs), fp32
// ones oneDNN's or the AVX2 kernel.
template <typename In>
inline void micro_gemm(int64_t M, int64_t N, int64_t K, const In* A, int64_t lda, const In* B,
                       int64_t ldb, int64_t panel_stride, float* C, int64_t ldc, bool add_C) {
#if RK_X86_DISPATCH
  if constexpr (kPair<In> == 1) {
    if (!onednn_fp32_gemm()) {
      avx2_gemm(M, N, K, A, lda, B, ldb, kPanel, panel_stride, C, ldc, add_C, kGemmRows);
      return;
    }
  }
#endif
  onednn_gemm<In>(M, N, K, A, lda, B, ldb, panel_stride, C, ldc, add_C);
}

// After a thread's last micro-kernel GEMM: oneDNN's hardware state (the AMX tile
// configuration) belongs to the thread.
template <typename In>
inline void micro_gemm_release() {
  if (kPair<In> == 2 || onednn_fp32_gemm()) at::native::cpublas::brgemm_release(kPair<In> == 2);
}

// fp32 -> bf16, round to nearest even (NaN stays NaN), as c10::BFloat16 rounds.
RK_INLINE uint16_t f32_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
}

}  // namespace detail
}  // namespace rag_kernels
