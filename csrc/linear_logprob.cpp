// Fused LM-head log-probability on CPU: log softmax(W h + b)[y] per row without [N, V] logits.
//
// The vocabulary is walked in tiles of `vocab_tile` columns, the (compacted) active rows in
// blocks of `row_tile`. Per (vocab tile, row block) one GEMM writes the logit tile into a
// preallocated buffer and a fused epilogue consumes it:
//   forward:  online log-sum-exp per row, the target logit, and sum_v z (for sum_logprob);
//   backward: recomputes the tile, turns it in place into
//             dz = g_lp (1[v=y] - p) + g_S (1 - V p) + g_lse p  (times 1 - (z/c)^2 with softcap)
//             and accumulates dh += dz W_tile, dW_tile += dz^T h, db_tile += sum_rows dz.
// Rows with target == ignore_index (and, in the backward, rows whose upstream gradients are
// all zero) are compacted away first, so they cost no FLOPs and their hidden states are never
// read. Extra memory is O(threads * (row_tile * vocab_tile + N * H)).
// GEMMs (csrc/tile_gemm.h, csrc/micro_gemm.h): micro-kernel GEMMs with fp32 outputs, on bf16
// operands for bf16 inputs where the CPU has bf16 matmul (oneDNN's, AVX512_BF16 / AMX: fp32
// logits and epilogue, dz rounded to bf16 for the gradient GEMMs, dh and dW accumulated in
// fp32), else on fp32 operands (16-bit weights converted while packing; oneDNN's on AVX-512
// CPUs, csrc/avx2_gemm.h on AVX2 ones); for fp64 and on pre-AVX2 CPUs ATen GEMMs in the
// compute dtype (a 16-bit weight's tile converted to fp32 once per tile). The epilogue is
// compiled per ISA (csrc/vec_math.h).
// Parallel over vocabulary tiles (one worker per intra-op thread, single-threaded GEMMs):
// one parallel region per pass, so the cost of synchronisation does not grow with the tile
// count (this beat GEMM-level threading + a row-parallel epilogue on 2 busy cores).
// Math: rag_kernels/ops/linear_logprob/__init__.py and docs/design.md §2.1.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "check.h"
#include "tile_gemm.h"
#include "tiling.h"
#include "vec_math.h"

namespace {

using rag_kernels::detail::acc_type;
using rag_kernels::detail::backward_walk;
using rag_kernels::detail::max_rows;
using rag_kernels::detail::for_each_vocab_tile;
using rag_kernels::detail::lse_shift;
using rag_kernels::detail::num_workers;
using rag_kernels::detail::rk_exp;
using rag_kernels::detail::rk_tanh;
using rag_kernels::detail::variant_of;

// Default tiles (rows x vocabulary columns), per GEMM path (cpu.py documents them): 1024
// columns on the micro-kernel paths (bf16 fwd+bwd ran about 5 % faster than at 2048 on a
// 2-core Zen 5, fp32 the same; the AVX2 kernel's fp32 backward 1-2 % slower than at 512, within
// the noise), 2048 on ATen's.
constexpr int64_t kDefaultRowTile = 256;
constexpr int64_t kDefaultVocabTileMicro = 1024;
constexpr int64_t kDefaultVocabTileAten = 2048;


// Forward, one row of a tile: z <- softcap(z + b) in place; returns max_v z and sum_v z.
template <typename T, bool kBias, bool kCap>
RK_INLINE void fwd_prep(T* z, const T* b, int64_t n, T cap, T& out_max, T& out_sum) {
  T mx = -std::numeric_limits<T>::infinity();
  T sm = 0;
  const T inv_cap = kCap ? T(1) / cap : T(0);
#pragma omp simd reduction(max : mx) reduction(+ : sm)
  for (int64_t v = 0; v < n; ++v) {
    T x = z[v];
    if (kBias) x += b[v];
    if (kCap) x = cap * rk_tanh(x * inv_cap);
    if (kBias || kCap) z[v] = x;
    mx = x > mx ? x : mx;
    sm += x;
  }
  out_max = mx;
  out_sum = sm;
}

template <typename T>
RK_INLINE T sum_exp(const T* z, int64_t n, T m) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < n; ++v) s += rk_exp(z[v] - m);
  return s;
}

// Backward, one row of a tile: z (raw logits without bias) <- dz for the terms that do not
// depend on the target: (c p + g_S) * cap'(z), p = exp(softcap(z + b) - lse),
// c = -g_lp - V g_S + g_lse. The target column is fixed up by the caller.
template <typename T, bool kBias, bool kCap>
RK_INLINE void bwd_row(T* z, const T* b, int64_t n, T cap, T lse, T c, T gs) {
  const T inv_cap = kCap ? T(1) / cap : T(0);
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) {
    T x = z[v];
    if (kBias) x += b[v];
    T d = 1;
    if (kCap) {
      const T t = rk_tanh(x * inv_cap);
      x = cap * t;
      d = T(1) - t * t;
    }
    const T p = rk_exp(x - lse);
    z[v] = kCap ? (c * p + gs) * d : c * p + gs;
  }
}

// Non-template entry points (the float ones compiled per ISA, vec_math.h);
// variant = bias + 2 * softcap.
#define RK_ROW_FNS(T, SUFFIX, VARIANTS)                                                        \
  VARIANTS(void, fwd_prep_##SUFFIX,                                                            \
           (int variant, T* z, const T* b, int64_t n, T cap, T* mx, T* sm),                    \
           (variant, z, b, n, cap, mx, sm), {                                                  \
             switch (variant) {                                                                \
               case 0: fwd_prep<T, false, false>(z, b, n, cap, *mx, *sm); break;               \
               case 1: fwd_prep<T, true, false>(z, b, n, cap, *mx, *sm); break;                \
               case 2: fwd_prep<T, false, true>(z, b, n, cap, *mx, *sm); break;                \
               default: fwd_prep<T, true, true>(z, b, n, cap, *mx, *sm); break;                \
             }                                                                                 \
           })                                                                                  \
  VARIANTS(T, sum_exp_##SUFFIX, (const T* z, int64_t n, T m), (z, n, m),                       \
           { return sum_exp<T>(z, n, m); })                                                    \
  VARIANTS(void, bwd_row_##SUFFIX,                                                             \
           (int variant, T* z, const T* b, int64_t n, T cap, T lse, T c, T gs),                \
           (variant, z, b, n, cap, lse, c, gs), {                                              \
             switch (variant) {                                                                \
               case 0: bwd_row<T, false, false>(z, b, n, cap, lse, c, gs); break;              \
               case 1: bwd_row<T, true, false>(z, b, n, cap, lse, c, gs); break;               \
               case 2: bwd_row<T, false, true>(z, b, n, cap, lse, c, gs); break;               \
               default: bwd_row<T, true, true>(z, b, n, cap, lse, c, gs); break;               \
             }                                                                                 \
           })

#define RK_ONE_VERSION(RET, NAME, PARAMS, ARGS, ...) RET NAME PARAMS __VA_ARGS__
RK_ROW_FNS(float, f, RK_ISA_VARIANTS)
RK_ROW_FNS(double, d, RK_ONE_VERSION)  // std::exp / std::tanh: nothing to vectorise
#undef RK_ONE_VERSION
#undef RK_ROW_FNS

inline void fwd_prep_row(int variant, float* z, const float* b, int64_t n, float cap, float* mx,
                         float* sm) {
  fwd_prep_f(variant, z, b, n, cap, mx, sm);
}
inline void fwd_prep_row(int variant, double* z, const double* b, int64_t n, double cap,
                         double* mx, double* sm) {
  fwd_prep_d(variant, z, b, n, cap, mx, sm);
}
inline float sum_exp_row(const float* z, int64_t n, float m) { return sum_exp_f(z, n, m); }
inline double sum_exp_row(const double* z, int64_t n, double m) { return sum_exp_d(z, n, m); }
inline void bwd_row_dispatch(int variant, float* z, const float* b, int64_t n, float cap,
                             float lse, float c, float gs) {
  bwd_row_f(variant, z, b, n, cap, lse, c, gs);
}
inline void bwd_row_dispatch(int variant, double* z, const double* b, int64_t n, double cap,
                             double lse, double c, double gs) {
  bwd_row_d(variant, z, b, n, cap, lse, c, gs);
}

// Scalar softcapped logit of one entry (the target column).
template <typename T>
T capped(T x, bool has_cap, T cap) {
  return has_cap ? cap * std::tanh(x / cap) : x;
}

struct Tiles {
  int64_t rows, vocab;
};

Tiles pick_tiles(int64_t row_tile, int64_t vocab_tile, at::ScalarType dt) {
  namespace d = rag_kernels::detail;
  const int64_t vocab_default =
      d::gemm_path(dt) == d::GemmPath::kAten ? kDefaultVocabTileAten : kDefaultVocabTileMicro;
  return {row_tile > 0 ? row_tile : kDefaultRowTile, vocab_tile > 0 ? vocab_tile : vocab_default};
}

// hidden [N, H] and weight [V, H], one floating dtype.
void check_head(const at::Tensor& hidden, const at::Tensor& weight) {
  RK_CHECK_INPUT(hidden);
  RK_CHECK_INPUT(weight);
  RK_CHECK_DIM(hidden, 2);
  RK_CHECK_DIM(weight, 2);
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "hidden must be float32, float64, bfloat16 or float16, got ", dt);
  RK_CHECK_DTYPE(weight, dt);
  TORCH_CHECK(weight.size(1) == hidden.size(1), "weight must have shape (V, ", hidden.size(1),
              "), got ", weight.sizes());
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                  const std::optional<at::Tensor>& bias) {
  check_head(hidden, weight);
  RK_CHECK_INPUT(target);
  const auto dt = hidden.scalar_type();
  // target: one id per row [N], or [B, T] shared by the K = N / (B T) consecutive groups of T
  // rows of each b (row (b K + k) T + t reads target[b, t]; the RAG layout, no K-fold copy).
  const int64_t N = hidden.size(0);
  TORCH_CHECK((target.dim() == 1 && target.size(0) == N) ||
                  (target.dim() == 2 && (N == 0 || (target.numel() > 0 && N % target.numel() == 0))),
              "target must have shape (", N, ") or (B, T) with B * T dividing ", N, ", got ",
              target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
              "target must be int64 or int32, got ", target.scalar_type());
  if (bias.has_value()) {
    RK_CHECK_INPUT(*bias);
    RK_CHECK_SHAPE(*bias, weight.size(0));
    RK_CHECK_DTYPE(*bias, dt);
  }
}

// Row -> target id, reading a [N] target directly or a [B, T] one shared by K groups of rows.
struct RowTargets {
  at::Tensor ids;  // int64, contiguous, [N] or [B * T]
  int64_t inner, group;  // T and K * T ([N] target: both N)
  const int64_t* p;

  RowTargets(const at::Tensor& target, int64_t N)
      : ids(target.to(at::kLong).contiguous().view(-1)),
        inner(target.dim() == 2 ? target.size(1) : N),
        group(target.dim() == 2 && target.size(0) > 0 ? N / target.size(0) : N),  // B = 0: N = 0
        p(ids.data_ptr<int64_t>()) {}
  int64_t operator()(int64_t row) const { return p[(row / group) * inner + row % inner]; }
  // The target of each active row idx[0 .. n) (looked up once, not once per vocabulary tile).
  std::vector<int64_t> of_rows(const at::Tensor& idx) const {
    const int64_t* ip = idx.data_ptr<int64_t>();
    std::vector<int64_t> out(idx.numel());
    for (int64_t i = 0; i < idx.numel(); ++i) out[i] = (*this)(ip[i]);
    return out;
  }
  // [N] bool: the row's target is not ignore_index (the only per-row expansion: a mask).
  at::Tensor kept_rows(int64_t N, int64_t ignore_index) const {
    auto keep = ids.ne(ignore_index);
    if (N == 0) return keep.narrow(0, 0, 0);
    if (inner == N && group == N) return keep;
    const int64_t B = ids.numel() / inner;
    // contiguous: callers update the mask in place, which a stride-0 view (inner = 1) forbids
    return keep.view({B, 1, inner}).expand({B, group / inner, inner}).contiguous().view({N});
  }
  // Every kept id lies in [0, V) (checked once per distinct id, not once per document).
  void check_range(int64_t V, int64_t ignore_index) const {
    for (int64_t i = 0; i < ids.numel(); ++i)
      TORCH_CHECK(p[i] == ignore_index || (p[i] >= 0 && p[i] < V), "target ids must lie in [0, ",
                  V, ") or equal ignore_index, got ", p[i]);
  }
};

// Active hidden rows (no copy when nothing changes); the Gemm converts them to its operand type.
at::Tensor gather_rows(const at::Tensor& hidden, const at::Tensor& idx) {
  return idx.numel() == hidden.size(0) ? hidden.contiguous() : hidden.index_select(0, idx);
}

// Runs fn(gemm, bias_ptr) with the Gemm of this call's GEMM path (csrc/micro_gemm.h) and the
// bias in the epilogue dtype; the epilogue dtype is the bias pointer's element type.
template <typename Fn>
void with_gemm(const at::Tensor& h, const at::Tensor& weight, rag_kernels::detail::RowBlocks blocks,
               int64_t workers, int64_t VT, bool backward, bool need_dh, bool need_dw,
               const at::Tensor& b, const Fn& fn) {
  namespace d = rag_kernels::detail;
  switch (d::gemm_path(h.scalar_type())) {
    case d::GemmPath::kMicroBf16: {
      d::MicroTileGemm<c10::BFloat16> gemm(h, weight, std::move(blocks), workers, VT, backward,
                                           need_dh, need_dw);
      fn(gemm, b.defined() ? b.data_ptr<float>() : static_cast<float*>(nullptr));
      break;
    }
    case d::GemmPath::kMicroF32: {
      d::MicroTileGemm<float> gemm(h, weight, std::move(blocks), workers, VT, backward, need_dh,
                                   need_dw);
      fn(gemm, b.defined() ? b.data_ptr<float>() : static_cast<float*>(nullptr));
      break;
    }
    default:
      AT_DISPATCH_FLOATING_TYPES(acc_type(h.scalar_type()), "linear_logprob", [&] {
        d::AtenTileGemm<scalar_t> gemm(h, weight, std::move(blocks), workers, VT, backward,
                                       need_dh, need_dw);
        fn(gemm, b.defined() ? b.data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr));
      });
  }
}

// The forward's tile walk: per (vocabulary tile, row block) the logits z [rows, vt] (row-major,
// at zp) of W_t, handed to epilogue(wk, blk, v0, vt, zp). Gemm: AtenTileGemm<T> or
// MicroTileGemm<In> (T = float), csrc/tile_gemm.h.
template <typename T, typename Gemm, typename Epilogue>
void forward_walk(Gemm& gemm, int64_t V, int64_t VT, int64_t workers,
                  const at::TensorOptions& zopts, const Epilogue& epilogue) {
  const auto& blocks = gemm.blocks;
  at::Tensor zbuf = at::empty({workers, max_rows(blocks) * VT}, zopts);  // a tile per worker
  for_each_vocab_tile(
      V, VT, workers,
      [&](int64_t wk, int64_t v0, int64_t vt) {
        gemm.set_tile(wk, v0, vt);
        at::Tensor zw = zbuf[wk];
        for (int64_t blk = 0; blk < static_cast<int64_t>(blocks.size()); ++blk) {
          at::Tensor z = zw.narrow(0, 0, blocks[blk].second * vt).view({blocks[blk].second, vt});
          gemm.logits(wk, blk, z);
          epilogue(wk, blk, v0, vt, zw.data_ptr<T>());
        }
      },
      [&](int64_t) { gemm.worker_done(); });
}

template <typename T, typename Gemm>
void forward_kernel(Gemm& gemm, int64_t Na, int64_t V, int64_t VT, int64_t workers,
                    const int64_t* y, const T* bias,
                    std::optional<double> softcap, const at::TensorOptions& zopts,
                    double* lse_out, double* zy_out, double* zsum_out) {
  const bool has_cap = softcap.has_value();
  const T cap = has_cap ? static_cast<T>(*softcap) : T(0);
  const int variant = variant_of(bias != nullptr, has_cap);
  const auto& blocks = gemm.blocks;
  // Per worker: partial row statistics.
  std::vector<double> run_max(workers * Na, -std::numeric_limits<double>::infinity());
  std::vector<double> run_sum(workers * Na, 0.0), run_zsum(workers * Na, 0.0);

  forward_walk<T>(gemm, V, VT, workers, zopts,
                  [&](int64_t wk, int64_t blk, int64_t v0, int64_t vt, T* zp) {
    double* mxs = run_max.data() + wk * Na;
    double* sms = run_sum.data() + wk * Na;
    double* zss = run_zsum.data() + wk * Na;
    const int64_t r0 = blocks[blk].first, rt = blocks[blk].second;
    for (int64_t i = 0; i < rt; ++i) {
      const int64_t r = r0 + i;
      T* zr = zp + i * vt;
      T mx, sm;
      fwd_prep_row(variant, zr, bias ? bias + v0 : nullptr, vt, cap, &mx, &sm);
      zss[r] += static_cast<double>(sm);
      const int64_t yr = y[r] - v0;
      if (yr >= 0 && yr < vt) zy_out[r] = static_cast<double>(zr[yr]);
      const double m_new = std::max(mxs[r], static_cast<double>(mx));
      const double s_tile =
          static_cast<double>(sum_exp_row(zr, vt, static_cast<T>(lse_shift(m_new))));
      // the running max rarely moves after the first tiles: skip exp(0) = 1 (exact); while
      // it is -inf, the sum (of exps clamped at exp(-87), or NaN) is dropped by the
      // exp(-inf) = 0 of the first finite max, a NaN kept
      sms[r] = (m_new == mxs[r] ? sms[r] : sms[r] * std::exp(mxs[r] - m_new)) + s_tile;
      mxs[r] = m_new;
    }
  });
  // Merge the workers' partial log-sum-exps (a worker without tiles holds -inf / 0).
  for (int64_t r = 0; r < Na; ++r) {
    double m = -std::numeric_limits<double>::infinity(), s = 0.0, zs = 0.0;
    for (int64_t wk = 0; wk < workers; ++wk) m = std::max(m, run_max[wk * Na + r]);
    const double shift = lse_shift(m);
    for (int64_t wk = 0; wk < workers; ++wk) {
      // != 0 (not > 0): a NaN partial sum (NaN in the weight or hidden row) must propagate
      if (run_sum[wk * Na + r] != 0.0)
        s += run_sum[wk * Na + r] * std::exp(run_max[wk * Na + r] - shift);
      zs += run_zsum[wk * Na + r];
    }
    lse_out[r] = shift + std::log(s);
    zsum_out[r] = zs;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprob_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, std::optional<double> softcap,
    int64_t row_tile, int64_t vocab_tile) {
  check_inputs(hidden, weight, target, bias);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto acc = acc_type(hidden.scalar_type());
  auto out_opts = hidden.options().dtype(acc);
  auto lp = at::zeros({N}, out_opts), lse = at::zeros({N}, out_opts), sum_lp = at::zeros({N}, out_opts);
  const RowTargets targets(target, N);
  targets.check_range(V, ignore_index);
  auto idx = targets.kept_rows(N, ignore_index).nonzero().squeeze(1);  // active rows
  const int64_t Na = idx.numel();
  if (Na == 0 || V == 0) return {lp, lse, sum_lp};
  auto h = gather_rows(hidden, idx);
  at::Tensor b;
  if (bias.has_value()) b = bias->to(acc).contiguous();
  auto dopts = hidden.options().dtype(at::kDouble);
  auto lse_a = at::empty({Na}, dopts), zy_a = at::empty({Na}, dopts), zs_a = at::empty({Na}, dopts);
  const Tiles tiles = pick_tiles(row_tile, vocab_tile, hidden.scalar_type());
  const int64_t VT = std::min(tiles.vocab, V), workers = num_workers(V, VT);
  auto blocks = rag_kernels::detail::uniform_blocks(Na, std::min(tiles.rows, Na));
  const std::vector<int64_t> y_a = targets.of_rows(idx);
  with_gemm(h, weight, std::move(blocks), workers, VT, false, false, false, b,
            [&](auto& gemm, auto* bias_p) {
              using T = std::remove_const_t<std::remove_pointer_t<decltype(bias_p)>>;
              forward_kernel<T>(gemm, Na, V, VT, workers, y_a.data(), bias_p, softcap, out_opts,
                                lse_a.data_ptr<double>(), zy_a.data_ptr<double>(),
                                zs_a.data_ptr<double>());
            });
  auto lp_a = zy_a - lse_a;
  auto s_a = zs_a - static_cast<double>(V) * lse_a;
  if (Na == N) return {lp_a.to(acc), lse_a.to(acc), s_a.to(acc)};
  lp.index_copy_(0, idx, lp_a.to(acc));
  lse.index_copy_(0, idx, lse_a.to(acc));
  sum_lp.index_copy_(0, idx, s_a.to(acc));
  return {lp, lse, sum_lp};
}

template <typename T, typename Gemm>
void backward_kernel(Gemm& gemm, int64_t Na, int64_t H, int64_t V, int64_t VT, int64_t workers,
                     const int64_t* y, const T* bias,
                     std::optional<double> softcap, const at::TensorOptions& zopts,
                     const double* lse, const double* coef_y, const double* coef_p,
                     const double* coef_c, at::Tensor* dh, at::Tensor* grad_weight, double* db) {
  const bool has_cap = softcap.has_value();
  const T cap = has_cap ? static_cast<T>(*softcap) : T(0);
  const int variant = variant_of(bias != nullptr, has_cap);
  const auto& blocks = gemm.blocks;
  backward_walk<T>(gemm, Na, H, V, VT, workers, zopts, dh, grad_weight, db,
                   [&](int64_t, int64_t blk, int64_t v0, int64_t vt, T* zp) {
    const int64_t r0 = blocks[blk].first, rt = blocks[blk].second;
    for (int64_t i = 0; i < rt; ++i) {
      const int64_t r = r0 + i;
      T* zr = zp + i * vt;
      const int64_t yr = y[r] - v0;
      const bool has_y = yr >= 0 && yr < vt;
      T dcap_y = 1;
      if (has_y && has_cap) {
        const T x = zr[yr] + (bias ? bias[v0 + yr] : T(0));
        const T t = std::tanh(x / cap);
        dcap_y = T(1) - t * t;
      }
      bwd_row_dispatch(variant, zr, bias ? bias + v0 : nullptr, vt, cap,
                       static_cast<T>(lse[r]), static_cast<T>(coef_p[r]),
                       static_cast<T>(coef_c[r]));
      if (has_y) zr[yr] += static_cast<T>(coef_y[r]) * dcap_y;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprob_bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lp, const std::optional<at::Tensor>& grad_lse,
    const std::optional<at::Tensor>& grad_sum, int64_t ignore_index,
    std::optional<double> softcap, bool needs_hidden, bool needs_weight, bool needs_bias,
    int64_t row_tile, int64_t vocab_tile) {
  check_inputs(hidden, weight, target, bias);
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto dt = hidden.scalar_type();
  const auto acc = acc_type(dt);
  RK_CHECK_CPU(lse);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == N, "lse must have shape (", N, "), got ", lse.sizes());
  for (const auto* g : {&grad_lp, &grad_lse, &grad_sum}) {
    if (g->has_value()) {
      RK_CHECK_CPU(**g);
      TORCH_CHECK((*g)->dim() == 1 && (*g)->size(0) == N, "upstream gradients must have shape (",
                  N, "), got ", (*g)->sizes());
    }
  }
  needs_bias = needs_bias && bias.has_value();
  // A gradient that is not needed comes back as an empty [0] tensor.
  auto empty = at::empty({0}, hidden.options());
  auto zero_grads = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    return {needs_hidden ? at::zeros({N, H}, hidden.options()) : empty,
            needs_weight ? at::zeros({V, H}, hidden.options()) : empty,
            needs_bias ? at::zeros({V}, hidden.options()) : empty};
  };
  if (!(needs_hidden || needs_weight || needs_bias) || V == 0 || N == 0) return zero_grads();

  // Active rows: a kept target and at least one non-zero upstream gradient.
  const RowTargets targets(target, N);
  targets.check_range(V, ignore_index);
  auto dopts = hidden.options().dtype(at::kDouble);
  auto zeros_n = at::zeros({N}, dopts);
  auto g_lp = grad_lp.has_value() ? grad_lp->to(at::kDouble) : zeros_n;
  auto g_lse = grad_lse.has_value() ? grad_lse->to(at::kDouble) : zeros_n;
  auto g_s = grad_sum.has_value() ? grad_sum->to(at::kDouble) : zeros_n;
  auto keep = targets.kept_rows(N, ignore_index).logical_and_(g_lp.ne(0).logical_or_(g_lse.ne(0)).logical_or_(g_s.ne(0)));
  auto idx = keep.nonzero().squeeze(1);
  const int64_t Na = idx.numel();
  if (Na == 0) return zero_grads();

  // dz_v = g_lp 1[v=y] + (c p_v + g_S) with c = -g_lp - V g_S + g_lse (before the softcap factor).
  auto glp_a = g_lp.index_select(0, idx).contiguous();
  auto gs_a = g_s.index_select(0, idx).contiguous();
  auto c_a = (g_lse.index_select(0, idx) - glp_a - static_cast<double>(V) * gs_a).contiguous();
  auto lse_a = lse.to(at::kDouble).index_select(0, idx).contiguous();
  auto h = gather_rows(hidden, idx);
  at::Tensor b;
  if (bias.has_value()) b = bias->to(acc).contiguous();
  const auto zopts = hidden.options().dtype(acc);
  at::Tensor dh = needs_hidden ? at::zeros({Na, H}, zopts) : at::Tensor();
  at::Tensor db = needs_bias ? at::zeros({V}, dopts) : at::Tensor();
  // Every vocabulary tile's first row block overwrites its rows of grad_weight.
  at::Tensor grad_weight = needs_weight ? at::empty({V, H}, hidden.options()) : empty;
  const Tiles tiles = pick_tiles(row_tile, vocab_tile, hidden.scalar_type());
  const int64_t VT = std::min(tiles.vocab, V), workers = num_workers(V, VT);
  auto blocks = rag_kernels::detail::uniform_blocks(Na, std::min(tiles.rows, Na));
  const std::vector<int64_t> y_a = targets.of_rows(idx);
  with_gemm(h, weight, std::move(blocks), workers, VT, true, needs_hidden, needs_weight, b,
            [&](auto& gemm, auto* bias_p) {
              using T = std::remove_const_t<std::remove_pointer_t<decltype(bias_p)>>;
              backward_kernel<T>(gemm, Na, H, V, VT, workers, y_a.data(), bias_p, softcap,
                                 zopts, lse_a.data_ptr<double>(), glp_a.data_ptr<double>(),
                                 c_a.data_ptr<double>(), gs_a.data_ptr<double>(),
                                 needs_hidden ? &dh : nullptr,
                                 needs_weight ? &grad_weight : nullptr,
                                 needs_bias ? db.data_ptr<double>() : nullptr);
            });
  at::Tensor grad_hidden = empty, grad_bias = empty;
  if (needs_hidden) {
    if (Na == N) {
      grad_hidden = dh.to(dt);
    } else {
      grad_hidden = at::zeros({N, H}, hidden.options());
      grad_hidden.index_copy_(0, idx, dh.to(dt));
    }
  }
  if (needs_bias) grad_bias = db.to(dt);
  return {grad_hidden, grad_weight, grad_bias};
}

// The benchmarks' yardstick for the kernels above (benchmarks/linear_logprob.py, provider
// rk_gemm_floor): the same GEMM path, tiles, workers, packing, dz layouts and dW rounding as
// linear_logprob_fwd (backward = false) or linear_logprob_fwd + linear_logprob_bwd (backward =
// true), without the epilogues (no softmax, log-sum-exp or targets: dz = z). Returns
// (dh, dW) = ((h W^T) W, (h W^T)^T h) in hidden's dtype (dz rounded to bf16 where the GEMMs
// run on bf16 operands), empty [0] tensors without backward.
std::tuple<at::Tensor, at::Tensor> linear_logprob_gemm_floor(const at::Tensor& hidden,
                                                             const at::Tensor& weight,
                                                             bool backward, int64_t row_tile,
                                                             int64_t vocab_tile) {
  check_head(hidden, weight);
  const auto dt = hidden.scalar_type();
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  auto empty = at::empty({0}, hidden.options());
  if (N == 0 || V == 0) {
    if (!backward) return {empty, empty};
    return {at::zeros({N, H}, hidden.options()), at::zeros({V, H}, hidden.options())};
  }
  const auto zopts = hidden.options().dtype(acc_type(dt));
  const Tiles tiles = pick_tiles(row_tile, vocab_tile, dt);
  const int64_t VT = std::min(tiles.vocab, V), workers = num_workers(V, VT);
  const auto blocks = rag_kernels::detail::uniform_blocks(N, std::min(tiles.rows, N));
  const auto h = hidden.contiguous();
  const auto none = [](int64_t, int64_t, int64_t, int64_t, auto*) {};
  with_gemm(h, weight, blocks, workers, VT, false, false, false, at::Tensor(),
            [&](auto& gemm, auto* bias_p) {
              using T = std::remove_const_t<std::remove_pointer_t<decltype(bias_p)>>;
              forward_walk<T>(gemm, V, VT, workers, zopts, none);
            });
  if (!backward) return {empty, empty};
  at::Tensor dh = at::zeros({N, H}, zopts), dw = at::empty({V, H}, hidden.options());
  with_gemm(h, weight, blocks, workers, VT, true, true, true, at::Tensor(),
            [&](auto& gemm, auto* bias_p) {
              using T = std::remove_const_t<std::remove_pointer_t<decltype(bias_p)>>;
              backward_walk<T>(gemm, N, H, V, VT, workers, zopts, &dh, &dw, nullptr, none);
            });
  return {dh.to(dt), dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rag_kernels, m) {
  m.def(
      "linear_logprob_fwd(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, "
      "int ignore_index, float? softcap, int row_tile=0, int vocab_tile=0) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_logprob_bwd(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, Tensor lse, "
      "Tensor? grad_lp, Tensor? grad_lse, Tensor? grad_sum, int ignore_index, float? softcap, "
      "bool needs_hidden, bool needs_weight, bool needs_bias, int row_tile=0, int vocab_tile=0) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_logprob_gemm_floor(Tensor hidden, Tensor weight, bool backward, int row_tile=0, "
      "int vocab_tile=0) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rag_kernels, CPU, m) {
  m.impl("linear_logprob_fwd", &linear_logprob_fwd);
  m.impl("linear_logprob_bwd", &linear_logprob_bwd);
  m.impl("linear_logprob_gemm_floor", &linear_logprob_gemm_floor);
}
