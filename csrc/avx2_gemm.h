// The fp32 micro-kernel GEMM of CPUs without oneDNN's AVX-512 one (AVX2 + FMA; micro_gemm.h
// says when it runs): C[M, N] (+)= A[M, K] B[K, N], fp32, single-threaded.
//
// Why not ATen's (MKL's) GEMM there: called once per (vocabulary tile, row block), MKL packs
// both operands on every call and reached about 100-118 GFLOP/s per core at the kernels' tile
// shapes on a Zen 5 core capped at AVX2 (FMA peak there: 134.6 GFLOP/s, measured), while this
// kernel reads the B panels the kernels pack once per tile and A in place, and ran at
// 125-130 GFLOP/s on the same core (operands in L2, shapes [256, 576] x [576, 1024] and
// [256, 1024] x [1024, 576]).
//
// Blocking: 6 rows x 16 columns of C in 12 ymm accumulators; per k, two loads of a B row and
// six broadcasts of A entries feed 12 FMAs. Columns go in strips of 16 (the last one masked),
// rows in runs of 6 within blocks of kGemmRows rows (the A block then stays in L2 across the
// strips). A is row-major with leading dimension lda (dW's A, dz^T, is a transposed copy:
// reading dz in place, with the power-of-two stride of its rows thrashing L1 sets, ran at
// 0.6-0.75x the rate; tile_gemm.h transposes it). B row k of panel p at
// B + p * panel_stride + k * ldb, as micro_gemm's B. Each C entry is one fp32 dot product over
// k in order (plus the old C value first, with add_C), so the result does not depend on how
// M and N are blocked.
#pragma once
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>

#include "vec_math.h"

namespace rag_kernels {
namespace detail {

#if RK_X86_DISPATCH

// One MR x 16 block of C; with kMask only the columns whose lane is set in (m0, m1) exist.
template <int MR, bool kMask>
RK_TARGET_AVX2 RK_INLINE void avx2_block(int64_t K, const float* A, int64_t lda, const float* B,
                                         int64_t ldb, float* C, int64_t ldc, bool add_C,
                                         __m256i m0, __m256i m1) {
  __m256 c[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    float* cr = C + r * ldc;
    if (!add_C) {
      c[r][0] = _mm256_setzero_ps();
      c[r][1] = _mm256_setzero_ps();
    } else if (kMask) {
      c[r][0] = _mm256_maskload_ps(cr, m0);
      c[r][1] = _mm256_maskload_ps(cr + 8, m1);
    } else {
      c[r][0] = _mm256_loadu_ps(cr);
      c[r][1] = _mm256_loadu_ps(cr + 8);
    }
  }
  const float* a[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) a[r] = A + r * lda;
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    const __m256 b0 = kMask ? _mm256_maskload_ps(bk, m0) : _mm256_loadu_ps(bk);
    const __m256 b1 = kMask ? _mm256_maskload_ps(bk + 8, m1) : _mm256_loadu_ps(bk + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(a[r] + k);
      c[r][0] = _mm256_fmadd_ps(x, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(x, b1, c[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    float* cr = C + r * ldc;
    if (kMask) {
      _mm256_maskstore_ps(cr, m0, c[r][0]);
      _mm256_maskstore_ps(cr + 8, m1, c[r][1]);
    } else {
      _mm256_storeu_ps(cr, c[r][0]);
      _mm256_storeu_ps(cr + 8, c[r][1]);
    }
  }
}

// Rows [0, M) of one 16-column strip (nc <= 16 columns).
template <bool kMask>
RK_TARGET_AVX2 RK_INLINE void avx2_strip(int64_t M, int64_t K, const float* A, int64_t lda,
                                         const float* B, int64_t ldb, float* C, int64_t ldc,
                                         bool add_C, __m256i m0, __m256i m1) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6)
    avx2_block<6, kMask>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, add_C, m0, m1);
  const float* a = A + i * lda;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: avx2_block<5, kMask>(K, a, lda, B, ldb, c, ldc, add_C, m0, m1); break;
    case 4: avx2_block<4, kMask>(K, a, lda, B, ldb, c, ldc, add_C, m0, m1); break;
    case 3: avx2_block<3, kMask>(K, a, lda, B, ldb, c, ldc, add_C, m0, m1); break;
    case 2: avx2_block<2, kMask>(K, a, lda, B, ldb, c, ldc, add_C, m0, m1); break;
    case 1: avx2_block<1, kMask>(K, a, lda, B, ldb, c, ldc, add_C, m0, m1); break;
    default: break;
  }
}

// C[M, N] (+)= A[M, K] B[K, N]; B in panels of `panel` columns (see the file comment).
RK_TARGET_AVX2 inline void avx2_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                     const float* B, int64_t ldb, int64_t panel,
                                     int64_t panel_stride, float* C, int64_t ldc, bool add_C,
                                     int64_t block_rows) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t m0 = 0; m0 < M; m0 += block_rows) {
    const int64_t mb = std::min(block_rows, M - m0);
    const float* Am = A + m0 * lda;
    float* Cm = C + m0 * ldc;
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
      const int64_t nc = std::min<int64_t>(16, N - n0);
      const float* Bs = B + (n0 / panel) * panel_stride + n0 % panel;
      if (nc == 16) {
        avx2_strip<false>(mb, K, Am, lda, Bs, ldb, Cm + n0, ldc, add_C, lane, lane);
      } else {
        const __m256i m0v = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nc)), lane);
        const __m256i m1v =
            _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nc) - 8), lane);
        avx2_strip<true>(mb, K, Am, lda, Bs, ldb, Cm + n0, ldc, add_C, m0v, m1v);
      }
    }
  }
}

#endif  // RK_X86_DISPATCH

}  // namespace detail
}  // namespace rag_kernels
