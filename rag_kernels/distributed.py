"""Distributed and memory-saving helpers for contrastive training.

* :func:`all_gather_with_grad` — concatenate a tensor from every rank along dim 0 with a
  gradient path back to each rank's piece (rows may differ in number across ranks).
  Gradient scale: the backward *sums* over ranks the gradient that each rank's loss sends to
  the gathered tensor (an all-reduce), so the local piece receives ``sum_r dL_r / dx_local``.
  With each rank's loss a mean over its local queries and DDP averaging parameter gradients
  over ranks, the update equals the single-process gradient of the mean loss over the
  concatenated global batch (``tests/test_contrastive_distributed.py`` checks this).
* :func:`grad_cache_step` — GradCache (Gao et al., 2021): a contrastive step over a batch
  too large to encode with graph at once, equal to the full-batch gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

__all__ = ["all_gather_with_grad", "grad_cache_step", "world_info"]


def world_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    _, world = world_info()
    size = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _all_gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather along dim 0 when ranks hold different numbers of rows (pad, gather, cut)."""
    n_max = max(sizes)
    if x.shape[0] < n_max:
        pad = x.new_zeros((n_max - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes):
        rank, _ = world_info()
        ctx.start = sum(sizes[:rank])
        ctx.n = x.shape[0]
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.n], None


def all_gather_with_grad(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenation over ranks (rank order) of ``x [n_r, ...]`` with gradient.

    ``sizes`` (rows per rank) is gathered when not given. Without an initialised process
    group, or with one rank, returns ``x``. Backward: all-reduce (sum) of the gradient of the
    gathered tensor, sliced to this rank's rows.
    """
    rank, world = world_info()
    if world == 1:
        return x
    sizes = list(sizes) if sizes is not None else _gather_sizes(x.shape[0], x.device)
    return _AllGatherWithGrad.apply(x, sizes)


def all_gather_no_grad(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    _, world = world_info()
    if world == 1:
        return x
    sizes = list(sizes) if sizes is not None else _gather_sizes(x.shape[0], x.device)
    with torch.no_grad():
        return _all_gather_padded(x.detach(), sizes)


class GatheredCandidates(NamedTuple):
    docs: torch.Tensor  # [M_global, D], with gradient to the local docs
    pos_index: torch.Tensor | None  # [B] into docs (global rows)
    pos_mask: torch.Tensor | None  # [B, M_global]
    doc_ids: torch.Tensor | None  # [M_global]
    all_queries: torch.Tensor | None  # [B_global, D] (symmetric only)
    all_pos_index: torch.Tensor | None  # [B_global] (symmetric only)
    query_offset: int


def gather_candidates(
    queries: torch.Tensor,
    docs: torch.Tensor,
    pos_index: torch.Tensor | None,
    pos_mask: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    symmetric: bool,
) -> GatheredCandidates:
    """Gather the candidates of every rank for ``contrastive_loss(gather=True)``.

    Local positives (indices into the local ``docs``, or a ``[B, M_local]`` mask) are moved to
    the global candidate numbering (offset by the rows of lower ranks; the mask is padded with
    False). For ``symmetric`` the queries and their global positive indices are gathered too.
    """
    rank, world = world_info()
    if world == 1:
        return GatheredCandidates(docs, pos_index, pos_mask, doc_ids, None, None, 0)
    dev = docs.device
    d_sizes = _gather_sizes(docs.shape[0], dev)
    d_off = sum(d_sizes[:rank])
    M = sum(d_sizes)
    all_docs = all_gather_with_grad(docs, d_sizes)
    all_ids = None if doc_ids is None else all_gather_no_grad(doc_ids, d_sizes)
    if pos_index is not None:
        pos_index = pos_index + d_off
    if pos_mask is not None:
        full = torch.zeros(pos_mask.shape[0], M, dtype=torch.bool, device=dev)
        full[:, d_off : d_off + pos_mask.shape[1]] = pos_mask
        pos_mask = full
    all_q = all_p = None
    q_off = 0
    if symmetric:
        q_sizes = _gather_sizes(queries.shape[0], dev)
        q_off = sum(q_sizes[:rank])
        all_q = all_gather_with_grad(queries, q_sizes)
        all_p = all_gather_no_grad(pos_index, q_sizes)
    return GatheredCandidates(all_docs, pos_index, pos_mask, all_ids, all_q, all_p, q_off)


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
