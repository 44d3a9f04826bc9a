// Contrastive (InfoNCE) loss, row direction, streamed over [B-tile, M-tile] score blocks (CPU).
// Forward: per query the online log-sum-exp over non-excluded candidates (lse) and over the
// positives (pos_lse); loss = lse - pos_lse. Backward recomputes each block,
// dS = g (softmax - target), and forms dq = scale dS d, dd = scale dS^T q,
// dscale = sum dS * sim. Only O(tile) scratch per thread (plus one [M, D] dd partial per
// thread in the backward): the [B, M] matrix never exists. Parallel over B-tiles; each block
// is one ATen GEMM (single-threaded inside the parallel region). Math and masking rules:
// rag_kernels/ops/contrastive/__init__.py.
//
// Positives: index mode pos_index[B] (cand_ids[M] raw ids, optional: candidate j is excluded
// for query i when cand_ids[j] == cand_ids[pos_index[i]] and j != pos_index[i]); mask mode
// pos_mask[B, M] (cand_ids[M] compact ids in [0, U) with id_table[B, U]: j is excluded when
// id_table[i, cand_ids[j]] and !pos_mask[i, j]).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>

#include "check.h"

namespace {

constexpr int64_t kRowTile = 128;
constexpr int64_t kColTile = 1024;

struct Inputs {
  at::Tensor q, d;
  double scale;
  std::optional<at::Tensor> pos_index, pos_mask, cand_ids, id_table;
  int64_t B, M, D;
};

Inputs check_inputs(const at::Tensor& q, const at::Tensor& d, const at::Tensor& scale,
                    const std::optional<at::Tensor>& pos_index,
                    const std::optional<at::Tensor>& pos_mask,
                    const std::optional<at::Tensor>& cand_ids,
                    const std::optional<at::Tensor>& id_table) {
  RK_CHECK_INPUT(q);
  RK_CHECK_INPUT(d);
  RK_CHECK_CPU(scale);
  RK_CHECK_DIM(q, 2);
  RK_CHECK_DIM(d, 2);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "q must be float32 or float64, got ", q.scalar_type());
  RK_CHECK_DTYPE(d, q.scalar_type());
  TORCH_CHECK(scale.dim() == 0, "scale must be 0-d");
  const int64_t B = q.size(0), M = d.size(0), D = q.size(1);
  TORCH_CHECK(d.size(1) == D, "d must have ", D, " columns, got ", d.size(1));
  TORCH_CHECK(pos_index.has_value() != pos_mask.has_value(),
              "exactly one of pos_index and pos_mask must be given");
  if (pos_index.has_value()) {
    RK_CHECK_INPUT(*pos_index);
    RK_CHECK_SHAPE(*pos_index, B);
    RK_CHECK_DTYPE(*pos_index, at::kLong);
    const int64_t* p = pos_index->data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i)
      TORCH_CHECK(p[i] >= 0 && p[i] < M, "pos_index[", i, "] = ", p[i], " out of [0, ", M, ")");
    TORCH_CHECK(!id_table.has_value(), "id_table is only used with pos_mask");
  } else {
    RK_CHECK_INPUT(*pos_mask);
    RK_CHECK_SHAPE(*pos_mask, B, M);
    RK_CHECK_DTYPE(*pos_mask, at::kBool);
    TORCH_CHECK(cand_ids.has_value() == id_table.has_value(),
                "mask mode needs both cand_ids and id_table, or neither");
  }
  if (cand_ids.has_value()) {
    RK_CHECK_INPUT(*cand_ids);
    RK_CHECK_SHAPE(*cand_ids, M);
    RK_CHECK_DTYPE(*cand_ids, at::kLong);
  }
  if (id_table.has_value()) {
    RK_CHECK_INPUT(*id_table);
    RK_CHECK_DIM(*id_table, 2);
    TORCH_CHECK(id_table->size(0) == B, "id_table must have ", B, " rows");
    RK_CHECK_DTYPE(*id_table, at::kBool);
    const int64_t U = id_table->size(1);
    const int64_t* c = cand_ids->data_ptr<int64_t>();
    for (int64_t j = 0; j < M; ++j)
      TORCH_CHECK(c[j] >= 0 && c[j] < U, "compact cand_ids[", j, "] out of [0, ", U, ")");
  }
  // detached: the worker threads of parallel_for run with grad mode on
  return {q.detach(), d.detach(), scale.item<double>(), pos_index, pos_mask, cand_ids, id_table, B, M, D};
}

// The scores of block [i0, i1) x [j0, j1): sim (unscaled, for dscale) and S = scale * sim with
// excluded candidates at -inf; pos_s = S on positives, -inf elsewhere (mask mode only).
template <typename scalar_t>
void block_scores(const Inputs& in, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                  at::Tensor& sim, at::Tensor& S, at::Tensor& pos_s) {
  const int64_t bi = i1 - i0, bj = j1 - j0;
  sim = sim.resize_({bi, bj});
  at::mm_out(sim, in.q.narrow(0, i0, bi), in.d.narrow(0, j0, bj).t());
  S = S.resize_({bi, bj});
  at::mul_out(S, sim, in.scale);
  const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  scalar_t* s = S.data_ptr<scalar_t>();
  const int64_t* ids = in.cand_ids.has_value() ? in.cand_ids->data_ptr<int64_t>() : nullptr;
  if (in.pos_index.has_value()) {
    if (!ids) return;
    const int64_t* p = in.pos_index->data_ptr<int64_t>();
    for (int64_t r = 0; r < bi; ++r) {
      const int64_t pi = p[i0 + r];
      const int64_t key = ids[pi];
      for (int64_t c = 0; c < bj; ++c)
        if (ids[j0 + c] == key && j0 + c != pi) s[r * bj + c] = neg_inf;
    }
    return;
  }
  pos_s = pos_s.resize_({bi, bj});
  scalar_t* ps = pos_s.data_ptr<scalar_t>();
  const bool* mask = in.pos_mask->data_ptr<bool>();
  const bool* table = in.id_table.has_value() ? in.id_table->data_ptr<bool>() : nullptr;
  const int64_t U = table ? in.id_table->size(1) : 0;
  for (int64_t r = 0; r < bi; ++r) {
    const bool* mrow = mask + (i0 + r) * in.M + j0;
    const bool* trow = table ? table + (i0 + r) * U : nullptr;
    for (int64_t c = 0; c < bj; ++c) {
      const int64_t k = r * bj + c;
      ps[k] = mrow[c] ? s[k] : neg_inf;
      if (trow && !mrow[c] && trow[ids[j0 + c]]) s[k] = neg_inf;
    }
  }
}

// Online log-sum-exp update of rows [0, bi) with block x (entries may be -inf); the
// elementwise work runs through ATen's vectorised kernels.
template <typename scalar_t>
void online_lse(const at::Tensor& x, double* m, double* l, at::Tensor& scratch,
                at::Tensor& shift_t) {
  const int64_t bi = x.size(0), bj = x.size(1);
  const auto mx = at::amax(x, {1});
  const scalar_t* mxp = mx.data_ptr<scalar_t>();
  shift_t = shift_t.resize_({bi, 1});
  scalar_t* shift = shift_t.data_ptr<scalar_t>();
  for (int64_t r = 0; r < bi; ++r) {
    const double nm = std::max(m[r], static_cast<double>(mxp[r]));
    shift[r] = std::isinf(nm) ? scalar_t(0) : static_cast<scalar_t>(nm);  // nothing yet: m=-inf, l=0
    if (m[r] != nm) l[r] = (std::isinf(m[r]) ? 0.0 : l[r] * std::exp(m[r] - static_cast<double>(shift[r])));
    m[r] = std::isinf(nm) ? nm : static_cast<double>(shift[r]);
  }
  scratch = scratch.resize_({bi, bj});
  at::sub_out(scratch, x, shift_t);
  scratch.exp_();
  const auto sums = scratch.sum(1);
  const scalar_t* sp = sums.data_ptr<scalar_t>();
  for (int64_t r = 0; r < bi; ++r) l[r] += static_cast<double>(sp[r]);
  (void)bj;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_fwd(
    const at::Tensor& q, const at::Tensor& d, const at::Tensor& scale,
    const std::optional<at::Tensor>& pos_index, const std::optional<at::Tensor>& pos_mask,
    const std::optional<at::Tensor>& cand_ids, const std::optional<at::Tensor>& id_table) {
  const Inputs in = check_inputs(q, d, scale, pos_index, pos_mask, cand_ids, id_table);
  const int64_t B = in.B, M = in.M;
  auto loss = at::empty({B}, q.options());
  auto lse = at::empty({B}, q.options());
  auto pos_lse = at::empty({B}, q.options());
  const int64_t n_row_tiles = (B + kRowTile - 1) / kRowTile;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "contrastive_fwd", [&] {
    at::parallel_for(0, n_row_tiles, 1, [&](int64_t t0, int64_t t1) {
      at::NoGradGuard no_grad;
      at::Tensor sim = at::empty({0}, q.options()), S = at::empty({0}, q.options());
      at::Tensor pos_s = at::empty({0}, q.options()), scratch = at::empty({0}, q.options());
      at::Tensor shift = at::empty({0}, q.options());
      std::vector<double> m(kRowTile), l(kRowTile), pm(kRowTile), pl(kRowTile), plogit(kRowTile);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = t * kRowTile, i1 = std::min(B, i0 + kRowTile), bi = i1 - i0;
        std::fill(m.begin(), m.end(), -std::numeric_limits<double>::infinity());
        std::fill(pm.begin(), pm.end(), -std::numeric_limits<double>::infinity());
        std::fill(l.begin(), l.end(), 0.0);
        std::fill(pl.begin(), pl.end(), 0.0);
        for (int64_t j0 = 0; j0 < M; j0 += kColTile) {
          const int64_t j1 = std::min(M, j0 + kColTile);
          block_scores<scalar_t>(in, i0, i1, j0, j1, sim, S, pos_s);
          online_lse<scalar_t>(S, m.data(), l.data(), scratch, shift);
          if (in.pos_mask.has_value()) {
            online_lse<scalar_t>(pos_s, pm.data(), pl.data(), scratch, shift);
          } else {
            const int64_t* p = in.pos_index->data_ptr<int64_t>();
            const scalar_t* s = S.data_ptr<scalar_t>();
            for (int64_t r = 0; r < bi; ++r) {
              const int64_t pi = p[i0 + r];
              if (pi >= j0 && pi < j1) plogit[r] = static_cast<double>(s[r * (j1 - j0) + pi - j0]);
            }
          }
        }
        scalar_t* lo = loss.data_ptr<scalar_t>();
        scalar_t* ls = lse.data_ptr<scalar_t>();
        scalar_t* pls = pos_lse.data_ptr<scalar_t>();
        for (int64_t r = 0; r < bi; ++r) {
          const double row_lse = m[r] + std::log(l[r]);
          const double row_pos = in.pos_mask.has_value() ? pm[r] + std::log(pl[r]) : plogit[r];
          lo[i0 + r] = static_cast<scalar_t>(row_lse - row_pos);
          ls[i0 + r] = static_cast<scalar_t>(row_lse);
          pls[i0 + r] = static_cast<scalar_t>(row_pos);
        }
      }
    });
  });
  return {loss, lse, pos_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_bwd(
    const at::Tensor& q, const at::Tensor& d, const at::Tensor& scale,
    const std::optional<at::Tensor>& pos_index, const std::optional<at::Tensor>& pos_mask,
    const std::optional<at::Tensor>& cand_ids, const std::optional<at::Tensor>& id_table,
    const at::Tensor& lse, const at::Tensor& pos_lse, const at::Tensor& grad, bool need_q,
    bool need_d) {
  const Inputs in = check_inputs(q, d, scale, pos_index, pos_mask, cand_ids, id_table);
  const int64_t B = in.B, M = in.M, D = in.D;
  for (const at::Tensor* t : {&lse, &pos_lse, &grad}) {
    RK_CHECK_INPUT(*t);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "lse, pos_lse and grad must have shape (", B, ")");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "lse, pos_lse and grad must match q's dtype");
  }
  auto dq = need_q ? at::zeros({B, D}, q.options()) : at::empty({0, D}, q.options());
  std::vector<at::Tensor> dd_parts;
  std::vector<double> dscale_parts;
  std::mutex mu;
  const int64_t n_row_tiles = (B + kRowTile - 1) / kRowTile;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "contrastive_bwd", [&] {
    at::parallel_for(0, n_row_tiles, 1, [&](int64_t t0, int64_t t1) {
      at::NoGradGuard no_grad;
      at::Tensor sim = at::empty({0}, q.options()), S = at::empty({0}, q.options());
      at::Tensor pos_s = at::empty({0}, q.options()), dS = at::empty({0}, q.options());
      at::Tensor tgt = at::empty({0}, q.options());
      at::Tensor dd = need_d ? at::zeros({M, D}, q.options()) : at::Tensor();
      double dscale = 0.0;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = t * kRowTile, i1 = std::min(B, i0 + kRowTile), bi = i1 - i0;
        auto lse_t = lse.narrow(0, i0, bi).unsqueeze(1);
        auto g_t = grad.narrow(0, i0, bi).unsqueeze(1);
        auto q_t = in.q.narrow(0, i0, bi);
        for (int64_t j0 = 0; j0 < M; j0 += kColTile) {
          const int64_t j1 = std::min(M, j0 + kColTile), bj = j1 - j0;
          block_scores<scalar_t>(in, i0, i1, j0, j1, sim, S, pos_s);
          // dS = g * (exp(S - lse) - target); excluded entries are exp(-inf) = 0
          dS = dS.resize_({bi, bj});
          at::sub_out(dS, S, lse_t);
          dS.exp_();
          if (in.pos_mask.has_value()) {
            tgt = tgt.resize_({bi, bj});
            at::sub_out(tgt, pos_s, pos_lse.narrow(0, i0, bi).unsqueeze(1));
            tgt.exp_();
            dS.sub_(tgt);
          } else {
            const int64_t* p = in.pos_index->data_ptr<int64_t>();
            scalar_t* ds = dS.data_ptr<scalar_t>();
            for (int64_t r = 0; r < bi; ++r) {
              const int64_t pi = p[i0 + r];
              if (pi >= j0 && pi < j1) ds[r * bj + pi - j0] -= scalar_t(1);
            }
          }
          dS.mul_(g_t);
          dscale += static_cast<double>(at::dot(dS.view({-1}), sim.view({-1})).item<scalar_t>());
          if (need_q) dq.narrow(0, i0, bi).addmm_(dS, in.d.narrow(0, j0, bj));
          if (need_d) dd.narrow(0, j0, bj).addmm_(dS.t(), q_t);
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      if (need_d) dd_parts.push_back(dd);
      dscale_parts.push_back(dscale);
    });
  });
  at::Tensor dd_out;
  if (need_d) {
    dd_out = dd_parts.empty() ? at::zeros({M, D}, q.options()) : dd_parts[0];
    for (size_t k = 1; k < dd_parts.size(); ++k) dd_out.add_(dd_parts[k]);
    dd_out.mul_(in.scale);
  } else {
    dd_out = at::empty({0, D}, q.options());
  }
  if (need_q) dq.mul_(in.scale);
  double ds_total = 0.0;
  for (double v : dscale_parts) ds_total += v;
  return {dq, dd_out, at::scalar_tensor(ds_total, q.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rag_kernels, m) {
  m.def(
      "contrastive_fwd(Tensor q, Tensor d, Tensor scale, Tensor? pos_index, Tensor? pos_mask, "
      "Tensor? cand_ids, Tensor? id_table) -> (Tensor, Tensor, Tensor)");
  m.def(
      "contrastive_bwd(Tensor q, Tensor d, Tensor scale, Tensor? pos_index, Tensor? pos_mask, "
      "Tensor? cand_ids, Tensor? id_table, Tensor lse, Tensor pos_lse, Tensor grad, "
      "bool need_q, bool need_d) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rag_kernels, CPU, m) {
  m.impl("contrastive_fwd", &contrastive_fwd);
  m.impl("contrastive_bwd", &contrastive_bwd);
}
