"""Retriever objectives (rag_kernels.losses.retriever): EMDR², PDist, LOOP, ADist, REPLUG-LSR.

Oracles: torch.nn.functional.kl_div for the KL family, the LSR formulas written out with
exp/log, hand-computed EMDR² values and a naive Python loop, per-query sub-selection for
doc masks, gradcheck in float64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from rag_kernels import retriever as R
from toolkit import assert_close

D64 = torch.float64
KL_REDUCTIONS = ["batchmean", "mean", "sum", "none"]

# The three "target" objectives share one signature: (doc_scores, target, **kw).
TARGET_FNS = {"pdist": R.pdist_loss, "loop": R.loop_loss, "adist": R.adist_loss}


def _kl_ref(log_q: torch.Tensor, p: torch.Tensor, reduction: str) -> torch.Tensor:
    """F.kl_div, with "none" summed over documents (our "none" is per query)."""
    if reduction == "none":
        return F.kl_div(log_q, p, reduction="none").sum(-1)
    with warnings.catch_warnings():  # kl_div warns that "mean" is not "batchmean"; we know
        warnings.simplefilter("ignore", UserWarning)
        return F.kl_div(log_q, p, reduction=reduction)


def _ragged_mask(B: int, K: int) -> torch.Tensor:
    mask = torch.rand(B, K) > 0.35
    mask[:, 0] = True
    mask[1, 1:] = False  # one query keeps a single document
    return mask


def _objective(name: str, reduction: str | None = None):
    """fn(doc_scores, gen, doc_mask) for one objective with fixed non-default temperatures."""
    red = {} if reduction is None else {"reduction": reduction}
    if name in TARGET_FNS:
        f = TARGET_FNS[name]
        return lambda s, g, m: f(
            s, g, doc_mask=m, retriever_temperature=0.7, generator_temperature=0.4, **red
        )
    if name.startswith("lsr"):
        d = name[4:-1]
        return lambda s, g, m: R.lsr_loss(
            s, g, doc_mask=m, direction=d, retriever_temperature=0.6, lm_temperature=1.3, **red
        )
    level = name[6:-1]
    return lambda s, g, m: R.emdr2_loss(
        s, g, doc_mask=m, level=level, retriever_temperature=0.8, **red
    )


OBJ_IDS = [
    *TARGET_FNS,
    *(f"lsr[{d}]" for d in R.LSR_DIRECTIONS),
    *(f"emdr2[{lv}]" for lv in R.EMDR2_LEVELS),
]


def _kind(name: str) -> str:
    return "bkt" if name.startswith("emdr2") else "bk"


def _gen_input(kind: str, B: int, K: int, T: int = 5, dtype=D64) -> torch.Tensor:
    if kind == "bk":
        return torch.randn(B, K, dtype=dtype) * 2
    return -torch.rand(B, K, T, dtype=dtype) * 3


# ---------------------------------------------------------------------------------------
# KL family against F.kl_div and the written-out formulas
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
@pytest.mark.parametrize("name", list(TARGET_FNS))
@pytest.mark.parametrize("taus", [(1.0, 1.0), (0.01, 0.01), (0.3, 2.5)], ids=str)
def test_target_kl_matches_kl_div(name, reduction, taus):
    tau_s, tau_g = taus
    s = torch.randn(5, 7, dtype=D64)
    g = torch.randn(5, 7, dtype=D64)
    got = TARGET_FNS[name](
        s, g, retriever_temperature=tau_s, generator_temperature=tau_g, reduction=reduction
    )
    want = _kl_ref(torch.log_softmax(s / tau_s, -1), torch.softmax(g / tau_g, -1), reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_target_kl_defaults_are_atlas():
    s, g = torch.randn(3, 6, dtype=D64), torch.randn(3, 6, dtype=D64)
    want = F.kl_div(
        torch.log_softmax(s / 0.01, -1), torch.softmax(g / 0.01, -1), reduction="batchmean"
    )
    for fn in TARGET_FNS.values():
        torch.testing.assert_close(fn(s, g), want, rtol=1e-12, atol=1e-12)
    # Atlas' nn.KLDivLoss() default ("mean") is the batchmean divided by K.
    torch.testing.assert_close(R.pdist_loss(s, g, reduction="mean"), want / 6, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
@pytest.mark.parametrize("taus", [(1.0, 1.0), (0.5, 2.0)], ids=str)
def test_lsr_lm_retriever_direction_matches_kl_div(reduction, taus):
    gamma, beta = taus
    s, lm = torch.randn(4, 9, dtype=D64), torch.randn(4, 9, dtype=D64) * 3 - 10
    got = R.lsr_loss(
        s,
        lm,
        retriever_temperature=gamma,
        lm_temperature=beta,
        direction="lm||retriever",
        reduction=reduction,
    )
    want = _kl_ref(torch.log_softmax(s / gamma, -1), torch.softmax(lm / beta, -1), reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _softmax_by_hand(x: list[float], tau: float) -> list[float]:
    e = [math.exp(v / tau) for v in x]
    z = sum(e)
    return [v / z for v in e]


@pytest.mark.parametrize("direction", R.LSR_DIRECTIONS)
@pytest.mark.parametrize("taus", [(1.0, 1.0), (0.5, 2.0)], ids=str)
def test_lsr_both_directions_written_out(direction, taus):
    """KL(P_R || Q_LM) and KL(Q_LM || P_R) computed with math.exp/log per query."""
    gamma, beta = taus
    s, lm = torch.randn(3, 5, dtype=D64), torch.randn(3, 5, dtype=D64) - 4
    got = R.lsr_loss(
        s,
        lm,
        retriever_temperature=gamma,
        lm_temperature=beta,
        direction=direction,
        reduction="none",
    )
    want = []
    for b in range(3):
        pr = _softmax_by_hand(s[b].tolist(), gamma)
        qlm = _softmax_by_hand(lm[b].tolist(), beta)
        p, q = (pr, qlm) if direction == "retriever||lm" else (qlm, pr)
        want.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))
    torch.testing.assert_close(got, torch.tensor(want, dtype=D64), rtol=1e-10, atol=1e-12)
    assert R.lsr_loss(
        s, lm, retriever_temperature=gamma, lm_temperature=beta, direction=direction
    ).item() == pytest.approx(sum(want) / 3, rel=1e-10)


def test_lsr_directions_differ():
    s, lm = torch.randn(2, 4, dtype=D64) * 2, torch.randn(2, 4, dtype=D64) * 2
    a = R.lsr_loss(s, lm, direction="retriever||lm")
    b = R.lsr_loss(s, lm, direction="lm||retriever")
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("tau_s", [1.0, 0.25])
def test_target_kl_gradient_is_q_minus_p(tau_s):
    """d KL(P||Q) / ds = (Q - P) / tau_s per query (batchmean: / B)."""
    s = torch.randn(4, 6, dtype=D64, requires_grad=True)
    g = torch.randn(4, 6, dtype=D64)
    R.pdist_loss(s, g, retriever_temperature=tau_s, generator_temperature=0.5).backward()
    q, p = torch.softmax(s.detach() / tau_s, -1), torch.softmax(g / 0.5, -1)
    torch.testing.assert_close(s.grad, (q - p) / tau_s / 4, rtol=1e-10, atol=1e-12)


def test_mean_token_logprob():
    g = torch.tensor([[[-1.0, -2.0, -3.0], [-0.5, float("nan"), -1.5]]], dtype=D64)
    m = torch.tensor([[True, False, True]])
    got = R.mean_token_logprob(g, m)
    torch.testing.assert_close(got, torch.tensor([[-2.0, -1.0]], dtype=D64))
    torch.testing.assert_close(R.mean_token_logprob(g[:, :1]), torch.tensor([[-2.0]], dtype=D64))
    # A query with no answer token gets 0, not NaN.
    assert R.mean_token_logprob(g, torch.zeros(1, 3, dtype=torch.bool)).eq(0).all()
    assert R.mean_token_logprob(g.float(), m).dtype == torch.float32


def test_pdist_with_mean_token_logprob_end_to_end():
    g = -torch.rand(3, 4, 6, dtype=D64) * 2
    m = torch.rand(3, 6) > 0.3
    m[:, 0] = True
    s = torch.randn(3, 4, dtype=D64)
    gbar = (g * m[:, None]).sum(-1) / m.sum(-1, keepdim=True)
    want = F.kl_div(
        torch.log_softmax(s / 0.01, -1), torch.softmax(gbar / 0.01, -1), reduction="batchmean"
    )
    torch.testing.assert_close(R.pdist_loss(s, R.mean_token_logprob(g, m)), want)


# ---------------------------------------------------------------------------------------
# EMDR²
# ---------------------------------------------------------------------------------------


def test_emdr2_hand_computed():
    """B=1, K=2, T=2 by hand: prior softmax([0, ln 3]) = (1/4, 3/4)."""
    s = torch.tensor([[0.0, math.log(3.0)]], dtype=D64)
    p = torch.tensor([[[0.5, 0.2], [0.1, 0.4]]], dtype=D64)  # p_LM(y_t | x, z_k)
    g = p.log()
    tok = -(math.log(0.25 * 0.5 + 0.75 * 0.1) + math.log(0.25 * 0.2 + 0.75 * 0.4))
    ans = -math.log(0.25 * 0.5 * 0.2 + 0.75 * 0.1 * 0.4)
    assert R.emdr2_loss(s, g, level="token", reduction="sum").item() == pytest.approx(
        tok, rel=1e-12
    )
    assert R.emdr2_loss(s, g, level="token").item() == pytest.approx(tok / 2, rel=1e-12)
    assert R.emdr2_loss(s, g, level="answer").item() == pytest.approx(ans, rel=1e-12)
    # retriever_temperature divides the scores: tau=0.5 doubles them, prior (1/10, 9/10).
    tok_t = -(math.log(0.1 * 0.5 + 0.9 * 0.1) + math.log(0.1 * 0.2 + 0.9 * 0.4))
    got = R.emdr2_loss(s, g, retriever_temperature=0.5, reduction="sum").item()
    assert got == pytest.approx(tok_t, rel=1e-12)


def _emdr2_naive(s, g, m, dm, level, tau):
    B, K, T = g.shape
    per_q, n_tok = [], 0
    for b in range(B):
        ks = [k for k in range(K) if dm[b, k]]
        z = sum(math.exp(s[b, k].item() / tau) for k in ks)
        prior = {k: math.exp(s[b, k].item() / tau) / z for k in ks}
        ts = [t for t in range(T) if m[b, t]]
        n_tok += len(ts)
        if level == "token":
            per_q.append(
                -sum(math.log(sum(prior[k] * math.exp(g[b, k, t].item()) for k in ks)) for t in ts)
            )
        else:
            per_q.append(
                -math.log(sum(prior[k] * math.exp(sum(g[b, k, t].item() for t in ts)) for k in ks))
            )
    return per_q, n_tok


@pytest.mark.parametrize("level", R.EMDR2_LEVELS)
@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "masked"])
def test_emdr2_matches_naive_loop(level, masks):
    B, K, T, tau = 4, 5, 7, 0.6
    s = torch.randn(B, K, dtype=D64)
    g = -torch.rand(B, K, T, dtype=D64) * 2
    m = torch.rand(B, T) > 0.3 if masks else torch.ones(B, T, dtype=torch.bool)
    dm = _ragged_mask(B, K) if masks else torch.ones(B, K, dtype=torch.bool)
    per_q, n_tok = _emdr2_naive(s, g, m, dm, level, tau)
    if masks:  # poison every masked entry: none of it may leak
        g = g.masked_fill(~m[:, None, :] | ~dm[:, :, None], float("nan"))
        s = s.masked_fill(~dm, float("-inf"))
    kw = dict(
        level=level,
        retriever_temperature=tau,
        token_mask=m if masks else None,
        doc_mask=dm if masks else None,
    )
    none = R.emdr2_loss(s, g, reduction="none", **kw)
    torch.testing.assert_close(none, torch.tensor(per_q, dtype=D64), rtol=1e-10, atol=1e-12)
    total = sum(per_q)
    mean_want = total / n_tok if level == "token" else total / B
    assert R.emdr2_loss(s, g, reduction="sum", **kw).item() == pytest.approx(total, rel=1e-10)
    assert R.emdr2_loss(s, g, reduction="mean", **kw).item() == pytest.approx(mean_want, rel=1e-10)


@pytest.mark.parametrize("level", R.EMDR2_LEVELS)
def test_emdr2_gradient_formula(level):
    """ds_bk = sum_t m (softmax_k(s/tau) - w_bk[t]) / tau, the posterior formula of DESIGN §2."""
    B, K, T, tau = 3, 4, 5, 0.5
    s = torch.randn(B, K, dtype=D64, requires_grad=True)
    g = -torch.rand(B, K, T, dtype=D64)
    m = torch.rand(B, T) > 0.3
    m[:, 0] = True
    R.emdr2_loss(
        s, g, token_mask=m, level=level, retriever_temperature=tau, reduction="sum"
    ).backward()
    prior = torch.softmax(s.detach() / tau, -1)
    gm = g * m[:, None]
    if level == "answer":
        w = torch.softmax(prior.log() + gm.sum(-1), -1)
        want = (prior - w) / tau
    else:
        w = torch.softmax(prior.log()[:, :, None] + gm, 1)  # [B,K,T]
        want = ((prior[:, :, None] - w) * m[:, None]).sum(-1) / tau
    torch.testing.assert_close(s.grad, want, rtol=1e-10, atol=1e-12)


def test_emdr2_mean_with_no_tokens_is_zero():
    s = torch.randn(2, 3, dtype=D64, requires_grad=True)
    g = torch.full((2, 3, 4), float("nan"), dtype=D64)
    out = R.emdr2_loss(s, g, token_mask=torch.zeros(2, 4, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert s.grad.eq(0).all()


# ---------------------------------------------------------------------------------------
# properties shared by every objective
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OBJ_IDS)
def test_gradient_reaches_doc_scores_only(name):
    fn, kind = _objective(name), _kind(name)
    s = torch.randn(3, 5, dtype=torch.float32, requires_grad=True)
    gen = _gen_input(kind, 3, 5, dtype=torch.float32).requires_grad_(True)
    out = fn(s, gen, None)
    out.backward()
    assert gen.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    # Each query's score gradient sums to 0 (softmax shift invariance).
    torch.testing.assert_close(s.grad.sum(-1), torch.zeros(3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", OBJ_IDS)
def test_doc_mask_equals_dropping_documents(name):
    """Masked docs (NaN-poisoned generator side, garbage/-inf scores) == docs removed."""
    fn, kind = _objective(name, "none"), _kind(name)
    B, K = 4, 6
    s = torch.randn(B, K, dtype=D64)
    gen = _gen_input(kind, B, K)
    dm = _ragged_mask(B, K)
    s_poison = s.detach().clone()
    s_poison[~dm] = torch.where(torch.rand(int((~dm).sum())) > 0.5, 1e4, float("-inf")).to(D64)
    s_poison.requires_grad_(True)
    gen_poison = gen.clone()
    gen_poison[~dm] = float("nan")
    w = torch.rand(B, dtype=D64) + 0.5

    out = fn(s_poison, gen_poison, dm)
    assert torch.isfinite(out).all()
    (out * w).sum().backward()  # non-uniform upstream gradient
    assert torch.isfinite(s_poison.grad).all()
    assert s_poison.grad[~dm].eq(0).all()
    for b in range(B):
        keep = dm[b]
        sb = s[b : b + 1, keep].clone().requires_grad_(True)
        ob = fn(sb, gen[b : b + 1, keep], None)
        torch.testing.assert_close(out[b : b + 1].detach(), ob.detach(), rtol=1e-10, atol=1e-12)
        (ob * w[b]).sum().backward()
        torch.testing.assert_close(s_poison.grad[b, keep], sb.grad[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
@pytest.mark.parametrize("name", ["pdist", "lsr"])
def test_kl_masked_reductions(name, reduction):
    """ "mean" with a doc mask = sum / number of unmasked entries; batchmean = sum / B."""
    B, K = 5, 4
    s, g = torch.randn(B, K, dtype=D64), torch.randn(B, K, dtype=D64)
    dm = _ragged_mask(B, K)
    fn = R.pdist_loss if name == "pdist" else R.lsr_loss
    per_q = fn(s, g, doc_mask=dm, reduction="none")
    denom = {"mean": dm.sum().item(), "batchmean": B, "sum": 1}[reduction]
    torch.testing.assert_close(
        fn(s, g, doc_mask=dm, reduction=reduction), per_q.sum() / denom, rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("name", OBJ_IDS)
def test_gradcheck_float64(name):
    fn, fn_none = _objective(name), _objective(name, "none")
    gen = _gen_input(_kind(name), 3, 5)
    dm = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    for mask in (None, dm):
        s = torch.randn(3, 5, dtype=D64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, m=mask: fn_none(x, gen, m), (s,))
        assert torch.autograd.gradgradcheck(lambda x, m=mask: fn(x, gen, m), (s,), fast_mode=True)


@pytest.mark.parametrize("name", OBJ_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, D64], ids=str)
def test_output_dtype(name, dtype):
    fn, kind = _objective(name), _kind(name)
    s = torch.randn(2, 3).to(dtype)
    gen = _gen_input(kind, 2, 3, dtype=torch.float32).to(dtype)
    out = fn(s, gen, None)
    assert out.dtype == (D64 if dtype == D64 else torch.float32)
    assert out.dim() == 0 and torch.isfinite(out)
    # mixed precision: bf16 generator side with fp32 scores is accepted
    assert fn(s.float(), gen.to(torch.bfloat16), None).dtype == (torch.float32)


# ---------------------------------------------------------------------------------------
# temperatures
# ---------------------------------------------------------------------------------------


def test_temperatures_rescale_inputs():
    s, g = torch.randn(3, 5, dtype=D64), torch.randn(3, 5, dtype=D64)
    for fn in TARGET_FNS.values():
        a = fn(s, g, retriever_temperature=0.3, generator_temperature=2.0)
        b = fn(s / 0.3, g / 2.0, retriever_temperature=1.0, generator_temperature=1.0)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    a = R.lsr_loss(s, g, retriever_temperature=0.3, lm_temperature=2.0)
    b = R.lsr_loss(s / 0.3, g / 2.0)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    gt = -torch.rand(3, 5, 4, dtype=D64)
    a = R.emdr2_loss(s, gt, retriever_temperature=0.3)
    torch.testing.assert_close(a, R.emdr2_loss(s / 0.3, gt), rtol=1e-12, atol=1e-12)


def test_cold_generator_temperature_is_cross_entropy_to_best_doc():
    """tau_g -> 0: the target is one-hot on argmax(g), so KL = -log Q[argmax]; no NaN from
    the underflowed target entries (exact zeros) in value or gradient."""
    s = torch.randn(4, 6, dtype=D64, requires_grad=True)
    g = torch.randn(4, 6, dtype=D64) * 5
    out = R.pdist_loss(s, g, retriever_temperature=1.0, generator_temperature=1e-6)
    want = F.cross_entropy(s.detach(), g.argmax(-1))
    torch.testing.assert_close(out.detach(), want, rtol=1e-10, atol=1e-12)
    out.backward()
    assert torch.isfinite(s.grad).all()


def test_cold_retriever_temperature_lsr_no_nan():
    """P_R underflows to exact zeros at small gamma (direction retriever||lm): finite grads."""
    s = torch.randn(3, 8, dtype=torch.float32, requires_grad=True)
    lm = torch.randn(3, 8)
    out = R.lsr_loss(s, lm, retriever_temperature=1e-4, direction="retriever||lm")
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_hot_temperature_uniform_target():
    s, g = torch.randn(3, 5, dtype=D64), torch.randn(3, 5, dtype=D64)
    out = R.loop_loss(s, g, retriever_temperature=1.0, generator_temperature=1e12, reduction="none")
    log_q = torch.log_softmax(s, -1)
    torch.testing.assert_close(out, -math.log(5) - log_q.mean(-1), rtol=1e-9, atol=1e-12)


def test_nan_in_active_generator_input_propagates():
    s, g = torch.randn(2, 4), torch.randn(2, 4)
    g[0, 1] = float("nan")
    out = R.pdist_loss(s, g, reduction="none")
    assert torch.isnan(out[0]) and torch.isfinite(out[1])


# ---------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------

_S = torch.randn(2, 3)
_G = torch.randn(2, 3)
_GT = torch.randn(2, 3, 4)
_META = torch.device("meta")

BAD = [
    # (id, callable, exception, substring of the message)
    ("scores_rank", lambda: R.pdist_loss(_S[0], _G), ValueError, "doc_scores"),
    ("scores_type", lambda: R.pdist_loss(_S.tolist(), _G), TypeError, "doc_scores"),
    ("scores_int", lambda: R.loop_loss(_S.long(), _G), TypeError, "doc_scores"),
    ("gen_rank", lambda: R.pdist_loss(_S, _GT), ValueError, "gen_scores"),
    ("gen_K", lambda: R.pdist_loss(_S, torch.randn(2, 4)), ValueError, "gen_scores"),
    ("gen_int", lambda: R.pdist_loss(_S, _G.long()), TypeError, "gen_scores"),
    ("loop_K", lambda: R.loop_loss(_S, torch.randn(2, 2)), ValueError, "nll_without_doc"),
    ("adist_B", lambda: R.adist_loss(_S, torch.randn(3, 3)), ValueError, "attention_scores"),
    ("lsr_K", lambda: R.lsr_loss(_S, torch.randn(2, 5)), ValueError, "lm_logprobs"),
    ("lsr_dtype", lambda: R.lsr_loss(_S, _G.to(torch.int32)), TypeError, "lm_logprobs"),
    ("gen_device", lambda: R.pdist_loss(_S, _G.to(_META)), ValueError, "gen_scores"),
    ("emdr_device", lambda: R.emdr2_loss(_S, _GT.to(_META)), ValueError, "gen_logprobs"),
    ("emdr_rank", lambda: R.emdr2_loss(_S, _G), ValueError, "gen_logprobs"),
    ("emdr_K", lambda: R.emdr2_loss(_S, torch.randn(2, 4, 4)), ValueError, "gen_logprobs"),
    ("emdr_B", lambda: R.emdr2_loss(_S, torch.randn(3, 3, 4)), ValueError, "gen_logprobs"),
    ("emdr_int", lambda: R.emdr2_loss(_S, _GT.long()), TypeError, "gen_logprobs"),
    ("emdr_level", lambda: R.emdr2_loss(_S, _GT, level="doc"), ValueError, "level"),
    (
        "emdr_reduction",
        lambda: R.emdr2_loss(_S, _GT, reduction="batchmean"),
        ValueError,
        "reduction",
    ),
    (
        "emdr_tokmask_shape",
        lambda: R.emdr2_loss(_S, _GT, token_mask=torch.ones(2, 3, dtype=torch.bool)),
        ValueError,
        "token_mask",
    ),
    (
        "emdr_tokmask_dtype",
        lambda: R.emdr2_loss(_S, _GT, token_mask=torch.ones(2, 4)),
        TypeError,
        "token_mask",
    ),
    ("kl_reduction", lambda: R.pdist_loss(_S, _G, reduction="avg"), ValueError, "reduction"),
    ("lsr_direction", lambda: R.lsr_loss(_S, _G, direction="forward"), ValueError, "direction"),
    (
        "docmask_shape",
        lambda: R.adist_loss(_S, _G, doc_mask=torch.ones(2, 4, dtype=torch.bool)),
        ValueError,
        "doc_mask",
    ),
    ("docmask_dtype", lambda: R.lsr_loss(_S, _G, doc_mask=torch.ones(2, 3)), TypeError, "doc_mask"),
    (
        "docmask_empty_row",
        lambda: R.pdist_loss(_S, _G, doc_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]).bool()),
        ValueError,
        "doc_mask",
    ),
    (
        "tau_zero",
        lambda: R.pdist_loss(_S, _G, retriever_temperature=0.0),
        ValueError,
        "retriever_temperature",
    ),
    (
        "tau_neg",
        lambda: R.loop_loss(_S, _G, generator_temperature=-1.0),
        ValueError,
        "generator_temperature",
    ),
    ("tau_type", lambda: R.lsr_loss(_S, _G, lm_temperature="1"), TypeError, "lm_temperature"),
    (
        "tau_nan",
        lambda: R.emdr2_loss(_S, _GT, retriever_temperature=float("nan")),
        ValueError,
        "retriever_temperature",
    ),
    (
        "scores_nan",
        lambda: R.pdist_loss(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2)),
        ValueError,
        "doc_scores",
    ),
    (
        "scores_neginf_unmasked",
        lambda: R.emdr2_loss(torch.tensor([[0.0, float("-inf")]]), torch.zeros(1, 2, 3)),
        ValueError,
        "doc_scores",
    ),
    ("mean_tok_rank", lambda: R.mean_token_logprob(_G), ValueError, "gen_logprobs"),
    # K = 0: emdr2 returned +inf, the KL objectives 0
    ("pdist_K0", lambda: R.pdist_loss(_S[:, :0], _G[:, :0]), ValueError, "at least one document"),
    ("lsr_K0", lambda: R.lsr_loss(_S[:, :0], _G[:, :0]), ValueError, "at least one document"),
    ("emdr_K0", lambda: R.emdr2_loss(_S[:, :0], _GT[:, :0]), ValueError, "at least one document"),
    (
        "tau_subnormal_fp32",
        lambda: R.pdist_loss(_S, _G, retriever_temperature=1e-40),
        ValueError,
        r"retriever_temperature must be at least 1\.175e-38 \(the smallest normal torch.float32",
    ),
    (
        "tau_subnormal_emdr2",
        lambda: R.emdr2_loss(_S, _GT, retriever_temperature=1e-39),
        ValueError,
        "retriever_temperature must be at least",
    ),
    (
        "lm_tau_subnormal",
        lambda: R.lsr_loss(_S, _G, lm_temperature=1e-45),
        ValueError,
        "lm_temperature must be at least",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(case):
    _, call, exc, name = case
    with pytest.raises(exc, match=name):
        call()


@pytest.mark.parametrize("name", ["pdist_loss", "loop_loss", "adist_loss", "lsr_loss"])
def test_a_target_minus_inf_on_every_document_is_an_error(name):
    """A query whose distillation target is -inf on every unmasked document (softmax of -infs
    is undefined) gave a NaN loss; now a ValueError naming the target and the query. A target
    finite on one unmasked document, or -inf only on masked ones, is fine."""
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)
    t[1] = float("-inf")
    mask = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"of query 1 are -inf on every unmasked document"):
        getattr(R, name)(s, t)
    t[1, 2] = 0.5
    mask[1, 2] = False
    with pytest.raises(ValueError, match=r"of query 1 are -inf"):
        getattr(R, name)(s, t, doc_mask=mask)
    mask[1, 2] = True
    loss = getattr(R, name)(s, t, doc_mask=mask)
    # (lsr's default KL(P_R || Q_LM) is +inf where Q_LM is 0 and P_R is not: a true value)
    assert not torch.isnan(loss) and (torch.isfinite(loss) or name == "lsr_loss")
    loss = getattr(R, name)(s, t.clamp_min(-50), doc_mask=mask)
    assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, s)[0]).all()


@pytest.mark.parametrize("name", ["pdist_loss", "loop_loss", "adist_loss", "lsr_loss"])
def test_a_target_plus_inf_on_an_unmasked_document_is_an_error(name):
    """A +inf target (softmax of +inf is NaN) gave a NaN loss and gradient; now a ValueError
    naming the target, query and document. On a masked document it is ignored."""
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)
    t[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"got \+inf at query 2, document 1"):
        getattr(R, name)(s, t)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 1] = False
    loss = getattr(R, name)(s, t, doc_mask=mask)
    assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, s)[0]).all()


@pytest.mark.parametrize("name", OBJ_IDS)
@pytest.mark.parametrize(
    "tau,offset,spread", [(1e-37, 40.0, 1.0), (2e-38, 10.0, 0.3)], ids=["1e-37", "2e-38"]
)
def test_tiny_temperature_float32_matches_float64(name, tau, offset, spread):
    """A temperature small but normal in fp32: scores / tau overflowed to inf once |s| / tau
    passed 3.4e38 (offset / tau does here), and the loss and gradient were NaN; the shifted
    logits keep them finite (the score gaps / tau fit fp32) and equal to float64 on the same
    fp32-rounded scores."""
    torch.manual_seed(3)
    B, K = 3, 5
    scores = (offset + torch.randn(B, K, dtype=D64) * spread).float().double()
    gen = _gen_input(_kind(name), B, K)
    mask = _ragged_mask(B, K)
    if name in TARGET_FNS:
        f = TARGET_FNS[name]
        fn = lambda s, g, m: f(s, g, doc_mask=m, retriever_temperature=tau)  # noqa: E731
    elif name.startswith("lsr"):
        fn = (
            lambda s, g, m: R.lsr_loss(  # noqa: E731
                s, g, doc_mask=m, direction=name[4:-1], retriever_temperature=tau
            )
        )
    else:
        fn = (
            lambda s, g, m: R.emdr2_loss(  # noqa: E731
                s, g, doc_mask=m, level=name[6:-1], retriever_temperature=tau
            )
        )
    out = {}
    for dt in (torch.float32, D64):
        s = scores.to(dt).requires_grad_()
        loss = fn(s, gen.to(dt), mask)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), (dt, loss, grad)
        out[dt] = (loss, grad)
    assert_close(out[torch.float32][0], out[D64][0], rtol=1e-5, name="loss")
    assert_close(out[torch.float32][1], out[D64][1], rtol=1e-5, name="grad")


def test_temperature_may_change_under_torch_compile():
    """A compiled objective (fullgraph, dynamic) called with another temperature, as in
    annealing: the temperature check used math.isfinite, which a symbolic float breaks."""
    torch._dynamo.reset()
    fn = torch.compile(
        lambda s, t, tau: R.pdist_loss(s, t, retriever_temperature=tau),
        backend="eager",
        fullgraph=True,
        dynamic=True,
    )
    s, t = torch.randn(2, 3, dtype=D64), torch.randn(2, 3, dtype=D64)
    for tau in (0.5, 0.25, 0.125):
        assert_close(fn(s, t, tau), R.pdist_loss(s, t, retriever_temperature=tau), name=str(tau))
