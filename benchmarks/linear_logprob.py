"""Fused LM-head log-prob vs the alternatives: ``python -m benchmarks.linear_logprob [--device cuda]``.

Every provider computes the per-row target log-prob (or its negation, the per-row loss) of
``hidden [N, H] @ weight[V, H]^T`` for targets ``[N]``:

* ``naive``: ``logits = h @ W.T``; ``-F.cross_entropy(logits, y, reduction="none")``.
* ``torch_lce``: ``F.linear_cross_entropy(h, W, y, reduction="none",
  options=torch.nn.LinearCrossEntropyOptions())`` (torch >= 2.13's chunked path, default options).
* ``cce``: Cut Cross-Entropy ``linear_cross_entropy(h, W, y, reduction="none")`` with
  ``impl="torch_compile"`` on CPU and ``impl="cce"`` (its Triton kernels, default gradient
  filtering) on CUDA. Install with ``pip install --no-deps cut-cross-entropy``.
* ``cce_exact``: the same on CUDA with ``filter_eps=None`` (no gradient filtering: exact, as
  ``rk_fused`` is). CUDA only.
* ``liger``: Liger-Kernel's fused linear cross-entropy, CUDA only, ``reduction="none"``
  (Liger >= 0.8.5 folds the per-row upstream gradient into a backward that recomputes the
  logits; older versions applied it as a scalar: the weighted backward is timed, not checked).
* ``rk_fused``: ``rk.linear_logprob(impl="cpu")`` on CPU, ``impl="triton"`` on CUDA.
* ``rk_fused_atomic``: ``impl="triton"`` with the ``"atomic"`` backward (one kernel, fp32
  atomics into dh / dW) instead of the default ``"deterministic"`` one; CUDA only. Chosen by
  the op's ``triton_backward`` keyword where it has one, else ``RAG_KERNELS_TRITON_BACKWARD``
  set around each timed call.
* ``rk_reference``: ``rk.linear_logprob(impl="reference")`` (materialises the logits).
* ``gemm_floor`` (CPU only): not an op, a yardstick (``benchmarks.harness.gemm_floor``, as in
  ``benchmarks.rag_loss``): the ``[N, H] x [H, V]``-sized matmuls alone that an exact method
  keeping no logits runs (fwd: the logits; fwd+bwd: the logits, then in the backward the
  logits again, ``dh`` and ``dW``), in vocabulary tiles of 2048, no epilogue. Naive runs three
  of these four; ``gemm_floor / naive`` shows where the fourth costs more than naive's
  softmax passes over its logits.
* ``rk_gemm_floor``, ``rk_gemm_floor_bf16`` (CPU only): not ops, yardsticks for ``rk_fused`` /
  ``rk_fused_bf16``: the C++ kernel's own GEMM machinery without its epilogues
  (``rag_kernels.ops.linear_logprob.cpu.gemm_floor``: the same GEMM path, tiles, threads,
  packing and ``dz`` / ``dW`` layouts, no softmax or log-sum-exp), fp32 and bf16 inputs. Their
  ratio is what the bf16 GEMMs alone gain over fp32 on this CPU, so ``rk_fused_bf16 / rk_fused``
  can be read against it.
* ``naive_bf16``, ``rk_fused_bf16`` (CPU only; the CUDA cases are bf16 already): ``naive`` and
  ``rk_fused`` on bf16 inputs (``hidden``, ``weight``), in the same run as the fp32 providers, so
  ``rk_fused_bf16 / rk_fused`` is a side-by-side ratio. The row's ``bf16_gemm`` column says
  whether the C++ kernel ran native bf16 GEMMs (``native``) or converted its tiles to fp32
  (``converted``: no native bf16 matmul, or ``--emulate-avx2``).

Modes: ``fwd`` (forward only, inputs require grad as in training, so tensors saved for
backward count in peak memory) and ``fwd+bwd`` (``torch.autograd.grad`` of the output with a
fixed non-uniform upstream gradient ``torch.rand(N)`` w.r.t. hidden and weight).
Shapes: CPU N=2048, H=576, V=49152 fp32 (SmolLM2-135M head); CUDA N in {4096, 16384} x
H in {2048, 4096} x V in {32000, 128256} bf16. ``tflops`` counts 2NHV (fwd) / 8NHV (fwd+bwd).
``--emulate-avx2`` (benchmarks/harness.py) measures an AVX2-only CPU's code paths on an
AVX-512 one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import itertools
import os
import sys

from benchmarks.harness import Benchmark, Case, Provider, Unavailable, gemm_floor
from benchmarks.plot import plot_csv

MODES = ("fwd", "fwd+bwd")


def _inputs(case: Case):
    import torch

    N, H, V = case.shape["N"], case.shape["H"], case.shape["V"]
    dev, dt = case.device, case.torch_dtype
    hidden = torch.randn(N, H, device=dev, dtype=dt).requires_grad_(True)
    # std 1/sqrt(H): logits of order 1, as in a trained head.
    weight = (torch.randn(V, H, device=dev, dtype=dt) * H**-0.5).requires_grad_(True)
    target = torch.randint(0, V, (N,), device=dev)
    grad = torch.rand(N, device=dev, dtype=torch.float32)
    return hidden, weight, target, grad


def _timed(case: Case, forward):
    """Wrap ``forward(hidden, weight, target) -> [N]`` into the timed call for ``case.mode``."""
    import torch

    hidden, weight, target, grad = _inputs(case)
    if case.mode == "fwd":
        return lambda: forward(hidden, weight, target)

    def fwd_bwd():
        out = forward(hidden, weight, target)
        g = grad if grad.dtype == out.dtype else grad.to(out.dtype)
        return torch.autograd.grad(out, (hidden, weight), g)

    return fwd_bwd


# ----------------------------------------------------------------------------- providers


def _setup_naive(case: Case):
    import torch.nn.functional as F

    return _timed(case, lambda h, w, y: -F.cross_entropy(h @ w.T, y, reduction="none"))


def _torch_lce_available(case: Case) -> str | None:
    import torch
    import torch.nn.functional as F

    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy with options"
    return None


def _setup_torch_lce(case: Case):
    import torch
    import torch.nn.functional as F

    opts = torch.nn.LinearCrossEntropyOptions()
    return _timed(
        case, lambda h, w, y: F.linear_cross_entropy(h, w, y, reduction="none", options=opts)
    )


def _cce_available(case: Case) -> str | None:
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return "cut_cross_entropy not installed (pip install --no-deps cut-cross-entropy)"
    return None


def _setup_cce(case: Case):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:
        raise Unavailable(f"cut_cross_entropy import failed: {exc}") from exc
    impl = "cce" if case.device.startswith("cuda") else "torch_compile"
    return _timed(case, lambda h, w, y: linear_cross_entropy(h, w, y, reduction="none", impl=impl))


def _cce_exact_available(case: Case) -> str | None:
    if not case.device.startswith("cuda"):
        return "CUDA only (filter_eps applies to CCE's Triton kernels)"
    return _cce_available(case)


def _setup_cce_exact(case: Case):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:
        raise Unavailable(f"cut_cross_entropy import failed: {exc}") from exc
    return _timed(
        case,
        lambda h, w, y: linear_cross_entropy(
            h, w, y, reduction="none", impl="cce", filter_eps=None
        ),
    )


def _liger_available(case: Case) -> str | None:
    if not case.device.startswith("cuda"):
        return "Liger-Kernel runs on CUDA only"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel not installed"
    return None


def _setup_liger(case: Case):
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as exc:
        raise Unavailable(f"liger_kernel import failed: {exc}") from exc

    def forward(h, w, y):
        out = liger_fused_linear_cross_entropy(h, w, y, reduction="none")
        return out[0] if isinstance(out, tuple) else out

    return _timed(case, forward)


def _rk_impl(case: Case) -> str:
    return "triton" if case.device.startswith("cuda") else "cpu"


def _rk_fused_available(case: Case) -> str | None:
    import rag_kernels as rk

    impl = _rk_impl(case)
    have = rk.available_impls("linear_logprob")
    if impl not in have:
        return f"rag_kernels.linear_logprob(impl={impl!r}) cannot run here; available: {list(have)}"
    return None


def _setup_rk(impl: str | None):
    def setup(case: Case):
        import rag_kernels as rk

        use = impl or _rk_impl(case)
        return _timed(case, lambda h, w, y: rk.linear_logprob(h, w, y, impl=use))

    return setup


def _cpu_only(case: Case) -> str | None:
    return None if case.device == "cpu" else "CPU only: the CUDA cases are bf16 already"


def _cpu_kernel_available(case: Case) -> str | None:
    return _cpu_only(case) or _rk_fused_available(case)


_BACKWARD_ENV = "RAG_KERNELS_TRITON_BACKWARD"


def _rk_atomic_available(case: Case) -> str | None:
    if not case.device.startswith("cuda"):
        return "CUDA only (the atomic variant is a Triton backward)"
    return _rk_fused_available(case)


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _setup_rk_atomic(case: Case):
    import rag_kernels as rk

    if "triton_backward" in inspect.signature(rk.linear_logprob).parameters:
        return _timed(
            case,
            lambda h, w, y: rk.linear_logprob(h, w, y, impl="triton", triton_backward="atomic"),
        )
    fn = _timed(case, lambda h, w, y: rk.linear_logprob(h, w, y, impl="triton"))

    def call():  # the kernels read the variable at each (forward and backward) call
        with _env(_BACKWARD_ENV, "atomic"):
            return fn()

    return call


def _setup_rk_gemm_floor(case: Case):
    from rag_kernels.ops.linear_logprob import cpu

    hidden, weight, _, _ = _inputs(case)
    h, w = hidden.detach(), weight.detach()
    return lambda: cpu.gemm_floor(h, w, backward=case.mode != "fwd")


def _setup_gemm_floor(case: Case):
    hidden, weight, _, _ = _inputs(case)
    h, w = hidden.detach(), weight.detach()
    return lambda: gemm_floor(h, w, backward=case.mode != "fwd")


PROVIDERS = [
    Provider("naive", _setup_naive),
    Provider("torch_lce", _setup_torch_lce, _torch_lce_available),
    Provider("cce", _setup_cce, _cce_available),
    Provider("cce_exact", _setup_cce_exact, _cce_exact_available),
    Provider("liger", _setup_liger, _liger_available),
    Provider("rk_fused", _setup_rk(None), _rk_fused_available),
    Provider("rk_fused_atomic", _setup_rk_atomic, _rk_atomic_available),
    Provider("rk_reference", _setup_rk("reference")),
    Provider("naive_bf16", _setup_naive, _cpu_only, dtype="bfloat16"),
    Provider("rk_fused_bf16", _setup_rk(None), _cpu_kernel_available, dtype="bfloat16"),
    Provider("gemm_floor", _setup_gemm_floor, _cpu_only),
    Provider("rk_gemm_floor", _setup_rk_gemm_floor, _cpu_kernel_available),
    Provider("rk_gemm_floor_bf16", _setup_rk_gemm_floor, _cpu_kernel_available, dtype="bfloat16"),
]


def cases(args) -> list[Case]:
    if args.device == "cuda":
        shapes = (
            [(256, 128, 1000)]
            if args.quick
            else list(itertools.product((4096, 16384), (2048, 4096), (32000, 128256)))
        )
        dtype = "bfloat16"
    else:
        shapes = [(67, 33, 517)] if args.quick else [(2048, 576, 49152)]
        dtype = "float32"
    return [
        Case({"N": n, "H": h, "V": v}, mode, args.device, dtype)
        for n, h, v in shapes
        for mode in MODES
    ]


def flops(case: Case) -> float:
    n, h, v = case.shape["N"], case.shape["H"], case.shape["V"]
    return (2.0 if case.mode == "fwd" else 8.0) * n * h * v


BENCH = Benchmark(
    op="linear_logprob",
    module="benchmarks.linear_logprob",
    providers=PROVIDERS,
    cases=cases,
    flops=flops,
    baseline="naive",
    description=__doc__.split("\n")[0],
    plot=plot_csv,
)

if __name__ == "__main__":
    sys.exit(BENCH.main())
