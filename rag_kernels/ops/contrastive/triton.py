"""Triton kernels for the row-direction contrastive loss (docs/design.md §2.5; same interface
as ``cpu.py``).

Math, per query i: ``S_ij = scale sim_ij``, ``sim_ij = q_i . d_j``;
``lse_i = logsumexp_{j not in excl(i)} S_ij``; ``plse_i = S_{i,p(i)}`` (index mode) or
``logsumexp_{j in pos(i)} S_ij`` (mask mode); ``L_i = lse_i - plse_i``. Backward with
upstream ``g_i``: ``dS_ij = g_i (P_ij - T_ij)``, ``P_ij = exp(S_ij - lse_i)`` off ``excl(i)``
(0 on it), ``T_ij = 1[j = p(i)]`` or ``1[j in pos(i)] exp(S_ij - plse_i)``; with
``G = scale dS`` (the gradient w.r.t. ``sim``): ``dq = G d``, ``dd = G^T q``,
``dscale = sum_ij dS_ij sim_ij``.

Design:

* ``contrastive_fwd_kernel``: program ``(query block, candidate split)`` streams the
  ``BLOCK_M`` candidate tiles of its split (score tile by ``tl.dot`` over ``BLOCK_D`` chunks,
  fp32 accumulation) with an online log-sum-exp over the non-excluded candidates and the
  positive logit (index mode) or an online log-sum-exp over the positives (mask mode), and
  writes per-split partials ``[splits, B]``; torch merges them (``logsumexp`` / ``amax``).
  Splits exist only to fill the GPU when ``B`` is small (a few hundred queries against many
  hard negatives would otherwise run on a handful of SMs).
* Backward, deterministic, no atomics: the candidates are taken in chunks of ``Mc`` columns.
  Per chunk, ``contrastive_bwd_kernel`` (program = one ``[BLOCK_B, BLOCK_M]`` tile, grouped
  launch order so concurrently running programs share their query and candidate tiles in L2)
  recomputes the score tile from the saved ``lse`` / ``plse``, writes
  ``G[:, chunk] = scale dS`` in the compute dtype (rounded once, where plain PyTorch's bf16 /
  fp16 backward rounds its score gradient) and, when ``scale`` needs a gradient, one fp32
  partial ``sum dS sim`` per program. ATen (cuBLAS) then does ``dd[chunk] = G^T q`` (complete
  rows: one GEMM each) and ``dq += G d[chunk]`` (fp32 accumulation across chunks; one
  chunk: a single GEMM in the compute dtype). Every sum has a fixed order, so two runs are
  bitwise equal (given cuBLAS's own run-to-run reproducibility on one stream). Cost:
  ``2 B M D`` flops to recompute the scores plus the ``4 B M D`` of the two GEMMs (the naive
  autograd backward's own), no fp32 accumulator round trips through global memory.
* Memory: O((B + M) D) for the inputs and gradients, ``[splits, B]`` forward partials, and
  the one ``[B, Mc]`` ``G`` buffer (compute dtype), reused by every chunk.
  ``Mc = min(M, floor(budget / (B elsize)))`` rounded down to a multiple of 128 (16 under the
  interpreter), at least that multiple, with
  ``budget = max(BWD_BUDGET_FRACTION (= 1 %) of the B x M matrix in that dtype,
  BWD_MIN_BUDGET_BYTES (= 256 MiB))``. Only the 128-column floor can exceed the budget
  (``B > 2^19`` fp32 rows with ``M < 12800``). Module knobs, read at each call (tests shrink
  them to force several chunks).
* Error: scores, softmax statistics and every accumulation are fp32; fp32 inputs multiply in
  IEEE fp32 in the kernels (never TF32); the two ATen GEMMs follow torch's fp32 matmul
  precision setting (IEEE by default), as the plain PyTorch backward would. 16-bit inputs:
  products in the input dtype, ``G`` rounded once to it (relative ``2^-9`` for bf16, as in
  plain PyTorch). With several chunks, ``dq`` adds the chunks' GEMMs in fp32; off CUDA (no
  fp32-output 16-bit GEMM in ATen) each chunk's ``G d[chunk]`` is rounded to the input dtype
  first, which adds at most ``2^-9 sum_j |G_ij| |d_j|`` to ``dq_i`` (bf16), the size of the
  error from rounding ``G`` itself.
* Tuning: autotuned on CUDA (one config list for 16-bit inputs, one for fp32;
  ``RAG_KERNELS_AUTOTUNE=0``, read at import, pins the first of each); the key is ``D`` and
  ``B`` / ``M`` rounded up to powers of two. One tiny config under ``TRITON_INTERPRET=1``,
  where 16-bit operands are upcast (exactly) to fp32 inside the dot (the 3.9 interpreter
  mis-computes 16-bit ``tl.dot``) and ``G`` is rounded to nearest-even on the bits. Every
  configuration is compiled for sm_90 offline by ``tests/test_triton_compile.py`` (no
  spills, shared memory within the H100's 227 KiB).
* Alignment and offsets: ``D``, the positives mask and the id table are zero-padded to rows
  of a multiple of 16 elements when they are not already (a copy only then; zeros add
  nothing to a score): aligned rows vectorise the loads, odd strides made ptxas spill. Row
  index x row stride products are formed in int64. Tile padding (rows >= B, columns past
  the chunk / split, D past its end) is masked on load, never read.

* torch ops: the two host launchers are the opaque ops
  ``torch.ops.rag_kernels.contrastive_fwd_triton`` / ``contrastive_bwd_triton``
  (``registry.launcher_op``, fakes next to them), which ``forward`` / ``backward`` call, so
  ``torch.compile`` records one node per launch, without a graph break, also under
  ``dynamic=True`` (docs/design.md §4.2).

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (tests) and on CUDA.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import registry
from ..triton_utils import dot, round_to

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_AUTOTUNE = os.environ.get("RAG_KERNELS_AUTOTUNE", "1") != "0"

# Backward chunk budget (bytes of the [B, Mc] gradient buffer), read at each call.
BWD_BUDGET_FRACTION = 0.01  # of the B x M score matrix the op never materialises
BWD_MIN_BUDGET_BYTES = 256 * 2**20
# Forward candidate splits: None picks them from the GPU's SM count (1 off CUDA).
FWD_SPLITS: int | None = None


def available() -> bool:
    """True when triton imported (this module only loads then)."""
    return True


def _cfg(bb, bm, bd, warps, stages, **extra):
    return triton.Config(
        {"BLOCK_B": bb, "BLOCK_M": bm, "BLOCK_D": bd, **extra}, num_warps=warps, num_stages=stages
    )


if _INTERPRET:
    _FWD_CONFIGS_16 = _FWD_CONFIGS_32 = [_cfg(16, 16, 16, 1, 1)]
    _BWD_CONFIGS_16 = _BWD_CONFIGS_32 = [_cfg(16, 16, 16, 1, 1, GROUP_B=2)]
    _ALIGN = 16
else:
    # Chosen by compiling for sm_90 offline (tests/test_triton_compile.py, with this
    # environment's triton and the GPU image's): none spills in any mode, with 16-aligned or
    # odd B / M. 16-bit: tensor-core tiles (128 x 128 tiles spilled in mask mode, with 64-wide
    # D chunks under both tritons, with 32-wide ones under the GPU image's). fp32: IEEE FMA
    # dots with BLOCK_D = 32 (128 spilled); 64 x 64 tiles of 4 warps (forward) and 128-wide
    # tiles of 8 (backward) spilled under the GPU image's triton.
    _FWD_CONFIGS_16 = [
        _cfg(128, 64, 64, 8, 3),
        _cfg(64, 128, 64, 8, 3),
        _cfg(128, 64, 64, 8, 4),
        _cfg(64, 64, 64, 4, 3),
    ]
    _BWD_CONFIGS_16 = [
        _cfg(128, 64, 64, 8, 3, GROUP_B=8),
        _cfg(64, 128, 64, 8, 3, GROUP_B=8),
        _cfg(64, 64, 64, 4, 3, GROUP_B=8),
    ]
    _FWD_CONFIGS_32 = [
        _cfg(32, 64, 32, 4, 2),
        _cfg(64, 64, 32, 8, 1),
        _cfg(32, 32, 32, 4, 2),
    ]
    _BWD_CONFIGS_32 = [
        _cfg(64, 64, 32, 8, 2, GROUP_B=8),
        _cfg(32, 64, 32, 4, 2, GROUP_B=8),
    ]
    _ALIGN = 128
    if not _AUTOTUNE:
        _FWD_CONFIGS_16, _BWD_CONFIGS_16 = _FWD_CONFIGS_16[:1], _BWD_CONFIGS_16[:1]
        _FWD_CONFIGS_32, _BWD_CONFIGS_32 = _FWD_CONFIGS_32[:1], _BWD_CONFIGS_32[:1]


# ----------------------------------------------------------------------------- device code


@triton.jit
def _scores(
    q_ptr,
    d_ptr,
    offs_b,
    offs_m,
    b_ok,
    m_ok,
    D,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``sim`` tile ``[BLOCK_B, BLOCK_M]`` in fp32 (0 outside the rows / columns)."""
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    qrow = offs_b.to(tl.int64) * D
    drow = offs_m.to(tl.int64) * D
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        k_ok = kk < D
        qt = tl.load(
            q_ptr + qrow[:, None] + kk[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0
        )
        dt = tl.load(
            d_ptr + drow[None, :] + kk[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0
        )
        acc = dot(qt, dt, acc, INPUT_PRECISION, UPCAST)
    return acc


@triton.jit
def _masks(
    pos_ptr,
    mask_ptr,
    ids_ptr,
    table_ptr,
    offs_b,
    offs_m,
    b_ok,
    m_ok,
    M,
    stride_mask,
    U,
    MASK_MODE: tl.constexpr,
    HAS_IDS: tl.constexpr,
):
    """``(is_pos, excl)`` boolean tiles; every entry outside the rows / columns is excluded
    and no positive. A positive index outside ``[0, M)`` (possible only with the value checks
    off) is never dereferenced: it matches no candidate and excludes none."""
    valid = b_ok[:, None] & m_ok[None, :]
    if MASK_MODE:
        mrow = offs_b.to(tl.int64) * stride_mask
        is_pos = tl.load(mask_ptr + mrow[:, None] + offs_m[None, :], mask=valid, other=0) != 0
        if HAS_IDS:
            cid = tl.load(ids_ptr + offs_m, mask=m_ok, other=0)
            trow = offs_b.to(tl.int64) * U
            same = tl.load(table_ptr + trow[:, None] + cid[None, :], mask=valid, other=0) != 0
            excl = same & (~is_pos)
        else:
            excl = ~valid
    else:
        p = tl.load(pos_ptr + offs_b, mask=b_ok, other=-1)
        is_pos = (offs_m[None, :] == p[:, None]) & valid
        if HAS_IDS:
            cid = tl.load(ids_ptr + offs_m, mask=m_ok, other=0)
            p_ok = b_ok & (p >= 0) & (p < M)
            key = tl.load(ids_ptr + p, mask=p_ok, other=0)
            excl = (cid[None, :] == key[:, None]) & p_ok[:, None] & (~is_pos)
        else:
            excl = ~valid
    return is_pos & valid, excl | (~valid)


@triton.jit
def contrastive_fwd_kernel(
    q_ptr,
    d_ptr,
    scale_ptr,
    pos_ptr,
    mask_ptr,
    ids_ptr,
    table_ptr,
    lse_ptr,
    plse_ptr,
    B,
    M,
    D,
    U,
    stride_mask,
    split_len,
    B_KEY,
    M_KEY,
    MASK_MODE: tl.constexpr,
    HAS_IDS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per-split partials ``lse_ptr / plse_ptr [splits, B]``: the log-sum-exp over the split's
    non-excluded candidates, and its positive log-sum-exp (mask mode) or the positive logit
    (index mode); ``-inf`` where the split has none."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    scale = tl.load(scale_ptr).to(tl.float32)
    m_start = pid_s * split_len
    m_stop = tl.minimum(m_start + split_len, M)
    neg_inf = float("-inf")
    m_i = tl.full((BLOCK_B,), neg_inf, tl.float32)
    l_i = tl.zeros((BLOCK_B,), tl.float32)
    pm_i = tl.full((BLOCK_B,), neg_inf, tl.float32)
    pl_i = tl.zeros((BLOCK_B,), tl.float32)
    for j0 in range(m_start, m_stop, BLOCK_M):
        offs_m = j0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_stop
        s = scale * _scores(
            q_ptr,
            d_ptr,
            offs_b,
            offs_m,
            b_ok,
            m_ok,
            D,
            INPUT_PRECISION,
            UPCAST,
            BLOCK_B,
            BLOCK_M,
            BLOCK_D,
        )
        is_pos, excl = _masks(
            pos_ptr, mask_ptr, ids_ptr, table_ptr, offs_b, offs_m, b_ok, m_ok, M, stride_mask, U,
            MASK_MODE, HAS_IDS,
        )  # fmt: skip
        sm = tl.where(excl, neg_inf, s)
        m_new = tl.maximum(m_i, tl.max(sm, axis=1))
        shift = tl.where(m_new == neg_inf, 0.0, m_new)
        l_i = l_i * tl.exp(m_i - shift) + tl.sum(tl.exp(sm - shift[:, None]), axis=1)
        m_i = m_new
        sp = tl.where(is_pos, s, neg_inf)
        if MASK_MODE:
            pm_new = tl.maximum(pm_i, tl.max(sp, axis=1))
            pshift = tl.where(pm_new == neg_inf, 0.0, pm_new)
            pl_i = pl_i * tl.exp(pm_i - pshift) + tl.sum(tl.exp(sp - pshift[:, None]), axis=1)
            pm_i = pm_new
        else:
            pm_i = tl.maximum(pm_i, tl.max(sp, axis=1))  # the single positive logit
    # l_i >= 1 unless the split has no candidate for the row (m_i = -inf), or NaN: a NaN
    # score must reach the loss (the max may drop it, the sum does not).
    lse = tl.where(m_i == neg_inf, neg_inf, m_i + tl.log(tl.where(m_i == neg_inf, 1.0, l_i)))
    if MASK_MODE:
        plse = tl.where(
            pm_i == neg_inf, neg_inf, pm_i + tl.log(tl.where(pm_i == neg_inf, 1.0, pl_i))
        )
    else:
        plse = pm_i
    out = pid_s.to(tl.int64) * B + offs_b
    tl.store(lse_ptr + out, lse, mask=b_ok)
    tl.store(plse_ptr + out, plse, mask=b_ok)


@triton.jit
def contrastive_bwd_kernel(
    q_ptr,
    d_ptr,
    scale_ptr,
    pos_ptr,
    mask_ptr,
    ids_ptr,
    table_ptr,
    lse_ptr,
    plse_ptr,
    g_ptr,
    grad_ptr,
    parts_ptr,
    B,
    M,
    D,
    U,
    stride_mask,
    j_start,
    n_cols,
    B_KEY,
    M_KEY,
    MASK_MODE: tl.constexpr,
    HAS_IDS: tl.constexpr,
    STORE_G: tl.constexpr,
    NEED_DSCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_B: tl.constexpr,
):
    """One ``[BLOCK_B, BLOCK_M]`` tile of the chunk ``[j_start, j_start + n_cols)``:
    ``grad_ptr [B, n_cols] = scale dS`` in its dtype (``STORE_G``) and
    ``parts_ptr[pid] = sum dS sim`` (``NEED_DSCALE``)."""
    # Grouped launch order: GROUP_B query blocks sweep the chunk together.
    pid = tl.program_id(0)
    n_blocks_b = tl.cdiv(B, BLOCK_B)
    n_blocks_m = tl.cdiv(n_cols, BLOCK_M)
    per_group = GROUP_B * n_blocks_m
    first_b = (pid // per_group) * GROUP_B
    group_b = tl.minimum(n_blocks_b - first_b, GROUP_B)
    pid_b = first_b + (pid % per_group) % group_b
    pid_m = (pid % per_group) // group_b

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    local_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = j_start + local_m
    b_ok = offs_b < B
    m_ok = local_m < n_cols
    scale = tl.load(scale_ptr).to(tl.float32)
    sim = _scores(
        q_ptr,
        d_ptr,
        offs_b,
        offs_m,
        b_ok,
        m_ok,
        D,
        INPUT_PRECISION,
        UPCAST,
        BLOCK_B,
        BLOCK_M,
        BLOCK_D,
    )
    is_pos, excl = _masks(
        pos_ptr, mask_ptr, ids_ptr, table_ptr, offs_b, offs_m, b_ok, m_ok, M, stride_mask, U,
        MASK_MODE, HAS_IDS,
    )  # fmt: skip
    s = scale * sim
    lse = tl.load(lse_ptr + offs_b, mask=b_ok, other=0.0)
    g = tl.load(g_ptr + offs_b, mask=b_ok, other=0.0)
    p = tl.where(excl, 0.0, tl.exp(s - lse[:, None]))
    if MASK_MODE:
        plse = tl.load(plse_ptr + offs_b, mask=b_ok, other=0.0)
        t = tl.where(is_pos, tl.exp(s - plse[:, None]), 0.0)
    else:
        t = tl.where(is_pos, 1.0, 0.0)
    ds = g[:, None] * (p - t)  # 0 outside the rows / columns
    if NEED_DSCALE:
        tl.store(parts_ptr + pid, tl.sum(tl.sum(ds * sim, axis=1), axis=0))
    if STORE_G:
        gv = round_to(scale * ds, grad_ptr.dtype.element_ty, UPCAST)
        grow = offs_b.to(tl.int64) * n_cols
        tl.store(
            grad_ptr + grow[:, None] + local_m[None, :], gv, mask=b_ok[:, None] & m_ok[None, :]
        )


_KEY = ["D", "B_KEY", "M_KEY"]
_FWD = {
    16: triton.autotune(configs=_FWD_CONFIGS_16, key=_KEY)(contrastive_fwd_kernel),
    32: triton.autotune(configs=_FWD_CONFIGS_32, key=_KEY)(contrastive_fwd_kernel),
}
# Benchmarking runs would leave their own partials behind in the slots a config with larger
# tiles does not write: restore_value puts the zeros back.
_BWD = {
    16: triton.autotune(configs=_BWD_CONFIGS_16, key=_KEY, restore_value=["parts_ptr"])(
        contrastive_bwd_kernel
    ),
    32: triton.autotune(configs=_BWD_CONFIGS_32, key=_KEY, restore_value=["parts_ptr"])(
        contrastive_bwd_kernel
    ),
}
_MIN_BLOCK = {
    bits: (min(c.kwargs["BLOCK_B"] for c in cfgs), min(c.kwargs["BLOCK_M"] for c in cfgs))
    for bits, cfgs in ((16, _BWD_CONFIGS_16), (32, _BWD_CONFIGS_32))
}


# ------------------------------------------------------------------------------- host code

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _check_dtype(q: torch.Tensor) -> None:
    if q.dtype not in _SUPPORTED:
        raise TypeError(
            "queries must have dtype float32, bfloat16 or float16 for impl='triton', "
            f"got {q.dtype} (use impl='cpu' or 'reference' for float64)"
        )


def _bits(q: torch.Tensor) -> int:
    return 32 if q.dtype == torch.float32 else 16


def _key(n: int) -> int:
    """Autotune bucket (powers of two), so varying batch sizes do not re-tune."""
    return 1 << max(n - 1, 0).bit_length()


def _pad_cols(x: torch.Tensor, mult: int = 16) -> torch.Tensor:
    """``x [R, C]`` with its columns zero-padded to a multiple of ``mult`` (a copy only when
    ``C`` is not one): 16-byte-aligned rows let the kernels vectorise their loads, and an odd
    row stride made ptxas spill."""
    cols = x.shape[1]
    if cols % mult == 0:
        return x.contiguous()
    out = x.new_zeros(x.shape[0], triton.cdiv(cols, mult) * mult)
    out[:, :cols] = x
    return out


def _prepare(q, d, pos_index, pos_mask, cand_ids, id_table):
    """The kernels' operands, contiguous (the kernels take row-major rows): embeddings
    (zero-padded along D when D % 16 != 0: zeros add nothing to a score), the positives mask /
    id table as uint8 with padded row strides, and dummies for what the mode does not use."""
    dummy = torch.zeros(1, dtype=torch.int64, device=q.device)
    mask = None if pos_mask is None else _pad_cols(pos_mask).view(torch.uint8)
    table = None if id_table is None else _pad_cols(id_table).view(torch.uint8)
    args = (
        dummy if pos_index is None else pos_index.contiguous(),
        dummy if mask is None else mask,
        dummy if cand_ids is None else cand_ids.contiguous(),
        dummy if table is None else table,
    )
    sizes = (
        0 if table is None else table.shape[1],  # U: the id table's row stride
        0 if mask is None else mask.shape[1],  # the positives mask's row stride
    )
    flags = dict(
        MASK_MODE=pos_mask is not None,
        HAS_IDS=cand_ids is not None,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=_INTERPRET,
    )
    return _pad_cols(q), _pad_cols(d), args, sizes, flags


def _num_splits(B: int, M: int, device: torch.device) -> int:
    if FWD_SPLITS is not None:
        return max(1, int(FWD_SPLITS))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, triton.cdiv(_key(B), 64))
    return max(1, min(want, triton.cdiv(M, 8 * _ALIGN)))


def chunk_columns(B: int, M: int, elsize: int) -> int:
    """Candidate columns per backward chunk: the ``[B, Mc]`` buffer of ``elsize``-byte
    elements stays within ``max(BWD_BUDGET_FRACTION B M elsize, BWD_MIN_BUDGET_BYTES)``,
    rounded down to a multiple of the alignment (at least one multiple), at most ``M``."""
    budget = max(BWD_BUDGET_FRACTION * B * M * elsize, BWD_MIN_BUDGET_BYTES)
    cols = int(budget // max(B * elsize, 1)) // _ALIGN * _ALIGN
    return max(1, min(M, max(cols, _ALIGN)))


@registry.launcher_op("contrastive_fwd_triton")
def contrastive_fwd(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    pos_index: torch.Tensor | None,
    pos_mask: torch.Tensor | None,
    cand_ids: torch.Tensor | None,
    id_table: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.rag_kernels.contrastive_fwd_triton``: ``(loss, lse, plse)``, each ``[B]`` fp32."""
    _check_dtype(q)
    B, D = q.shape
    M = d.shape[0]
    dev = q.device
    qk, dk, args, (U, stride_mask), flags = _prepare(q, d, pos_index, pos_mask, cand_ids, id_table)
    splits = _num_splits(B, M, dev)
    split_len = triton.cdiv(triton.cdiv(M, splits), _ALIGN) * _ALIGN
    splits = triton.cdiv(M, split_len)
    lse_p = torch.empty(splits, B, dtype=torch.float32, device=dev)
    plse_p = torch.empty_like(lse_p)

    def grid(meta):
        return (triton.cdiv(B, meta["BLOCK_B"]), splits)

    _FWD[_bits(q)][grid](
        qk, dk, scale.detach().float().contiguous(), *args, lse_p, plse_p,
        B, M, qk.shape[1], U, stride_mask, split_len, _key(B), _key(M), **flags,
    )  # fmt: skip
    if splits == 1:
        lse, plse = lse_p[0], plse_p[0]
    else:
        lse = torch.logsumexp(lse_p, dim=0)
        plse = torch.logsumexp(plse_p, dim=0) if pos_mask is not None else plse_p.amax(dim=0)
    return lse - plse, lse, plse


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32: cuBLAS's fp32-output 16-bit GEMM on CUDA where torch has it,
    else the GEMM in the input dtype, then widened."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and "dtype" in torch.ops.aten.mm.overloads():
        return torch.ops.aten.mm.dtype(a, b, torch.float32)
    return (a @ b).float()


@registry.launcher_op("contrastive_bwd_triton")
def contrastive_bwd(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    pos_index: torch.Tensor | None,
    pos_mask: torch.Tensor | None,
    cand_ids: torch.Tensor | None,
    id_table: torch.Tensor | None,
    lse: torch.Tensor,
    pos_lse: torch.Tensor,
    grad: torch.Tensor,
    need_q: bool,
    need_d: bool,
    need_s: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.rag_kernels.contrastive_bwd_triton``: ``(dq [B, D], dd [M, D], dscale [])``;
    a gradient that is not needed comes back empty (``[0, D]`` / ``[0]``)."""
    _check_dtype(q)
    B, D = q.shape
    M = d.shape[0]
    dev = q.device
    qk, dk, args, (U, stride_mask), flags = _prepare(q, d, pos_index, pos_mask, cand_ids, id_table)
    bits = _bits(q)
    s32 = scale.detach().float().contiguous()
    g = grad.float().contiguous()
    store_g = need_q or need_d
    mc = chunk_columns(B, M, q.element_size())
    n_chunks = triton.cdiv(M, mc)
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    gbuf = torch.empty(B * mc, dtype=q.dtype, device=dev) if store_g else dummy
    bb, bm = _MIN_BLOCK[bits]
    parts = (
        torch.zeros(triton.cdiv(B, bb) * triton.cdiv(mc, bm), dtype=torch.float32, device=dev)
        if need_s
        else dummy
    )
    dq = dd = dscale = None
    if need_q and n_chunks > 1:
        dq = torch.zeros(B, D, dtype=torch.float32, device=dev)
    if need_d:
        dd = torch.empty(M, D, dtype=d.dtype, device=dev)
    if need_s:
        dscale = torch.zeros((), dtype=torch.float32, device=dev)
    for j0 in range(0, M, mc):
        w = min(mc, M - j0)
        gmat = gbuf[: B * w].view(B, w) if store_g else dummy

        def grid(meta, w=w):
            return (triton.cdiv(B, meta["BLOCK_B"]) * triton.cdiv(w, meta["BLOCK_M"]),)

        _BWD[bits][grid](
            qk, dk, s32, *args, lse, pos_lse, g, gmat, parts, B, M, qk.shape[1], U, stride_mask,
            j0, w,
            _key(B), _key(M),
            STORE_G=store_g, NEED_DSCALE=need_s, **flags,
        )  # fmt: skip
        if need_s:
            dscale += parts.sum()
            if j0 + w < M:
                parts.zero_()
        dc = d[j0 : j0 + w]
        if need_d:
            torch.mm(gmat.t(), q, out=dd[j0 : j0 + w])
        if need_q:
            if n_chunks == 1:
                dq = gmat @ dc
            elif q.dtype == torch.float32:
                dq.addmm_(gmat, dc)
            else:
                dq += _mm_f32(gmat, dc)
    if need_q:
        dq = dq.to(q.dtype)
    return (
        dq if need_q else q.new_empty(0, D),
        dd if need_d else d.new_empty(0, D),
        dscale.to(scale.dtype) if need_s else scale.new_empty(0),
    )


@contrastive_fwd.register_fake
def _(q, d, scale, pos_index, pos_mask, cand_ids, id_table):
    B = q.shape[0]
    return tuple(q.new_empty(B, dtype=torch.float32) for _ in range(3))


@contrastive_bwd.register_fake
def _(q, d, scale, pos_index, pos_mask, cand_ids, id_table, lse, pos_lse, grad, need_q, need_d,
      need_s):  # fmt: skip
    D = q.shape[1]
    return (
        q.new_empty(q.shape if need_q else (0, D)),
        d.new_empty(d.shape if need_d else (0, D)),
        scale.new_empty(() if need_s else (0,)),
    )


def forward(q, d, scale, pos_index, pos_mask, cand_ids, id_table):
    """``(loss, lse, plse)`` (``ContrastiveFunction``'s kernel interface)."""
    return torch.ops.rag_kernels.contrastive_fwd_triton(
        q, d, scale, pos_index, pos_mask, cand_ids, id_table
    )


def backward(q, d, scale, pos_index, pos_mask, cand_ids, id_table, lse, pos_lse, grad, needs):
    """``(dq, dd, dscale)``, None where ``needs`` says a gradient is not needed."""
    need_q, need_d, need_s = (bool(n) for n in needs)
    dq, dd, dscale = torch.ops.rag_kernels.contrastive_bwd_triton(
        q, d, scale, pos_index, pos_mask, cand_ids, id_table, lse, pos_lse, grad,
        need_q, need_d, need_s,
    )  # fmt: skip
    return dq if need_q else None, dd if need_d else None, dscale if need_s else None
