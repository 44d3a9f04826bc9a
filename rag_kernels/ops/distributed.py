"""Collectives with gradient, shared by the ops (``contrastive_loss(gather=True)``) and the
losses built on them.

* :func:`all_gather_with_grad` — concatenate a tensor from every rank along dim 0 with a
  gradient path back to each rank's piece (rows may differ in number across ranks).
  Gradient scale: the backward *sums* over ranks the gradient that each rank's loss sends to
  the gathered tensor (an all-reduce), so the local piece receives ``sum_r dL_r / dx_local``.
  With each rank's loss a mean over its local queries and DDP averaging parameter gradients
  over ranks, the update equals the single-process gradient of the mean loss over the
  concatenated global batch (``tests/test_contrastive_distributed.py`` checks this).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = ["all_gather_with_grad", "all_gather_no_grad", "gather_candidates", "world_info"]


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
