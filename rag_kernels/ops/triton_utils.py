"""Triton helpers shared by the LM-head kernels of ``linear_logprob/triton.py`` and
``token_smoothing/triton.py``.

Device code (``@triton.jit`` functions, inlined):

* :func:`dot` — ``tl.dot`` with fp32 accumulation; ``UPCAST`` multiplies in fp32 (the CPU
  interpreter mis-computes 16-bit dots, so there operands are upcast after rounding).
* :func:`round_to` — round to the input dtype (round-to-nearest-even, as the GPU's ``cvt.rn``).
* :func:`tanh` — exp-based tanh (no libdevice) for the logit softcap.
* :func:`logit_tile` — a ``[rows, BLOCK_V]`` tile of LM-head logits ``h W^T (+ b)``, softcapped.
* :func:`accumulate_grads` — backward of a logit tile: ``dz^T h`` into dW, ``dz W`` into dh
  (fp32 atomics; the ``"atomic"`` backward variant only).
* :func:`swizzle` — grouped launch order of a (row block, vocab tile) grid.

Host code of the chunked backward (the default ``"deterministic"`` variant):

* :func:`backward_variant` — ``"deterministic"`` (default) or ``"atomic"``, from the op's
  ``triton_backward`` option or the ``RAG_KERNELS_TRITON_BACKWARD`` environment variable.
* :func:`active_order` — stable row partition, active rows first, without a host sync.
* :func:`chunk_columns` — the vocabulary chunk width of the ``dz`` buffer's memory budget.
* :func:`mm_f32` / :func:`mm_into` — cuBLAS / ATen matmuls with fp32 accumulation.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .linear_logprob import check_triton_backward

BACKWARD_ENV = "RAG_KERNELS_TRITON_BACKWARD"
# Memory budget of one backward's dz chunk buffer: max(1 % of the N x V logits, 256 MiB).
CHUNK_FRACTION = 0.01
CHUNK_MIN_BYTES = 256 * 2**20
CHUNK_ALIGN = 128


def backward_variant(option: str | None) -> str:
    """The Triton backward to run (one of ``linear_logprob.TRITON_BACKWARDS``): the op's
    ``triton_backward`` option when set, else ``$RAG_KERNELS_TRITON_BACKWARD`` (read at each
    call, so a benchmark can switch between runs), else ``"deterministic"``."""
    if option is not None:
        return check_triton_backward(option)
    env = os.environ.get(BACKWARD_ENV, "").strip()
    return check_triton_backward(env, BACKWARD_ENV) if env else "deterministic"


def active_order(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row permutation with active rows first (stable) and the active count ``[1]`` (device),
    from one ``cumsum`` + ``scatter``, without a host sync."""
    n = active.shape[0]
    idx = torch.arange(n, device=active.device)
    before = torch.cumsum(active, 0)  # active rows up to and including each row
    n_act = before[-1:].clone()  # its own allocation: one pointer alignment whatever n is
    # active row -> its rank among active rows; inactive row -> n_act + its rank among inactive
    pos = torch.where(active, before - 1, n_act + idx - before)
    rows = torch.empty_like(idx).scatter_(0, pos, idx)
    return rows, n_act


def chunk_columns(n_total: int, n_rows: int, vocab: int, elem_bytes: int) -> int:
    """Vocabulary columns per chunk of the ``[n_rows, C]`` dz buffer: the widest multiple of
    :data:`CHUNK_ALIGN` (at least that) whose bytes stay within
    ``max(CHUNK_FRACTION * n_total * vocab * elem_bytes, CHUNK_MIN_BYTES)``, i.e. 1 % of the
    logits the op avoids or 256 MiB, whichever is larger (exceeded only by the 128-column
    floor, when ``n_rows > budget / (128 * elem_bytes)``); never more than ``vocab``."""
    budget = max(CHUNK_FRACTION * n_total * vocab * elem_bytes, CHUNK_MIN_BYTES)
    cols = int(budget // (max(n_rows, 1) * elem_bytes)) // CHUNK_ALIGN * CHUNK_ALIGN
    return max(1, min(vocab, max(cols, CHUNK_ALIGN)))


def merge_split_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp of rows whose vocabulary was cut into ``splits`` parts, from each part's
    max ``m [splits, N]`` and ``s = sum exp(z - m)`` (``s = 0`` where the part's max is -inf):
    ``logsumexp_j(m_j + log s_j)``. A row that is -inf in every part gets -inf, as with one
    part (``max + log(sum s exp(m - max))`` gave ``exp(-inf - -inf)``: NaN); a NaN stays.
    One part: ``m + log s`` exactly."""
    return torch.logsumexp(m + torch.log(s), dim=0)


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32 with fp32 accumulation, for the cross-chunk ``dh`` sum: cuBLAS's
    16-bit GEMM with an fp32 output (``out_dtype``, torch >= 2.8) on CUDA; on CPU (the
    interpreter) the exactly upcast operands (same products)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, NotImplementedError):  # older torch: 16-bit output
            return torch.mm(a, b).float()
    return torch.mm(a.float(), b.float())


def mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b`` in ``out``'s dtype with fp32 accumulation (cuBLAS on CUDA; on CPU the
    exactly upcast operands), rounded once."""
    if a.is_cuda or a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a.float(), b.float()))


@triton.jit
def swizzle(pid, n_blocks_n, n_blocks_v, GROUP_N: tl.constexpr):
    """``(pid_n, pid_v)`` of program ``pid`` in grouped order: ``GROUP_N`` row blocks sweep the
    vocabulary together, so the W tiles (and h tiles) that concurrently running programs read
    stay in L2."""
    per_group = GROUP_N * n_blocks_v
    first_n = (pid // per_group) * GROUP_N
    group_n = tl.minimum(n_blocks_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_n
    pid_v = (pid % per_group) // group_n
    return pid_n, pid_v


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return out


@triton.jit
def round_to(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """``x`` rounded to the input dtype (round-to-nearest-even, as the GPU's cvt.rn does).

    The 3.9 interpreter truncates fp32 -> bf16 casts, so there the rounding is done on the
    bits and the (exactly representable) result stays fp32 for the upcast ``dot``.
    """
    if UPCAST:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            out = bits.to(tl.float32, bitcast=True)
        else:
            out = x.to(DTYPE)
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def accumulate_grads(
    dz,
    h_ptr,
    w_ptr,
    dh_ptr,
    dw_ptr,
    hrow,
    row_ok,
    offs_v,
    v_ok,
    D,
    k_stop,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Backward of a logit tile ``z = h W^T``: from ``dz [BLOCK_R, BLOCK_V]`` add
    ``dz^T h`` into ``dW`` and ``dz W`` into ``dh`` (fp32 buffers, relaxed atomics), walking
    the hidden dim in ``BLOCK_K`` chunks up to ``k_stop`` (``D``, or 0 to skip the tile).
    ``hrow`` / ``row_ok``: the rows' element offsets into ``h`` / ``dh`` and validity. ``dz`` is
    rounded to the input dtype first, as plain PyTorch's bf16 / fp16 path rounds it.
    Shared by the linear_logprob and token-smoothing backward kernels."""
    dz_c = round_to(dz, h_ptr.dtype.element_ty, UPCAST)
    offs_k = tl.arange(0, BLOCK_K)
    wrow = offs_v.to(tl.int64) * D
    for k0 in range(0, k_stop, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < D
        if NEED_DW:
            h = tl.load(
                h_ptr + hrow[:, None] + kk[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            dw = dot(
                tl.trans(dz_c),
                h,
                tl.zeros((BLOCK_V, BLOCK_K), dtype=tl.float32),
                INPUT_PRECISION,
                UPCAST,
            )
            tl.atomic_add(
                dw_ptr + wrow[:, None] + kk[None, :],
                dw,
                mask=v_ok[:, None] & k_ok[None, :],
                sem="relaxed",
            )
        if NEED_DH:
            w = tl.load(
                w_ptr + wrow[:, None] + kk[None, :],
                mask=v_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            dh = dot(
                dz_c,
                w,
                tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32),
                INPUT_PRECISION,
                UPCAST,
            )
            tl.atomic_add(
                dh_ptr + hrow[:, None] + kk[None, :],
                dh,
                mask=row_ok[:, None] & k_ok[None, :],
                sem="relaxed",
            )


@triton.jit
def tanh(x):
    # exp-based so it needs no libdevice; |error| ~ 1e-7 absolute in fp32.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def logit_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    hrow,
    row_ok,
    offs_v,
    v_ok,
    D,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``[BLOCK_N, BLOCK_V]`` fp32 logits (bias, softcap applied); inactive rows read as 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    wrow = offs_v.to(tl.int64) * D
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < D
        h = tl.load(
            h_ptr + hrow[:, None] + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        wt = tl.load(
            w_ptr + wrow[None, :] + kk[:, None], mask=v_ok[None, :] & k_ok[:, None], other=0.0
        )
        acc = dot(h, wt, acc, INPUT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc
