"""Triton kernels for the fused LM head (docs/design.md §2.1): per-row ``lp``, ``lse``, ``sum_logprob``.

Math, per row r: ``z_rv = W_v . h_r (+ b_v)``, optionally ``z = c tanh(z / c)``;
``lse_r = logsumexp_v z_rv``; ``lp_r = z_r[y_r] - lse_r``; ``S_r = sum_v z_rv - V lse_r``.
Backward: ``p = exp(z - lse)``,
``dz_rv = g_r (1[v=y_r] - p_rv) + g^S_r (1 - V p_rv) + g^lse_r p_rv`` (times ``1 - (z/c)^2``
under softcap); ``dh_r = sum_v dz_rv W_v``; ``dW_v = sum_r dz_rv h_r``; ``db_v = sum_r dz_rv``.

Design:

* Active rows first. Rows that contribute nothing (ignored targets; in the backward also rows
  whose three upstream gradients are all zero) are moved to the end of a permutation
  ``rows`` (a stable partition from one ``cumsum`` + ``scatter``, no host sync) and the active
  count travels as a device scalar. Kernels address rows through ``rows`` (no copy of ``hidden``), load inactive rows as
  zeros (NaN-poisoned hidden states never enter a sum) and blocks with no active row do no
  work at all. Skipping is exact: such rows' contributions are zero by definition.
* Forward: program ``(row block, vocab split)`` loops over ``BLOCK_V`` vocab tiles of its split,
  forms the logit tile with ``tl.dot`` (fp32 accumulation; fp32 inputs use IEEE fp32, never
  TF32), and keeps an online max / sum-exp, the target logit and ``sum_v z`` (summed in-kernel,
  which also covers bias and softcap). Vocab splits exist only to fill the GPU when ``N`` is
  small; the per-split partials (``[splits, N]`` fp32 each) are merged by a few torch ops.
  Nothing of size ``V`` is stored; the autograd shell saves the fp32 ``lse``.
* Backward: one program per ``(row block, vocab tile)`` recomputes the logit tile, forms
  ``dz`` in registers, then walks ``H`` in ``BLOCK_K`` chunks, adding ``dz @ W`` into an fp32
  ``dh`` buffer and ``dz^T @ h`` into an fp32 ``dW`` buffer with relaxed atomics (``db`` too).
  This is the 6NHV-flop scheme (one recompute); a two-kernel scheme without atomics would
  recompute the logits twice (8NHV) or need a ``[BLOCK_V, H]`` accumulator per program.
  Cost: fp32 ``[V, H]`` / ``[N, H]`` buffers (cast to the input dtype at the end when that is
  not fp32) and a run-to-run nondeterministic summation order of dh / dW (fp32 atomics).
  ``dz`` is rounded to the input dtype before the two gradient matmuls, as plain PyTorch's
  bf16 / fp16 path rounds the logit gradient.
* Optional ``filter_eps`` (``opts.filter_eps``, off by default): a backward tile is skipped when
  it holds no active row's target, no row of the block has a nonzero ``grad_sum`` and every
  ``p < filter_eps``. Every skipped ``dz_rv = (g^lse_r - g_r) p_rv`` then has
  ``|dz_rv| < (|g_r| + |g^lse_r|) filter_eps``, so for each row
  ``|dh_r error| <= (|g_r| + |g^lse_r|) filter_eps sum_v |W_v|`` (elementwise) and
  ``|dW_v error| <= filter_eps sum_r (|g_r| + |g^lse_r|) |h_r|``, ``|db_v error|`` likewise.
* dtypes: fp32 / bf16 / fp16 inputs; fp64 raises ``TypeError`` (use ``impl="reference"``).
  Outputs and saved statistics are fp32.
* Tuning: autotuned configs for H100 on CUDA, one list for 16-bit inputs and one for fp32
  (``RAG_KERNELS_AUTOTUNE=0``, read at import, pins the first of each, e.g. for quick
  correctness runs); one tiny fixed config under ``TRITON_INTERPRET=1``. The autotune key is
  ``(H, V, N rounded up to a power of two)`` plus the dtypes, so varying N does not re-tune.
  The interpreter of triton 3.9 mis-computes ``tl.dot`` on bf16 operands and truncates
  fp32 -> bf16 casts, so there the operands (rounded to nearest-even in the input dtype, as
  on the GPU) are upcast to fp32 first: same products, fp32 accumulation, as on the tensor
  cores.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..triton_utils import accumulate_grads, logit_tile

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_AUTOTUNE = os.environ.get("RAG_KERNELS_AUTOTUNE", "1") != "0"
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    """True when triton imported (this module only loads then)."""
    return True


def _cfg(bn, bv, bk, warps, stages, **extra):
    return triton.Config(
        {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, **extra}, num_warps=warps, num_stages=stages
    )


# Checked by compiling for sm_90 offline (triton 3.9 + its ptxas, 16-divisible shapes, every
# feature on; tests/test_linear_logprob_triton.py::test_default_configs_compile_for_h100): all
# fit the H100's 227 KiB of shared memory; the default (first) 16-bit configs spill nothing, the
# others at most ~72 bytes. fp32 inputs use IEEE fp32 (FMA, no tensor cores) and small tiles.
if _INTERPRET:
    _FWD_CONFIGS_16 = _FWD_CONFIGS_32 = [_cfg(16, 32, 16, 1, 1)]
    _BWD_CONFIGS_16 = _BWD_CONFIGS_32 = [_cfg(16, 32, 16, 1, 1, GROUP_N=2)]
    _SPLIT_ALIGN = 32
else:
    _FWD_CONFIGS_16 = [
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 128, 64, 8, 4),
        _cfg(64, 256, 64, 8, 4),
        _cfg(64, 128, 64, 4, 4),
    ]
    _BWD_CONFIGS_16 = [
        _cfg(128, 64, 64, 8, 3, GROUP_N=8),  # spill-free with every feature on: the default
        _cfg(128, 128, 64, 8, 3, GROUP_N=8),
        _cfg(256, 64, 64, 8, 3, GROUP_N=4),
        _cfg(128, 128, 64, 8, 4, GROUP_N=16),
        _cfg(128, 64, 64, 4, 4, GROUP_N=8),
    ]
    _FWD_CONFIGS_32 = [_cfg(64, 128, 32, 8, 3), _cfg(32, 64, 32, 4, 3), _cfg(64, 64, 32, 4, 2)]
    _BWD_CONFIGS_32 = [_cfg(32, 64, 32, 4, 3, GROUP_N=8), _cfg(64, 64, 32, 4, 3, GROUP_N=8)]
    _SPLIT_ALIGN = 256
    if not _AUTOTUNE:
        _FWD_CONFIGS_16, _BWD_CONFIGS_16 = _FWD_CONFIGS_16[:1], _BWD_CONFIGS_16[:1]
        _FWD_CONFIGS_32, _BWD_CONFIGS_32 = _FWD_CONFIGS_32[:1], _BWD_CONFIGS_32[:1]


# ----------------------------------------------------------------------------- device code


@triton.jit
def linear_logprob_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    rows_ptr,
    nact_ptr,
    m_ptr,
    s_ptr,
    zt_ptr,
    zs_ptr,
    N,
    V,
    D,
    Y_INNER,
    Y_GROUP,
    split_len,
    softcap,
    N_KEY,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_act = tl.load(nact_ptr)
    pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = pos < n_act
    rows = tl.load(rows_ptr + pos, mask=pos < N, other=0)
    y = tl.load(y_ptr + (rows // Y_GROUP) * Y_INNER + rows % Y_INNER, mask=row_ok, other=-1)
    hrow = rows * D
    v_start = pid_s * split_len
    v_stop = tl.minimum(v_start + split_len, V)
    v_stop = tl.where(pid_n * BLOCK_N < n_act, v_stop, v_start)  # no active row: no work

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zs = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_stop
        z = logit_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            hrow,
            row_ok,
            offs_v,
            v_ok,
            D,
            softcap,
            HAS_BIAS,
            SOFTCAP,
            INPUT_PRECISION,
            UPCAST,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
        )
        zm = tl.where(v_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zm - m_new[:, None]), axis=1)
        m = m_new
        zt += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
        zs += tl.sum(tl.where(v_ok[None, :], z, 0.0), axis=1)

    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(zt_ptr + out, zt, mask=row_ok)
    tl.store(zs_ptr + out, zs, mask=row_ok)


@triton.jit
def linear_logprob_bwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    rows_ptr,
    nact_ptr,
    lse_ptr,
    glp_ptr,
    glse_ptr,
    gs_ptr,
    dh_ptr,
    dw_ptr,
    db_ptr,
    N,
    V,
    D,
    Y_INNER,
    Y_GROUP,
    softcap,
    filter_eps,
    N_KEY,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_GLSE: tl.constexpr,
    HAS_GS: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    FILTER: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # Grouped launch order: GROUP_N row blocks sweep the vocab together, so the W tiles
    # (and h tiles) that concurrently running programs read stay in L2.
    pid = tl.program_id(0)
    n_blocks_n = tl.cdiv(N, BLOCK_N)
    n_blocks_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * n_blocks_v
    first_n = (pid // per_group) * GROUP_N
    group_n = tl.minimum(n_blocks_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_n
    pid_v = (pid % per_group) // group_n

    n_act = tl.load(nact_ptr)
    if pid_n * BLOCK_N < n_act:
        pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = pos < n_act
        rows = tl.load(rows_ptr + pos, mask=pos < N, other=0)
        hrow = rows * D
        y = tl.load(y_ptr + (rows // Y_GROUP) * Y_INNER + rows % Y_INNER, mask=row_ok, other=-1)
        # Inactive rows get lse = +inf, so p = 0 and (their upstream gradients being 0) dz = 0.
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
        # dz = g (1[v=y] - p) + gl p + gs (1 - V p) = a + b p (+ g at v = y)
        g = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
        a = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b = -g
        if HAS_GLSE:
            b += tl.load(glse_ptr + rows, mask=row_ok, other=0.0)
        if HAS_GS:
            gs = tl.load(gs_ptr + rows, mask=row_ok, other=0.0)
            a = gs
            b -= V * gs
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V

        z = logit_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            hrow,
            row_ok,
            offs_v,
            v_ok,
            D,
            softcap,
            HAS_BIAS,
            SOFTCAP,
            INPUT_PRECISION,
            UPCAST,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
        )
        # Few full tiles live at once (register pressure): p, then dz in place.
        p = tl.exp(z - lse[:, None])
        if FILTER:
            p_max = tl.max(tl.max(tl.where(v_ok[None, :], p, 0.0), axis=1), axis=0)
        dz = a[:, None] + b[:, None] * p
        dz = tl.where(offs_v[None, :] == y[:, None], dz + g[:, None], dz)
        if SOFTCAP:
            t = z / softcap
            dz = dz * (1.0 - t * t)

        k_stop = D
        if FILTER:
            y_in = (y >= pid_v * BLOCK_V) & (y < pid_v * BLOCK_V + BLOCK_V) & row_ok
            keep = (p_max >= filter_eps) | (tl.sum(y_in.to(tl.int32), axis=0) > 0)
            if HAS_GS:
                keep = keep | (tl.max(tl.abs(gs), axis=0) > 0)
            k_stop = tl.where(keep, D, 0)
            if NEED_DB:
                db = tl.where(keep, tl.sum(dz, axis=0), 0.0)
                tl.atomic_add(db_ptr + offs_v, db, mask=v_ok, sem="relaxed")
        elif NEED_DB:
            tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=v_ok, sem="relaxed")

        accumulate_grads(
            dz, h_ptr, w_ptr, dh_ptr, dw_ptr, hrow, row_ok, offs_v, v_ok, D, k_stop,
            NEED_DH, NEED_DW, INPUT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip


_FWD_KEY = ["D", "V", "N_KEY"]
_BWD_KEY = ["D", "V", "N_KEY"]
# Benchmarking runs accumulate into the gradient buffers: restore_value puts their zeros back.
_BWD_RESTORE = ["dh_ptr", "dw_ptr", "db_ptr"]
_FWD = {
    16: triton.autotune(configs=_FWD_CONFIGS_16, key=_FWD_KEY)(linear_logprob_fwd_kernel),
    32: triton.autotune(configs=_FWD_CONFIGS_32, key=_FWD_KEY)(linear_logprob_fwd_kernel),
}
_BWD = {
    16: triton.autotune(configs=_BWD_CONFIGS_16, key=_BWD_KEY, restore_value=_BWD_RESTORE)(
        linear_logprob_bwd_kernel
    ),
    32: triton.autotune(configs=_BWD_CONFIGS_32, key=_BWD_KEY, restore_value=_BWD_RESTORE)(
        linear_logprob_bwd_kernel
    ),
}


# ------------------------------------------------------------------------------- host code


def _empty(shape, device) -> torch.Tensor:
    """fp32 scratch whose every read element the kernels write first (tests NaN-fill it)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _check_dtype(hidden: torch.Tensor) -> None:
    if hidden.dtype not in _SUPPORTED:
        raise TypeError(
            "hidden must have dtype float32, bfloat16 or float16 for impl='triton', "
            f"got {hidden.dtype} (use impl='reference' for float64)"
        )


def _bits(hidden: torch.Tensor) -> int:
    return 32 if hidden.dtype == torch.float32 else 16


def _kernel_flags(hidden: torch.Tensor) -> dict:
    return {
        "INPUT_PRECISION": "ieee" if hidden.dtype == torch.float32 else "tf32",
        "UPCAST": _INTERPRET,
    }


def _n_key(n: int) -> int:
    """Autotune bucket for the row count (powers of two), so varying N does not re-tune."""
    return 1 << max(n - 1, 0).bit_length()


def _y_layout(target: torch.Tensor, n: int) -> tuple[int, int]:
    """``(inner, group)``: row r reads ``target[(r // group) * inner + r % inner]`` — ``[N]``
    targets: the row itself; ``[B, T]`` targets shared by K row groups: ``(T, K T)``."""
    if target.dim() == 1:
        return max(n, 1), max(n, 1)
    return max(target.shape[1], 1), max(n // max(target.shape[0], 1), 1)


def _kept_rows(target: torch.Tensor, n: int, ignore_index: int) -> torch.Tensor:
    """``[N]`` bool, True where the row's target is not ``ignore_index`` (the one per-row
    expansion of a shared ``[B, T]`` target: a mask, not the ids)."""
    keep = target != ignore_index
    if target.dim() == 1 or n == 0:
        return keep.reshape(-1)[:n]
    B, T = target.shape
    return keep[:, None, :].expand(B, n // (B * T), T).reshape(n)


def _active_order(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row permutation with active rows first (stable) and the active count, without sync."""
    n = active.shape[0]
    idx = torch.arange(n, device=active.device)
    before = torch.cumsum(active, 0)  # active rows up to and including each row
    n_act = before[-1:]
    # active row -> its rank among active rows; inactive row -> n_act + its rank among inactive
    pos = torch.where(active, before - 1, n_act + idx - before)
    rows = torch.empty_like(idx).scatter_(0, pos, idx)
    return rows, n_act


def _num_splits(n: int, v: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(n, 128)
    want = triton.cdiv(2 * sms, row_blocks)
    return max(1, min(want, triton.cdiv(v, 4 * _SPLIT_ALIGN)))


def forward(hidden, weight, target, bias, opts, *, num_splits: int | None = None):
    """``hidden [N,H]``, ``weight [V,H]``, ``target [N]`` or ``[B,T]`` shared by ``N/(B T)``
    row groups, ``bias [V]|None`` (contiguous) ->
    ``(lp, lse, sum_logprob)``, each ``[N]`` fp32, zero on ignored rows.

    ``num_splits`` (tests / tuning) overrides how many vocab splits share one row block.
    """
    _check_dtype(hidden)
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    keep = _kept_rows(target, N, opts.ignore_index)
    if N == 0:
        z = torch.zeros(0, dtype=torch.float32, device=dev)
        return z, z.clone(), z.clone()
    rows, n_act = _active_order(keep)
    # from the N bucket, so split_len (and with it the tuned config) is stable within a bucket
    splits = num_splits if num_splits is not None else _num_splits(_n_key(N), V, dev)
    split_len = triton.cdiv(triton.cdiv(V, max(splits, 1)), _SPLIT_ALIGN) * _SPLIT_ALIGN
    splits = triton.cdiv(V, split_len)
    m, s, zt, zs = (_empty((splits, N), dev) for _ in range(4))
    softcap = opts.softcap

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), splits)

    _FWD[_bits(hidden)][grid](
        hidden,
        weight,
        bias if bias is not None else hidden,
        target,
        rows,
        n_act,
        m,
        s,
        zt,
        zs,
        N,
        V,
        D,
        *_y_layout(target, N),
        split_len,
        1.0 if softcap is None else float(softcap),
        _n_key(N),
        HAS_BIAS=bias is not None,
        SOFTCAP=softcap is not None,
        **_kernel_flags(hidden),
    )
    if splits == 1:
        lse = m[0] + torch.log(s[0])
    else:
        mx = m.amax(dim=0)
        lse = mx + torch.log((s * torch.exp(m - mx)).sum(dim=0))
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    lp = torch.where(keep, zt.sum(dim=0) - lse, zero)
    sum_lp = torch.where(keep, zs.sum(dim=0) - V * lse, zero)
    lse = torch.where(keep, lse, zero)
    return lp, lse, sum_lp


def backward(hidden, weight, target, bias, lse, grad_lp, grad_lse, grad_sum, opts, needs):
    """Recompute-the-logits backward; returns ``(grad_hidden, grad_weight, grad_bias)`` in the
    input dtype (None where not needed). ``grad_lse`` / ``grad_sum`` may be None."""
    _check_dtype(hidden)
    need_dh, need_dw, need_db = needs
    need_db = bool(need_db) and bias is not None
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    keep = _kept_rows(target, N, opts.ignore_index)
    zero = torch.zeros((), dtype=torch.float32, device=dev)

    def masked(g):
        return None if g is None else torch.where(keep, g.float(), zero)

    glp = masked(grad_lp)
    glse, gs = masked(grad_lse), masked(grad_sum)
    if glp is None:
        glp = torch.zeros(N, dtype=torch.float32, device=dev)
    active = glp != 0
    if glse is not None:
        active = active | (glse != 0)
    if gs is not None:
        active = active | (gs != 0)
    rows, n_act = _active_order(active)

    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    dh = torch.zeros(N, D, dtype=torch.float32, device=dev) if need_dh else dummy
    dw = torch.zeros(V, D, dtype=torch.float32, device=dev) if need_dw else dummy.clone()
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else dummy.clone()
    if N > 0 and (need_dh or need_dw or need_db):
        softcap = opts.softcap
        filter_eps = getattr(opts, "filter_eps", None)

        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(V, meta["BLOCK_V"]),)

        _BWD[_bits(hidden)][grid](
            hidden,
            weight,
            bias if bias is not None else hidden,
            target,
            rows,
            n_act,
            lse.float().contiguous(),
            glp,
            glse if glse is not None else glp,
            gs if gs is not None else glp,
            dh,
            dw,
            db,
            N,
            V,
            D,
            *_y_layout(target, N),
            1.0 if softcap is None else float(softcap),
            0.0 if filter_eps is None else float(filter_eps),
            _n_key(N),
            HAS_BIAS=bias is not None,
            SOFTCAP=softcap is not None,
            HAS_GLSE=glse is not None,
            HAS_GS=gs is not None,
            NEED_DH=bool(need_dh),
            NEED_DW=bool(need_dw),
            NEED_DB=need_db,
            FILTER=filter_eps is not None and filter_eps > 0,
            **_kernel_flags(hidden),
        )
    return (
        dh.to(hidden.dtype) if need_dh else None,
        dw.to(weight.dtype) if need_dw else None,
        db.to(bias.dtype) if need_db else None,
    )
