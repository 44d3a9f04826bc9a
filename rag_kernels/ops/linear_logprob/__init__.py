"""Fused LM head log-probability: ``log softmax(W h + b)[y]`` per row, without ``[N, V]`` logits.

Math (docs/design.md §2.1): ``z_r = W h_r (+ bias)``, optionally softcapped ``z = c tanh(z / c)``;
``lse_r = logsumexp_v z_rv``; ``lp_r = z_r[y_r] - lse_r``; ``S_r = sum_v log p_rv``.
Backward with upstream ``g_r`` (and ``g^S_r``, ``g^lse_r`` for the statistics):
``dz_rv = g_r (1[v=y_r] - p_rv) + g^S_r (1 - V p_rv) + g^lse_r p_rv``;
``dh_r = W^T dz_r``; ``dW += dz_r^T h_r``. Rows with zero upstream gradients contribute nothing.

Implementations (op contract, docs/design.md §4): ``reference.py`` (materialising PyTorch,
float64-capable); ``cpu.py`` (compiled C++, csrc/linear_logprob.cpp) and ``triton.py`` (GPU),
both behind :class:`LinearLogprobFunction`. :func:`linear_logprob` validates and runs the value
checks once; compositions (``rag_loss``, the hf drop-ins) call :func:`linear_logprob_core`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import registry, vocab_parallel
from .. import validation as V
from .reference import linear_logprob_reference

OP = registry.register("linear_logprob", __name__)

# The Triton backward variants of this op and token_smoothing (ops/triton_utils.py).
TRITON_BACKWARDS = ("deterministic", "atomic")


def check_triton_backward(value, name: str = "triton_backward") -> str | None:
    """``value`` if it is None or one of :data:`TRITON_BACKWARDS`, else a ``ValueError``."""
    if value is not None and value not in TRITON_BACKWARDS:
        raise ValueError(f"{name} must be one of {TRITON_BACKWARDS} or None, got {value!r}")
    return value


@dataclass(frozen=True)
class LinearLogprobOptions:
    """Non-tensor options of the fused LM-head op (travel as one frozen object)."""

    ignore_index: int = -100
    softcap: float | None = None
    # Backward only (Triton): skip vocab tiles whose softmax is below this everywhere
    # (error bound in triton.py). None = exact.
    filter_eps: float | None = None
    # Backward only (Triton): "deterministic" (chunked dz + cuBLAS GEMMs, bitwise
    # reproducible) or "atomic" (one kernel, fp32 atomics); None = $RAG_KERNELS_TRITON_BACKWARD
    # or "deterministic" (linear_logprob/triton.py).
    triton_backward: str | None = None


class LogprobStats(NamedTuple):
    """Per-row statistics, each shaped like ``target``, fp32 (fp64 for fp64 inputs)."""

    logprob: torch.Tensor  # log p(y_r)
    lse: torch.Tensor  # logsumexp_v z_rv
    sum_logprob: torch.Tensor  # sum_v log p_rv (for label smoothing)


class LinearLogprobFunction(torch.autograd.Function):
    """Autograd shell shared by the fused kernels (``cpu.py``, ``triton.py``).

    A kernel module provides
    ``forward(hidden[N,H], weight[V,H], target, bias, opts) -> (lp, lse, sum_logprob)``
    (``target`` is ``[N]`` or ``[B, T]`` shared by ``K = N / (B T)`` groups of rows, see
    :func:`_target_layout`)
    (each ``[N]``, fp32; fp64 allowed for fp64 inputs), storing nothing of size V, and
    ``backward(hidden, weight, target, bias, lse, grad_lp, grad_lse, grad_sum, opts,
    needs=(hidden, weight, bias)) -> (grad_hidden, grad_weight, grad_bias)`` which recomputes
    the logits tile by tile; ``grad_lse`` / ``grad_sum`` are None when those outputs are unused,
    and a gradient that is not needed may be returned as None.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, opts, kernels):
        with registry.device_guard(hidden):
            lp, lse, sum_lp = kernels.forward(hidden, weight, target, bias, opts)
        ctx.save_for_backward(hidden, weight, target, bias, lse)
        ctx.opts, ctx.kernels = opts, kernels
        ctx.set_materialize_grads(False)
        return lp, lse, sum_lp

    @staticmethod
    def backward(ctx, grad_lp, grad_lse, grad_sum):
        hidden, weight, target, bias, lse = ctx.saved_tensors
        if grad_lp is None and grad_lse is None and grad_sum is None:
            return None, None, None, None, None, None
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        with torch.no_grad(), registry.device_guard(hidden):  # not traced: first_order_only
            dh, dw, db = ctx.kernels.backward(
                hidden, weight, target, bias, lse, grad_lp, grad_lse, grad_sum, ctx.opts, needs
            )
        return registry.first_order_only(
            OP, (dh, dw, None, db, None, None), (hidden, weight, bias, grad_lp, grad_lse, grad_sum)
        )


def _target_layout(target: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """The target as the kernels take it: ``[N]`` (one id per row of ``hidden`` flattened), or
    ``[outer, inner]`` when ``target`` is broadcast over one run of ``hidden``'s leading dims
    (size 1 there), e.g. ``target [B, 1, T]`` for ``hidden [B, K, T, H]``: the K documents
    then share each answer id without a K-fold copy (row ``(b K + k) T + t`` reads
    ``target[b, t]``)."""
    shape, lead = tuple(target.shape), tuple(lead)
    fits = len(shape) == len(lead)
    pairs = list(zip(shape, lead, strict=True)) if fits else []
    bcast = [i for i, (t, h) in enumerate(pairs) if t == 1 and h != 1]
    # (t == 1 or t == h, not t in (h, 1): dynamo takes an int equal to a symbolic size as
    # not in the tuple, and a valid target failed under torch.compile(dynamic=True))
    fits = fits and all(t == 1 or t == h for t, h in pairs)
    # size-1 dims of hidden inside the run are neutral: (1, 1, 1) fits hidden (3, 1, 5, H)
    if not fits or (bcast and any(shape[i] != 1 for i in range(bcast[0], bcast[-1] + 1))):
        raise ValueError(
            f"target must have shape {lead} (hidden without its last dim), or that shape with "
            f"size 1 over one run of dims to share ids across them (e.g. [B, 1, T] for hidden "
            f"[B, K, T, H]), got {shape}"
        )
    if not bcast:
        return target.reshape(-1)
    outer = math.prod(lead[: bcast[0]])
    return target.reshape(outer, target.numel() // outer if outer else 0)


def validate_linear_logprob_inputs(
    hidden, weight, target, bias, ignore_index, softcap, checks: V.ValueChecks,
    vocab_sharded: bool = False,
) -> None:  # fmt: skip
    """Structural checks (raise now) and the target-range value check (added to ``checks``;
    with ``vocab_sharded`` only ``>= 0`` here, ``< V`` after the vocab-parallel all-gather)."""
    V.check_tensor("hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., H], got {tuple(hidden.shape)}")
    V.check_lm_head(hidden, weight, bias)
    V.check_index_tensor("target", target)
    _target_layout(target, hidden.shape[:-1])  # raises on a shape that does not fit
    V.check_same_device("target", target, hidden, "hidden")
    V.check_softcap(softcap)
    V.check_ignore_index(ignore_index, target)
    if vocab_sharded:
        vocab_parallel.check_shard_targets(checks, "target", target, ignore_index)
    else:
        V.check_targets(checks, "target", target, weight.shape[0], ignore_index)


def linear_logprob_core(
    hidden, weight, target, bias, opts: LinearLogprobOptions, impl: str, return_stats: bool
) -> torch.Tensor | LogprobStats:
    """:func:`linear_logprob` on validated inputs (no checks, no host synchronisation)."""
    with V.autocast_disabled(hidden):
        impl = registry.resolve(OP, impl, hidden)
        shape = hidden.shape[:-1]
        rows = hidden.reshape(-1, hidden.shape[-1])
        if impl == "reference":  # the materialising oracle takes one id per row
            lp, lse, s = linear_logprob_reference(
                rows,
                weight,
                target.expand(shape).reshape(-1),
                bias,
                opts.ignore_index,
                opts.softcap,
            )
        else:
            lp, lse, s = LinearLogprobFunction.apply(
                rows.contiguous(),
                weight.contiguous(),
                _target_layout(target, shape).contiguous(),
                None if bias is None else bias.contiguous(),
                opts,
                registry.kernels(OP, impl),
            )
        if not return_stats:
            return lp.view(shape)
        return LogprobStats(lp.view(shape), lse.view(shape), s.view(shape))


def make_options(
    ignore_index=-100, softcap=None, filter_eps=None, triton_backward=None
) -> LinearLogprobOptions:
    check_triton_backward(triton_backward)
    if filter_eps is not None and not (
        isinstance(filter_eps, (int, float))
        and not isinstance(filter_eps, bool)
        and 0 <= filter_eps < 1
    ):
        raise ValueError(f"filter_eps must be a float in [0, 1) or None, got {filter_eps!r}")
    return LinearLogprobOptions(
        ignore_index=ignore_index,
        softcap=None if softcap is None else float(softcap),
        filter_eps=None if filter_eps is None else float(filter_eps),
        triton_backward=triton_backward,
    )


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    impl: str = "auto",
    return_stats: bool = False,
    filter_eps: float | None = None,
    vocab_group=None,
    vocab_start: int | None = None,
    reduce_hidden_grad: bool = True,
) -> torch.Tensor | LogprobStats:
    """Log-probability of each row's target through the LM head, without the logits.

    Args:
        hidden: ``[..., H]`` hidden states (fp32 / bf16 / fp16 / fp64).
        weight: ``[V, H]`` LM-head weight, same dtype as ``hidden``.
        target: ``[...]`` int64/int32 ids in ``[0, V)`` or ``ignore_index``, one per row of
            ``hidden``; or shared over one run of leading dims by giving them size 1 (e.g.
            ``[B, 1, T]`` for ``hidden [B, K, T, H]``: no K-fold copy is made).
        bias: optional ``[V]``.
        ignore_index: rows with this target return 0 and get no gradient.
        softcap: optional ``c``: logits become ``c * tanh(z / c)``.
        impl: ``"auto" | "triton" | "cpu" | "reference"``.
        return_stats: also return ``lse`` and ``sum_logprob`` (differentiable).
        filter_eps: Triton backward only: skip vocabulary tiles where every softmax entry is
            below this (each skipped logit-gradient entry is < (|g| + |g_lse|) * eps; never
            skips with label smoothing). None (default) = exact; other impls ignore it.
        vocab_group: a ``torch.distributed`` process group over which the head's rows are
            sharded (vocabulary parallelism, :mod:`rag_kernels.ops.vocab_parallel`): ``weight``
            (and ``bias``) are then this rank's contiguous rows ``[V_r, H]`` of the full head,
            ``target`` holds global ids, and ``hidden`` / ``target`` are the same on every
            rank. Every rank returns the unsharded op's ``lp`` (and ``lse``, ``sum_logprob``);
            the backward gives each rank the gradient of its own rows and the whole ``dh``.
            Forward: one all-gather of ``[N + 1, 4]`` float64 per rank (per-row local
            ``(lse, lp, sum_logprob, target)`` and the shard layout), and with value checks
            on a 4-int header before it (the ranks' validation verdicts, rows, H and dtype:
            ``vocab_parallel.validated_together``); backward: one all-reduce of
            ``dh [N, H]``. A group of one rank is the plain op.
        vocab_start: with ``vocab_group``, the global id of this rank's first row; the
            shards must tile ``[0, V)`` (checked after the all-gather, with the targets).
        reduce_hidden_grad: with ``vocab_group``, all-reduce ``dh`` over the group (default);
            False leaves each rank's ``dh`` its own shard's part, for a framework that
            reduces it itself (a tensor-parallel region's backward).

    Under ``torch.autocast`` the matmul operands are cast to the autocast dtype (fp32
    accumulation, fp32 outputs, gradients in each input's own dtype), as ``F.linear`` would.

    Returns: ``hidden.shape[:-1]`` fp32 log-probs (fp64 for fp64 inputs), or :class:`LogprobStats`.
    """
    with vocab_parallel.validated_together(vocab_group, hidden):  # a bad rank stops them all
        hidden, weight, bias = V.autocast_inputs(hidden, hidden, weight, bias)
        shard = vocab_parallel.vocab_shard(vocab_group, vocab_start, reduce_hidden_grad)
        checks = V.ValueChecks()
        validate_linear_logprob_inputs(
            hidden, weight, target, bias, ignore_index, softcap, checks, shard is not None
        )
        opts = make_options(ignore_index, softcap, filter_eps)
        checks.run()
    if shard is not None:
        st = vocab_parallel.sharded_linear_logprob(
            linear_logprob_core, hidden, weight, target, bias, opts, impl, shard
        )
        return LogprobStats(st.logprob, st.lse, st.sum_logprob) if return_stats else st.logprob
    return linear_logprob_core(hidden, weight, target, bias, opts, impl, return_stats)


__all__ = [
    "linear_logprob",
    "linear_logprob_core",
    "LinearLogprobFunction",
    "LinearLogprobOptions",
    "LogprobStats",
]
