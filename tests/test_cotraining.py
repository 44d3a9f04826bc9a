"""CoTrainingLoss: fixed weights, retriever freeze/warm-up, gradnorm, uncertainty weighting."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rag_kernels as rk
from rag_kernels.losses.cotraining import CoTrainingLoss, CoTrainingOutput

D64 = torch.float64


def _scalar(v: float, dtype=D64, grad: bool = True) -> torch.Tensor:
    return torch.tensor(v, dtype=dtype, requires_grad=grad)


# ---------------------------------------------------------------------------------------
# fixed weights, output record
# ---------------------------------------------------------------------------------------


def test_fixed_weights_exact():
    crit = CoTrainingLoss(generator_weight=0.7, retriever_weight=2.5)
    lg, lr = _scalar(1.3), _scalar(0.4)
    out = crit(lg, lr)
    assert isinstance(out, CoTrainingOutput)
    assert out.loss.item() == pytest.approx(0.7 * 1.3 + 2.5 * 0.4, rel=1e-15)
    out.loss.backward()
    assert lg.grad.item() == pytest.approx(0.7) and lr.grad.item() == pytest.approx(2.5)
    assert out.generator.item() == 1.3 and out.retriever.item() == 0.4
    assert not out.generator.requires_grad and not out.retriever.requires_grad
    assert out.generator_weight.item() == pytest.approx(0.7)
    assert out.retriever_weight.item() == pytest.approx(2.5)
    assert out.generator_grad_norm is None and out.retriever_grad_norm is None
    assert out.loss.dtype == D64


def test_generator_only():
    crit = CoTrainingLoss(generator_weight=0.5)
    lg = _scalar(3.0, dtype=torch.float32)
    out = crit(lg)
    assert out.loss.item() == pytest.approx(1.5)
    assert out.retriever is None and out.retriever_weight.item() == 0.0
    assert out.loss.dtype == torch.float32
    d = out.as_dict()
    assert "retriever" not in d and d["generator"] == 3.0


def test_as_dict_plain_floats():
    out = CoTrainingLoss(retriever_weight=0.5)(_scalar(2.0), _scalar(4.0, dtype=torch.float32))
    d = out.as_dict()
    assert set(d) == {"loss", "generator", "retriever", "generator_weight", "retriever_weight"}
    assert all(type(v) is float for v in d.values())
    assert d["loss"] == pytest.approx(4.0)


def test_bf16_losses_give_fp32_total():
    out = CoTrainingLoss()(_scalar(1.0, torch.bfloat16), _scalar(2.0, torch.bfloat16))
    assert out.loss.dtype == torch.float32 and out.loss.item() == 3.0


# ---------------------------------------------------------------------------------------
# freeze / warm-up schedule and the step counter
# ---------------------------------------------------------------------------------------

SCHEDULES = [
    # (freeze, warmup, expected factor for steps 0..7)
    (0, 0, [1, 1, 1, 1, 1, 1, 1, 1]),
    (3, 0, [0, 0, 0, 1, 1, 1, 1, 1]),
    (0, 2, [0.5, 1, 1, 1, 1, 1, 1, 1]),
    (3, 4, [0, 0, 0, 0.25, 0.5, 0.75, 1, 1]),
]


@pytest.mark.parametrize("freeze,warmup,want", SCHEDULES, ids=lambda x: str(x))
def test_schedule_internal_counter(freeze, warmup, want):
    crit = CoTrainingLoss(
        retriever_weight=2.0, retriever_freeze_steps=freeze, retriever_warmup_steps=warmup
    )
    got, active = [], []
    for _ in range(len(want)):
        active.append(crit.retriever_active())
        out = crit(_scalar(1.0), _scalar(3.0))
        got.append(out.retriever_weight.item())
        assert out.loss.item() == pytest.approx(1.0 + 3.0 * got[-1])
    assert got == pytest.approx([2.0 * w for w in want])
    assert active == [i >= freeze for i in range(len(want))]
    assert int(crit.step_count) == len(want)


@pytest.mark.parametrize("freeze,warmup,want", SCHEDULES, ids=lambda x: str(x))
def test_schedule_explicit_step(freeze, warmup, want):
    crit = CoTrainingLoss(retriever_freeze_steps=freeze, retriever_warmup_steps=warmup)
    for step, w in enumerate(want):
        for s in (step, torch.tensor(step)):
            out = crit(_scalar(1.0), _scalar(1.0), step=s)
            assert out.retriever_weight.item() == pytest.approx(w)
            assert crit.retriever_active(s) == (step >= freeze)
    assert int(crit.step_count) == 0  # an explicit step leaves the counter alone


def test_eval_mode_does_not_advance_counter():
    crit = CoTrainingLoss(retriever_freeze_steps=1)
    crit(_scalar(1.0), _scalar(1.0))
    crit.eval()
    for _ in range(3):
        assert crit(_scalar(1.0), _scalar(1.0)).retriever_weight.item() == 1.0
    assert int(crit.step_count) == 1


def test_freeze_blocks_retriever_gradient_and_nonfinite_loss():
    crit = CoTrainingLoss(retriever_freeze_steps=2)
    lr = _scalar(float("inf"))
    out = crit(_scalar(1.0), lr * 1.0)
    assert out.loss.item() == 1.0
    out.loss.backward()
    assert lr.grad is None  # no gradient reaches the frozen term at all


def test_nonfinite_frozen_term_leaks_no_nan_through_its_graph():
    """A zero gradient into a frozen (or zero-weight) term's graph is not enough: a +inf
    retriever loss's own backward turns it into NaN (0 * inf), which reached doc_scores."""
    s = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    lm = torch.randn(2, 3, dtype=torch.float64)
    lm[0, 1] = float("-inf")  # the answer is impossible given document 1: L_r = +inf
    lg = -torch.log_softmax(s, -1)[:, 0].mean()
    (want,) = torch.autograd.grad(lg, s, retain_graph=True)
    for crit, step in (
        (CoTrainingLoss(retriever_freeze_steps=10), None),  # the counter: a tensor flag
        (CoTrainingLoss(retriever_freeze_steps=10), 3),  # an int step: known on the host
        (CoTrainingLoss(retriever_freeze_steps=10), torch.tensor(3)),
        (CoTrainingLoss(retriever_weight=0.0), None),
        (CoTrainingLoss(balancing="uncertainty", retriever_freeze_steps=10), None),
    ):
        out = crit(lg, rk.retriever.lsr_loss(s, lm), step=step)
        (got,) = torch.autograd.grad(out.loss, s, retain_graph=True)
        assert torch.isfinite(out.loss) and torch.isfinite(got).all(), got
        if crit.balancing == "fixed":
            torch.testing.assert_close(got, want)
    # a zero generator weight with a non-finite generator loss: the same
    lr = rk.retriever.lsr_loss(s, torch.zeros(2, 3, dtype=torch.float64))
    out = CoTrainingLoss(generator_weight=0.0)(torch.log(torch.zeros((), requires_grad=True)), lr)
    (got,) = torch.autograd.grad(out.loss, s)
    assert torch.isfinite(out.loss) and torch.isfinite(got).all()


def test_state_dict_round_trip():
    crit = CoTrainingLoss(retriever_freeze_steps=2, retriever_warmup_steps=4)
    for _ in range(5):
        crit(_scalar(1.0), _scalar(1.0))
    sd = crit.state_dict()
    assert int(sd["step_count"]) == 5
    fresh = CoTrainingLoss(retriever_freeze_steps=2, retriever_warmup_steps=4)
    fresh.load_state_dict(sd)
    a = crit(_scalar(1.0), _scalar(1.0)).retriever_weight.item()
    b = fresh(_scalar(1.0), _scalar(1.0)).retriever_weight.item()
    assert a == b == pytest.approx(1.0)  # step 5: (5 - 2 + 1) / 4
    assert int(fresh.step_count) == 6


# ---------------------------------------------------------------------------------------
# gradnorm
# ---------------------------------------------------------------------------------------


class _Toy(nn.Module):
    """A retriever (linear query encoder) scoring K documents, and a generator stand-in."""

    def __init__(self, D: int = 5, K: int = 4, B: int = 3):
        super().__init__()
        self.retriever = nn.Linear(D, D, dtype=D64)
        self.gen = nn.Linear(D, 1, dtype=D64)
        self.q = torch.randn(B, D, dtype=D64)
        self.docs = torch.randn(B, K, D, dtype=D64)
        self.target = torch.softmax(torch.randn(B, K, dtype=D64), -1)

    def losses(self):
        s = torch.einsum("bd,bkd->bk", self.retriever(self.q), self.docs)
        # generator loss depends on both the retriever (doc prior) and the generator params
        lp = self.gen(self.docs).squeeze(-1) - 1.0
        lg = -torch.logsumexp(torch.log_softmax(s, -1) + lp, -1).mean()
        lr = 30.0 * (self.target * -torch.log_softmax(s, -1)).sum(-1).mean()
        return lg, lr, s


def _weighted_norms(model, out, lg, lr):
    params = list(model.retriever.parameters())
    gg = torch.autograd.grad(out.generator_weight * lg, params, retain_graph=True)
    gr = torch.autograd.grad(out.retriever_weight * lr, params, retain_graph=True)
    norm = lambda gs: math.sqrt(sum(float(g.square().sum()) for g in gs))
    return norm(gg), norm(gr)


@pytest.mark.parametrize("wrt", ["params", "doc_scores"])
def test_gradnorm_equalises_weighted_gradient_norms(wrt):
    model = _Toy()
    crit = CoTrainingLoss(balancing="gradnorm", gradnorm_momentum=0.9)
    lg, lr, s = model.losses()
    grad_wrt = list(model.retriever.parameters()) if wrt == "params" else s
    out = crit(lg, lr, grad_wrt=grad_wrt)
    # raw norms differ a lot, the weighted ones are equal (first step: EMA = observation)
    assert out.retriever_grad_norm / out.generator_grad_norm > 3
    if wrt == "params":
        ng, nr = _weighted_norms(model, out, lg, lr)
    else:
        ng = float(torch.autograd.grad(out.generator_weight * lg, s, retain_graph=True)[0].norm())
        nr = float(torch.autograd.grad(out.retriever_weight * lr, s, retain_graph=True)[0].norm())
    assert ng == pytest.approx(nr, rel=1e-6)  # fp32 EMA buffer
    geo = math.sqrt(float(out.generator_grad_norm) * float(out.retriever_grad_norm))
    assert ng == pytest.approx(geo, rel=1e-6)  # fp32 EMA buffer
    # the differentiable total still backpropagates (graph was retained)
    out.loss.backward()
    assert model.gen.weight.grad is not None


def test_gradnorm_base_weights_and_ema():
    model = _Toy()
    crit = CoTrainingLoss(generator_weight=2.0, retriever_weight=0.5, balancing="gradnorm")
    params = list(model.retriever.parameters())
    lg, lr, _ = model.losses()
    out = crit(lg, lr, grad_wrt=params)
    ng, nr = _weighted_norms(model, out, lg, lr)
    assert ng / nr == pytest.approx(2.0 / 0.5, rel=1e-6)  # ratio of the base weights
    first = crit.ema_grad_norms.clone()
    # second step with scaled losses: EMA = 0.9 * old + 0.1 * new
    lg, lr, _ = model.losses()
    out2 = crit(3.0 * lg, lr, grad_wrt=params)
    new = torch.stack([out2.generator_grad_norm, out2.retriever_grad_norm]).float()
    torch.testing.assert_close(crit.ema_grad_norms, 0.9 * first + 0.1 * new)
    g, r = crit.ema_grad_norms.tolist()
    assert out2.generator_weight.item() == pytest.approx(2.0 * math.sqrt(g * r) / g, rel=1e-6)
    assert out2.retriever_weight.item() == pytest.approx(0.5 * math.sqrt(g * r) / r, rel=1e-6)


def test_gradnorm_momentum_zero_equalises_every_step():
    model = _Toy()
    crit = CoTrainingLoss(balancing="gradnorm", gradnorm_momentum=0.0)
    params = list(model.retriever.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        lg, lr, _ = model.losses()
        out = crit(lg, lr, grad_wrt=params)
        ng, nr = _weighted_norms(model, out, lg, lr)
        assert ng == pytest.approx(nr, rel=1e-6)
        opt.zero_grad()
        out.loss.backward()
        opt.step()


def test_gradnorm_unused_and_eval_and_freeze():
    model = _Toy()
    params = list(model.retriever.parameters())
    crit = CoTrainingLoss(balancing="gradnorm", retriever_freeze_steps=1)
    # step 0: frozen -> generator keeps its base weight, retriever weight 0
    lg, lr, _ = model.losses()
    out = crit(lg, lr, grad_wrt=params)
    assert out.generator_weight.item() == 1.0 and out.retriever_weight.item() == 0.0
    # a retriever loss that does not reach grad_wrt (norm 0): base weights, no division by 0
    crit2 = CoTrainingLoss(balancing="gradnorm")
    lg, _, _ = model.losses()
    out = crit2(lg, _scalar(2.0), grad_wrt=params)
    assert out.retriever_grad_norm.item() == 0.0
    assert out.generator_weight.item() == 1.0 and out.retriever_weight.item() == 1.0
    # eval: the EMA weights are used, nothing is measured or updated
    crit.eval()
    before = crit.ema_grad_norms.clone()
    lg, lr, _ = model.losses()
    out = crit(lg, lr, grad_wrt=params)
    assert out.generator_grad_norm is None
    assert torch.equal(before, crit.ema_grad_norms)
    g, r = before.tolist()
    assert out.retriever_weight.item() == pytest.approx(math.sqrt(g * r) / r, rel=1e-6)


def _inf_term(s: torch.Tensor) -> torch.Tensor:
    """A scalar loss whose value and gradient are inf (-log of an underflowed probability)."""
    return -(torch.log(torch.zeros_like(s)) * s).sum()


def test_gradnorm_a_non_finite_frozen_term_does_not_poison_the_average():
    """During the freeze a non-finite retriever term (inf, or a NaN gradient) was measured
    into the gradient-norm EMA: the weights, then the total and every gradient, were NaN or
    inf from then on, or balancing silently stopped. It is left out of the average now."""
    for bad in (_inf_term, lambda s: (s * float("nan")).sum()):
        crit = CoTrainingLoss(balancing="gradnorm", retriever_freeze_steps=1)
        for step in range(3):
            s = torch.tensor([[0.3, -0.2, 0.5]], dtype=D64, requires_grad=True)
            lg, lr = (s**2).sum(), bad(s) if step == 0 else 10 * s.sum() ** 2
            out = crit(lg, lr, grad_wrt=s)
            out.loss.backward()
            assert torch.isfinite(out.loss) and torch.isfinite(s.grad).all(), step
            assert torch.isfinite(crit.ema_grad_norms).all(), step
            if step == 0:
                assert out.loss.item() == pytest.approx(lg.item())
        # after the freeze the two terms are balanced: equal weighted gradient norms
        ng = float(out.generator_weight) * float(out.generator_grad_norm)
        nr = float(out.retriever_weight) * float(out.retriever_grad_norm)
        assert ng == pytest.approx(nr, rel=1e-6)


@pytest.mark.parametrize("zero", ["generator", "retriever"])
def test_gradnorm_a_non_finite_zero_weight_term_does_not_leak(zero):
    """A term with base weight 0 is not measured and nothing is balanced (the other term
    keeps its base weight): its non-finite value gave a NaN or inf total."""
    crit = CoTrainingLoss(balancing="gradnorm", **{f"{zero}_weight": 0.0})
    s = torch.tensor([[0.3, -0.2, 0.5]], dtype=D64, requires_grad=True)
    good = (s**2).sum()
    terms = (_inf_term(s), good) if zero == "generator" else (good, _inf_term(s))
    out = crit(*terms, grad_wrt=s)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(good.item())
    torch.testing.assert_close(s.grad, 2 * s.detach())
    assert (out.generator_grad_norm, out.retriever_grad_norm) == (None, None)


@pytest.mark.parametrize(
    "grad_wrt,exc,match",
    [
        (None, ValueError, "grad_wrt is required"),
        ([], ValueError, "grad_wrt"),
        ([1.0], TypeError, r"grad_wrt\[0\]"),
        ([torch.zeros(2)], ValueError, r"grad_wrt\[0\] must require grad"),
    ],
    ids=["missing", "empty", "not_tensor", "no_grad"],
)
def test_gradnorm_bad_grad_wrt(grad_wrt, exc, match):
    crit = CoTrainingLoss(balancing="gradnorm")
    with pytest.raises(exc, match=match):
        crit(_scalar(1.0), _scalar(1.0), grad_wrt=grad_wrt)


# ---------------------------------------------------------------------------------------
# uncertainty weighting
# ---------------------------------------------------------------------------------------


def test_uncertainty_formula_and_gradients():
    crit = CoTrainingLoss(generator_weight=1.5, retriever_weight=0.5, balancing="uncertainty")
    names = {n for n, _ in crit.named_parameters()}
    assert names == {"log_var_generator", "log_var_retriever"}
    assert crit.log_var_generator.item() == 0.0 and crit.log_var_retriever.item() == 0.0
    with torch.no_grad():
        crit.log_var_generator.fill_(0.3)
        crit.log_var_retriever.fill_(-0.7)
    Lg, Lr = 2.0, 5.0
    lg, lr = _scalar(Lg), _scalar(Lr)
    out = crit(lg, lr)
    sg, sr = 0.3, -0.7
    want = 1.5 * (math.exp(-sg) * Lg + sg) + 0.5 * (math.exp(-sr) * Lr + sr)
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    assert out.generator_weight.item() == pytest.approx(1.5 * math.exp(-sg), rel=1e-6)
    assert out.retriever_weight.item() == pytest.approx(0.5 * math.exp(-sr), rel=1e-6)
    out.loss.backward()
    assert crit.log_var_generator.grad.item() == pytest.approx(
        1.5 * (1 - math.exp(-sg) * Lg), rel=1e-6
    )
    assert crit.log_var_retriever.grad.item() == pytest.approx(
        0.5 * (1 - math.exp(-sr) * Lr), rel=1e-6
    )
    assert lg.grad.item() == pytest.approx(1.5 * math.exp(-sg), rel=1e-6)


def test_uncertainty_learns_and_respects_freeze():
    crit = CoTrainingLoss(balancing="uncertainty", retriever_freeze_steps=1)
    out = crit(_scalar(2.0), _scalar(5.0))  # step 0: frozen
    out.loss.backward()
    assert crit.log_var_retriever.grad is None
    assert crit.log_var_generator.grad.item() != 0.0
    # generator-only: the retriever parameter is untouched
    crit2 = CoTrainingLoss(balancing="uncertainty")
    out = crit2(_scalar(2.0))
    assert out.loss.item() == pytest.approx(2.0)
    # optimising s_g on a constant loss L drives it to log L (the optimum of exp(-s) L + s)
    crit3 = CoTrainingLoss(balancing="uncertainty")
    opt = torch.optim.SGD(crit3.parameters(), lr=0.2)
    for _ in range(200):
        opt.zero_grad()
        crit3(torch.tensor(4.0), torch.tensor(0.5)).loss.backward()
        opt.step()
    assert crit3.log_var_generator.item() == pytest.approx(math.log(4.0), abs=1e-3)
    assert crit3.log_var_retriever.item() == pytest.approx(math.log(0.5), abs=1e-3)


def test_compiled_training_step_matches_eager():
    """fullgraph torch.compile of forward + backward through the freeze / warm-up (the gate is
    a where there: graphs cannot branch on the step counter)."""
    grads = []
    for compiled in (False, True):
        crit = CoTrainingLoss(retriever_freeze_steps=2, retriever_warmup_steps=2)
        fn = lambda a, b, c=crit: c(a, b).loss  # noqa: E731
        if compiled:
            fn = torch.compile(fn, backend="eager", fullgraph=True)
        a, b = _scalar(1.0), _scalar(2.0)
        for _ in range(5):
            fn(a * 1.0, b * 1.0).backward()
        grads.append((a.grad.item(), b.grad.item()))
    assert grads[0] == grads[1] == (5.0, 2.5)  # b: 0, 0, 0.5, 1, 1


# ---------------------------------------------------------------------------------------
# no host sync in forward
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("balancing", ["fixed", "gradnorm", "uncertainty"])
def test_forward_does_not_sync(balancing, monkeypatch):
    model = _Toy()
    crit = CoTrainingLoss(balancing=balancing, retriever_freeze_steps=1, retriever_warmup_steps=2)
    crit(*model.losses()[:2], grad_wrt=list(model.retriever.parameters()))

    def boom(*a, **k):
        raise AssertionError("host sync inside CoTrainingLoss.forward")

    lg, lr, _ = model.losses()
    params = list(model.retriever.parameters())
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    out = crit(lg, lr, grad_wrt=params)
    monkeypatch.undo()
    for f in ("loss", "generator", "retriever", "generator_weight", "retriever_weight"):
        assert isinstance(getattr(out, f), torch.Tensor)
    assert out.as_dict()["retriever_weight"] > 0


def test_compiles_without_graph_break():
    crit = CoTrainingLoss(retriever_weight=0.5, retriever_freeze_steps=1, retriever_warmup_steps=2)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: crit(a, b).loss, backend="eager", fullgraph=True)
    got = [compiled(torch.tensor(1.0), torch.tensor(2.0)).item() for _ in range(4)]
    assert got == pytest.approx([1.0, 1.5, 2.0, 2.0])
    assert int(crit.step_count) == 4


# ---------------------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------------------

BAD_INIT = [
    ("balancing", dict(balancing="magic"), ValueError, "balancing"),
    ("neg_weight", dict(retriever_weight=-1.0), ValueError, "retriever_weight"),
    ("nan_weight", dict(generator_weight=float("nan")), ValueError, "generator_weight"),
    ("str_weight", dict(generator_weight="1"), TypeError, "generator_weight"),
    ("float_freeze", dict(retriever_freeze_steps=1.5), TypeError, "retriever_freeze_steps"),
    ("neg_warmup", dict(retriever_warmup_steps=-2), ValueError, "retriever_warmup_steps"),
    ("momentum_1", dict(gradnorm_momentum=1.0), ValueError, "gradnorm_momentum"),
    ("neg_eps", dict(eps=-1.0), ValueError, "eps"),
]


@pytest.mark.parametrize("case", BAD_INIT, ids=[c[0] for c in BAD_INIT])
def test_bad_init(case):
    _, kw, exc, match = case
    with pytest.raises(exc, match=match):
        CoTrainingLoss(**kw)


BAD_CALL = [
    ("gen_vector", lambda c: c(torch.ones(2), _scalar(1.0)), ValueError, "generator_loss"),
    ("gen_float", lambda c: c(1.0, _scalar(1.0)), TypeError, "generator_loss"),
    ("ret_vector", lambda c: c(_scalar(1.0), torch.ones(1)), ValueError, "retriever_loss"),
    ("ret_int", lambda c: c(_scalar(1.0), torch.tensor(1)), TypeError, "retriever_loss"),
    ("ret_device", lambda c: c(_scalar(1.0), torch.ones((), device="meta")), ValueError,
     "retriever_loss"),
    ("neg_step", lambda c: c(_scalar(1.0), _scalar(1.0), step=-1), ValueError, "step"),
    ("float_step", lambda c: c(_scalar(1.0), _scalar(1.0), step=1.5), TypeError, "step"),
    # a [2] step gave a [2] total; a float or bool tensor step was taken as is
    ("vector_step", lambda c: c(_scalar(1.0), _scalar(1.0), step=torch.tensor([3, 0])),
     TypeError, r"0-d integer tensor, got a tensor of shape \(2,\)"),
    ("float_tensor_step", lambda c: c(_scalar(1.0), _scalar(1.0), step=torch.tensor(1.5)),
     TypeError, "step must be an int >= 0 or a 0-d integer tensor"),
    ("bool_tensor_step", lambda c: c(_scalar(1.0), _scalar(1.0), step=torch.tensor(True)),
     TypeError, "step must be"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CALL, ids=[c[0] for c in BAD_CALL])
def test_bad_call(case):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call(CoTrainingLoss())
