"""The fused losses with a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter is a ``DTensor`` holding one rank's slice of dim 0 (for the LM
head ``[V, H]``: ``ceil(V / W)`` rows). FSDP all-gathers a unit's parameters only around
that unit's ``forward``, and reduce-scatters their gradients after its backward. Read
outside the forward, ``model.lm_head.weight`` is the sharded DTensor: the fused ops refuse it
(``TypeError`` naming the argument), since its local rows would give wrong log-probs and a
gather here would be a second full copy that FSDP does not manage.

The pattern: compute everything that reads the root unit's parameters (the embeddings, the
final norm, the LM head) inside **one method that FSDP treats as a forward**
(``torch.distributed.fsdp.register_fsdp_forward_method``). FSDP then unshards the root for
the call, the fused loss reads the whole head as a plain tensor, and the backward
reduce-scatters its gradient as for any forward::

    import rag_kernels as rk
    from rag_kernels.integrations import fsdp

    fsdp.fully_shard_model(model)          # each decoder layer, then the root (head, embeddings)
    loss_fn = rk.hf.fsdp_rag_loss_method(model)   # registered with FSDP
    loss = loss_fn(batch, doc_scores, mode="sequence")   # rk.hf.causal_rag_loss, unsharded head
    loss.backward()   # gradients reduce-scattered, averaged over the W ranks: the gradient
                      # of the mean over the global batch when the ranks' batches are equal

    # anything else that needs the head (rk.generator_feedback, a custom loss):
    step = fsdp.forward_method(model, lambda m, batch: my_loss(m, batch), name="my_loss")

* :func:`fully_shard_model`: ``fully_shard`` on each transformer block (a transformers
  model's ``_no_split_modules`` classes, or the classes given), then on the root.
* :func:`forward_method`: register ``fn(module, *args, **kwargs)`` as an FSDP forward method
  of ``module``; a no-op registration for a module that is not sharded (the same code runs
  with and without FSDP).
* :func:`unsharded`: the root's parameters gathered for a block of no-grad code that calls
  submodules directly (evaluation, decoding), resharded at the end.

Needs nothing beyond torch to import (``torch.distributed`` is imported where used).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator

import torch

from ..ops.validation import is_dtensor

__all__ = ["forward_method", "fully_shard_model", "is_dtensor", "is_sharded", "unsharded"]


def is_sharded(module: object) -> bool:
    """Whether ``module`` is an FSDP2 module (``fully_shard`` was applied to it)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _block_classes(model: torch.nn.Module, layer_classes) -> set[str]:
    if layer_classes is None:
        names = getattr(model, "_no_split_modules", None)
        if not names:
            raise ValueError(
                f"layer_classes: {type(model).__name__} names no transformer blocks "
                "(_no_split_modules); pass the classes (or class names) to shard one by one"
            )
        return set(names)
    if isinstance(layer_classes, (str, type)):
        layer_classes = [layer_classes]
    out = set()
    for c in layer_classes:
        if isinstance(c, type):
            out.add(c.__name__)
        elif isinstance(c, str):
            out.add(c)
        else:
            raise TypeError(f"layer_classes must hold classes or class names, got {c!r}")
    return out


def fully_shard_model(
    model: torch.nn.Module,
    *,
    layer_classes: Iterable[type | str] | type | str | None = None,
    **fully_shard_kwargs,
) -> torch.nn.Module:
    """``fully_shard`` each transformer block of ``model`` (children before parents), then
    ``model`` itself, and return ``model`` (sharded in place, its class now an ``FSDPModule``).

    ``layer_classes``: the block classes (or class names) that become their own FSDP units;
    default the transformers model's ``_no_split_modules`` (``LlamaDecoderLayer``,
    ``BertLayer``, ...). Everything else (the embeddings, the final norm, the LM head, tied
    or not) belongs to the root unit, which :func:`forward_method` unshards.
    ``fully_shard_kwargs`` (``mesh``, ``reshard_after_forward``, ``mp_policy``, ...) go to
    every ``fully_shard`` call. Needs an initialised process group.

    Raises:
        ValueError when no block class is known or none is found in ``model``.
    """
    from torch.distributed.fsdp import fully_shard

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = _block_classes(model, layer_classes)
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"layer_classes: no submodule of {type(model).__name__} is a {sorted(names)}"
        )
    for m in reversed(blocks):  # reverse pre-order: a block's children before the block
        fully_shard(m, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def forward_method(module: torch.nn.Module, fn: Callable, *, name: str = "rk_forward") -> Callable:
    """Attach ``fn`` to ``module`` as the method ``name`` and register it with
    ``torch.distributed.fsdp.register_fsdp_forward_method``; return the method.

    ``module.<name>(*args, **kwargs)`` runs ``fn(module, *args, **kwargs)`` between FSDP's
    pre- and post-forward hooks: the parameters of ``module``'s own unit (for a root: the
    embeddings, final norm and LM head) are plain, whole tensors during the call; the
    gradients that flow back into them through the returned tensors are reduce-scattered by
    FSDP like those of ``forward``. Blocks sharded as their own units unshard around their
    own forwards, as always. For a module that is not an ``FSDPModule`` the registration is a
    no-op and the method just calls ``fn``.

    Call it after ``fully_shard(module)``. Return the tensors that carry gradient (a loss,
    hidden states) from ``fn``, not closures over them: FSDP hooks its backward on the
    outputs.

    Raises:
        TypeError / ValueError for a ``fn`` that is not callable or a ``name`` that is not an
        identifier or would replace an attribute ``module`` already has.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a Python identifier, got {name!r}")
    if hasattr(module, name) and not getattr(getattr(module, name), "_rk_forward_method", False):
        raise ValueError(
            f"name: {type(module).__name__} already has an attribute {name!r}; choose another"
        )

    def method(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    method._rk_forward_method = True
    # an instance attribute, as register_fsdp_forward_method sets its wrapper
    object.__setattr__(module, name, types.MethodType(method, module))
    if torch.distributed.is_available():
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(module, name)
        getattr(module, name).__func__._rk_forward_method = True
    return getattr(module, name)


@contextlib.contextmanager
def unsharded(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module``'s own FSDP unit unsharded (all-gathered) for the block, resharded after;
    a no-op for a module that is not sharded.

    For **no-grad** code that calls submodules directly and so skips the root's forward
    hooks: evaluation and decoding (an encoder-decoder's ``get_encoder()(...)``). The blocks
    sharded as their own units still unshard around their forwards. Under grad the root's
    gradients would bypass FSDP's reduce-scatter: use :func:`forward_method` for training.

    Raises:
        RuntimeError when entered with gradients enabled on a sharded module.
    """
    if not is_sharded(module):
        yield module
        return
    if torch.is_grad_enabled():
        raise RuntimeError(
            "rag_kernels.integrations.fsdp.unsharded is for no-grad code (evaluation): under "
            "grad the root's gradients would skip FSDP's reduce-scatter; compute a training "
            "loss in a forward_method"
        )
    # first through the root's own pre-forward (a registered no-op method): FSDP initialises
    # its state from the root's first forward, and refuses a block run before it
    forward_method(module, _no_op, name="rk_fsdp_unsharded")()
    module.unshard()  # a no-op when the root kept its parameters after that forward
    try:
        yield module
    finally:
        module.reshard()


def _no_op(module: torch.nn.Module) -> None:
    return None


def check_head_in_root(model: torch.nn.Module, what: str) -> None:
    """The output embeddings must belong to ``model``'s own FSDP unit (not a unit of their
    own, whose parameters only a call of that module would unshard)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None and head is not model and is_sharded(head):
        raise ValueError(
            f"{what}: {type(model).__name__}'s output embeddings are an FSDP unit of their own "
            "(fully_shard(model.lm_head)); leave them in the root unit, which the registered "
            "method unshards (rag_kernels.integrations.fsdp.fully_shard_model does)"
        )
    weight = getattr(head, "weight", None)
    if weight is not None and not is_sharded(model) and is_dtensor(weight):
        raise ValueError(
            f"{what}: {type(model).__name__}'s LM head weight is a DTensor but the model "
            "itself is not sharded: fully_shard(model) (the root) after its blocks"
        )


def check_unsharded(model: torch.nn.Module, what: str) -> None:
    """``model``'s embeddings and LM head must be whole tensors here: a DTensor means an FSDP2
    root read outside its forward (the hidden states and the loss would need its gathered
    parameters)."""
    for get in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, get, None)
        emb = fn() if callable(fn) else None
        if is_dtensor(getattr(emb, "weight", None)):
            raise ValueError(
                f"{what}: {type(model).__name__} is sharded by FSDP2 (fully_shard) and called "
                "outside its forward, so its embeddings and LM head are sharded DTensors; "
                "compute the loss with rk.hf.fsdp_rag_loss_method(model), or inside a method "
                "registered by rag_kernels.integrations.fsdp.forward_method"
            )
