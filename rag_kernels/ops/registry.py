"""The op registry: which implementations every op has, which of them load here, which one runs.

Every op folder ``ops/<op>/`` registers itself with :func:`register` and holds one module per
implementation — ``reference.py`` (plain PyTorch, float64-capable, the readable ground truth),
``cpu.py`` (binding of the compiled C++ core, ``rag_kernels.ops._C``) and ``triton.py`` (GPU
kernels; CPU tensors too under ``TRITON_INTERPRET=1``). Kernel modules are imported lazily, the
first time an implementation is asked for, so ``import rag_kernels`` never imports triton.

``impl`` values: ``"triton"``, ``"cpu"``, ``"reference"``, or ``"auto"``: triton on CUDA tensors,
cpu on CPU tensors. Two fallbacks are deliberate and loud, none is silent:

* CPU tensors, C++ extension missing: ``"auto"`` runs the reference and warns once.
* CUDA tensors, Triton kernels not importable: ``"auto"`` raises (the reference materialises
  the ``[N, V]`` logits, an out-of-memory on a real model) with the import error and the fix;
  pass ``impl="reference"`` to run it anyway. Ops without a fused kernel worth the name on a
  dtype (e.g. float64 contrastive) choose the reference explicitly through ``auto_reference``.

:func:`launcher_op` registers a Triton host launcher as an opaque torch op
(``torch.ops.rag_kernels.<op>_<phase>_triton``), so ``torch.compile`` traces the Triton path
without a graph break (docs/design.md §4.2).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from types import ModuleType

import torch

IMPLS = ("auto", "triton", "cpu", "reference")
KERNEL_IMPLS = ("reference", "cpu", "triton")

_C = None
_C_ERROR: str | None = None
try:
    _C = importlib.import_module("rag_kernels.ops._C")  # registers torch.ops.rag_kernels.*
except Exception as exc:  # ImportError, or an ABI mismatch surfacing as OSError
    _C = None
    _C_ERROR = f"{type(exc).__name__}: {exc}"

_warned_fallback = False


def cpu_available() -> bool:
    """True when the compiled C++ extension (``rag_kernels.ops._C``) loaded."""
    return _C is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class _Op:
    package: str  # e.g. "rag_kernels.ops.linear_logprob"
    impls: tuple[str, ...]
    modules: dict[str, ModuleType] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


_OPS: dict[str, _Op] = {}


def register(name: str, package: str, impls: tuple[str, ...] = KERNEL_IMPLS) -> str:
    """Declare op ``name`` whose implementation modules are ``<package>.<impl>``."""
    bad = [i for i in impls if i not in KERNEL_IMPLS]
    if bad or "reference" not in impls:
        raise ValueError(
            f"impls must include 'reference' and name only {KERNEL_IMPLS}, got {impls}"
        )
    _OPS[name] = _Op(package, tuple(impls))
    return name


def _op(name: str) -> _Op:
    if name not in _OPS:
        raise ValueError(f"unknown op {name!r}; registered ops: {sorted(_OPS)}")
    return _OPS[name]


def _import(module: str) -> str | None:
    """Import ``module``: None, or why it failed (triton missing, a broken install).

    Under ``torch.compile`` dynamo calls this eagerly while tracing and keeps its (constant)
    result: ``importlib`` cannot be traced, and this way the first call of an op may come from
    inside a compiled ``fullgraph=True`` function. The mark is what
    ``torch.compiler.assume_constant_result`` sets, set directly so that ``import
    rag_kernels`` does not import ``torch._dynamo``.
    """
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


_import._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _load(name: str, impl: str) -> ModuleType | None:
    """The kernel module, or None (reason in ``errors``) when it cannot run in this process."""
    op = _op(name)
    if impl in op.modules:
        return op.modules[impl]
    if impl in op.errors:
        return None
    if impl not in op.impls:
        op.errors[impl] = f"op {name!r} has no {impl!r} implementation"
        return None
    if impl == "cpu" and _C is None:
        op.errors[impl] = f"the C++ extension did not load ({_C_ERROR})"
        return None
    error = _import(f"{op.package}.{impl}")
    if error is not None:
        op.errors[impl] = f"importing {op.package}.{impl} failed: {error}"
        return None
    mod = getattr(sys.modules[op.package], impl)  # an attribute of its package once imported
    if impl == "cpu" and not mod.available():
        op.errors[impl] = (
            f"the C++ extension does not register {name!r}: rebuild it with "
            "`pip install --no-build-isolation -e .`"
        )
        return None
    op.modules[impl] = mod
    return mod


def unavailable_reason(name: str, impl: str) -> str | None:
    """Why ``impl`` of op ``name`` cannot run here (None when it can)."""
    if impl == "triton" and not (torch.cuda.is_available() or triton_interpret()):
        return "triton needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)"
    if _load(name, impl) is None:
        return _op(name).errors[impl]
    return None


def available_impls(name: str) -> tuple[str, ...]:
    """The implementations of op ``name`` that can run in this process, e.g.
    ``("reference", "cpu")`` on a CPU machine with the C++ extension built; ``"triton"`` appears
    with a CUDA device (or under ``TRITON_INTERPRET=1``) and an importable triton."""
    return tuple(i for i in _op(name).impls if unavailable_reason(name, i) is None)


def ops() -> tuple[str, ...]:
    """Names of the registered ops."""
    return tuple(_OPS)


def resolve(name: str, impl: str, ref: torch.Tensor, *, auto_reference: bool = False) -> str:
    """The concrete implementation of op ``name`` for tensors on ``ref``'s device.

    ``auto_reference``: the op's own judgement that the reference is the right choice for these
    inputs under ``impl="auto"`` (for example float64, which its fused kernels do not take).
    """
    global _warned_fallback
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    op = _op(name)
    if impl == "auto":
        if auto_reference:
            return "reference"
        if ref.is_cuda:
            if "triton" not in op.impls:
                return "reference"
            if _load(name, "triton") is None:
                raise RuntimeError(
                    f"rag_kernels: {name} on CUDA tensors needs its Triton kernels, which cannot "
                    f"be used: {op.errors['triton']}. Install triton (`pip install triton`, the "
                    "version your torch pins), or pass impl='reference' to run the materialising "
                    "PyTorch reference (it stores the full logits: slow and memory-hungry)."
                )
            return "triton"
        if "cpu" in op.impls and _load(name, "cpu") is not None:
            return "cpu"
        if "cpu" in op.impls and not _warned_fallback:
            _warned_fallback = True
            warnings.warn(
                f"rag_kernels: the compiled CPU kernels are not available ({op.errors['cpu']}); "
                "falling back to the reference implementation. Reinstall with "
                "`pip install --no-build-isolation -e .` to build them.",
                RuntimeWarning,
                stacklevel=4,
            )
        return "reference"
    if impl == "reference":
        return impl
    if impl not in op.impls:
        raise ValueError(f"impl={impl!r} is not implemented for {name}; use 'reference' or 'auto'")
    if impl == "cpu" and ref.is_cuda:
        raise ValueError(f"impl='cpu' needs CPU tensors, got tensors on {ref.device}")
    if impl == "triton" and not ref.is_cuda and not triton_interpret():
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got {ref.device}); on CPU set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter"
        )
    if _load(name, impl) is None:
        raise RuntimeError(f"impl={impl!r} requested for {name} but {op.errors[impl]}")
    return impl


def kernels(name: str, impl: str) -> ModuleType:
    """The kernel module of a resolved implementation (``reference``, ``cpu`` or ``triton``)."""
    mod = _load(name, impl)
    if mod is None:
        raise RuntimeError(f"impl={impl!r} of {name} cannot be used: {_op(name).errors[impl]}")
    return mod


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Kernel launches on ``t``'s GPU: Triton launches on the *current* device, which under
    torchrun is GPU 0 for every rank unless the caller set it; the ops never rely on that."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _NotDifferentiableAgain(torch.autograd.Function):
    """Identity on a fused op's gradients, attached to the op's inputs (see
    :func:`first_order_only`); its backward raises."""

    @staticmethod
    def forward(ctx, op, n, *tensors):
        ctx.op = op
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"{ctx.op}: the fused kernels' gradients are not differentiable again (a "
            "higher-order gradient reached a backward that ran with create_graph=True); use "
            "impl='reference' for higher-order gradients"
        )


def first_order_only(op: str, grads: tuple, sources: tuple) -> tuple:
    """The gradients an op's autograd shell returns: as they are, or, when its backward runs
    with ``create_graph=True``, behind a node that depends on ``sources`` (the op's inputs and
    upstream gradients) and raises if a higher-order gradient reaches it. The kernels'
    gradients are computed, not traced (their backward runs under ``no_grad``): without the
    node a higher-order gradient through them would be silently missing."""
    if not torch.is_grad_enabled():
        return grads
    src = [t for t in sources if isinstance(t, torch.Tensor) and t.requires_grad]
    at = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not src or not at:
        return grads
    marked = _NotDifferentiableAgain.apply(op, len(at), *(grads[i].detach() for i in at), *src)
    out = list(grads)
    for i, g in zip(at, marked, strict=True):
        out[i] = g
    return tuple(out)


LIBRARY = "rag_kernels"  # the torch op namespace of the C++ ops and the Triton launchers


def launcher_op(name: str):
    """Register a Triton host launcher as the opaque torch op ``rag_kernels::<name>``.

    Decorator for a function annotated with torch types (the schema is inferred from them,
    ``mutates_args=()``: the launcher allocates its outputs and never writes its inputs).
    Returns ``torch.library.custom_op``'s op object; the op module registers its fake
    (output shapes and dtypes from input shapes) next to it with ``@op.register_fake``, and
    calls it as ``torch.ops.rag_kernels.<name>``.

    Why an opaque ``custom_op`` (docs/design.md §4.2): ``torch.compile`` then records one graph
    node per launch and never traces the launcher's body, so everything in it that needs real
    sizes or values (block sizes, ``bit_length`` autotune buckets, grids, chunk loops, the
    active-row partition, the SM count) runs on real tensors, also under ``dynamic=True``.
    The body runs under :func:`device_guard` of its first tensor argument.
    """
    qualname = f"{LIBRARY}::{name}"

    def wrap(fn):
        schema = torch.library.infer_schema(fn, mutates_args=())

        @functools.wraps(fn)
        def launch(*args, **kwargs):
            ref = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            with device_guard(ref):
                return fn(*args, **kwargs)

        return torch.library.custom_op(qualname, launch, mutates_args=(), schema=schema)

    return wrap
