"""Contrastive (InfoNCE / MNRL / DPR) loss over in-batch and hard-negative candidates.

Math (docs/design.md §2.5). Scores ``S_ij = scale * sim(q_i, d_j)``; ``sim`` is the dot product,
of ``F.normalize``-d embeddings for ``"cos"`` (gradients flow through the normalisation).
Per query i with positive set ``pos(i)`` and false negatives ``excl(i)`` (candidates that
share an id with one of i's positives, the positives themselves excepted):

* ``L_i = -logsumexp_{j in pos(i)} S_ij + logsumexp_{j not in excl(i)} S_ij`` — with one
  positive ``-S_{i,p(i)} + logsumexp_j S_ij``; with several it is minus the log of the
  probability of retrieving *any* positive (the marginal likelihood).
* ``symmetric``: ``(L_i + L'_i) / 2`` with the doc -> query term
  ``L'_i = -S_{i,p(i)} + logsumexp_{i'} S_{i',p(i)}`` over all queries (other queries whose
  positive has p(i)'s id left out). This is sentence-transformers'
  ``MultipleNegativesRankingLoss(directions=("query_to_doc", "doc_to_query"),
  partition_mode="per_direction")`` = ``MultipleNegativesSymmetricRankingLoss``: the column
  direction runs over the positive columns only (hard negatives have no query). Differences:
  ``partition_mode="joint"`` (one softmax over both directions' scores) is a different loss
  and is not offered; sentence-transformers has no doc-id masking (here, without
  ``doc_ids``, only queries whose positive is the *same row* of ``docs`` mask each other).

Backward with upstream ``g_i``: ``dS_ij = g_i (P_ij - T_ij)`` with ``P = softmax`` over the
non-excluded candidates and ``T`` the target distribution (one-hot, or the softmax restricted
to ``pos(i)``); ``dq_i = scale * sum_j dS_ij d_j``, ``dd_j = scale * sum_i dS_ij q_i``,
``dscale = sum_ij dS_ij sim_ij``, then chained through the normalisation by autograd.

Implementations: ``reference.py`` (materialises ``[B, M]``), ``cpu.py`` (C++, csrc/
contrastive.cpp) and ``triton.py`` (GPU): both stream ``[B-tile, M-tile]`` blocks, keep only
per-query statistics (row log-sum-exp, positive log-sum-exp) and recompute the tiles in the
backward, so memory is O((B + M) D), never B x M. The Triton backward is deterministic (no
atomics): per chunk of candidates a kernel writes ``scale dS [B, Mc]`` in the compute dtype
and cuBLAS does ``dd = (scale dS)^T q``, ``dq += (scale dS) d``; the one chunk buffer stays
within ``max(1 % of B x M, 256 MiB)`` (``triton.py`` states the math, memory and error). The
symmetric column direction is the same row kernel applied to the transposed problem
(positive documents as queries, queries as candidates), which streams the ``[B, B]`` block
of positive columns the same way.

Distributed (``gather=True``): docs (and doc_ids; for ``symmetric`` also queries) are
all-gathered with gradient (:func:`rag_kernels.ops.distributed.all_gather_with_grad`); local
queries score against all ranks' candidates, ``positives`` index the local docs and are
offset internally. Gradient scale: each rank's loss is the mean over its local queries, and
the gather's backward *sums* the gradients that every rank's loss sends to a tensor, so
under DDP (which averages gradients over ranks) the update equals the single-process
gradient of the mean loss over the concatenated global batch. Without DDP, divide the local
gradients by the world size to get that scale. A ``[B, M_local]`` positives mask is padded
with False to the gathered candidates; ``doc_ids`` must be globally consistent ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import registry
from .. import validation as V
from ..distributed import gather_candidates
from .reference import contrastive_loss_reference, similarity_inputs

OP = registry.register("contrastive", __name__)

SIMILARITIES = ("cos", "dot")


@dataclass(frozen=True)
class ContrastiveOptions:
    """Non-tensor options of the contrastive op."""

    similarity: str = "cos"  # "cos" (MNRL) or "dot" (DPR)
    symmetric: bool = False  # average with the doc -> query direction
    gather: bool = False  # score against every rank's candidates (torch.distributed)


class ContrastiveFunction(torch.autograd.Function):
    """Autograd shell for the row-direction fused kernels (``cpu.py``, ``triton.py``).

    A kernel module provides
    ``forward(q[B,D], d[M,D], scale[], pos_index[B]?, pos_mask[B,M]?, cand_ids[M]?,
    id_table[B,U]?) -> (loss[B], lse[B], pos_lse[B])`` and
    ``backward(q, d, scale, pos_index, pos_mask, cand_ids, id_table, lse, pos_lse, grad[B],
    needs=(q, d, scale)) -> (dq, dd, dscale)``, which recomputes the score tiles.
    ``q``/``d`` are the already normalised embeddings. In index mode ``cand_ids`` holds raw
    ids; in mask mode it holds compact ids indexing the columns of ``id_table``.
    """

    @staticmethod
    def forward(ctx, q, d, scale, pos_index, pos_mask, cand_ids, id_table, kernels):
        with registry.device_guard(q):
            loss, lse, pos_lse = kernels.forward(
                q, d, scale, pos_index, pos_mask, cand_ids, id_table
            )
        ctx.save_for_backward(q, d, scale, pos_index, pos_mask, cand_ids, id_table, lse, pos_lse)
        ctx.kernels = kernels
        return loss

    @staticmethod
    def backward(ctx, grad):
        q, d, scale, pos_index, pos_mask, cand_ids, id_table, lse, pos_lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        with torch.no_grad(), registry.device_guard(q):  # not traced: first_order_only
            dq, dd, dscale = ctx.kernels.backward(
                q,
                d,
                scale,
                pos_index,
                pos_mask,
                cand_ids,
                id_table,
                lse,
                pos_lse,
                grad.contiguous(),
                needs,
            )
        grads = (dq if needs[0] else None, dd if needs[1] else None, dscale if needs[2] else None)
        return registry.first_order_only(OP, grads + (None,) * 5, (q, d, scale, grad))


def _rows(kernels, q, d, scale, pos_index=None, pos_mask=None, cand_ids=None, id_table=None):
    c = lambda t: None if t is None else t.contiguous()
    return ContrastiveFunction.apply(
        q.contiguous(),
        d.contiguous(),
        scale,
        c(pos_index),
        c(pos_mask),
        c(cand_ids),
        c(id_table),
        kernels,
    )


def _id_table(pos_mask: torch.Tensor, cand_ids: torch.Tensor):
    """The fused kernels' ``(id_table [B, M] bool, compact [M] int64)`` for mask mode with ids:
    ``compact[j]`` is the sorted position of candidate j's id's first occurrence (equal ids
    share it, distinct ids differ) and ``id_table[i, u]`` is True when one of query i's
    positives has ``compact = u``. Same meaning as ``reference.positive_id_table``, with ``M``
    columns instead of the number of distinct ids: static shapes and no host read, so
    ``torch.compile`` traces it (the table is the size of the ``[B, M]`` mask itself)."""
    compact = torch.searchsorted(torch.sort(cand_ids).values, cand_ids)
    table = torch.zeros(pos_mask.shape, dtype=torch.uint8, device=pos_mask.device)
    table.scatter_reduce_(1, compact.expand_as(table), pos_mask.to(torch.uint8), "amax")
    return table.bool(), compact


def _fused(
    impl, in_dtype, q, d, scale, sim, pos_index, pos_mask, cand_ids, symmetric, all_q, all_p, q_off
):
    kernels = registry.kernels(OP, impl)
    qn = similarity_inputs(q, sim)
    dn = similarity_inputs(d, sim)
    if impl == "triton" and in_dtype in (torch.float16, torch.bfloat16):
        # normalised in fp32, multiplied on the tensor cores in the input dtype, fp32 accumulation
        qn, dn = qn.to(in_dtype), dn.to(in_dtype)
    id_table = None
    ids = cand_ids
    if pos_mask is not None and cand_ids is not None:
        id_table, ids = _id_table(pos_mask, cand_ids)
    loss = _rows(kernels, qn, dn, scale, pos_index, pos_mask, ids, id_table)
    if not symmetric:
        return loss
    an = qn if all_q is None else similarity_inputs(all_q, sim).to(qn.dtype)
    all_p = pos_index if all_p is None else all_p
    key_all = all_p if cand_ids is None else cand_ids[all_p]
    B = q.shape[0]
    self_rows = torch.arange(B, device=q.device) + q_off
    loss_col = _rows(kernels, dn[pos_index], an, scale, self_rows, None, key_all, None)
    return 0.5 * (loss + loss_col)


def validate_contrastive_inputs(
    queries, docs, positives, scale, similarity, symmetric, doc_ids, reduction, gather, checks
):
    V.check_tensor("queries", queries, ndim=2)
    V.check_tensor("docs", docs, ndim=2)
    B, D = queries.shape
    M = docs.shape[0]
    if docs.shape[1] != D:
        raise ValueError(
            f"docs must have shape [M, D] with D={D} (queries' last dim), got {tuple(docs.shape)}"
        )
    if B == 0:
        raise ValueError(f"queries must have at least one row, got shape {tuple(queries.shape)}")
    V.check_same_device("docs", docs, queries, "queries")
    V.check_same_dtype("docs", docs, queries, "queries")
    V.check_choice("similarity", similarity, SIMILARITIES)
    V.check_choice("reduction", reduction, V.REDUCTIONS)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if not isinstance(gather, bool):
        raise TypeError(f"gather must be a bool, got {type(gather).__name__}")
    if isinstance(scale, torch.Tensor):
        V.check_tensor("scale", scale, ndim=0)
        V.check_same_device("scale", scale, queries, "queries")
        bad_scale = ~(torch.isfinite(scale) & (scale > 0))  # as a float scale must be

        def fail_scale():
            raise ValueError(f"scale must be positive and finite, got {scale.item()!r}")

        checks.add(bad_scale, fail_scale)
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if not (float(scale) > 0 and float(scale) != float("inf")):
            raise ValueError(
                f"scale must be a positive finite number or a 0-d tensor, got {scale!r}"
            )
    else:
        raise TypeError(f"scale must be a float or a 0-d tensor, got {type(scale).__name__}")
    if doc_ids is not None:
        V.check_index_tensor("doc_ids", doc_ids, ndim=1)
        V.check_shape("doc_ids", doc_ids, (M,))
        V.check_same_device("doc_ids", doc_ids, queries, "queries")
    if positives is None:
        if M < B:
            raise ValueError(
                f"positives=None pairs query i with docs[i], so docs needs at least B={B} rows; "
                f"got docs of shape {tuple(docs.shape)} (pass positives explicitly)"
            )
        return
    if not isinstance(positives, torch.Tensor):
        raise TypeError(f"positives must be None or a torch.Tensor, got {type(positives).__name__}")
    V.check_same_device("positives", positives, queries, "queries")
    if positives.dtype == torch.bool:
        if symmetric:
            raise ValueError(
                "symmetric=True needs one positive per query: pass positives as a [B] index "
                "tensor (or None), not a [B, M] bool mask"
            )
        V.check_shape("positives", positives, (B, M))
        empty = ~positives.any(dim=1)

        def fail_empty():
            i = int(empty.nonzero()[0, 0])
            raise ValueError(f"positives must mark at least one doc per query, query {i} has none")

        checks.add(empty.any(), fail_empty)
        return
    if positives.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"positives must be an int64/int32 [B] index tensor or a bool [B, M] mask, "
            f"got dtype {positives.dtype}"
        )
    if positives.dim() != 1 or positives.shape[0] != B:
        raise ValueError(
            f"positives must have shape ({B},) (an index into docs per query) or ({B}, {M}) "
            f"(a bool mask), got {tuple(positives.shape)}"
        )
    bad = (positives < 0) | (positives >= M)

    def fail_range():
        raise ValueError(
            f"positives must hold indices in [0, {M}) (rows of docs), got "
            f"{int(positives[bad][0])} ({int(bad.sum())} invalid entries)"
        )

    checks.add(bad.any(), fail_range)


def contrastive_loss(
    queries: torch.Tensor,
    docs: torch.Tensor,
    positives: torch.Tensor | None = None,
    *,
    scale: float | torch.Tensor = 20.0,
    similarity: str = "cos",
    symmetric: bool = False,
    doc_ids: torch.Tensor | None = None,
    reduction: str = "mean",
    gather: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Contrastive InfoNCE loss of queries against candidate documents (in-batch + hard negatives).

    Args:
        queries: ``[B, D]`` query embeddings (fp32 / bf16 / fp16 / fp64).
        docs: ``[M, D]`` candidate embeddings, same dtype, e.g. ``cat([positives, hard_negs])``.
        positives: ``None`` (query i's positive is ``docs[i]``, needs ``M >= B``), a ``[B]``
            int index into ``docs``, or a ``[B, M]`` bool mask (several positives per query:
            the loss is ``-log`` of the probability mass on the positives).
        scale: inverse temperature, a float or a learnable 0-d tensor (gets its gradient).
        similarity: ``"cos"`` (MNRL, scale 20) or ``"dot"`` (DPR, scale 1).
        symmetric: average with the doc -> query direction (sentence-transformers'
            ``MultipleNegativesSymmetricRankingLoss``); needs one positive per query.
        doc_ids: ``[M]`` int ids; candidates sharing an id with a query's positive (other than
            the positive itself) are false negatives and leave that query's denominator.
        reduction: ``"mean"`` over queries, ``"sum"``, or ``"none"`` -> ``[B]``.
        gather: score local queries against the candidates of every rank (torch.distributed),
            with gradient; see the module docstring for the gradient scale.
        impl: ``"auto" | "triton" | "cpu" | "reference"``.

    Under ``torch.autocast`` both embeddings are cast to the autocast dtype first (the score
    matmul then runs in it with fp32 accumulation, as ``queries @ docs.T`` would).

    Returns: the loss in fp32 (fp64 for fp64 inputs); ``[B]`` for ``reduction="none"``.
    """
    queries, docs = V.autocast_inputs(queries, queries, docs)
    checks = V.ValueChecks()
    validate_contrastive_inputs(
        queries, docs, positives, scale, similarity, symmetric, doc_ids, reduction, gather, checks
    )
    checks.run()
    opts = ContrastiveOptions(similarity=similarity, symmetric=symmetric, gather=gather)
    per_query = contrastive_core(queries, docs, positives, scale, doc_ids, opts, impl)
    return V.reduce_loss(per_query, reduction)


def contrastive_core(
    queries, docs, positives, scale, doc_ids, opts: ContrastiveOptions, impl: str
) -> torch.Tensor:
    """Per-query loss ``[B]`` on validated inputs (no checks, no host synchronisation)."""
    with V.autocast_disabled(queries):
        similarity, symmetric = opts.similarity, opts.symmetric
        B = queries.shape[0]
        dev = queries.device
        cdt = torch.float64 if queries.dtype == torch.float64 else torch.float32
        # The Triton kernels compute in fp32; on CUDA float64 (for exactness) takes the reference.
        impl = registry.resolve(
            OP, impl, queries, auto_reference=queries.is_cuda and cdt == torch.float64
        )
        if impl == "triton" and cdt == torch.float64:
            raise ValueError(
                "impl='triton' supports float16/bfloat16/float32 inputs; use 'cpu' or 'reference' for float64"
            )

        q = queries.to(cdt)
        d = docs.to(cdt)
        scale_t = (
            scale.to(cdt)
            if isinstance(scale, torch.Tensor)
            else torch.tensor(float(scale), dtype=cdt, device=dev)
        )
        pos_index = pos_mask = None
        if positives is None:
            pos_index = torch.arange(B, device=dev)
        elif positives.dtype == torch.bool:
            pos_mask = positives
        else:
            pos_index = positives.long()
        cand_ids = None if doc_ids is None else doc_ids.long()

        all_q = all_p = None
        q_off = 0
        if opts.gather:
            g = gather_candidates(q, d, pos_index, pos_mask, cand_ids, symmetric)
            d, pos_index, pos_mask, cand_ids = g.docs, g.pos_index, g.pos_mask, g.doc_ids
            all_q, all_p, q_off = g.all_queries, g.all_pos_index, g.query_offset

        if impl == "reference":
            per_query = contrastive_loss_reference(
                q,
                d,
                scale_t,
                similarity=similarity,
                pos_index=pos_index,
                pos_mask=pos_mask,
                cand_ids=cand_ids,
                symmetric=symmetric,
                all_queries=all_q,
                all_pos_index=all_p,
                query_offset=q_off,
            )
        else:
            per_query = _fused(
                impl,
                queries.dtype,
                q,
                d,
                scale_t,
                similarity,
                pos_index,
                pos_mask,
                cand_ids,
                symmetric,
                all_q,
                all_p,
                q_off,
            )
        return per_query


__all__ = ["contrastive_loss", "contrastive_core", "ContrastiveFunction", "ContrastiveOptions"]
