"""Weighted combination of the generator and retriever losses for RAG co-training.

``total = w_g * L_g + w_r(step) * L_r``, where ``w_r(step)`` follows a freeze / warm-up
schedule and both weights may be rebalanced every step (``balancing``):

* ``"fixed"``: the configured weights.
* ``"gradnorm"``: rescale both terms so their gradients w.r.t. ``grad_wrt`` (retriever
  parameters, or the shared ``doc_scores``) have the same norm, the geometric mean of the
  two (a simplified GradNorm, Chen et al. 2018, without the learned weights):
  ``w_i = base_i * sqrt(n_g * n_r) / n_i`` with ``n_i`` an EMA of ``||dL_i/d grad_wrt||``
  (a norm that is not finite is left out of its EMA; with a base weight 0 nothing is
  balanced).
* ``"uncertainty"``: homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla 2018)
  with learnable log-variances ``s_g``, ``s_r`` (init 0):
  ``total = w_g * (exp(-s_g) L_g + s_g) + w_r(step) * (exp(-s_r) L_r + s_r)``.

Retriever schedule (``F = retriever_freeze_steps``, ``W = retriever_warmup_steps``)::

    w_r(step) = 0                                      for step < F
              = base_r * min(1, (step - F + 1) / W)    for step >= F   (W > 0)
              = base_r                                 for step >= F   (W = 0)

so the warm-up reaches the full weight on its W-th step after the freeze.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from numbers import Integral, Real

import torch
from torch import nn

from ..ops import validation as V

BALANCING = ("fixed", "gradnorm", "uncertainty")


@dataclass
class CoTrainingOutput:
    """Result of :class:`CoTrainingLoss`.

    ``loss`` is the differentiable total; every other field is a detached 0-d tensor (or
    None) for logging. ``generator_weight`` / ``retriever_weight`` are the effective
    multipliers of ``L_g`` / ``L_r`` this step (for ``"uncertainty"``: ``w * exp(-s)``);
    the grad norms are this step's measured (not EMA) norms, ``"gradnorm"`` only (None in
    eval mode, and when a base weight is 0: there is nothing to balance).
    """

    loss: torch.Tensor
    generator: torch.Tensor
    retriever: torch.Tensor | None
    generator_weight: torch.Tensor
    retriever_weight: torch.Tensor
    generator_grad_norm: torch.Tensor | None = None
    retriever_grad_norm: torch.Tensor | None = None

    def as_dict(self) -> dict[str, float]:
        """Plain Python floats for logging (one host sync); None fields are left out."""
        names = [f.name for f in fields(self) if getattr(self, f.name) is not None]
        vals = [getattr(self, n).detach().reshape(()).to(torch.float64) for n in names]
        dev = vals[0].device
        return dict(zip(names, torch.stack([v.to(dev) for v in vals]).tolist(), strict=True))


def _check_nonneg_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def _check_nonneg_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _check_scalar_loss(name: str, x: object) -> torch.Tensor:
    V.check_tensor(name, x)
    if x.dim() != 0:
        raise ValueError(f"{name} must be a 0-d (scalar) tensor, got shape {tuple(x.shape)}")
    return x


class _Gate(torch.autograd.Function):
    """``term`` where ``on`` (a 0-d bool tensor), else 0, and then no gradient at all into
    ``term``'s graph: a zero upstream gradient is not enough, since a non-finite term's own
    backward turns it into NaN (0 · inf). The forward never reads ``on`` on the host; the
    backward does (a sync only when ``on`` lives on the GPU). See :func:`_gate`."""

    @staticmethod
    def forward(ctx, on, term):
        ctx.save_for_backward(on)
        return torch.where(on, term, torch.zeros_like(term))

    @staticmethod
    def backward(ctx, grad):
        (on,) = ctx.saved_tensors
        return None, grad if bool(on) else None


def _gate(on: bool | torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``term`` if ``on`` else 0 with nothing sent into ``term``'s graph. ``on`` known on the
    host (a float weight, an int step): the term is simply left out. A tensor ``on`` (the step
    counter, a tensor step): :class:`_Gate`, except under ``torch.compile``, whose graphs
    cannot branch on it, where it is a ``where`` (a frozen non-finite term's gradient may then
    be NaN: pass an int ``step`` to keep it out)."""
    if isinstance(on, bool):
        return term if on else torch.zeros_like(term)
    if term.requires_grad and not torch.compiler.is_compiling():
        return _Gate.apply(on, term)
    return torch.where(on, term, torch.zeros_like(term))


class CoTrainingLoss(nn.Module):
    """``total = w_g L_g + w_r(step) L_r`` with a retriever freeze/warm-up and balancing.

    Args:
        generator_weight / retriever_weight: base weights ``w_g`` / ``w_r`` (>= 0).
        balancing: ``"fixed" | "gradnorm" | "uncertainty"`` (module docstring).
        retriever_freeze_steps: steps during which the retriever term has weight 0. The
            retriever still gets a gradient through ``doc_scores`` inside the *generator*
            loss (the RAG marginal likelihood); to freeze it completely the training loop
            should pass ``doc_scores.detach()`` to the generator loss while
            ``retriever_active(step)`` is False.
        retriever_warmup_steps: linear ramp of the retriever weight after the freeze.
        gradnorm_momentum: EMA momentum of the gradient norms (0 = use this step's norms).
        eps: norms below this count as zero (then the base weights are used).

    ``forward(generator_loss, retriever_loss=None, *, step=None, grad_wrt=None)``: scalar
    losses; ``step`` None uses the internal counter (buffer ``step_count``, saved in the
    ``state_dict``), which each forward in training mode uses and then increments; an
    explicit ``step`` leaves the counter untouched. ``grad_wrt`` (a tensor or a list of
    tensors) is required for ``"gradnorm"``: each training step then runs two extra
    ``torch.autograd.grad`` passes (``retain_graph=True``) from ``L_g`` and ``L_r`` back to
    ``grad_wrt``. Autograd walks only the graph between each loss and ``grad_wrt``: with
    ``doc_scores`` that is the small ``[B, K]`` loss graph; with the retriever parameters it
    is one extra retriever backward per loss (the generator is not on that path unless it
    shares parameters with the retriever). In eval mode or under ``no_grad`` the EMA
    weights are used without update.

    ``"uncertainty"`` creates the parameters ``log_var_generator`` / ``log_var_retriever``:
    add ``CoTrainingLoss.parameters()`` to the optimizer (and move the module to the
    losses' device). The convention is ``exp(-s) L + s`` with ``s = log sigma^2`` for both
    terms (Kendall et al. write ``L / (2 sigma^2) + log sigma`` for regression terms, i.e.
    half of this; a factor that only rescales the learned ``s``). During the retriever
    freeze the whole retriever term, ``s_r`` included, is weighted by 0.

    ``forward`` never synchronises with the host (no ``.item()``); :meth:`retriever_active`
    and :meth:`CoTrainingOutput.as_dict` may. Move the module to the losses' device
    (``.to(device)``) so the step counter and EMA buffers live there; otherwise every
    forward copies them between devices.
    """

    def __init__(
        self,
        generator_weight: float = 1.0,
        retriever_weight: float = 1.0,
        balancing: str = "fixed",
        retriever_freeze_steps: int = 0,
        retriever_warmup_steps: int = 0,
        gradnorm_momentum: float = 0.9,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.generator_weight = _check_nonneg_number("generator_weight", generator_weight)
        self.retriever_weight = _check_nonneg_number("retriever_weight", retriever_weight)
        V.check_choice("balancing", balancing, BALANCING)
        self.balancing = balancing
        self.retriever_freeze_steps = _check_nonneg_int(
            "retriever_freeze_steps", retriever_freeze_steps
        )
        self.retriever_warmup_steps = _check_nonneg_int(
            "retriever_warmup_steps", retriever_warmup_steps
        )
        m = _check_nonneg_number("gradnorm_momentum", gradnorm_momentum)
        if m >= 1:
            raise ValueError(f"gradnorm_momentum must be in [0, 1), got {gradnorm_momentum!r}")
        self.gradnorm_momentum = m
        self.eps = _check_nonneg_number("eps", eps)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        if balancing == "gradnorm":
            # EMA of (||grad L_g||, ||grad L_r||); ema_initialized is 0 until the first update.
            self.register_buffer("ema_grad_norms", torch.zeros(2, dtype=torch.float32))
            self.register_buffer("ema_initialized", torch.zeros((), dtype=torch.bool))
        if balancing == "uncertainty":
            self.log_var_generator = nn.Parameter(torch.zeros(()))
            self.log_var_retriever = nn.Parameter(torch.zeros(()))

    def extra_repr(self) -> str:
        return (
            f"generator_weight={self.generator_weight}, retriever_weight={self.retriever_weight}, "
            f"balancing={self.balancing!r}, retriever_freeze_steps={self.retriever_freeze_steps}, "
            f"retriever_warmup_steps={self.retriever_warmup_steps}"
        )

    # -- schedule ------------------------------------------------------------------------

    def retriever_schedule(self, step: int | torch.Tensor | None = None) -> torch.Tensor:
        """Schedule factor in [0, 1] (0-d fp64 tensor) multiplying the retriever weight."""
        if step is None:
            step = self.step_count
        F, W = self.retriever_freeze_steps, self.retriever_warmup_steps
        if not torch.is_tensor(step):
            return torch.tensor(self._schedule_factor(step), dtype=torch.float64)
        s = step.to(torch.float64)
        if W == 0:
            return (s >= F).to(torch.float64)
        return ((s - F + 1) / W).clamp(0.0, 1.0)

    def _schedule_factor(self, step: int) -> float:
        F, W = self.retriever_freeze_steps, self.retriever_warmup_steps
        if step < F:
            return 0.0
        return 1.0 if W == 0 else min(1.0, (step - F + 1) / W)

    def retriever_active(self, step: int | torch.Tensor | None = None) -> bool:
        """Whether the retriever's freeze is over at ``step`` (None: the step the next training
        forward will use), whatever ``retriever_weight`` is: the retriever term's weight is
        non-zero from then on unless ``retriever_weight`` is 0. Use it to pass
        ``doc_scores.detach()`` to the generator loss during the freeze. Reads the counter (a
        host sync when it is on GPU)."""
        if step is None:
            step = self.step_count
        return int(step) >= self.retriever_freeze_steps

    # -- balancing -----------------------------------------------------------------------

    def _grad_norm(self, loss: torch.Tensor, wrt: list[torch.Tensor]) -> torch.Tensor:
        if not loss.requires_grad:
            return torch.zeros((), dtype=torch.float32, device=loss.device)
        grads = torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)
        sq = [g.detach().to(torch.float32).square().sum() for g in grads if g is not None]
        if not sq:
            return torch.zeros((), dtype=torch.float32, device=loss.device)
        return torch.stack([x.to(loss.device) for x in sq]).sum().sqrt()

    def _gradnorm_scales(
        self,
        generator_loss: torch.Tensor,
        retriever_loss: torch.Tensor,
        grad_wrt: torch.Tensor | Sequence[torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(scale_g, scale_r, norm_g, norm_r) from the EMA of the gradient norms.

        A term with base weight 0 is not measured (norm None) and there is nothing to balance
        (scales 1). A measured norm that is not finite (a non-finite term, e.g. during the
        freeze) leaves that term's average as it was: it never enters the EMA, whose scales
        would otherwise turn the whole total NaN from then on. An average still 0 (never
        measured, or gradients that never reached ``grad_wrt``) is replaced by the next
        finite measurement."""
        if grad_wrt is None:
            raise ValueError(
                "grad_wrt is required with balancing='gradnorm': pass the tensor(s) the two "
                "gradient norms are measured on (retriever parameters or doc_scores)"
            )
        wrt = [grad_wrt] if torch.is_tensor(grad_wrt) else list(grad_wrt)
        if not wrt:
            raise ValueError("grad_wrt must hold at least one tensor, got an empty sequence")
        for i, t in enumerate(wrt):
            if not torch.is_tensor(t):
                raise TypeError(f"grad_wrt[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if not t.requires_grad:
                raise ValueError(
                    f"grad_wrt[{i}] must require grad (a leaf parameter or graph node)"
                )
        n_g = n_r = None
        ema = self.ema_grad_norms
        update = (
            self.training
            and torch.is_grad_enabled()
            and (generator_loss.requires_grad or retriever_loss.requires_grad)
        )
        both = self.generator_weight != 0 and self.retriever_weight != 0
        if update and both:
            n_g = self._grad_norm(generator_loss, wrt)
            n_r = self._grad_norm(retriever_loss, wrt)
            new = torch.stack([n_g, n_r]).to(ema.device)
            m = self.gradnorm_momentum
            with torch.no_grad():
                warm = self.ema_initialized & (ema > 0)
                mixed = torch.where(warm, m * ema + (1 - m) * new, new)
                ema.copy_(torch.where(torch.isfinite(new), mixed, ema))
                self.ema_initialized.fill_(True)
        g, r = ema[0], ema[1]
        ok = self.ema_initialized & (g > self.eps) & (r > self.eps) & both
        geo = (g * r).sqrt()
        one = torch.ones((), dtype=ema.dtype, device=ema.device)
        scale_g = torch.where(ok, geo / g.clamp_min(self.eps), one)
        scale_r = torch.where(ok, geo / r.clamp_min(self.eps), one)
        return scale_g, scale_r, n_g, n_r

    # -- forward -------------------------------------------------------------------------

    def forward(
        self,
        generator_loss: torch.Tensor,
        retriever_loss: torch.Tensor | None = None,
        *,
        step: int | torch.Tensor | None = None,
        grad_wrt: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> CoTrainingOutput:
        _check_scalar_loss("generator_loss", generator_loss)
        if retriever_loss is not None:
            _check_scalar_loss("retriever_loss", retriever_loss)
            V.check_same_device("retriever_loss", retriever_loss, generator_loss, "generator_loss")
        if torch.is_tensor(step):
            dt = step.dtype
            if step.dim() != 0 or dt.is_floating_point or dt.is_complex or dt == torch.bool:
                raise TypeError(
                    f"step must be an int >= 0 or a 0-d integer tensor, got a tensor of shape "
                    f"{tuple(step.shape)} and dtype {dt}"
                )
        elif step is not None:
            _check_nonneg_int("step", step)
        use_counter = step is None
        dev = generator_loss.device
        dt = generator_loss.dtype if generator_loss.dtype == torch.float64 else torch.float32
        if retriever_loss is not None and retriever_loss.dtype == torch.float64:
            dt = torch.float64

        def const(x: float | torch.Tensor) -> torch.Tensor:
            if torch.is_tensor(x):
                return x.to(device=dev, dtype=dt)
            return torch.tensor(x, device=dev, dtype=dt)

        w_g = const(self.generator_weight)
        g_on = self.generator_weight != 0  # a float
        n_g = n_r = None
        if retriever_loss is None:
            if self.balancing == "uncertainty":
                s_g = self.log_var_generator.to(dt)
                total = _gate(g_on, w_g * (torch.exp(-s_g) * generator_loss + s_g))
                w_g = (w_g * torch.exp(-s_g)).detach()
            else:
                total = _gate(g_on, w_g * generator_loss)
            w_r = const(0.0)
        else:
            sched = const(self.retriever_schedule(step))
            w_r = const(self.retriever_weight) * sched
            active = sched > 0
            if self.balancing == "gradnorm":
                scale_g, scale_r, n_g, n_r = self._gradnorm_scales(
                    generator_loss, retriever_loss, grad_wrt
                )
                # While the retriever term is off there is nothing to balance against.
                w_g = torch.where(active, w_g * const(scale_g), w_g)
                w_r = w_r * const(scale_r)
            if self.balancing == "uncertainty":
                s_g = self.log_var_generator.to(dt)
                s_r = self.log_var_retriever.to(dt)
                gen_term = w_g * (torch.exp(-s_g) * generator_loss + s_g)
                ret_term = w_r * (torch.exp(-s_r) * retriever_loss + s_r)
                w_g = (w_g * torch.exp(-s_g)).detach()
                w_r = (w_r * torch.exp(-s_r)).detach()
            else:
                gen_term = w_g * generator_loss
                ret_term = w_r * retriever_loss
            # gated, not a bare product: a non-finite L_r during the freeze must not leak
            if self.retriever_weight == 0:
                r_on = False
            elif step is None or torch.is_tensor(step):
                r_on = active
            else:  # an int step: known here, no tensor flag
                r_on = self._schedule_factor(step) > 0
            total = _gate(g_on, gen_term) + _gate(r_on, ret_term)

        if use_counter and self.training:
            with torch.no_grad():
                self.step_count.add_(1)
        return CoTrainingOutput(
            loss=total,
            generator=generator_loss.detach(),
            retriever=None if retriever_loss is None else retriever_loss.detach(),
            generator_weight=w_g.detach(),
            retriever_weight=w_r.detach(),
            generator_grad_norm=n_g,
            retriever_grad_norm=n_r,
        )


__all__ = ["CoTrainingLoss", "CoTrainingOutput"]
