"""RAG generator loss from hidden states vs transformers' ``get_nll``: ``python -m benchmarks.rag_loss``.

Inputs: ``hidden [B*K, T, H]``, LM-head ``weight [V, H]``, ``doc_scores [B, K]`` (all
requiring grad), ``target [B, T]`` (BOS first, odd queries padded over their last quarter).
Every mode is fwd+bwd: ``torch.autograd.grad`` of the ``[B]`` loss (``reduce_loss=False``)
with a fixed non-uniform upstream gradient ``torch.rand(B)`` w.r.t. hidden, weight and
doc_scores. Modes: ``sequence_eps0``, ``sequence_eps0.1``, ``token_eps0``, ``token_eps0.1``.

Providers:

* ``hf_get_nll``: the real ``RagSequenceForGeneration.get_nll`` /
  ``RagTokenForGeneration.get_nll`` from transformers, called unbound with a stand-in ``self``
  (``config.n_docs``, ``config.bos_token_id``, ``config.generator.pad_token_id/bos_token_id``;
  the token class's ``marginalize`` bound to it) on materialised logits
  ``hidden @ weight.T`` of shape ``[B*K, T, V]``.
* ``rk_reference``: ``rk.hf.rag_sequence_get_nll`` / ``rag_token_get_nll`` with
  ``impl="reference"``.
* ``rk_fused``: the same with ``impl="auto"`` (C++ on CPU, Triton on CUDA), unavailable
  (not silently the reference) where those kernels do not load.
* ``gemm_floor``: not a loss, a yardstick. The four ``[rows, H] x [H, V]``-sized matmuls
  any exact method that never keeps the ``[rows, V]`` logits performs (forward logits for
  the log-sum-exp; backward: the logits again, ``dh``, ``dW``), over the rows that take part
  (shifted target not padding), in vocab tiles of 2048 with torch's own threading and no
  epilogue. ``rk_fused / gemm_floor`` is the fused path's overhead; ``gemm_floor /
  hf_get_nll`` is the best ratio an exact logits-free path can reach on the machine.
* ``cce_marginalize`` (CUDA, epsilon = 0 only: CCE has no per-row sum of log-probs):
  Cut Cross-Entropy ``reduction="none"`` per-row log-probs, then the RAG marginalisation in
  plain torch (the doc prior is added whenever shifted position 1 is not padding, as HF does).

Shapes: CPU B=2, K=8, T=128, H=576, V=49152 fp32; CUDA B=8, K=8, T=256, H=4096, V=128256
bf16. ``tflops`` counts the LM head only, 8·(B·K·T)·H·V.
"""

from __future__ import annotations

import importlib.util
import sys
import types

from benchmarks.harness import Benchmark, Case, Provider, Unavailable, gemm_floor
from benchmarks.plot import plot_csv

PAD, BOS = 2, 1
MODES = ("sequence_eps0", "sequence_eps0.1", "token_eps0", "token_eps0.1")


def _parse_mode(mode: str) -> tuple[str, float]:
    kind, eps = mode.split("_eps")
    return kind, float(eps)


def _inputs(case: Case):
    import torch

    s = case.shape
    B, K, T, H, V = s["B"], s["K"], s["T"], s["H"], s["V"]
    dev, dt = case.device, case.torch_dtype
    hidden = torch.randn(B * K, T, H, device=dev, dtype=dt).requires_grad_(True)
    weight = (torch.randn(V, H, device=dev, dtype=dt) * H**-0.5).requires_grad_(True)
    doc_scores = torch.randn(B, K, device=dev, dtype=dt).requires_grad_(True)
    target = torch.randint(3, V, (B, T), device=dev)
    target[:, 0] = BOS
    target[1::2, T - T // 4 :] = PAD
    grad = torch.rand(B, device=dev, dtype=torch.float32)
    return hidden, weight, doc_scores, target, grad


def _shifted(target):
    """transformers' labels: the token each position predicts, PAD after the last."""
    import torch

    return torch.cat([target[:, 1:], torch.full_like(target[:, :1], PAD)], dim=1)


def _timed(case: Case, loss_fn):
    """``loss_fn(hidden, weight, doc_scores, target, kind, eps) -> [B]`` → the fwd+bwd call."""
    import torch

    hidden, weight, doc_scores, target, grad = _inputs(case)
    kind, eps = _parse_mode(case.mode)

    def fwd_bwd():
        loss = loss_fn(hidden, weight, doc_scores, target, kind, eps)
        g = grad if grad.dtype == loss.dtype else grad.to(loss.dtype)
        return torch.autograd.grad(loss, (hidden, weight, doc_scores), g)

    return fwd_bwd


# ----------------------------------------------------------------------------- providers


def _hf_available(case: Case) -> str | None:
    if importlib.util.find_spec("transformers") is None:
        return "transformers not installed"
    return None


def _setup_hf(case: Case):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.models.rag.modeling_rag import (
            RagSequenceForGeneration,
            RagTokenForGeneration,
        )
    except Exception as exc:
        raise Unavailable(f"transformers RAG import failed: {exc}") from exc
    K = case.shape["K"]
    stub = types.SimpleNamespace(
        config=types.SimpleNamespace(
            n_docs=K,
            bos_token_id=None,
            generator=types.SimpleNamespace(pad_token_id=PAD, bos_token_id=BOS),
        )
    )
    stub.marginalize = types.MethodType(RagTokenForGeneration.marginalize, stub)

    def loss_fn(hidden, weight, doc_scores, target, kind, eps):
        logits = hidden @ weight.T  # [B*K, T, V]
        cls = RagSequenceForGeneration if kind == "sequence" else RagTokenForGeneration
        return cls.get_nll(
            stub, logits, doc_scores, target, reduce_loss=False, epsilon=eps, n_docs=K
        )

    return _timed(case, loss_fn)


def _rk_hf_available(case: Case) -> str | None:
    if importlib.util.find_spec("rag_kernels.integrations.hf") is None:
        return "rag_kernels.integrations.hf not available yet"
    return None


def _rk_fused_available(case: Case) -> str | None:
    """``impl="auto"`` falls back to the reference where no fused kernel runs: refuse, so that a
    missing C++ build (or GPU kernel) is never timed under the fused provider's name."""
    import rag_kernels as rk

    need = "triton" if case.device.startswith("cuda") else "cpu"
    for op in ("linear_logprob", "token_smoothing", "marginalize"):
        have = rk.available_impls(op)
        if need not in have:
            return f"rag_kernels {op}(impl={need!r}) cannot run here; available: {list(have)}"
    return _rk_hf_available(case)


def _setup_rk(impl: str):
    def setup(case: Case):
        from rag_kernels import hf

        K = case.shape["K"]

        def loss_fn(hidden, weight, doc_scores, target, kind, eps):
            if kind == "sequence":
                return hf.rag_sequence_get_nll(
                    hidden, weight, doc_scores, target, pad_token_id=PAD, bos_token_id=BOS,
                    epsilon=eps, n_docs=K, impl=impl,
                )  # fmt: skip
            return hf.rag_token_get_nll(
                hidden, weight, doc_scores, target, pad_token_id=PAD, epsilon=eps, n_docs=K,
                impl=impl,
            )  # fmt: skip

        return _timed(case, loss_fn)

    return setup


def _cce_marg_available(case: Case) -> str | None:
    if not case.device.startswith("cuda"):
        return "CUDA only (CCE's CPU path is torch.compile, covered by benchmarks.linear_logprob)"
    if _parse_mode(case.mode)[1] != 0:
        return "CCE returns no per-row sum of log-probs, so label smoothing is not expressible"
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return "cut_cross_entropy not installed (pip install --no-deps cut-cross-entropy)"
    return None


def _setup_cce_marg(case: Case):
    import torch

    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:
        raise Unavailable(f"cut_cross_entropy import failed: {exc}") from exc
    s = case.shape
    B, K, T, H = s["B"], s["K"], s["T"], s["H"]

    def loss_fn(hidden, weight, doc_scores, target, kind, eps):
        tgt = _shifted(target)
        keep = tgt != PAD
        y = tgt.masked_fill(~keep, -100)[:, None, :].expand(B, K, T).reshape(-1)
        nll = linear_cross_entropy(hidden.reshape(-1, H), weight, y, reduction="none", impl="cce")
        lp = -nll.float().view(B, K, T)  # ignored rows are 0
        log_prior = torch.log_softmax(doc_scores.float(), dim=1)
        if kind == "sequence":
            prior = torch.where(keep[:, 1:2], log_prior, torch.zeros_like(log_prior))
            return -torch.logsumexp(lp.sum(-1) + prior, dim=1)
        lse = torch.logsumexp(log_prior[:, :, None] + lp, dim=1)  # [B, T]
        return -(lse * keep).sum(-1)

    return _timed(case, loss_fn)


def _setup_gemm_floor(case: Case):
    """The matmuls alone (``benchmarks.harness.gemm_floor``) over the rows that take part."""
    hidden, weight, _, target, _ = _inputs(case)
    B, K, T, H = (case.shape[d] for d in "BKTH")
    rows = (_shifted(target) != PAD)[:, None, :].expand(B, K, T).reshape(-1).nonzero().squeeze(1)
    h2, w2 = hidden.detach().reshape(-1, H), weight.detach()
    return lambda: gemm_floor(h2.index_select(0, rows), w2)


PROVIDERS = [
    Provider("hf_get_nll", _setup_hf, _hf_available),
    Provider("rk_reference", _setup_rk("reference"), _rk_hf_available),
    Provider("rk_fused", _setup_rk("auto"), _rk_fused_available),
    Provider("cce_marginalize", _setup_cce_marg, _cce_marg_available),
    Provider("gemm_floor", _setup_gemm_floor),
]


def cases(args) -> list[Case]:
    if args.device == "cuda":
        shape = (2, 3, 9, 64, 1000) if args.quick else (8, 8, 256, 4096, 128256)
        dtype = "bfloat16"
    else:
        shape = (2, 3, 9, 17, 101) if args.quick else (2, 8, 128, 576, 49152)
        dtype = "float32"
    dims = dict(zip("BKTHV", shape, strict=True))
    return [Case(dims, mode, args.device, dtype) for mode in MODES]


def flops(case: Case) -> float:
    s = case.shape
    return 8.0 * s["B"] * s["K"] * s["T"] * s["H"] * s["V"]


BENCH = Benchmark(
    op="rag_loss",
    module="benchmarks.rag_loss",
    providers=PROVIDERS,
    cases=cases,
    flops=flops,
    baseline="hf_get_nll",
    description=__doc__.split("\n")[0],
    plot=plot_csv,
)

if __name__ == "__main__":
    sys.exit(BENCH.main())
