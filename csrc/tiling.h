// Vocabulary tiling shared by the CPU LM-head kernels (linear_logprob.cpp,
// token_smoothing.cpp): compute dtype, weight tiles, and the one-worker-per-thread walk over
// vocabulary tiles. Everything lives in rag_kernels::detail (inline functions and templates,
// no anonymous namespace), so each kernel file shares one definition.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace rag_kernels {
namespace detail {

// The epilogue dtype: bf16 / fp16 inputs compute in fp32; fp32 and fp64 in themselves.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Epilogue variant index: bias + 2 * softcap.
inline int variant_of(bool has_bias, bool has_cap) {
  return (has_bias ? 1 : 0) + (has_cap ? 2 : 0);
}

// The weight rows [v0, v0 + vt) in the compute dtype: a view for fp32/fp64, else converted
// into `wbuf` (one tile, never the whole weight).
inline at::Tensor weight_tile(const at::Tensor& weight, at::Tensor& wbuf, int64_t v0,
                              int64_t vt, at::ScalarType acc) {
  auto w = weight.narrow(0, v0, vt);
  if (weight.scalar_type() == acc) return w;
  auto dst = wbuf.narrow(0, 0, vt * weight.size(1)).view({vt, weight.size(1)});
  dst.copy_(w);
  return dst;
}

// Runs fn(worker, v0, vt) over all vocabulary tiles: worker w takes tiles w, w + W, ...
// Its GEMMs run single-threaded inside the parallel region, and there is one region per pass,
// so synchronisation does not grow with the tile count. The static assignment keeps results
// bitwise reproducible for a given thread count (partial sums always combine the same way).
// done(worker) runs on the worker's thread after its last tile (per-thread GEMM state).
template <typename Fn, typename Done>
inline void for_each_vocab_tile(int64_t V, int64_t VT, int64_t workers, const Fn& fn,
                                const Done& done) {
  const int64_t ntiles = (V + VT - 1) / VT;
  // Worker threads start with default thread-local state (grad mode, dispatch-key
  // exclusions); give them the caller's so the ATen calls inside behave as on this thread.
  const at::ThreadLocalState tls;
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    at::ThreadLocalStateGuard guard(tls);
    for (int64_t wk = w0; wk < w1; ++wk) {
      for (int64_t t = wk; t < ntiles; t += workers) fn(wk, t * VT, std::min(VT, V - t * VT));
      done(wk);
    }
  });
}

template <typename Fn>
inline void for_each_vocab_tile(int64_t V, int64_t VT, int64_t workers, const Fn& fn) {
  for_each_vocab_tile(V, VT, workers, fn, [](int64_t) {});
}

// The shift of an online log-sum-exp (or of a max over documents) whose running max is m: m,
// or 0 while m is -inf (every logit so far -inf, e.g. a -inf bias over whole tiles), where
// exp(z - m) would be exp(-inf + inf) = NaN.
template <typename T>
inline T lse_shift(T m) {
  return m == -std::numeric_limits<T>::infinity() ? T(0) : m;
}

inline int64_t num_workers(int64_t V, int64_t VT) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (V + VT - 1) / VT));
}

}  // namespace detail
}  // namespace rag_kernels
