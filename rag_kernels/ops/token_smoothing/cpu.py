"""Binding of the compiled C++ RAG-Token smoothing kernels (csrc/token_smoothing.cpp).

``torch.ops.rag_kernels.token_smoothing_fwd(hidden[B,K,T,H], weight[V,H], log_prior[B,K],
bias[V]?, target[B,T]?, softcap?, row_tile, vocab_tile) -> (out[B,T], lse[B,K,T], wsum[B,K,T],
lp)``: ``out`` the statistic, ``lse`` the per-row log-sum-exp of the logits, ``wsum_bkt =
sum_v w_bkt(v)`` (document k's posterior mass summed over the vocabulary) and, with a target,
``lp[B,K,T] = z_bkt(y_bt) - lse_bkt`` (an empty tensor without target). With a target,
tokens with ``y < 0`` (padding) are skipped: out, lse, wsum and lp are 0 there.
fp32 (fp64 for fp64 inputs). Documents with ``log_prior == -inf`` are masked: their hidden rows
are never read; lse, wsum and lp are 0 there. ``token_smoothing_bwd(..., target?, lse, wsum,
grad_out?, grad_lp?, softcap, needs_hidden, needs_weight, needs_bias, row_tile, vocab_tile)
-> (dh, dW, db)`` recomputes the logit tiles; tokens whose gradients are all zero are skipped
(their hidden rows are never read); a gradient that is not needed comes back as an empty
``[0]`` tensor. ``d out / d log_prior_bk = sum_t grad_out_bt wsum_bkt`` is formed here.

Tiles (rows = documents x tokens of one query per GEMM, vocabulary columns): 0 picks the
kernel's defaults — forward: one tile covering V (a single GEMM pass) and 512 rows, fewer when
the logit scratch would exceed 128 MiB; backward: 2048 rows x 1024 columns. A forward vocab tile smaller
than V adds a first pass for the log-sum-exp (two GEMM passes, scratch rows x tile).
Override with ``RAG_KERNELS_TS_CPU_TILES="rows,vocab"`` (both directions) or
``"rows,vocab,bwd_rows,bwd_vocab"`` (read at import), or set :data:`TILES` (the tests do, so
small shapes span several tiles). GEMM paths and the ``RAG_KERNELS_CPU_ISA`` /
``RAG_KERNELS_CPU_GEMM`` overrides as in ``linear_logprob/cpu.py`` (docs/design.md §4.2).
"""

from __future__ import annotations

import os

import torch

from ..registry import cpu_available


def _tiles_from_env() -> tuple[int, int, int, int]:
    raw = os.environ.get("RAG_KERNELS_TS_CPU_TILES", "")
    if not raw:
        return 0, 0, 0, 0
    try:
        vals = [max(int(x), 0) for x in raw.split(",")]
        if len(vals) == 2:
            vals = vals * 2
        rows, vocab, brows, bvocab = vals
    except ValueError as exc:
        raise ValueError(
            "RAG_KERNELS_TS_CPU_TILES must be 'rows,vocab' or 'rows,vocab,bwd_rows,bwd_vocab' "
            f"(integers), got {raw!r}"
        ) from exc
    return rows, vocab, brows, bvocab


#: (forward rows, forward vocab, backward rows, backward vocab); 0 = kernel default.
TILES = _tiles_from_env()


def _has_op() -> bool:
    return cpu_available() and hasattr(torch.ops.rag_kernels, "token_smoothing_fwd")


def available() -> bool:
    """True when the compiled extension loaded and registered the token-smoothing ops."""
    return _has_op()


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


if _has_op():

    @torch.library.register_fake("rag_kernels::token_smoothing_fwd")
    def _(hidden, weight, log_prior, bias, target, softcap, row_tile=0, vocab_tile=0):
        B, K, T, _ = hidden.shape
        dt = _acc_dtype(hidden)
        lp = (
            hidden.new_empty(B, K, T, dtype=dt)
            if target is not None
            else hidden.new_empty(0, dtype=dt)
        )
        return (
            hidden.new_empty(B, T, dtype=dt),
            hidden.new_empty(B, K, T, dtype=dt),
            hidden.new_empty(B, K, T, dtype=dt),
            lp,
        )

    @torch.library.register_fake("rag_kernels::token_smoothing_bwd")
    def _(
        hidden,
        weight,
        log_prior,
        bias,
        target,
        lse,
        wsum,
        grad_out,
        grad_lp,
        softcap,
        needs_hidden,
        needs_weight,
        needs_bias,
        row_tile=0,
        vocab_tile=0,
    ):
        dh = torch.empty_like(hidden) if needs_hidden else hidden.new_empty(0)
        dw = torch.empty_like(weight) if needs_weight else hidden.new_empty(0)
        db = torch.empty_like(bias) if needs_bias and bias is not None else hidden.new_empty(0)
        return dh, dw, db


def _default_fwd_rows(V: int) -> int:
    # Mirrors default_fwd_rows in csrc/token_smoothing.cpp (also here so that an extension built
    # before that default changed picks the same tiles).
    return max(1, min(512, (1 << 25) // max(V, 1)))


def _c(x):
    return None if x is None else x.contiguous()


def forward(hidden, weight, log_prior, bias, target, opts):
    """``(out[B,T], lse[B,K,T], wsum[B,K,T], lp[B,K,T] or [0])``; ``log_prior [B,K]`` with
    -inf on masked documents; ``target [B,T]`` or None."""
    return torch.ops.rag_kernels.token_smoothing_fwd(
        hidden.contiguous(),
        weight.contiguous(),
        log_prior.contiguous(),
        _c(bias),
        _c(target),
        opts.softcap,
        TILES[0] or _default_fwd_rows(weight.shape[0]),
        TILES[1],
    )


def backward(hidden, weight, log_prior, bias, target, lse, wsum, grad_out, grad_lp, opts, needs):
    """``(grad_hidden, grad_weight, grad_bias)``; None where ``needs`` says it is not needed.
    ``grad_out [B,T]`` / ``grad_lp [B,K,T]`` may be None."""
    needs_h, needs_w, needs_b = (bool(x) for x in needs)
    needs_b = needs_b and bias is not None
    dh, dw, db = torch.ops.rag_kernels.token_smoothing_bwd(
        hidden.contiguous(),
        weight.contiguous(),
        log_prior.contiguous(),
        _c(bias),
        _c(target),
        lse.contiguous(),
        wsum.contiguous(),
        _c(grad_out),
        _c(grad_lp),
        opts.softcap,
        needs_h,
        needs_w,
        needs_b,
        TILES[2],
        TILES[3],
    )
    return (dh if needs_h else None, dw if needs_w else None, db if needs_b else None)
