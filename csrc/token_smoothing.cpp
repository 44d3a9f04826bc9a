// RAG-Token label-smoothing statistic on CPU without [B, K, T, V] logits:
//   out[b,t] = sum_v log sum_k exp(pi_bk + z_bkt(v) - lse_bkt),  z_bkt = softcap(W h_bkt + bias),
// and optionally, for a target y[b,t], the per-document log-prob lp_bkt = z_bkt(y) - lse_bkt, so
// a RAG-Token loss with label smoothing needs one call (and one backward) for all its LM-head work.
//
// Rows are the (b, k, t) of the documents whose log prior pi_bk is finite (pi = -inf marks a
// masked document: its hidden states are never read). They are gathered token-major into
// groups: one group = one query b, a block of tokens, all its kept documents, so the K logits
// of a token are adjacent rows of the group's GEMM output. Forward, per (vocab tile, group):
// one GEMM [K_b * T_blk, H] x [H, V_tile], then per token
//   m(v) = max_k a_k(v), a_k(v) = pi_k - lse_k + z_k(v), s(v) = sum_k exp(a_k - m),
//   out += sum_v m + log s,  wsum_k += sum_v w_k(v),  w_k = exp(a_k - m) / s.
// lse_k must be known first. By default one vocabulary tile covers V, so lse comes from the
// same tile (one GEMM pass, 2NHV flops; scratch = rows_per_group * V, capped at 128 MiB by the
// row count). With a smaller vocab tile a first pass computes lse by an online log-sum-exp
// (two GEMM passes, 4NHV, scratch rows * V_tile).
// Backward with upstream g[b,t] and g_lp[b,k,t] (tokens whose gradients are all zero are
// compacted away): recompute the tile and turn it in place into
//   dz_k(v) = g (w_k(v) - p_k(v) wsum_k) + g_lp,k (1[v=y] - p_k(v))   (times 1 - (z/c)^2
// under softcap), p_k = exp(z_k - lse_k); then dh += dz W_tile, dW_tile += dz^T h,
// db += sum_rows dz (6NHV). d out / d pi_bk = sum_t g wsum_bkt is formed by the Python shell.
// GEMMs (csrc/tile_gemm.h, csrc/micro_gemm.h): micro-kernel GEMMs with fp32 outputs, on bf16
// operands for bf16 inputs where the CPU has bf16 matmul (oneDNN's; fp32 logits and epilogue,
// dz rounded to bf16 for the gradient GEMMs, dh / dW accumulated in fp32), else on fp32
// operands (16-bit weights converted while packing; oneDNN's on AVX-512 CPUs, csrc/avx2_gemm.h
// on AVX2 ones); for fp64 and on pre-AVX2 CPUs ATen GEMMs in the compute dtype (the W tile of
// a 16-bit weight converted once per tile).
// Forward GEMMs run on all threads (over B panels on the micro-kernel paths, over 1024-column
// chunks on ATen's, csrc/tile_gemm.h) and the per-token epilogue is parallel over the tokens of
// a group; with a target, tokens without one (padding) are not computed. The backward runs one
// worker per thread over vocabulary tiles (csrc/tiling.h).
// Math: rag_kernels/ops/token_smoothing/__init__.py and docs/design.md §2.3.
#include <ATen/Parallel.h>
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
using rag_kernels::detail::lse_shift;
using rag_kernels::detail::num_workers;
using rag_kernels::detail::rk_exp;
using rag_kernels::detail::rk_tanh;
using rag_kernels::detail::variant_of;

// log(x) for a positive normal float (here x = sum_k exp(a_k - max) in [1, K]): x = 2^e m with
// m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(u), u = (m - 1) / (m + 1), |u| < 0.172, by its
// series to u^11 (truncation < 1e-10).
RK_INLINE float ts_log(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  // Subtracting the bits of sqrt(1/2) puts the mantissa in [sqrt(1/2), sqrt(2)).
  const int32_t off = bits - 0x3F3504F3;
  const int32_t e = off >> 23;
  const int32_t mbits = bits - (e << 23);
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const float u = (m - 1.0f) / (m + 1.0f);
  const float u2 = u * u;
  float q = 1.0f / 11.0f;
  q = q * u2 + 1.0f / 9.0f;
  q = q * u2 + 1.0f / 7.0f;
  q = q * u2 + 1.0f / 5.0f;
  q = q * u2 + 1.0f / 3.0f;
  q = q * u2 + 1.0f;
  return static_cast<float>(e) * 0.693147180559945309f + 2.0f * u * q;
}
RK_INLINE double ts_log(double x) { return std::log(x); }


// z <- softcap(z + b) in place over one row of a tile.
template <typename T, bool kBias, bool kCap>
RK_INLINE void prep_row(T* z, const T* b, int64_t n, T cap) {
  if (!kBias && !kCap) return;
  const T inv_cap = kCap ? T(1) / cap : T(0);
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) {
    T x = z[v];
    if (kBias) x += b[v];
    if (kCap) x = cap * rk_tanh(x * inv_cap);
    z[v] = x;
  }
}

template <typename T>
RK_INLINE T row_max(const T* z, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t v = 0; v < n; ++v) mx = z[v] > mx ? z[v] : mx;
  return mx;
}

// Any NaN among n logits (a NaN in the hidden row or the weight): max reductions drop NaN
// and the fast exp / log give finite garbage on it, so NaN is detected and propagated here.
template <typename T>
RK_INLINE bool has_nan(const T* z, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t v = 0; v < n; ++v) bad |= (z[v] != z[v]);
  return bad != 0;
}

// max_v z and whether a NaN is among the n logits, in one pass.
template <typename T>
RK_INLINE T row_max_nan(const T* z, int64_t n, bool* nan) {
  T mx = -std::numeric_limits<T>::infinity();
  int bad = 0;
#pragma omp simd reduction(max : mx) reduction(| : bad)
  for (int64_t v = 0; v < n; ++v) {
    mx = z[v] > mx ? z[v] : mx;
    bad |= (z[v] != z[v]);
  }
  *nan = bad != 0;
  return mx;
}

template <typename T>
RK_INLINE T row_sum_exp(const T* z, int64_t n, T m) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < n; ++v) s += rk_exp(z[v] - m);
  return s;
}

// m(v) = max_k (c_k + z_k(v)) over the ka rows z, z + ld, ... of n entries.
template <typename T>
RK_INLINE void max_over_docs(const T* z, int64_t ka, int64_t n, int64_t ld, const T* c, T* mx) {
  const T c0 = c[0];
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) mx[v] = z[v] + c0;
  for (int64_t k = 1; k < ka; ++k) {
    const T* zk = z + k * ld;
    const T ck = c[k];
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) {
      const T a = zk[v] + ck;
      mx[v] = a > mx[v] ? a : mx[v];
    }
  }
}

// Pass 1, one row: prep, then (max, sum_v exp(z - max)).
template <typename T, bool kBias, bool kCap>
RK_INLINE void lse_row(T* z, const T* b, int64_t n, T cap, T* mx, T* se) {
  prep_row<T, kBias, kCap>(z, b, n, cap);
  *mx = row_max(z, n);
  *se = has_nan(z, n) ? std::numeric_limits<T>::quiet_NaN() : row_sum_exp(z, n, lse_shift(*mx));
}

constexpr int64_t kTokenChunk = 1024;

// Pass 2, one token: ka rows of n logits (raw GEMM output) at z; c_k = pi_k - lse_k, or, when
// `lse` is given (single-tile mode), lse_k is computed here from the complete rows, written to
// lse[k] and c_k formed from pi. Returns sum_v m + log s; adds sum_v w_k to wsum[k].
// When 0 <= y < n, zy[k] = z_k(y) (the target logit). Overwrites z with exp(a - m).
// Scratch: mx, s (n each), c (ka).
template <typename T, bool kBias, bool kCap>
RK_INLINE double fwd_token(T* z, int64_t ka, int64_t n, const T* b, T cap, const double* pi,
                           const double* lse_in, double* lse_out, double* wsum, int64_t y,
                           double* zy, T* mx, T* s, T* c) {
  for (int64_t k = 0; k < ka; ++k) prep_row<T, kBias, kCap>(z + k * n, b, n, cap);
  if (y >= 0 && y < n)
    for (int64_t k = 0; k < ka; ++k) zy[k] = static_cast<double>(z[k * n + y]);
  bool nan_tok = false;
  for (int64_t k = 0; k < ka; ++k) {
    const T* zk = z + k * n;
    double lse;
    bool bad;
    if (lse_out) {  // max and NaN check in one pass; the row then sits in L2 for the sum
      const T m = row_max_nan(zk, n, &bad);
      lse = bad ? std::numeric_limits<double>::quiet_NaN()
                : static_cast<double>(m) +
                      std::log(static_cast<double>(row_sum_exp(zk, n, lse_shift(m))));
      lse_out[k] = lse;
    } else {
      bad = has_nan(zk, n);
      lse = lse_in[k];
    }
    nan_tok = nan_tok || bad;
    c[k] = static_cast<T>(pi[k] - lse);
  }
  if (nan_tok) {  // the token's statistic and every document's posterior mass are NaN
    const double q = std::numeric_limits<double>::quiet_NaN();
    for (int64_t k = 0; k < ka; ++k) wsum[k] = q;
    return q;
  }
  // The mixture over documents, in column chunks: the ka rows of a chunk stay in L1 across its
  // five loops (with one vocabulary tile covering V, a token's rows are ka * V floats).
  double total = 0;
  std::vector<double> wk(ka, 0.0);
  for (int64_t v0 = 0; v0 < n; v0 += kTokenChunk) {
    const int64_t nc = std::min(kTokenChunk, n - v0);
    T* zc = z + v0;
    max_over_docs(zc, ka, nc, n, c, mx);
#pragma omp simd
    for (int64_t v = 0; v < nc; ++v) s[v] = 0;
    for (int64_t k = 0; k < ka; ++k) {
      T* zk = zc + k * n;
      const T ck = c[k];
#pragma omp simd
      for (int64_t v = 0; v < nc; ++v) {
        const T e = rk_exp(zk[v] + ck - lse_shift(mx[v]));
        zk[v] = e;
        s[v] += e;
      }
    }
    // A column -inf in every document (a -inf bias) has log p_marg = -inf (m = -inf) and no
    // posterior weight (r = 0; its e are exp(-inf) clamped, not 0).
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t v = 0; v < nc; ++v) {
      acc += mx[v] + ts_log(s[v]);
      s[v] = mx[v] == -std::numeric_limits<T>::infinity() ? T(0) : T(1) / s[v];
    }
    total += static_cast<double>(acc);
    for (int64_t k = 0; k < ka; ++k) {
      const T* zk = zc + k * n;
      T w = 0;
#pragma omp simd reduction(+ : w)
      for (int64_t v = 0; v < nc; ++v) w += zk[v] * s[v];
      wk[k] += static_cast<double>(w);
    }
  }
  for (int64_t k = 0; k < ka; ++k) wsum[k] += wk[k];
  return total;
}

// Backward, one token with upstream g: z (raw GEMM output, ka rows of n) <- dz wrt the raw
// logits. gw[k] = g * wsum_k + glp_k, lse[k] per row, c_k = pi_k - lse_k; when 0 <= y < n the
// target column gets + glp_k (the log-prob term g_lp (1[v=y] - p)). Scratch: mx, s (n each)
// and e (ka * n: exp(a_k - m), computed once for both the normaliser and dz).
template <typename T, bool kBias, bool kCap>
RK_INLINE void bwd_token(T* z, int64_t ka, int64_t n, const T* b, T cap, const T* c,
                         const T* lse, const T* gw, T g, const T* glp, int64_t y, T* mx, T* s,
                         T* e) {
  for (int64_t k = 0; k < ka; ++k) prep_row<T, kBias, kCap>(z + k * n, b, n, cap);
  max_over_docs(z, ka, n, n, c, mx);
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) s[v] = 0;
  for (int64_t k = 0; k < ka; ++k) {  // e_k(v) = exp(a_k(v) - m(v)), kept for the next loop
    const T* zk = z + k * n;
    T* ek = e + k * n;
    const T ck = c[k];
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) {
      ek[v] = rk_exp(zk[v] + ck - lse_shift(mx[v]));
      s[v] += ek[v];
    }
  }
  // no posterior weight on a column -inf in every document (as in the forward)
#pragma omp simd
  for (int64_t v = 0; v < n; ++v)
    s[v] = mx[v] == -std::numeric_limits<T>::infinity() ? T(0) : g / s[v];
  const T inv_cap = kCap ? T(1) / cap : T(0);
  for (int64_t k = 0; k < ka; ++k) {
    T* zk = z + k * n;
    const T* ek = e + k * n;
    const T lk = lse[k], gwk = gw[k];
    const bool has_y = glp && y >= 0 && y < n;
    T dcap_y = 1;
    if (kCap && has_y) {
      const T t = zk[y] * inv_cap;
      dcap_y = T(1) - t * t;
    }
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) {
      const T x = zk[v];
      T d = ek[v] * s[v] - gwk * rk_exp(x - lk);
      if (kCap) {
        const T t = x * inv_cap;
        d *= T(1) - t * t;
      }
      zk[v] = d;
    }
    if (has_y) zk[y] += glp[k] * dcap_y;
  }
}

// Non-template entry points (the float ones compiled per ISA, vec_math.h);
// variant = bias + 2 * softcap.
#define TS_DISPATCH(FN, ...)                             \
  switch (variant) {                                     \
    case 0: return FN<T, false, false>(__VA_ARGS__);     \
    case 1: return FN<T, true, false>(__VA_ARGS__);      \
    case 2: return FN<T, false, true>(__VA_ARGS__);      \
    default: return FN<T, true, true>(__VA_ARGS__);      \
  }

#define TS_ONE_VERSION(RET, NAME, PARAMS, ARGS, ...) RET NAME PARAMS __VA_ARGS__
#define TS_ENTRY_POINTS(TYPE, VARIANTS)                                                        \
  VARIANTS(void, lse_row_v,                                                                    \
           (int variant, TYPE* z, const TYPE* b, int64_t n, TYPE cap, TYPE* mx, TYPE* se),     \
           (variant, z, b, n, cap, mx, se), {                                                  \
             using T = TYPE;                                                                   \
             TS_DISPATCH(lse_row, z, b, n, cap, mx, se)                                        \
           })                                                                                  \
  VARIANTS(double, fwd_token_v,                                                                \
           (int variant, TYPE* z, int64_t ka, int64_t n, const TYPE* b, TYPE cap,              \
            const double* pi, const double* lse_in, double* lse_out, double* wsum, int64_t y,  \
            double* zy, TYPE* mx, TYPE* s, TYPE* c),                                           \
           (variant, z, ka, n, b, cap, pi, lse_in, lse_out, wsum, y, zy, mx, s, c), {          \
             using T = TYPE;                                                                   \
             TS_DISPATCH(fwd_token, z, ka, n, b, cap, pi, lse_in, lse_out, wsum, y, zy, mx, s, \
                         c)                                                                    \
           })                                                                                  \
  VARIANTS(void, bwd_token_v,                                                                  \
           (int variant, TYPE* z, int64_t ka, int64_t n, const TYPE* b, TYPE cap,              \
            const TYPE* c, const TYPE* lse, const TYPE* gw, TYPE g, const TYPE* glp,           \
            int64_t y, TYPE* mx, TYPE* s, TYPE* e),                                            \
           (variant, z, ka, n, b, cap, c, lse, gw, g, glp, y, mx, s, e), {                     \
             using T = TYPE;                                                                   \
             TS_DISPATCH(bwd_token, z, ka, n, b, cap, c, lse, gw, g, glp, y, mx, s, e)         \
           })

TS_ENTRY_POINTS(float, RK_ISA_VARIANTS)
TS_ENTRY_POINTS(double, TS_ONE_VERSION)  // std::exp / std::log: nothing to vectorise
#undef TS_ENTRY_POINTS
#undef TS_ONE_VERSION
#undef TS_DISPATCH

// Token-major groups of gathered rows: group g covers tokens tok[tok0, tok0 + nt) of query b,
// each with the ka rows (one per kept document, in doc order) at row0 + j * ka.
struct Group {
  int64_t b, row0, tok0, nt, ka;
};

struct Layout {
  std::vector<Group> groups;
  std::vector<int64_t> rows;    // flat (b, k, t) row of every gathered row
  std::vector<int64_t> tokens;  // flat (b, t) of every gathered token
  std::vector<int64_t> docs;    // per gathered row: k
  int64_t max_rows = 0;         // most rows in one group
};

// Kept documents: pi_bk != -inf (NaN counts as kept, so it propagates). Tokens: all, or, when
// `g` is given, those with g[b,t] != 0, or, when `y` is given, those with a target y[b,t] >= 0.
Layout make_layout(const double* pi, const double* g, int64_t B, int64_t K, int64_t T,
                   int64_t row_tile, const int64_t* y = nullptr) {
  Layout L;
  const double ninf = -std::numeric_limits<double>::infinity();
  std::vector<int64_t> docs, toks;
  for (int64_t b = 0; b < B; ++b) {
    docs.clear();
    toks.clear();
    for (int64_t k = 0; k < K; ++k)
      if (!(pi[b * K + k] == ninf)) docs.push_back(k);
    for (int64_t t = 0; t < T; ++t)
      if ((!g || g[b * T + t] != 0.0) && (!y || y[b * T + t] >= 0)) toks.push_back(t);
    const int64_t ka = static_cast<int64_t>(docs.size());
    if (ka == 0 || toks.empty()) continue;
    const int64_t tb = std::max<int64_t>(1, row_tile / ka);
    for (size_t i0 = 0; i0 < toks.size(); i0 += tb) {
      const int64_t nt = std::min<int64_t>(tb, static_cast<int64_t>(toks.size() - i0));
      L.groups.push_back({b, static_cast<int64_t>(L.rows.size()),
                          static_cast<int64_t>(L.tokens.size()), nt, ka});
      L.max_rows = std::max(L.max_rows, nt * ka);
      for (int64_t j = 0; j < nt; ++j) {
        const int64_t t = toks[i0 + j];
        L.tokens.push_back(b * T + t);
        for (int64_t k : docs) {
          L.rows.push_back((b * K + k) * T + t);
          L.docs.push_back(k);
        }
      }
    }
  }
  return L;
}

at::Tensor index_tensor(const std::vector<int64_t>& v) {
  return at::from_blob(const_cast<int64_t*>(v.data()), {static_cast<int64_t>(v.size())},
                       at::TensorOptions().dtype(at::kLong))
      .clone();
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& log_prior,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& target) {
  RK_CHECK_INPUT(hidden);
  RK_CHECK_INPUT(weight);
  RK_CHECK_CPU(log_prior);
  RK_CHECK_DIM(hidden, 4);
  RK_CHECK_DIM(weight, 2);
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "hidden must be float32, float64, bfloat16 or float16, got ", dt);
  RK_CHECK_DTYPE(weight, dt);
  TORCH_CHECK(weight.size(1) == hidden.size(3), "weight must have shape (V, ", hidden.size(3),
              "), got ", weight.sizes());
  RK_CHECK_SHAPE(log_prior, hidden.size(0), hidden.size(1));
  TORCH_CHECK(at::isFloatingType(log_prior.scalar_type()), "log_prior must be floating, got ",
              log_prior.scalar_type());
  if (bias.has_value()) {
    RK_CHECK_INPUT(*bias);
    RK_CHECK_SHAPE(*bias, weight.size(0));
    RK_CHECK_DTYPE(*bias, dt);
  }
  if (target.has_value()) {
    RK_CHECK_CPU(*target);
    RK_CHECK_SHAPE(*target, hidden.size(0), hidden.size(2));
    TORCH_CHECK(target->scalar_type() == at::kLong || target->scalar_type() == at::kInt,
                "target must be int64 or int32, got ", target->scalar_type());
  }
}

// Targets as int64 [B*T]; negative ids mean "no target" (log-prob 0, no gradient).
std::vector<int64_t> targets_of(const std::optional<at::Tensor>& target, int64_t n, int64_t V) {
  std::vector<int64_t> y(n, -1);
  if (!target.has_value()) return y;
  auto t = target->to(at::kLong).contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(tp[i] < V, "target ids must be < V = ", V, " (negative: no target), got ", tp[i]);
    y[i] = tp[i] < 0 ? -1 : tp[i];
  }
  return y;
}

// Default forward tiles: one vocabulary tile covering V (single GEMM pass), 512 rows or as many
// as keep the logit scratch at 2^25 floats (128 MiB in fp32). Fewer rows per GEMM cost more than
// they save: each GEMM call streams all of W, and MKL runs [<256, H] x [H, V] well below peak.
int64_t default_fwd_rows(int64_t V) {
  return std::max<int64_t>(1, std::min<int64_t>(512, (int64_t{1} << 25) / std::max<int64_t>(V, 1)));
}
// Runs fn(gemm, bias_ptr) with the Gemm (Tile = true: a tile-walk Gemm, else a Logits) of this
// call's GEMM path (csrc/micro_gemm.h); the epilogue dtype is the bias pointer's element type.
template <bool Tile, typename Fn, typename... Args>
void with_gemm(const at::Tensor& h, const at::Tensor& b, const Fn& fn, Args&&... args) {
  namespace d = rag_kernels::detail;
  const auto fp = [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    return b.defined() ? b.data_ptr<S>() : static_cast<S*>(nullptr);
  };
  switch (d::gemm_path(h.scalar_type())) {
    case d::GemmPath::kMicroBf16: {
      std::conditional_t<Tile, d::MicroTileGemm<c10::BFloat16>, d::MicroLogits<c10::BFloat16>>
          gemm(h, args...);
      fn(gemm, fp(static_cast<float*>(nullptr)));
      break;
    }
    case d::GemmPath::kMicroF32: {
      std::conditional_t<Tile, d::MicroTileGemm<float>, d::MicroLogits<float>> gemm(h, args...);
      fn(gemm, fp(static_cast<float*>(nullptr)));
      break;
    }
    default:
      AT_DISPATCH_FLOATING_TYPES(acc_type(h.scalar_type()), "token_smoothing", [&] {
        std::conditional_t<Tile, d::AtenTileGemm<scalar_t>, d::AtenLogits<scalar_t>> gemm(
            h, args...);
        fn(gemm, fp(static_cast<scalar_t*>(nullptr)));
      });
  }
}

constexpr int64_t kDefaultBwdRows = 2048;
constexpr int64_t kDefaultBwdVocab = 1024;

// Logits: AtenLogits<T> or MicroLogits<In> (T = float), csrc/tile_gemm.h; VT = min(vocab_tile, V).
template <typename T, typename Logits>
void forward_kernel(Logits& gemm, int64_t Na, int64_t V, int64_t VT, const Layout& L,
                    const double* pi, int64_t K, const std::vector<int64_t>& y_all,
                    const T* bias, std::optional<double> softcap, int64_t row_tile,
                    const at::TensorOptions& zopts, double* lse, double* wsum, double* zy,
                    double* out) {
  const bool has_cap = softcap.has_value();
  const T cap = has_cap ? static_cast<T>(*softcap) : T(0);
  const int variant = variant_of(bias != nullptr, has_cap);
  const bool one_pass = VT == V;
  const int64_t RT = std::min(row_tile, Na);
  at::Tensor zbuf = at::empty({(one_pass ? L.max_rows : std::max(RT, L.max_rows)) * VT}, zopts);
  T* zp = zbuf.data_ptr<T>();
  // pi and the target per gathered row / token.
  std::vector<double> pi_row(Na);
  std::vector<int64_t> y_row(Na), y_tok(L.tokens.size());
  for (const auto& g : L.groups) {
    for (int64_t j = 0; j < g.nt; ++j) {
      const int64_t yt = y_all[L.tokens[g.tok0 + j]];
      y_tok[g.tok0 + j] = yt;
      for (int64_t k = 0; k < g.ka; ++k) {
        const int64_t i = g.row0 + j * g.ka + k;
        pi_row[i] = pi[g.b * K + L.docs[i]];
        y_row[i] = yt;
      }
    }
  }
  std::fill(zy, zy + Na, 0.0);

  if (!one_pass) {  // pass 1: lse (and the target logit) per row, online over the tiles
    std::vector<double> run_max(Na, -std::numeric_limits<double>::infinity()), run_sum(Na, 0.0);
    for (int64_t v0 = 0; v0 < V; v0 += VT) {
      const int64_t vt = std::min(VT, V - v0);
      gemm.set_tile(v0, vt);
      for (int64_t r0 = 0; r0 < Na; r0 += RT) {
        const int64_t rt = std::min(RT, Na - r0);
        at::Tensor z = zbuf.narrow(0, 0, rt * vt).view({rt, vt});
        gemm.logits(z, r0, rt);
        at::parallel_for(0, rt, 8, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t r = r0 + i;
            T mx, se;
            lse_row_v(variant, zp + i * vt, bias ? bias + v0 : nullptr, vt, cap, &mx, &se);
            const int64_t yl = y_row[r] - v0;
            if (y_row[r] >= 0 && yl < vt && yl >= 0) zy[r] = static_cast<double>(zp[i * vt + yl]);
            const double m_new = std::max(run_max[r], static_cast<double>(mx));
            const double shift = lse_shift(m_new);
            run_sum[r] = run_sum[r] * std::exp(run_max[r] - shift) +
                         static_cast<double>(se) * std::exp(static_cast<double>(mx) - shift);
            run_max[r] = m_new;
          }
        });
      }
    }
    for (int64_t r = 0; r < Na; ++r) lse[r] = run_max[r] + std::log(run_sum[r]);
  }

  const int64_t n_tok = static_cast<int64_t>(L.tokens.size());
  std::fill(out, out + n_tok, 0.0);
  std::fill(wsum, wsum + Na, 0.0);
  for (int64_t v0 = 0; v0 < V; v0 += VT) {  // pass 2
    const int64_t vt = std::min(VT, V - v0);
    gemm.set_tile(v0, vt);
    for (const auto& g : L.groups) {
      const int64_t rows = g.nt * g.ka;
      at::Tensor z = zbuf.narrow(0, 0, rows * vt).view({rows, vt});
      gemm.logits(z, g.row0, rows);
      at::parallel_for(0, g.nt, 1, [&](int64_t j0, int64_t j1) {
        std::vector<T> mx(vt), s(vt), c(g.ka);
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t r = g.row0 + j * g.ka;
          const int64_t yt = y_tok[g.tok0 + j];
          // In two-pass mode pass 1 already has the target logit.
          const int64_t yl = one_pass && yt >= 0 ? yt - v0 : -1;
          out[g.tok0 + j] += fwd_token_v(variant, zp + j * g.ka * vt, g.ka, vt,
                                         bias ? bias + v0 : nullptr, cap, pi_row.data() + r,
                                         one_pass ? nullptr : lse + r, one_pass ? lse + r : nullptr,
                                         wsum + r, yl, zy + r, mx.data(), s.data(), c.data());
        }
      });
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_smoothing_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& log_prior,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& target,
    std::optional<double> softcap, int64_t row_tile, int64_t vocab_tile) {
  check_inputs(hidden, weight, log_prior, bias, target);
  const int64_t B = hidden.size(0), K = hidden.size(1), T = hidden.size(2), H = hidden.size(3);
  const int64_t V = weight.size(0);
  const auto acc = acc_type(hidden.scalar_type());
  auto opts = hidden.options().dtype(acc);
  if (row_tile <= 0) row_tile = default_fwd_rows(V);
  if (vocab_tile <= 0) vocab_tile = std::max<int64_t>(V, 1);
  auto pi = log_prior.to(at::kDouble).contiguous();
  // With a target, tokens without one (negative ids: padding) are not computed at all: their
  // out, lse, wsum and lp are 0 (the op's contract gives them no value).
  auto y = targets_of(target, B * T, V);
  auto L = make_layout(pi.data_ptr<double>(), nullptr, B, K, T, row_tile,
                       target.has_value() ? y.data() : nullptr);
  auto out = at::full({B, T}, -std::numeric_limits<double>::infinity(), opts);  // no kept doc
  if (target.has_value()) out.masked_fill_(target->lt(0), 0.0);
  auto lse = at::zeros({B, K, T}, opts), wsum = at::zeros({B, K, T}, opts);
  auto lp = target.has_value() ? at::zeros({B, K, T}, opts) : at::empty({0}, opts);
  const int64_t Na = static_cast<int64_t>(L.rows.size());
  if (Na == 0 || V == 0) return {out, lse, wsum, lp};
  auto idx = index_tensor(L.rows);
  auto h = hidden.view({-1, H}).index_select(0, idx);  // the Gemm converts it
  at::Tensor b;
  if (bias.has_value()) b = bias->to(acc).contiguous();
  auto dopts = hidden.options().dtype(at::kDouble);
  auto lse_a = at::empty({Na}, dopts), wsum_a = at::empty({Na}, dopts), zy_a = at::empty({Na}, dopts);
  auto out_a = at::empty({static_cast<int64_t>(L.tokens.size())}, dopts);
  const int64_t VT = std::min(vocab_tile, V);
  with_gemm<false>(
      h, b,
      [&](auto& gemm, auto* bias_p) {
        using S = std::remove_const_t<std::remove_pointer_t<decltype(bias_p)>>;
        forward_kernel<S>(gemm, Na, V, VT, L, pi.data_ptr<double>(), K, y, bias_p, softcap,
                          row_tile, opts, lse_a.data_ptr<double>(), wsum_a.data_ptr<double>(),
                          zy_a.data_ptr<double>(), out_a.data_ptr<double>());
      },
      weight, VT);
  out.view(-1).index_copy_(0, index_tensor(L.tokens), out_a.to(acc));
  lse.view(-1).index_copy_(0, idx, lse_a.to(acc));
  wsum.view(-1).index_copy_(0, idx, wsum_a.to(acc));
  if (target.has_value()) {
    std::vector<double> has(Na);
    for (int64_t i = 0; i < Na; ++i) {
      const int64_t row = L.rows[i];  // (b*K + k)*T + t
      has[i] = y[(row / (K * T)) * T + row % T] >= 0 ? 1.0 : 0.0;
    }
    auto has_t = at::from_blob(has.data(), {Na}, dopts).clone();
    // where, not a product: an ignored row's lse may be NaN (whatever it holds stays out)
    lp.view(-1).index_copy_(0, idx, at::where(has_t.gt(0), zy_a - lse_a, 0.0).to(acc));
  }
  return {out, lse, wsum, lp};
}

// The groups are the Gemm's row blocks (AtenTileGemm<T> or MicroTileGemm<In> with T = float,
// csrc/tile_gemm.h); dh [Na, H] and the dW tiles accumulate in T.
template <typename T, typename Gemm>
void backward_kernel(Gemm& gemm, int64_t Na, int64_t H, int64_t V, int64_t VT, int64_t workers,
                     const Layout& L, const double* pi, const double* lse_all,
                     const double* wsum_all, const double* grad, const double* grad_lp,
                     const std::vector<int64_t>& y_all, int64_t K, const T* bias,
                     std::optional<double> softcap, const at::TensorOptions& zopts,
                     at::Tensor* dh, at::Tensor* grad_weight, double* db) {
  const bool has_cap = softcap.has_value();
  const T cap = has_cap ? static_cast<T>(*softcap) : T(0);
  const int variant = variant_of(bias != nullptr, has_cap);
  int64_t max_ka = 1;
  for (const auto& g : L.groups) max_ka = std::max(max_ka, g.ka);
  // Per gathered row: c = pi - lse, lse, g * wsum + g_lp, g_lp; per gathered token: g, target.
  std::vector<T> c_row(Na), lse_row(Na), gw_row(Na), glp_row(Na), g_tok(L.tokens.size());
  std::vector<int64_t> y_tok(L.tokens.size());
  for (const auto& g : L.groups) {
    for (int64_t j = 0; j < g.nt; ++j) {
      const int64_t tok = L.tokens[g.tok0 + j];
      const int64_t yt = y_all[tok];
      g_tok[g.tok0 + j] = static_cast<T>(grad ? grad[tok] : 0.0);
      y_tok[g.tok0 + j] = yt;
      for (int64_t k = 0; k < g.ka; ++k) {
        const int64_t i = g.row0 + j * g.ka + k, row = L.rows[i];
        const double gl = grad_lp && yt >= 0 ? grad_lp[row] : 0.0;
        c_row[i] = static_cast<T>(pi[g.b * K + L.docs[i]] - lse_all[row]);
        lse_row[i] = static_cast<T>(lse_all[row]);
        gw_row[i] = static_cast<T>((grad ? grad[tok] * wsum_all[row] : 0.0) + gl);
        glp_row[i] = static_cast<T>(gl);
      }
    }
  }
  // Per worker scratch of bwd_token: mx, s (VT each) and e (max_ka * VT).
  std::vector<std::vector<T>> scratch(workers, std::vector<T>((2 + max_ka) * VT));

  // The groups are the walk's row blocks; one worker per thread walks its vocabulary tiles
  // with single-threaded GEMMs (as in linear_logprob.cpp).
  backward_walk<T>(gemm, Na, H, V, VT, workers, zopts, dh, grad_weight, db,
                   [&](int64_t wk, int64_t gi, int64_t v0, int64_t vt, T* zp) {
    const Group& g = L.groups[gi];
    T* mx = scratch[wk].data();
    for (int64_t j = 0; j < g.nt; ++j) {
      const int64_t r = g.row0 + j * g.ka;
      const int64_t yt = y_tok[g.tok0 + j];
      bwd_token_v(variant, zp + j * g.ka * vt, g.ka, vt, bias ? bias + v0 : nullptr, cap,
                  c_row.data() + r, lse_row.data() + r, gw_row.data() + r, g_tok[g.tok0 + j],
                  grad_lp ? glp_row.data() + r : nullptr, yt >= 0 ? yt - v0 : -1, mx, mx + vt,
                  mx + 2 * vt);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_smoothing_bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& log_prior,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& target,
    const at::Tensor& lse, const at::Tensor& wsum, const std::optional<at::Tensor>& grad_out,
    const std::optional<at::Tensor>& grad_lp, std::optional<double> softcap, bool needs_hidden,
    bool needs_weight, bool needs_bias, int64_t row_tile, int64_t vocab_tile) {
  check_inputs(hidden, weight, log_prior, bias, target);
  const int64_t B = hidden.size(0), K = hidden.size(1), T = hidden.size(2), H = hidden.size(3);
  const int64_t V = weight.size(0);
  const auto dt = hidden.scalar_type();
  const auto acc = acc_type(dt);
  RK_CHECK_CPU(lse);
  RK_CHECK_CPU(wsum);
  RK_CHECK_SHAPE(lse, B, K, T);
  RK_CHECK_SHAPE(wsum, B, K, T);
  if (grad_out.has_value()) {
    RK_CHECK_CPU(*grad_out);
    RK_CHECK_SHAPE(*grad_out, B, T);
  }
  if (grad_lp.has_value()) {
    TORCH_CHECK(target.has_value(), "grad_lp needs target");
    RK_CHECK_CPU(*grad_lp);
    RK_CHECK_SHAPE(*grad_lp, B, K, T);
  }
  needs_bias = needs_bias && bias.has_value();
  auto empty = at::empty({0}, hidden.options());
  auto zero_grads = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    return {needs_hidden ? at::zeros_like(hidden) : empty,
            needs_weight ? at::zeros_like(weight) : empty,
            needs_bias ? at::zeros({V}, hidden.options()) : empty};
  };
  if (!(needs_hidden || needs_weight || needs_bias) || V == 0 ||
      !(grad_out.has_value() || grad_lp.has_value()))
    return zero_grads();
  if (row_tile <= 0) row_tile = kDefaultBwdRows;
  if (vocab_tile <= 0) vocab_tile = kDefaultBwdVocab;
  auto pi = log_prior.to(at::kDouble).contiguous();
  auto y = targets_of(target, B * T, V);
  auto dopts = hidden.options().dtype(at::kDouble);
  at::Tensor g, glp;
  if (grad_out.has_value()) g = grad_out->to(at::kDouble).contiguous();
  if (grad_lp.has_value()) glp = grad_lp->to(at::kDouble).contiguous();
  // A token takes part when its upstream gradient or one of its rows' log-prob gradient
  // (with a target) is non-zero.
  auto active = at::zeros({B, T}, dopts);
  if (g.defined()) active.add_(g.ne(0).to(at::kDouble));
  if (glp.defined()) {
    auto has_y = at::from_blob(y.data(), {B, 1, T}, at::TensorOptions().dtype(at::kLong)).ge(0);
    active.add_(glp.ne(0).logical_and(has_y).any(1).to(at::kDouble));
  }
  auto L = make_layout(pi.data_ptr<double>(), active.data_ptr<double>(), B, K, T, row_tile);
  const int64_t Na = static_cast<int64_t>(L.rows.size());
  if (Na == 0) return zero_grads();
  auto idx = index_tensor(L.rows);
  auto h = hidden.view({-1, H}).index_select(0, idx);  // the Gemm converts it
  at::Tensor b;
  if (bias.has_value()) b = bias->to(acc).contiguous();
  auto lse_d = lse.to(at::kDouble).contiguous(), wsum_d = wsum.to(at::kDouble).contiguous();
  const auto zopts = hidden.options().dtype(acc);
  at::Tensor dh = needs_hidden ? at::zeros({Na, H}, zopts) : at::Tensor();
  at::Tensor db = needs_bias ? at::zeros({V}, dopts) : at::Tensor();
  // Every vocabulary tile's first group overwrites its rows of grad_weight.
  at::Tensor grad_weight = needs_weight ? at::empty({V, H}, hidden.options()) : empty;
  const int64_t VT = std::min(vocab_tile, V), workers = num_workers(V, VT);
  rag_kernels::detail::RowBlocks blocks;
  for (const auto& grp : L.groups) blocks.emplace_back(grp.row0, grp.nt * grp.ka);
  with_gemm<true>(
      h, b,
      [&](auto& gemm, auto* bias_p) {
        using S = std::remove_const_t<std::remove_pointer_t<decltype(bias_p)>>;
        backward_kernel<S>(gemm, Na, H, V, VT, workers, L, pi.data_ptr<double>(),
                           lse_d.data_ptr<double>(), wsum_d.data_ptr<double>(),
                           g.defined() ? g.data_ptr<double>() : nullptr,
                           glp.defined() ? glp.data_ptr<double>() : nullptr, y, K, bias_p,
                           softcap, zopts, needs_hidden ? &dh : nullptr,
                           needs_weight ? &grad_weight : nullptr,
                           needs_bias ? db.data_ptr<double>() : nullptr);
      },
      weight, blocks, workers, VT, true, needs_hidden, needs_weight);
  at::Tensor grad_hidden = empty, grad_bias = empty;
  if (needs_hidden) {
    grad_hidden = at::zeros_like(hidden);
    grad_hidden.view({-1, H}).index_copy_(0, idx, dh.to(dt));
  }
  if (needs_bias) grad_bias = db.to(dt);
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rag_kernels, m) {
  m.def(
      "token_smoothing_fwd(Tensor hidden, Tensor weight, Tensor log_prior, Tensor? bias, "
      "Tensor? target, float? softcap, int row_tile=0, int vocab_tile=0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "token_smoothing_bwd(Tensor hidden, Tensor weight, Tensor log_prior, Tensor? bias, "
      "Tensor? target, Tensor lse, Tensor wsum, Tensor? grad_out, Tensor? grad_lp, "
      "float? softcap, bool needs_hidden, bool needs_weight, bool needs_bias, int row_tile=0, "
      "int vocab_tile=0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rag_kernels, CPU, m) {
  m.impl("token_smoothing_fwd", &token_smoothing_fwd);
  m.impl("token_smoothing_bwd", &token_smoothing_bwd);
}
