"""Collectives with gradient, shared by the ops (``contrastive_loss(gather=True)``) and the
losses built on them.

* :func:`all_gather_with_grad` — concatenate a tensor from every rank along dim 0 with a
  gradient path back to each rank's piece (rows may differ in number across ranks).
  Gradient scale: the backward *sums* over ranks the gradient that each rank's loss sends to
  the gathered tensor (an all-reduce), so the local piece receives ``sum_r dL_r / dx_local``.
  With each rank's loss a mean over its local queries and DDP averaging parameter gradients
  over ranks, the update equals the single-process gradient of the mean loss over the
  concatenated global batch (``tests/test_contrastive_distributed.py`` checks this).

For computations that every rank of a group carries out identically on replicated tensors
(the vocabulary-parallel LM head, :mod:`rag_kernels.ops.vocab_parallel`), the scale differs:
each rank evaluates the *same* loss, so a gradient must not be summed over ranks where every
rank already holds it in full, and must be summed where each rank holds only its part:

* :func:`all_gather_replicated` — ``[world, *x.shape]`` of a same-shaped tensor from every
  rank; backward returns this rank's slice of the (replicated) gradient, no collective.
* :func:`copy_to_group` — identity forward; backward all-reduces (sums) the gradient: a
  replicated tensor that enters rank-local computation (the hidden states entering a
  vocabulary shard) gets the parts of its gradient that every rank computed.
* :func:`sum_over_group` — all-reduce (sum) forward; backward is the identity: each rank's
  partial sum gets the replicated gradient of the replicated total.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_with_grad",
    "all_gather_no_grad",
    "all_gather_replicated",
    "check_agreement",
    "copy_to_group",
    "dtype_code",
    "gather_ints",
    "gather_candidates",
    "group_info",
    "sum_over_group",
    "world_info",
]


def world_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_ints(values: Sequence[int], device: torch.device, group=None) -> list[list[int]]:
    """Every rank's ``values`` (the same count on every rank), in rank order: one all-gather."""
    world = dist.get_world_size(group)
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [p.tolist() for p in torch.stack(parts).cpu()]


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    return [v[0] for v in gather_ints([n], device)]


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_code(dt: torch.dtype) -> int:
    """A small int per floating dtype, for headers exchanged between ranks."""
    return _DTYPES.index(dt) if dt in _DTYPES else -1


def _show(name: str, v: int) -> str:
    if "dtype" not in name:
        return str(v)
    return str(_DTYPES[v]) if 0 <= v < len(_DTYPES) else "another dtype"


def check_agreement(what: str, header: list[list[int]], names: Sequence[str]) -> None:
    """Raise the same ValueError on every rank when the ranks' ``header`` columns ``1 ..`` (one
    per name; column 0 may differ, e.g. a row count) differ: every rank sees every header, so
    none of them waits in a collective that the others never enter. A name with "dtype" in it
    shows its values (:func:`dtype_code`) as dtypes."""
    for j, name in enumerate(names, start=1):
        vals = [h[j] for h in header]
        if len(set(vals)) > 1:
            per_rank = ", ".join(f"rank {r}: {_show(name, v)}" for r, v in enumerate(vals))
            raise ValueError(f"{what}: every rank must pass the same {name}, got {per_rank}")


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
    # one exchange of the layouts: rows per rank, and what must agree before the gathers
    # (a mismatch would crash gloo or gather garbage)
    header = gather_ints(
        [docs.shape[0], docs.shape[1], dtype_code(docs.dtype), doc_ids is not None,
         pos_mask is not None, symmetric, queries.shape[0]],
        dev,
    )  # fmt: skip
    check_agreement(
        "contrastive_loss(gather=True)",
        header,
        ("embedding dim D of docs", "dtype of queries / docs",
         "doc_ids (1: given)", "kind of positives (1: a bool mask)", "symmetric"),
    )  # fmt: skip
    d_sizes = [h[0] for h in header]
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
        q_sizes = [h[6] for h in header]
        q_off = sum(q_sizes[:rank])
        all_q = all_gather_with_grad(queries, q_sizes)
        all_p = all_gather_no_grad(pos_index, q_sizes)
    return GatheredCandidates(all_docs, pos_index, pos_mask, all_ids, all_q, all_p, q_off)


# ------------------------------------------------------------------------------------------
# Collectives for computations replicated over a process group (every rank, the same loss)
# ------------------------------------------------------------------------------------------


def group_info(group) -> tuple[int, int]:
    """``(rank in group, group size)``; ``(-1, size)`` when this process is not a member."""
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGatherReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        rank, world = group_info(group)
        ctx.rank = rank
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        # The loss is replicated: every rank holds the whole gradient of the gathered tensor,
        # so this rank's piece gets its slice as is (summing over ranks would scale by world).
        return grad[ctx.rank], None


def all_gather_replicated(x: torch.Tensor, group) -> torch.Tensor:
    """``[world, *x.shape]``: ``x`` (same shape on every rank) from every rank of ``group``,
    in group-rank order. Backward (for a loss every rank computes identically): this rank's
    slice of the gradient, no collective."""
    return _AllGatherReplicated.apply(x, group)


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # the incoming buffer may be shared: reduce a copy
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; backward all-reduces (sums over ``group``) the gradient of ``x``.

    For a tensor replicated on every rank that feeds rank-local computation: each rank's
    backward yields only its own part of the gradient, and the sum is the whole of it, the
    same on every rank. One all-reduce of ``x.shape`` in ``x``'s dtype, in the backward."""
    return _CopyToGroup.apply(x, group)


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        y = x.contiguous().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_group(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the ranks of ``group`` of each rank's partial ``x`` (one all-reduce); the
    total is replicated, and the backward passes its (replicated) gradient to every rank's
    part unchanged."""
    return _SumOverGroup.apply(x, group)
