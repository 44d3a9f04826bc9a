"""Binding of the compiled C++ fused LM-head kernels (csrc/linear_logprob.cpp).

``torch.ops.rag_kernels.linear_logprob_fwd(hidden[N,H], weight[V,H], target[N], bias[V]?,
ignore_index, softcap?, row_tile, vocab_tile) -> (lp, lse, sum_logprob)``, each ``[N]`` fp32
(fp64 for fp64 inputs); ``linear_logprob_bwd(..., lse, grad_lp?, grad_lse?, grad_sum?, ...,
needs_hidden, needs_weight, needs_bias, row_tile, vocab_tile) -> (dh, dW, db)`` recomputes the
logits tile by tile; a gradient that is not needed comes back as an empty ``[0]`` tensor.

Tile sizes (rows x vocabulary columns per GEMM + epilogue step): 0 (:data:`DEFAULT_TILES`)
lets the kernel pick per GEMM path, 256 x 1024 on the micro-kernel paths and 256 x 2048 on
ATen's (tuned on 2 CPU cores at N=2048, H=576, V=49152). Override them with the
environment variable ``RAG_KERNELS_LLP_CPU_TILES="rows,vocab"`` (read at import) or by setting
:data:`TILE_ROWS` / :data:`TILE_VOCAB` (the tests do, so small shapes span several tiles).

GEMM path and instruction set (docs/design.md §4.2): micro-kernel GEMMs with fp32 outputs on
panels packed once per tile: oneDNN's BRGEMM on bf16 operands for bf16 inputs where the CPU
has bf16 matmul (AVX512_BF16 / AMX), else on fp32 operands (16-bit inputs converted while
packing) — oneDNN's on AVX-512 CPUs, the project's AVX2 kernel (csrc/avx2_gemm.h) on AVX2
ones; ATen's GEMMs for fp64 and on pre-AVX2 CPUs. ``RAG_KERNELS_CPU_ISA=avx2`` takes an
AVX2-only CPU's paths, ``RAG_KERNELS_CPU_GEMM=fp32|aten`` keeps bf16 inputs off bf16 operands /
the micro-kernels off (both read at the first call; ``rag_kernels.ops._C.set_cpu_isa`` /
``set_cpu_gemm`` change them at run time, ``cpu_isa()`` / ``native_bf16_gemm()`` /
``fp32_gemm()`` report them).
"""

from __future__ import annotations

import os

import torch

from ..registry import cpu_available

DEFAULT_TILES = (0, 0)  # the kernel's defaults for its GEMM path (csrc/linear_logprob.cpp)


def _tiles_from_env() -> tuple[int, int]:
    raw = os.environ.get("RAG_KERNELS_LLP_CPU_TILES", "")
    if not raw:
        return DEFAULT_TILES
    try:
        rows, vocab = (int(x) for x in raw.split(","))
    except ValueError as exc:
        raise ValueError(
            f"RAG_KERNELS_LLP_CPU_TILES must be 'rows,vocab' (two integers), got {raw!r}"
        ) from exc
    if rows < 1 or vocab < 1:
        raise ValueError(f"RAG_KERNELS_LLP_CPU_TILES must hold positive sizes, got {raw!r}")
    return rows, vocab


TILE_ROWS, TILE_VOCAB = _tiles_from_env()


def _has_op() -> bool:
    return cpu_available() and hasattr(torch.ops.rag_kernels, "linear_logprob_fwd")


def available() -> bool:
    """True when the compiled extension loaded and registered the fused LM-head ops."""
    return _has_op()


if _has_op():

    @torch.library.register_fake("rag_kernels::linear_logprob_fwd")
    def _(hidden, weight, target, bias, ignore_index, softcap, row_tile=0, vocab_tile=0):
        dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n = hidden.shape[0]
        return (
            hidden.new_empty(n, dtype=dt),
            hidden.new_empty(n, dtype=dt),
            hidden.new_empty(n, dtype=dt),
        )

    @torch.library.register_fake("rag_kernels::linear_logprob_bwd")
    def _(
        hidden,
        weight,
        target,
        bias,
        lse,
        grad_lp,
        grad_lse,
        grad_sum,
        ignore_index,
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

    @torch.library.register_fake("rag_kernels::linear_logprob_gemm_floor")
    def _(hidden, weight, backward, row_tile=0, vocab_tile=0):
        if not backward:
            return hidden.new_empty(0), hidden.new_empty(0)
        return torch.empty_like(hidden), torch.empty_like(weight)


def forward(hidden, weight, target, bias, opts):
    """``(lp, lse, sum_logprob)``, each ``[N]``; ``hidden [N,H]``, ``weight [V,H]``, ``target [N]``."""
    return torch.ops.rag_kernels.linear_logprob_fwd(
        hidden.contiguous(),
        weight.contiguous(),
        target.contiguous(),
        None if bias is None else bias.contiguous(),
        opts.ignore_index,
        opts.softcap,
        TILE_ROWS,
        TILE_VOCAB,
    )


def backward(hidden, weight, target, bias, lse, grad_lp, grad_lse, grad_sum, opts, needs):
    """``(grad_hidden, grad_weight, grad_bias)``; None where ``needs`` says it is not needed."""
    needs_h, needs_w, needs_b = (bool(x) for x in needs)
    needs_b = needs_b and bias is not None

    def c(g):
        return None if g is None else g.contiguous()

    dh, dw, db = torch.ops.rag_kernels.linear_logprob_bwd(
        hidden.contiguous(),
        weight.contiguous(),
        target.contiguous(),
        None if bias is None else bias.contiguous(),
        lse.contiguous(),
        c(grad_lp),
        c(grad_lse),
        c(grad_sum),
        opts.ignore_index,
        opts.softcap,
        needs_h,
        needs_w,
        needs_b,
        TILE_ROWS,
        TILE_VOCAB,
    )
    return (dh if needs_h else None, dw if needs_w else None, db if needs_b else None)


def gemm_floor(hidden, weight, backward: bool = True):
    """The benchmarks' yardstick for this kernel (``rk_gemm_floor`` in
    benchmarks/linear_logprob.py): its GEMM machinery alone — the same GEMM path, tiles,
    threads, operand packing, ``dz`` layouts and ``dW`` rounding as :func:`forward` (and, with
    ``backward``, :func:`backward` for both gradients) — without the epilogues (no softmax,
    log-sum-exp or targets: ``dz = z``). Returns ``(dh, dW) = ((h W^T) W, (h W^T)^T h)`` in
    ``hidden``'s dtype (``dz`` rounded to bf16 where the GEMMs run on bf16 operands), or
    ``None`` without ``backward``. ``hidden [N, H]``, ``weight [V, H]``, one dtype."""
    dh, dw = torch.ops.rag_kernels.linear_logprob_gemm_floor(
        hidden.contiguous(), weight.contiguous(), bool(backward), TILE_ROWS, TILE_VOCAB
    )
    return (dh, dw) if backward else None
