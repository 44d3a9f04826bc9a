"""One test toolkit: the tolerance rule, one input factory per op, impl parametrisation.

* :func:`assert_close` — the project's one accuracy rule. A fast path's error against a
  float64 ground truth may be at most twice the error of plain PyTorch in the same dtype
  (``ref``) plus a small constant; without ``ref`` it is a scaled relative check,
  ``|a - e| <= rtol * max|e| + atol`` elementwise. Failures name the quantity, the worst
  element (index, actual, expected, absolute and relative error), the bound and the
  NaN / inf counts.
* ``make_linear_logprob`` / ``make_marginalize`` / ``make_token_smoothing`` /
  ``make_contrastive`` / ``make_rag`` — seeded inputs (values drawn in float64, then cast),
  ignored rows NaN-poisoned where the op promises never to read them.
* :func:`impl_params` — ``pytest.param`` per implementation, SKIPPED with the registry's
  reason (``rag_kernels.ops.registry.unavailable_reason``) where one cannot run here.
* :func:`poisoned`, :func:`nan_filled_empty`, :func:`nan_scratch` — NaN poisoning of inputs
  and of scratch memory (an element a kernel forgot to write shows up as NaN).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import pytest
import torch

import triton_interpreter_compat
from rag_kernels.ops import registry

# also in processes without the conftest (spawned distributed workers import this module)
triton_interpreter_compat.install()

IGNORE = -100  # the default ignore_index of rk.linear_logprob / rk.rag_loss

F64 = torch.float64
# dtypes the Triton kernels take (float64 raises TypeError there; cpu / reference take it)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_DTYPE_IDS = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


# ------------------------------------------------------------------------------ tolerance


class Closeness(NamedTuple):
    """What :func:`assert_close` measured: ``err = max|a - e|`` and the bound it met."""

    err: float
    bound: float
    ref_err: float | None  # max|ref - e| when a plain-PyTorch result was given


def _as_f64(x: torch.Tensor | float) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(x)
    return x.detach().to(device="cpu", dtype=torch.float64)


def _nonfinite(x: torch.Tensor) -> str:
    return f"{int(torch.isnan(x).sum())} NaN, {int(torch.isinf(x).sum())} inf"


def _index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    idx = []
    for n in reversed(shape):
        idx.append(flat % n)
        flat //= n
    return tuple(reversed(idx))


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    ref: torch.Tensor | None = None,
    rtol: float = 0.0,
    atol: float = 0.0,
    elem_rtol: float = 0.0,
    equal_nan: bool = False,
    name: str = "value",
) -> Closeness:
    """Check ``actual`` against the ground truth ``expected`` (float64 or exact).

    With ``ref`` (plain PyTorch's result in ``actual``'s dtype, same inputs):
    ``max|a - e| <= 2 max|ref - e| + rtol max|e| + atol``.
    Without ``ref``, elementwise: ``|a - e| <= rtol max|e| + atol (+ elem_rtol |e|)``
    (``elem_rtol`` is torch.testing's per-element relative term, for the few checks that use
    it). NaN / inf must sit at the same places in both (NaN only with ``equal_nan``); a NaN
    in ``actual`` where ``expected`` is finite always fails. Returns the measured errors.
    """
    assert actual is not None, f"{name}: got None, expected a tensor"
    a, e = _as_f64(actual), _as_f64(expected)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    a, e = a.reshape(-1), e.reshape(-1)
    same = (a == e) | (equal_nan & torch.isnan(a) & torch.isnan(e))
    finite = torch.isfinite(a) & torch.isfinite(e)
    bad = ~finite & ~same  # NaN / inf on either side that the other side does not match
    r = None if ref is None else _as_f64(ref).reshape(-1)
    if r is not None:
        assert r.shape == e.shape, f"{name}: ref shape {tuple(r.shape)} != {tuple(e.shape)}"
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise AssertionError(
            f"{name}: non-finite mismatch at {_index(i, actual.shape)}: actual {a[i].item()!r}, "
            f"expected {e[i].item()!r}; actual has {_nonfinite(a)}, expected {_nonfinite(e)}"
            + ("" if r is None else f", ref {_nonfinite(r)}")
        )
    a, e = torch.where(finite, a, 0.0), torch.where(finite, e, 0.0)
    diff = (a - e).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    scale = float(e.abs().max()) if e.numel() else 0.0
    ref_err = None
    if r is not None:
        assert torch.isfinite(r[finite]).all(), f"{name}: plain PyTorch result has {_nonfinite(r)}"
        ref_err = float((torch.where(finite, r, 0.0) - e).abs().max()) if e.numel() else 0.0
        bound = 2 * ref_err + rtol * scale + atol
        tol = torch.full_like(e, bound)
    else:
        tol = rtol * scale + atol + elem_rtol * e.abs()
        bound = float(tol.max()) if tol.numel() else 0.0
    over = diff - tol
    if diff.numel() == 0 or bool((over <= 0).all()):
        return Closeness(err, bound, ref_err)
    i = int(over.argmax())  # the element furthest over its bound
    rel = diff[i].item() / abs(e[i].item()) if e[i] != 0 else float("inf")
    if r is not None:
        rule = f"2 * plain-PyTorch err {ref_err:.3e} + {rtol:g} * max|e| {scale:.3e} + {atol:g}"
    else:
        rule = f"{rtol:g} * max|e| {scale:.3e} + {atol:g}" + (
            f" + {elem_rtol:g} * |e|" if elem_rtol else ""
        )
    raise AssertionError(
        f"{name}: max abs err {err:.3e} > allowed {tol[i].item():.3e} ({rule}); worst element "
        f"{_index(i, actual.shape)}: actual {a[i].item():.9g}, expected {e[i].item():.9g}, "
        f"abs err {diff[i].item():.3e}, rel err {rel:.3e}; {int((over > 0).sum())} of "
        f"{diff.numel()} elements over; actual has {_nonfinite(_as_f64(actual))}"
    )


# ------------------------------------------------------------------------ impl parameters


def dtype_id(dtype: torch.dtype) -> str:
    return _DTYPE_IDS.get(dtype, str(dtype).replace("torch.", ""))


def unsupported_dtype_reason(impl: str, dtype: torch.dtype | None) -> str | None:
    """Why ``impl`` does not take ``dtype`` (None when it does)."""
    if impl == "triton" and dtype is not None and dtype not in TRITON_DTYPES:
        return f"the Triton kernels take fp32 / bf16 / fp16 only, not {dtype_id(dtype)}"
    return None


def impl_params(
    op: str,
    impls: Sequence[str] = ("reference", "cpu", "triton"),
    *,
    dtypes: Sequence[torch.dtype] | None = None,
) -> list:
    """``pytest.param(impl, id=impl)`` per implementation of ``op``; one that cannot run in
    this process is kept, marked SKIPPED with the registry's reason. With ``dtypes``:
    ``pytest.param(impl, dtype, id="impl-dtype")`` per pair (for ``"impl,dtype"``), a pair the
    implementation does not take skipped too."""
    out = []
    for impl in impls:
        why = registry.unavailable_reason(op, impl)
        for dtype in [None] if dtypes is None else dtypes:
            reason = why or unsupported_dtype_reason(impl, dtype)
            marks = [pytest.mark.skip(reason=f"{op} impl={impl!r}: {reason}")] if reason else []
            if dtype is None:
                out.append(pytest.param(impl, id=impl, marks=marks))
            else:
                out.append(pytest.param(impl, dtype, id=f"{impl}-{dtype_id(dtype)}", marks=marks))
    return out


def require_impl(op: str, impl: str, dtype: torch.dtype | None = None) -> None:
    """Skip the running test (with the reason) when ``impl`` of ``op`` cannot run here."""
    reason = registry.unavailable_reason(op, impl) or unsupported_dtype_reason(impl, dtype)
    if reason:
        pytest.skip(f"{op} impl={impl!r}: {reason}")


def needs_impl(op: str, impl: str):
    """``pytest.mark.skipif`` with the registry's reason when ``impl`` of ``op`` cannot run."""
    reason = registry.unavailable_reason(op, impl)
    return pytest.mark.skipif(reason is not None, reason=f"{op} impl={impl!r}: {reason}")


# ------------------------------------------------------------------------------ poisoning


def poisoned(x: torch.Tensor, where: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    """A detached copy of ``x`` holding ``value`` (NaN) at ``where``: what a kernel must never
    read (ignored rows, masked documents, padding)."""
    x = x.detach().clone()
    x[where] = value
    return x


@contextlib.contextmanager
def nan_filled_empty():
    """``torch.empty`` / ``at::empty`` / ``resize_`` return NaN-filled memory inside (torch's
    deterministic mode fills uninitialised memory): an output a kernel forgot to write fails."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def nan_scratch(monkeypatch, module, attr: str = "_empty") -> None:
    """Make a kernel module's fp32 scratch allocator ``attr(shape, device)`` return NaN."""
    monkeypatch.setattr(
        module,
        attr,
        lambda shape, device: torch.full(shape, float("nan"), dtype=torch.float32, device=device),
    )


# -------------------------------------------------------------------------------- factories


def _cast(x: torch.Tensor | None, dtype: torch.dtype, device="cpu") -> torch.Tensor | None:
    return None if x is None else x.to(device=device, dtype=dtype)


def _leaf(x: torch.Tensor | None, requires_grad: bool) -> torch.Tensor | None:
    return x.requires_grad_(True) if x is not None and requires_grad else x


class LinearLogprobCase(NamedTuple):
    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    target: torch.Tensor  # [N] int64, IGNORE on ignored rows
    bias: torch.Tensor | None  # [V]
    upstream: list[torch.Tensor]  # 3 x [N] float64 weights for (lp, lse, sum_logprob)


def make_linear_logprob(
    N: int,
    H: int,
    V: int,
    *,
    dtype: torch.dtype = F64,
    bias: bool = False,
    n_ignore: int = 0,
    ignore_frac: float | None = None,
    poison: bool = True,
    wscale: float = 1.0,
    bscale: float = 1.0,
    device="cpu",
    seed: int = 0,
) -> LinearLogprobCase:
    """Inputs of ``rk.linear_logprob``: ``hidden ~ N(0, 1)``, ``weight ~ N(0, wscale^2 / H)``,
    ``bias ~ N(0, bscale^2)``; ``n_ignore`` random rows (or each row with probability
    ``ignore_frac``) get ``IGNORE`` targets and, with ``poison``, NaN hidden states.
    Upstream weights: ``rand``, ``rand``, ``rand * 0.01`` (sum_logprob is ~V times larger)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=F64)
    w = torch.randn(V, H, generator=g, dtype=F64) * (wscale / H**0.5)
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_frac is not None:
        y[torch.rand(N, generator=g) < ignore_frac] = IGNORE
    elif n_ignore:
        y[torch.randperm(N, generator=g)[: min(n_ignore, N)]] = IGNORE
    b = torch.randn(V, generator=g, dtype=F64) * bscale if bias else None
    ups = [torch.rand(N, generator=g, dtype=F64) for _ in range(3)]
    ups[2] = ups[2] * 0.01
    if poison:
        h[y == IGNORE] = float("nan")  # ignored rows are never read: nothing of them may leak
    return LinearLogprobCase(
        _cast(h, dtype, device),
        _cast(w, dtype, device),
        y.to(device),
        _cast(b, dtype, device),
        [u.to(device) for u in ups],
    )


class MarginalizeCase(NamedTuple):
    token_logprobs: torch.Tensor  # [B, K, T], <= 0
    doc_scores: torch.Tensor  # [B, K]
    token_mask: torch.Tensor  # [B, T] bool
    doc_mask: torch.Tensor  # [B, K] bool, document 0 always kept


def make_marginalize(
    B: int,
    K: int,
    T: int,
    *,
    dtype: torch.dtype = F64,
    p_tok: float = 0.7,
    p_doc: float = 0.7,
    seed: int = 0,
) -> MarginalizeCase:
    """Inputs of ``rk.rag_sequence_loss`` / ``rk.rag_token_loss``: log-probs in ``[-3, 0]``,
    scores ``N(0, 4)``, tokens / documents kept with probability ``p_tok`` / ``p_doc``."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, K, T, generator=g, dtype=dtype) * 3
    s = torch.randn(B, K, generator=g, dtype=dtype) * 2
    tm = torch.rand(B, T, generator=g) < p_tok
    dm = torch.rand(B, K, generator=g) < p_doc
    dm[:, 0] = True
    return MarginalizeCase(lp, s, tm, dm)


class TokenSmoothingCase(NamedTuple):
    hidden: torch.Tensor  # [B, K, T, H]
    weight: torch.Tensor  # [V, H]
    doc_scores: torch.Tensor  # [B, K]
    bias: torch.Tensor | None  # [V]
    doc_mask: torch.Tensor | None  # [B, K] bool


def doc_mask_of(B: int, K: int, masked: Iterable[tuple[int, int]] | bool) -> torch.Tensor | None:
    """``[B, K]`` bool mask, False at the ``(b, k)`` pairs in ``masked`` (negative indices
    allowed). ``True``: the default pattern — the last document of query 0, and document 0 of
    query 1 when B > 1 and K > 2. ``False``: None."""
    if masked is False:
        return None
    if masked is True:
        masked = [(0, K - 1)] + ([(1, 0)] if B > 1 and K > 2 else [])
    m = torch.ones(B, K, dtype=torch.bool)
    for b, k in masked:
        m[b, k] = False
    return m


def make_token_smoothing(
    B: int,
    K: int,
    T: int,
    H: int,
    V: int,
    *,
    dtype: torch.dtype = F64,
    score_dtype: torch.dtype | None = None,
    bias: bool = False,
    doc_mask: Iterable[tuple[int, int]] | bool = False,
    hscale: float = 1.0,
    wscale: float = 2.0,
    sscale: float = 1.0,
    bscale: float = 0.5,
    requires_grad: bool = False,
    seed: int = 0,
) -> TokenSmoothingCase:
    """Inputs of ``token_smoothing``: ``hidden ~ N(0, hscale^2)``, ``weight ~ N(0, wscale^2 /
    H)``, scores ``N(0, sscale^2)`` in ``score_dtype`` (default: float64 for float64 inputs,
    else float32), ``bias ~ N(0, bscale^2)``; ``doc_mask`` see :func:`doc_mask_of`. Masked
    documents are *not* poisoned here: use :func:`poisoned` on them."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, K, T, H, generator=g, dtype=F64) * hscale
    w = torch.randn(V, H, generator=g, dtype=F64) / H**0.5 * wscale
    s = torch.randn(B, K, generator=g, dtype=F64) * sscale
    b = torch.randn(V, generator=g, dtype=F64) * bscale if bias else None
    if score_dtype is None:
        score_dtype = F64 if dtype == F64 else torch.float32
    rg = requires_grad
    return TokenSmoothingCase(
        _leaf(_cast(h, dtype), rg),
        _leaf(_cast(w, dtype), rg),
        _leaf(_cast(s, score_dtype), rg),
        _leaf(_cast(b, dtype), rg),
        doc_mask_of(B, K, doc_mask),
    )


class ContrastiveCase(NamedTuple):
    queries: torch.Tensor  # [B, D]
    docs: torch.Tensor  # [M, D]
    positives: torch.Tensor | None  # [B] index, [B, M] bool mask, or None (docs[i] for query i)
    doc_ids: torch.Tensor | None  # [M] int64
    weights: torch.Tensor  # [B] float64 per-query upstream weights in [-0.5, 1.5)


def make_contrastive(
    B: int,
    M: int,
    D: int,
    *,
    dtype: torch.dtype = F64,
    positives: str | None = None,
    doc_ids: bool = False,
    p_pos: float = 0.15,
    requires_grad: bool = False,
    seed: int = 0,
) -> ContrastiveCase:
    """Inputs of ``rk.contrastive_loss``: ``N(0, 1)`` queries and documents; ``positives``
    None (query i's positive is docs[i]), ``"index"`` (random ``[B]`` indices, queries 3 and 5
    sharing one when B > 5) or ``"mask"`` (each pair with probability ``p_pos``, at least one
    per query); ``doc_ids`` draws ids in ``[0, M // 2)`` so that duplicates exist."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g, dtype=F64)
    d = torch.randn(M, D, generator=g, dtype=F64)
    ids = torch.randint(0, max(M // 2, 1), (M,), generator=g) if doc_ids else None
    pos = None
    if positives == "index":
        pos = torch.randint(0, M, (B,), generator=g)
        if B > 5:
            pos[3] = pos[5]  # two queries with the same positive
    elif positives == "mask":
        pos = torch.rand(B, M, generator=g) < p_pos
        pos[torch.arange(B), torch.randint(0, M, (B,), generator=g)] = True
    elif positives is not None:
        raise ValueError(f"positives must be None, 'index' or 'mask', got {positives!r}")
    w = torch.rand(B, generator=g, dtype=F64) * 2 - 0.5
    return ContrastiveCase(
        _leaf(_cast(q, dtype), requires_grad),
        _leaf(_cast(d, dtype), requires_grad),
        pos,
        ids,
        w,
    )


class RagCase(NamedTuple):
    hidden: torch.Tensor  # [B, K, T, H]
    weight: torch.Tensor  # [V, H]
    target: torch.Tensor  # [B, T], IGNORE on the first two (prompt) positions and one pad
    doc_scores: torch.Tensor  # [B, K]
    doc_mask: torch.Tensor  # [B, K] bool, the last document of the last query masked if K > 2


def make_rag(
    B: int,
    K: int,
    T: int,
    H: int,
    V: int,
    *,
    dtype: torch.dtype = F64,
    seed: int = 0,
) -> RagCase:
    """Inputs of ``rk.rag_loss``: ``hidden ~ N(0, 1)``, ``weight ~ N(0, 1 / H)``, scores
    ``N(0, 1)``; targets ignored at positions 0, 1 (prompt) and at query 0's last position
    (padding)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, K, T, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64) / H**0.5
    target = torch.randint(0, V, (B, T), generator=g)
    target[:, :2] = IGNORE  # prompt positions
    target[0, -1] = IGNORE  # padding
    scores = torch.randn(B, K, generator=g, dtype=F64)
    doc_mask = torch.ones(B, K, dtype=torch.bool)
    if K > 2:
        doc_mask[-1, -1] = False
    return RagCase(hidden.to(dtype), weight.to(dtype), target, scores.to(dtype), doc_mask)


def tiny_dataset(*, dev: bool = False):
    """Eight fictional towers and their builders: a corpus, 6 training questions and a test
    split (with ``dev``: a dev split too) for the tiny-random co-training runs of the tests."""
    from rag_kernels.cotrain.data import Dataset, Passage, QAExample

    names = ["Varn", "Hesk", "Dorrow", "Quellen", "Sotha", "Ilva", "Brell", "Maribet"]
    makers = ["Oskar", "Teodor", "Lina", "Mirza", "Pell", "Ruun", "Aska", "Bo"]
    corpus = [
        Passage(f"p{i}", n, f"The tower of {n} was built by {m} in spring.")
        for i, (n, m) in enumerate(zip(names, makers, strict=True))
    ]
    qa = [
        QAExample(f"q{i}", f"Who built the tower of {n}?", [m], [f"p{i}"])
        for i, (n, m) in enumerate(zip(names, makers, strict=True))
    ]
    if dev:
        return Dataset(corpus=corpus, train=qa[:6], dev=qa[5:8], test=qa[6:])
    return Dataset(corpus=corpus, train=qa[:6], dev=[], test=qa[4:])


def tiny_train_config(output_dir, **overrides):
    """A :class:`~rag_kernels.cotrain.training.TrainConfig` for the tiny-random co-training runs
    of the tests: 3 steps of 2 questions × 3 documents at a full learning rate of 1e-3 from the
    first step (no warm-up), every generator parameter trained, short decoding, no progress
    bars; ``overrides`` replace any field."""
    from rag_kernels.cotrain.training import TrainConfig

    base = dict(
        generator="tiny-random",
        retriever="tiny-random",
        steps=3,
        batch_size=2,
        docs=3,
        output_dir=str(output_dir),
        progress=False,
        max_new_tokens=3,
        eval_batch_size=4,
        lr_generator=1e-3,
        lr_retriever=1e-3,
        warmup_steps=0,
        generator_train_layers=-1,
    )
    return TrainConfig(**(base | overrides))


def cli_error_line(capsys, *argv) -> str:
    """Run the CLI; assert exit 2 and exactly one error line, no traceback; return it."""
    from rag_kernels.cotrain.cli import main

    rc = main(list(argv))
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert rc == 2, (rc, out.err)
    assert len(lines) == 1, out.err
    assert lines[0].startswith("rag-kernels: error: "), out.err
    assert "Traceback" not in out.err
    return lines[0]
