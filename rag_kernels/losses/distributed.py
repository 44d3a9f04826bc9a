"""Distributed and memory-saving training helpers (``rk.distributed``).

* :func:`all_gather_with_grad`, :func:`world_info` — the collectives of
  :mod:`rag_kernels.ops.distributed`, re-exported (gradient scale documented there).
* :func:`grad_cache_step` — GradCache (Gao et al., 2021): a contrastive step over a batch
  too large to encode with graph at once, equal to the full-batch gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..ops.distributed import all_gather_no_grad, all_gather_with_grad, world_info

__all__ = ["all_gather_with_grad", "all_gather_no_grad", "grad_cache_step", "world_info"]


# ----------------------------------------------------------------------------- GradCache


def _split(batch: Any, chunk_size: int) -> list[Any]:
    """Split a tensor, a mapping of tensors (e.g. tokenizer output) or a list along dim 0."""
    if isinstance(batch, torch.Tensor):
        return list(batch.split(chunk_size, dim=0))
    if isinstance(batch, Mapping):
        keys = list(batch.keys())
        parts = {k: _split(batch[k], chunk_size) for k in keys}
        n = len(parts[keys[0]])
        return [{k: parts[k][i] for k in keys} for i in range(n)]
    if isinstance(batch, (list, tuple)):
        return [batch[i : i + chunk_size] for i in range(0, len(batch), chunk_size)]
    raise TypeError(
        f"batch must be a tensor, a mapping of tensors or a list, got {type(batch).__name__}"
    )


class _RngState:
    """CPU (and CUDA, when used) RNG state, so re-encoding a chunk replays the same dropout."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def grad_cache_step(
    encode_queries: Callable[[Any], torch.Tensor],
    encode_docs: Callable[[Any], torch.Tensor],
    query_batch: Any,
    doc_batch: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    chunk_size: int,
) -> torch.Tensor:
    """One GradCache forward/backward: accumulates into ``.grad`` the full-batch gradient.

    1. embed every chunk of ``chunk_size`` rows without a graph (recording the RNG state);
    2. ``loss = loss_fn(q, d)`` on the detached embeddings ``q [B, D]``, ``d [M, D]`` (which
       require grad), ``loss.backward()`` -> cached embedding gradients (parameters inside
       ``loss_fn``, e.g. a learnable scale, get theirs here);
    3. re-encode chunk by chunk with graph (same RNG state, so dropout matches) and
       backpropagate the cached gradient slice: peak activation memory is one chunk's.

    ``query_batch`` / ``doc_batch``: a tensor, a dict of tensors (split along dim 0) or a list.
    ``loss_fn`` must be a scalar function of the two embedding matrices (e.g.
    ``lambda q, d: rk.contrastive_loss(q, d)``). Returns the detached loss. The caller runs
    ``optimizer.step()``; under DDP, wrap the encoders' re-encoding in ``no_sync`` except for
    the last chunk, as usual for gradient accumulation.
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    q_chunks = _split(query_batch, chunk_size)
    d_chunks = _split(doc_batch, chunk_size)

    def embed(encode, chunks):
        states, outs = [], []
        with torch.no_grad():
            for c in chunks:
                states.append(_RngState())
                outs.append(encode(c))
        return torch.cat(outs, dim=0), states

    q_emb, q_states = embed(encode_queries, q_chunks)
    d_emb, d_states = embed(encode_docs, d_chunks)
    q_leaf = q_emb.detach().requires_grad_(True)
    d_leaf = d_emb.detach().requires_grad_(True)
    loss = loss_fn(q_leaf, d_leaf)
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    loss.backward()
    after = _RngState()

    def replay(encode, chunks, states, grad):
        if grad is None:  # the loss does not depend on these embeddings
            return
        start = 0
        for c, st in zip(chunks, states, strict=True):
            st.restore()
            out = encode(c)
            n = out.shape[0]
            out.backward(grad[start : start + n])
            start += n

    replay(encode_queries, q_chunks, q_states, q_leaf.grad)
    replay(encode_docs, d_chunks, d_states, d_leaf.grad)
    after.restore()
    return loss.detach()
