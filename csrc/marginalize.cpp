// Marginalisation of the generator likelihood over K retrieved documents (CPU).
// One forward pass per query computes the loss, the generator row weights
// dloss/dlp = -posterior * mask and the retriever gradient dloss/ds = prior - posterior;
// the autograd backward only scales them by the upstream gradient. Parallel over queries,
// accumulation in double. Math: rag_kernels/ops/marginalize/__init__.py.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "check.h"

namespace {

template <typename scalar_t>
void marginalize_kernel(const scalar_t* lp, const scalar_t* s, const bool* tok_mask,
                        const bool* doc_mask, bool token_mode, int64_t B, int64_t K,
                        int64_t T, scalar_t* loss, scalar_t* dlp, scalar_t* ds) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> log_prior(K), joint(K), grad_s(K);
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* lp_b = lp + b * K * T;
      const bool* m_b = tok_mask ? tok_mask + b * T : nullptr;
      const bool* d_b = doc_mask ? doc_mask + b * K : nullptr;
      scalar_t* dlp_b = dlp + b * K * T;

      // Document prior pi_k = log_softmax over the kept documents.
      double smax = kNegInf;
      for (int64_t k = 0; k < K; ++k)
        if (!d_b || d_b[k]) smax = std::max(smax, static_cast<double>(s[b * K + k]));
      double ssum = 0.0;
      for (int64_t k = 0; k < K; ++k)
        if (!d_b || d_b[k]) ssum += std::exp(static_cast<double>(s[b * K + k]) - smax);
      const double log_z = smax + std::log(ssum);
      for (int64_t k = 0; k < K; ++k) {
        log_prior[k] = (!d_b || d_b[k]) ? static_cast<double>(s[b * K + k]) - log_z : kNegInf;
        grad_s[k] = 0.0;
      }

      double loss_b = 0.0;
      if (!token_mode) {
        // RAG-Sequence: J_k = pi_k + sum_t m_t lp_kt.
        double jmax = kNegInf;
        for (int64_t k = 0; k < K; ++k) {
          if (log_prior[k] == kNegInf) { joint[k] = kNegInf; continue; }
          double ell = 0.0;
          for (int64_t t = 0; t < T; ++t)
            if (!m_b || m_b[t]) ell += static_cast<double>(lp_b[k * T + t]);
          joint[k] = log_prior[k] + ell;
          jmax = std::max(jmax, joint[k]);
        }
        // A zero likelihood on every document (jmax = -inf) gives lse = -inf, loss +inf, as
        // the reference does; shifting by -inf would give NaN.
        const double shift = jmax == kNegInf ? 0.0 : jmax;
        double jsum = 0.0;
        for (int64_t k = 0; k < K; ++k)
          if (log_prior[k] != kNegInf) jsum += std::exp(joint[k] - shift);
        const double lse = shift + std::log(jsum);
        loss_b = -lse;
        for (int64_t k = 0; k < K; ++k) {
          const bool kept = log_prior[k] != kNegInf;
          const double w = kept ? std::exp(joint[k] - lse) : 0.0;
          grad_s[k] = kept ? std::exp(log_prior[k]) - w : 0.0;
          for (int64_t t = 0; t < T; ++t)
            dlp_b[k * T + t] = static_cast<scalar_t>((kept && (!m_b || m_b[t])) ? -w : 0.0);
        }
      } else {
        // RAG-Token: per token, J_kt = pi_k + lp_kt, marginalised over k.
        for (int64_t t = 0; t < T; ++t) {
          if (m_b && !m_b[t]) {
            for (int64_t k = 0; k < K; ++k) dlp_b[k * T + t] = 0;
            continue;
          }
          double jmax = kNegInf;
          for (int64_t k = 0; k < K; ++k) {
            joint[k] = log_prior[k] == kNegInf
                           ? kNegInf
                           : log_prior[k] + static_cast<double>(lp_b[k * T + t]);
            if (log_prior[k] != kNegInf) jmax = std::max(jmax, joint[k]);
          }
          const double shift = jmax == kNegInf ? 0.0 : jmax;  // see the sequence branch
          double jsum = 0.0;
          for (int64_t k = 0; k < K; ++k)
            if (log_prior[k] != kNegInf) jsum += std::exp(joint[k] - shift);
          const double lse = shift + std::log(jsum);
          loss_b -= lse;
          for (int64_t k = 0; k < K; ++k) {
            const bool kept = log_prior[k] != kNegInf;
            const double w = kept ? std::exp(joint[k] - lse) : 0.0;
            dlp_b[k * T + t] = static_cast<scalar_t>(-w);
            if (kept) grad_s[k] += std::exp(log_prior[k]) - w;
          }
        }
      }
      loss[b] = static_cast<scalar_t>(loss_b);
      for (int64_t k = 0; k < K; ++k) ds[b * K + k] = static_cast<scalar_t>(grad_s[k]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> marginalize_fwd(
    const at::Tensor& token_logprobs, const at::Tensor& doc_scores,
    const std::optional<at::Tensor>& token_mask, const std::optional<at::Tensor>& doc_mask,
    bool token_mode) {
  RK_CHECK_INPUT(token_logprobs);
  RK_CHECK_INPUT(doc_scores);
  RK_CHECK_DIM(token_logprobs, 3);
  const int64_t B = token_logprobs.size(0), K = token_logprobs.size(1), T = token_logprobs.size(2);
  RK_CHECK_SHAPE(doc_scores, B, K);
  RK_CHECK_DTYPE(doc_scores, token_logprobs.scalar_type());
  TORCH_CHECK(token_logprobs.scalar_type() == at::kFloat || token_logprobs.scalar_type() == at::kDouble,
              "token_logprobs must be float32 or float64, got ", token_logprobs.scalar_type());
  const bool* tm = nullptr;
  const bool* dm = nullptr;
  if (token_mask.has_value()) {
    RK_CHECK_INPUT(*token_mask);
    RK_CHECK_SHAPE(*token_mask, B, T);
    RK_CHECK_DTYPE(*token_mask, at::kBool);
    tm = token_mask->data_ptr<bool>();
  }
  if (doc_mask.has_value()) {
    RK_CHECK_INPUT(*doc_mask);
    RK_CHECK_SHAPE(*doc_mask, B, K);
    RK_CHECK_DTYPE(*doc_mask, at::kBool);
    dm = doc_mask->data_ptr<bool>();
  }
  auto loss = at::empty({B}, token_logprobs.options());
  auto dlp = at::empty_like(token_logprobs);
  auto ds = at::empty_like(doc_scores);
  AT_DISPATCH_FLOATING_TYPES(token_logprobs.scalar_type(), "marginalize_fwd", [&] {
    marginalize_kernel<scalar_t>(token_logprobs.data_ptr<scalar_t>(), doc_scores.data_ptr<scalar_t>(),
                                 tm, dm, token_mode, B, K, T, loss.data_ptr<scalar_t>(),
                                 dlp.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>());
  });
  return {loss, dlp, ds};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rag_kernels, m) {
  m.def(
      "marginalize_fwd(Tensor token_logprobs, Tensor doc_scores, Tensor? token_mask, "
      "Tensor? doc_mask, bool token_mode) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rag_kernels, CPU, m) { m.impl("marginalize_fwd", &marginalize_fwd); }
