// The GEMMs of the CPU LM-head kernels (linear_logprob.cpp, token_smoothing.cpp), behind one
// interface so that the kernels' epilogues do not depend on the GEMM path (micro_gemm.h says
// which path a call takes).
//
// Vocabulary-tile walk, one worker per thread (linear_logprob forward and backward,
// token_smoothing backward). The active hidden rows are cut into blocks (row ranges, fixed up
// front); per worker wk and vocabulary tile W_t = W[v0 : v0 + vt]:
//   set_tile(wk, v0, vt)                 prepares W_t;
//   logits(wk, blk, z)                   z [rows, vt] = h_blk W_t^T;
//   grads(wk, blk, dz, dh, dw, first)    dh [rows, H] += dz W_t; dw [vt, H] = dz^T h_blk
//                                        (first block of the tile) or += (later blocks);
//   worker_done()                        on the worker's thread after its last tile.
// AtenTileGemm<T>: ATen GEMMs in the compute dtype T (16-bit weights converted tile by tile).
// MicroTileGemm<In>: micro-kernel GEMMs (oneDNN's, or for fp32 the AVX2 one) on In = bf16 or
// fp32 operands, fp32 z / dh / dW.
//
// Whole-machine logits (token_smoothing forward, which threads each GEMM and epilogue instead):
// set_tile(v0, vt), then logits(z, r0, rows) -> z [rows, vt] = h[r0 : r0 + rows] W_t^T.
// AtenLogits<T>, MicroLogits<In> (parallel over B panels, each packed on the fly, so no packed
// copy of the weight is kept).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "micro_gemm.h"
#include "tiling.h"
#include "vec_math.h"

namespace rag_kernels {
namespace detail {

using RowBlocks = std::vector<std::pair<int64_t, int64_t>>;  // (first row, rows)

inline RowBlocks uniform_blocks(int64_t n, int64_t rows) {
  RowBlocks b;
  for (int64_t r0 = 0; r0 < n; r0 += rows) b.emplace_back(r0, std::min(rows, n - r0));
  return b;
}

inline int64_t max_rows(const RowBlocks& blocks) {
  int64_t m = 0;
  for (const auto& b : blocks) m = std::max(m, b.second);
  return m;
}

template <typename T>
struct AtenTileGemm {
  at::Tensor h, weight;  // h [Na, H] in T; weight [V, H] in T or a 16-bit type
  RowBlocks blocks;
  at::Tensor wbuf;  // [workers, VT * H]: converted weight tiles (16-bit weights only)
  std::vector<at::Tensor> w;

  AtenTileGemm(const at::Tensor& h_, at::Tensor weight_, RowBlocks blocks_, int64_t workers,
               int64_t VT, bool /*backward*/, bool /*need_dh*/, bool /*need_dw*/)
      : h(h_.scalar_type() == c10::CppTypeToScalarType<T>::value
              ? h_.contiguous()
              : h_.to(c10::CppTypeToScalarType<T>::value).contiguous()),
        weight(std::move(weight_)),
        blocks(std::move(blocks_)),
        w(workers) {
    if (weight.scalar_type() != h.scalar_type())
      wbuf = at::empty({workers, VT * weight.size(1)}, h.options());
  }
  void set_tile(int64_t wk, int64_t v0, int64_t vt) {
    at::Tensor wb = wbuf.defined() ? wbuf[wk] : wbuf;
    w[wk] = weight_tile(weight, wb, v0, vt, h.scalar_type());
  }
  void logits(int64_t wk, int64_t blk, at::Tensor& z) {
    at::mm_out(z, h.narrow(0, blocks[blk].first, blocks[blk].second), w[wk].t());
  }
  void grads(int64_t wk, int64_t blk, const at::Tensor& dz, at::Tensor* dh, at::Tensor* dw,
             bool first) {
    if (dh) dh->addmm_(dz, w[wk]);
    if (dw) {
      auto hb = h.narrow(0, blocks[blk].first, blocks[blk].second);
      if (first)
        at::mm_out(*dw, dz.t(), hb);
      else
        dw->addmm_(dz.t(), hb);
    }
  }
  void worker_done() {}
};

// The two layouts of dz the gradient GEMMs read (MicroTileGemm::grads), written in 16 x 16
// blocks: dz (fp32 [rows, n], ld n) transposed into dst (ld ldt) as fp32 (transpose_dz<float>)
// or, rounded to bf16, both row-major into row_major (ld ldr: the A of dh = dz W_t) and
// transposed into dst (the A of dW = dz^T h; dst may be null) (transpose_dz<bf16>). The pad
// columns of the bf16 layouts (n .. ldr - 1, rows .. ldt - 1) are zeroed. Full blocks take a
// register transpose (16 x 16 on AVX-512; 8 x 8 on AVX2, fp32 only: the bf16 layouts are only
// written where oneDNN's bf16 GEMMs run, on AVX-512), the ragged edges and other CPUs a scalar
// loop; both round exactly as f32_to_bf16_bits.
template <typename Out>
inline void dz_block_scalar(const float* dz, int64_t n, int64_t i0, int64_t i1, int64_t j0,
                            int64_t j1, Out* row_major, int64_t ldr, Out* dst, int64_t ldt) {
  for (int64_t i = i0; i < i1; ++i) {
    const float* zr = dz + i * n;
    for (int64_t j = j0; j < j1; ++j) {
      if constexpr (std::is_same_v<Out, float>) {
        if (dst) dst[j * ldt + i] = zr[j];
      } else {
        const uint16_t u = f32_to_bf16_bits(zr[j]);
        row_major[i * ldr + j] = u;
        if (dst) dst[j * ldt + i] = u;
      }
    }
  }
}

#if RK_X86_DISPATCH
// f32_to_bf16_bits on 16 lanes, in two steps: the rounded bits in the low half of each 32-bit
// lane (bf16_bits_32, which transpose16 can move like floats), then packed (pack_bf16_16).
RK_TARGET_AVX512 RK_INLINE __m512 bf16_bits_32(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i biased = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  __m512i r = _mm512_srli_epi32(biased, 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_castsi512_ps(r);
}
RK_TARGET_AVX512 RK_INLINE __m256i pack_bf16_16(__m512 bits) {
  return _mm512_cvtepi32_epi16(_mm512_castps_si512(bits));
}

template <typename Out>
RK_TARGET_AVX512 void transpose_dz_avx512(const float* dz, int64_t rows, int64_t n,
                                          Out* row_major, int64_t ldr, Out* dst, int64_t ldt) {
  constexpr int64_t B = 16;
  constexpr bool kBf16 = !std::is_same_v<Out, float>;
  const int64_t rf = rows / B * B, nf = n / B * B;
  __m512 r[16];
  for (int64_t i0 = 0; i0 < rf; i0 += B) {
    for (int64_t j0 = 0; j0 < nf; j0 += B) {
      // bf16: round once, then store and transpose the rounded bits
      for (int64_t i = 0; i < B; ++i) {
        r[i] = _mm512_loadu_ps(dz + (i0 + i) * n + j0);
        if constexpr (kBf16) {
          r[i] = bf16_bits_32(r[i]);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(row_major + (i0 + i) * ldr + j0),
                              pack_bf16_16(r[i]));
        }
      }
      if (!dst) continue;
      transpose16(r);
      for (int64_t j = 0; j < B; ++j) {
        if constexpr (kBf16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (j0 + j) * ldt + i0),
                              pack_bf16_16(r[j]));
        else
          _mm512_storeu_ps(dst + (j0 + j) * ldt + i0, r[j]);
      }
    }
    dz_block_scalar(dz, n, i0, i0 + B, nf, n, row_major, ldr, dst, ldt);
  }
  dz_block_scalar(dz, n, rf, rows, 0, n, row_major, ldr, dst, ldt);
}

// The fp32 transpose on AVX2 (the A of the AVX2 kernel's dW = dz^T h, csrc/avx2_gemm.h).
RK_TARGET_AVX2 inline void transpose_dz_avx2(const float* dz, int64_t rows, int64_t n,
                                             float* dst, int64_t ldt) {
  constexpr int64_t B = 8;
  const int64_t rf = rows / B * B, nf = n / B * B;
  for (int64_t i0 = 0; i0 < rf; i0 += B) {
    for (int64_t j0 = 0; j0 < nf; j0 += B) {
      __m256 r[8], t[8];
      for (int64_t i = 0; i < B; ++i) r[i] = _mm256_loadu_ps(dz + (i0 + i) * n + j0);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int g = 0; g < 8; g += 4) {
        r[g] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
        r[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xEE);
        r[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
        r[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
      }
      // r[g + c] (g = 0, 4) holds, per 128-bit lane l, column 4 l + c of rows g .. g + 3
      for (int c = 0; c < 4; ++c) {
        _mm256_storeu_ps(dst + (j0 + c) * ldt + i0, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
        _mm256_storeu_ps(dst + (j0 + 4 + c) * ldt + i0,
                         _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
      }
    }
    dz_block_scalar<float>(dz, n, i0, i0 + B, nf, n, nullptr, 0, dst, ldt);
  }
  dz_block_scalar<float>(dz, n, rf, rows, 0, n, nullptr, 0, dst, ldt);
}
#endif

template <typename Out>
inline void transpose_dz(const float* dz, int64_t rows, int64_t n, Out* row_major, int64_t ldr,
                         Out* dst, int64_t ldt) {
#if RK_X86_DISPATCH
  if (cpu_isa() == CpuIsa::kAvx512) {
    transpose_dz_avx512<Out>(dz, rows, n, row_major, ldr, dst, ldt);
  } else if (std::is_same_v<Out, float> && cpu_isa() == CpuIsa::kAvx2 && dst) {
    transpose_dz_avx2(dz, rows, n, reinterpret_cast<float*>(dst), ldt);
  } else
#endif
  {
    constexpr int64_t B = 16;
    for (int64_t i0 = 0; i0 < rows; i0 += B)
      for (int64_t j0 = 0; j0 < n; j0 += B)
        dz_block_scalar(dz, n, i0, std::min(rows, i0 + B), j0, std::min(n, j0 + B), row_major,
                        ldr, dst, ldt);
  }
  if constexpr (!std::is_same_v<Out, float>) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = n; j < ldr; ++j) row_major[i * ldr + j] = 0;
    if (dst)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = rows; i < ldt; ++i) dst[j * ldt + i] = 0;
  }
}

// dst[i] = bf16(src[i]), i < n, rounded as f32_to_bf16_bits (a bf16 dW tile accumulated in
// fp32; ATen's copy_ there ran its AVX2 loop on AVX-512 CPUs).
#if RK_X86_DISPATCH
RK_TARGET_AVX512 inline void round_to_bf16_avx512(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        pack_bf16_16(bf16_bits_32(_mm512_loadu_ps(src + i))));
  for (; i < n; ++i) dst[i] = f32_to_bf16_bits(src[i]);
}
#endif

// grad (bf16, fp16 or fp32, contiguous rows) <- src (fp32, same shape, contiguous).
inline void store_grad_tile(at::Tensor grad, const at::Tensor& src) {
#if RK_X86_DISPATCH
  if (grad.scalar_type() == at::kBFloat16 && grad.is_contiguous() && src.is_contiguous() &&
      cpu_isa() == CpuIsa::kAvx512) {
    round_to_bf16_avx512(src.data_ptr<float>(), src.numel(),
                         reinterpret_cast<uint16_t*>(grad.data_ptr<at::BFloat16>()));
    return;
  }
#endif
  grad.copy_(src);
}

template <typename In>
constexpr at::ScalarType scalar_type_of() {
  return std::is_same_v<In, c10::BFloat16> ? at::kBFloat16 : at::kFloat;
}

// h [N, H] as the A operand of the logits GEMMs: In, rows padded to pad_k<In>(H) with zeros.
template <typename In>
inline at::Tensor a_rows(const at::Tensor& h) {
  const int64_t H = h.size(1), Hp = pad_k<In>(H);
  const auto dt = scalar_type_of<In>();
  if (Hp == H) return h.scalar_type() == dt ? h.contiguous() : h.to(dt).contiguous();
  auto out = at::zeros({h.size(0), Hp}, h.options().dtype(dt));
  out.narrow(1, 0, H).copy_(h);
  return out;
}

// Calls fn(const S* w) with the weight's data in its own 16-bit / fp32 type S.
template <typename Fn>
inline void with_weight_data(const at::Tensor& weight, const Fn& fn) {
  switch (weight.scalar_type()) {
    case at::kBFloat16: fn(weight.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: fn(weight.data_ptr<c10::Half>()); break;
    default: fn(weight.data_ptr<float>()); break;
  }
}

// Per tile: W_t packed by columns (B of the logits) and, for dh = dz W_t, by rows (bf16, or a
// 16-bit weight on fp32 operands; an fp32 weight is read in place). Per block: dW (+)= dz^T h_blk
// with A = dz transposed (rounded to bf16 for bf16 operands) and B = h_blk packed once per call,
// straight into dw. (dW^T = h^T dz would pack dz with streaming writes instead of transposing
// it, but needs an [H, vt] fp32 accumulator per worker: more memory, no faster overall.)
template <typename In>
struct MicroTileGemm {
  static constexpr bool kBf16 = kPair<In> == 2;
  at::Tensor hin;     // [Na, Hp] In (pad columns 0)
  at::Tensor weight;  // [V, H]: In, or a 16-bit type converted while packing (In = float)
  RowBlocks blocks;
  int64_t H, Hp;
  bool need_dh, need_dw, w_in_place;
  at::Tensor hpack;           // h blocks packed as B operands of dW (need_dw)
  std::vector<int64_t> hoff;  // offset of each block's packing in hpack
  at::Tensor wcols, wrows;    // per worker: W_t packed for logits (K = H) and for dh (K = vt)
  at::Tensor dza, dzt;        // per worker: dz as A of dh (bf16 only) and transposed, A of dW
  std::vector<int64_t> vt_of, v0_of;  // per worker: current tile

  MicroTileGemm(const at::Tensor& h, at::Tensor weight_, RowBlocks blocks_, int64_t workers,
                int64_t VT, bool backward, bool need_dh_, bool need_dw_)
      : hin(a_rows<In>(h)),
        weight(std::move(weight_)),
        blocks(std::move(blocks_)),
        H(h.size(1)),
        Hp(hin.size(1)),
        need_dh(backward && need_dh_),
        need_dw(backward && need_dw_),
        w_in_place(!kBf16 && weight.scalar_type() == at::kFloat),
        vt_of(workers, 0),
        v0_of(workers, 0) {
    const auto opts = hin.options();
    const int64_t RT = max_rows(blocks);
    wcols = at::empty({workers, packed_elems<In>(H, VT)}, opts);
    if (need_dh && !w_in_place) wrows = at::empty({workers, packed_elems<In>(VT, H)}, opts);
    if (backward && kBf16) dza = at::empty({workers, RT * pad_k<In>(VT)}, opts);
    if (need_dw) {
      dzt = at::empty({workers, VT * pad_k<In>(RT)}, opts);
      int64_t total = 0;
      for (const auto& b : blocks) {
        hoff.push_back(total);
        total += packed_elems<In>(b.second, H);
      }
      hpack = at::empty({total}, opts);
      const In* src = hin.data_ptr<In>();
      In* dst = hpack.data_ptr<In>();
      at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          pack_b_rows<In>(src + blocks[b].first * Hp, Hp, blocks[b].second, H, dst + hoff[b]);
      });
    }
  }
  void set_tile(int64_t wk, int64_t v0, int64_t vt) {
    vt_of[wk] = vt;
    v0_of[wk] = v0;
    with_weight_data(weight, [&](const auto* w) {
      pack_b_cols<In>(w + v0 * H, H, H, vt, wcols[wk].data_ptr<In>());
      if (need_dh && !w_in_place) pack_b_rows<In>(w + v0 * H, H, vt, H, wrows[wk].data_ptr<In>());
    });
  }
  void logits(int64_t wk, int64_t blk, at::Tensor& z) {
    const int64_t vt = vt_of[wk], r0 = blocks[blk].first, rt = blocks[blk].second;
    micro_gemm<In>(rt, vt, Hp, hin.data_ptr<In>() + r0 * Hp, Hp, wcols[wk].data_ptr<In>(),
                   kPanel, panel_elems<In>(H), z.data_ptr<float>(), vt, false);
  }
  void grads(int64_t wk, int64_t blk, const at::Tensor& dz, at::Tensor* dh, at::Tensor* dw,
             bool first) {
    const int64_t vt = vt_of[wk], rt = blocks[blk].second;
    const int64_t vtp = pad_k<In>(vt), rtp = pad_k<In>(rt);
    const float* d = dz.data_ptr<float>();
    const In* a_dh = reinterpret_cast<const In*>(d);  // fp32: dz in place
    const In* a_dw = dw ? dzt[wk].data_ptr<In>() : nullptr;
    if constexpr (kBf16) {
      auto* za = reinterpret_cast<uint16_t*>(dza[wk].data_ptr<In>());
      transpose_dz<uint16_t>(d, rt, vt, za, vtp,
                             reinterpret_cast<uint16_t*>(const_cast<In*>(a_dw)), rtp);
      a_dh = reinterpret_cast<const In*>(za);
    } else if (dw) {
      transpose_dz<float>(d, rt, vt, nullptr, 0, reinterpret_cast<float*>(const_cast<In*>(a_dw)),
                          rtp);
    }
    if (dh) {
      if (w_in_place)
        micro_gemm<In>(rt, H, vt, a_dh, vt,
                       reinterpret_cast<const In*>(weight.data_ptr<float>() + v0_of[wk] * H), H,
                       kPanel, dh->data_ptr<float>(), H, true);
      else
        micro_gemm<In>(rt, H, vtp, a_dh, kBf16 ? vtp : vt, wrows[wk].data_ptr<In>(), kPanel,
                       panel_elems<In>(vt), dh->data_ptr<float>(), H, true);
    }
    if (dw)
      micro_gemm<In>(vt, H, rtp, a_dw, rtp, hpack.data_ptr<In>() + hoff[blk], kPanel,
                     panel_elems<In>(rt), dw->data_ptr<float>(), H, !first);
  }
  void worker_done() { micro_gemm_release<In>(); }
};

// The backward tile walk of the LM-head kernels (linear_logprob.cpp, token_smoothing.cpp) on a
// tile-walk Gemm (above): per (vocabulary tile, row block) the logits z [rows, vt] (at zp),
// turned into dz in place by epilogue(wk, blk, v0, vt, zp), then dh [Na, H] += dz W_t,
// dW_t (+)= dz^T h and db_t += sum_rows dz (each may be null) in the compute dtype T (fp32 for
// bf16 inputs, whose dW tiles accumulate in fp32 and are rounded once into grad_weight).
template <typename T, typename Gemm, typename Epilogue>
inline void backward_walk(Gemm& gemm, int64_t Na, int64_t H, int64_t V, int64_t VT,
                          int64_t workers, const at::TensorOptions& zopts, at::Tensor* dh,
                          at::Tensor* grad_weight, double* db, const Epilogue& epilogue) {
  const auto& blocks = gemm.blocks;
  // Per worker: a logit tile, a dW tile in T when grad_weight has another dtype, and a partial
  // dh (summed at the end). dW and db tiles belong to one worker: no races.
  at::Tensor zbuf = at::empty({workers, max_rows(blocks) * VT}, zopts);
  at::Tensor dwbuf, dh_parts;
  if (grad_weight && grad_weight->scalar_type() != zopts.dtype().toScalarType())
    dwbuf = at::empty({workers, VT * H}, zopts);
  if (dh) dh_parts = workers == 1 ? dh->unsqueeze(0) : at::zeros({workers, Na, H}, zopts);

  for_each_vocab_tile(
      V, VT, workers,
      [&](int64_t wk, int64_t v0, int64_t vt) {
        gemm.set_tile(wk, v0, vt);
        at::Tensor dw;
        if (grad_weight) {
          dw = dwbuf.defined() ? dwbuf[wk].narrow(0, 0, vt * H).view({vt, H})
                               : grad_weight->narrow(0, v0, vt);
        }
        at::Tensor zw = zbuf[wk];
        for (int64_t blk = 0; blk < static_cast<int64_t>(blocks.size()); ++blk) {
          const int64_t r0 = blocks[blk].first, rt = blocks[blk].second;
          at::Tensor z = zw.narrow(0, 0, rt * vt).view({rt, vt});
          gemm.logits(wk, blk, z);
          epilogue(wk, blk, v0, vt, zw.data_ptr<T>());
          at::Tensor dh_rows;
          if (dh) dh_rows = dh_parts[wk].narrow(0, r0, rt);
          gemm.grads(wk, blk, z, dh ? &dh_rows : nullptr, grad_weight ? &dw : nullptr, blk == 0);
          if (db) {
            at::Tensor col = z.sum(0, false, at::kDouble);
            const double* cp = col.data_ptr<double>();
            for (int64_t v = 0; v < vt; ++v) db[v0 + v] += cp[v];
          }
        }
        if (grad_weight && dwbuf.defined())
          store_grad_tile(grad_weight->narrow(0, v0, vt), dw);
      },
      [&](int64_t) { gemm.worker_done(); });
  if (dh && workers > 1) at::sum_out(*dh, dh_parts, {0});
}

template <typename T>
struct AtenLogits {
  at::Tensor h, weight, wbuf, w;
  AtenLogits(const at::Tensor& h_, at::Tensor weight_, int64_t VT)
      : h(h_.scalar_type() == c10::CppTypeToScalarType<T>::value
              ? h_.contiguous()
              : h_.to(c10::CppTypeToScalarType<T>::value).contiguous()),
        weight(std::move(weight_)) {
    if (weight.scalar_type() != h.scalar_type())
      wbuf = at::empty({VT * weight.size(1)}, h.options());
  }
  void set_tile(int64_t v0, int64_t vt) { w = weight_tile(weight, wbuf, v0, vt, h.scalar_type()); }
  // Parallel over column chunks of kLogitCols, each one single-threaded GEMM into its columns
  // of z (a strided view, which ATen hands to BLAS as is): with AVX2 MKL on 2 cores these ran
  // 5-10 % faster than one 2-thread GEMM of the whole [rows, H] x [H, vt] product.
  void logits(at::Tensor& z, int64_t r0, int64_t rows) {
    constexpr int64_t kLogitCols = 1024;
    const int64_t vt = w.size(0);
    const int64_t chunks = (vt + kLogitCols - 1) / kLogitCols;
    const at::Tensor a = h.narrow(0, r0, rows);
    if (chunks < 2 || at::get_num_threads() < 2) {
      at::mm_out(z, a, w.t());
      return;
    }
    const at::ThreadLocalState tls;  // the caller's dispatch state on the worker threads
    at::parallel_for(0, chunks, 1, [&](int64_t p0, int64_t p1) {
      at::ThreadLocalStateGuard guard(tls);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kLogitCols, nb = std::min(kLogitCols, vt - n0);
        at::Tensor zc = z.narrow(1, n0, nb);
        at::mm_out(zc, a, w.narrow(0, n0, nb).t());
      }
    });
  }
};

template <typename In>
struct MicroLogits {
  at::Tensor hin, weight, pbuf;  // pbuf: one packed panel per thread
  int64_t H, Hp, v0 = 0, vt = 0;
  MicroLogits(const at::Tensor& h, at::Tensor weight_, int64_t /*VT*/)
      : hin(a_rows<In>(h)), weight(std::move(weight_)), H(h.size(1)), Hp(hin.size(1)) {
    pbuf = at::empty({at::get_num_threads(), panel_elems<In>(H)}, hin.options());
  }
  void set_tile(int64_t v0_, int64_t vt_) {
    v0 = v0_;
    vt = vt_;
  }
  void logits(at::Tensor& z, int64_t r0, int64_t rows) {
    const int64_t panels = (vt + kPanel - 1) / kPanel;
    const In* a = hin.data_ptr<In>() + r0 * Hp;
    float* c = z.data_ptr<float>();
    with_weight_data(weight, [&](const auto* w) {
      at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
        In* bp = pbuf[at::get_thread_num()].template data_ptr<In>();
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n0 = p * kPanel, nb = std::min(kPanel, vt - n0);
          pack_b_cols<In>(w + (v0 + n0) * H, H, H, nb, bp);
          micro_gemm<In>(rows, nb, Hp, a, Hp, bp, kPanel, panel_elems<In>(H), c + n0, vt, false);
        }
        micro_gemm_release<In>();
      });
    });
  }
};

}  // namespace detail
}  // namespace rag_kernels
