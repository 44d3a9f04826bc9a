"""Contrastive loss, naive vs fused: ``python -m benchmarks.contrastive [--device cuda]``.

Every provider computes the per-query InfoNCE loss of ``B`` queries against ``M`` candidates
(query i's positive is candidate i), cosine similarity, scale 20:

* ``naive``: ``S = normalize(q) @ normalize(d).T * 20``; ``F.cross_entropy(S, arange(B),
  reduction="none")`` (materialises ``[B, M]``, as sentence-transformers' MNRL does).
* ``rk_fused``: ``rk contrastive_loss(impl="cpu")`` on CPU, ``impl="triton"`` on CUDA
  (streams score tiles, never stores ``[B, M]``).
* ``rk_reference``: ``contrastive_loss(impl="reference")`` (materialising, readable).

Modes: ``fwd`` (inputs require grad as in training) and ``fwd+bwd`` (``torch.autograd.grad``
of the per-query losses with a fixed non-uniform upstream gradient ``torch.rand(B)`` w.r.t.
queries and docs). Shapes: CPU B=M in {1024, 4096, 8192}, D=384, fp32; CUDA B=M in
{8192, 32768, 65536}, D=768, bf16. ``tflops`` counts 2BMD (fwd) / 8BMD (fwd+bwd: the
fused kernels recompute the scores once; the naive path does 6BMD).
"""

from __future__ import annotations

import sys

from benchmarks.harness import Benchmark, Case, Provider
from benchmarks.plot import plot_csv

MODES = ("fwd", "fwd+bwd")
SCALE = 20.0


def _timed(case: Case, forward):
    """Wrap ``forward(q, d) -> [B]`` into the timed call for ``case.mode``."""
    import torch

    B, M, D = case.shape["B"], case.shape["M"], case.shape["D"]
    dev, dt = case.device, case.torch_dtype
    q = torch.randn(B, D, device=dev, dtype=dt).requires_grad_(True)
    d = torch.randn(M, D, device=dev, dtype=dt).requires_grad_(True)
    grad = torch.rand(B, device=dev, dtype=torch.float32)
    if case.mode == "fwd":
        return lambda: forward(q, d)

    def fwd_bwd():
        out = forward(q, d)
        return torch.autograd.grad(out, (q, d), grad.to(out.dtype))

    return fwd_bwd


def _setup_naive(case: Case):
    import torch
    import torch.nn.functional as F

    def forward(q, d):
        S = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T * SCALE
        target = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(S.float(), target, reduction="none")

    return _timed(case, forward)


def _rk_impl(case: Case) -> str:
    return "triton" if case.device.startswith("cuda") else "cpu"


def _rk_fused_available(case: Case) -> str | None:
    import rag_kernels as rk

    impl = _rk_impl(case)
    have = rk.available_impls("contrastive")
    if impl not in have:
        return f"rk.contrastive_loss(impl={impl!r}) cannot run here; available: {list(have)}"
    return None


def _setup_rk(impl: str | None):
    def setup(case: Case):
        import rag_kernels as rk

        use = impl or _rk_impl(case)
        return _timed(
            case, lambda q, d: rk.contrastive_loss(q, d, scale=SCALE, reduction="none", impl=use)
        )

    return setup


PROVIDERS = [
    Provider("naive", _setup_naive),
    Provider("rk_fused", _setup_rk(None), _rk_fused_available),
    Provider("rk_reference", _setup_rk("reference")),
]


def cases(args) -> list[Case]:
    if args.device == "cuda":
        sizes, D, dtype = ([512] if args.quick else [8192, 32768, 65536]), 768, "bfloat16"
    else:
        sizes, D, dtype = ([129] if args.quick else [1024, 4096, 8192]), 384, "float32"
    return [
        Case({"B": n, "M": n, "D": D}, mode, args.device, dtype) for n in sizes for mode in MODES
    ]


def flops(case: Case) -> float:
    b, m, d = case.shape["B"], case.shape["M"], case.shape["D"]
    return (2.0 if case.mode == "fwd" else 8.0) * b * m * d


BENCH = Benchmark(
    op="contrastive",
    module="benchmarks.contrastive",
    providers=PROVIDERS,
    cases=cases,
    flops=flops,
    baseline="naive",
    description=__doc__.split("\n")[0],
    plot=plot_csv,
)

if __name__ == "__main__":
    sys.exit(BENCH.main())
