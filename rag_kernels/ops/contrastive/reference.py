"""Plain-PyTorch contrastive (InfoNCE) loss: materialises the ``[B, M]`` score matrix.

Notation: queries ``q_i`` (``B`` rows), candidates ``d_j`` (``M`` rows), scores
``S_ij = scale * sim(q_i, d_j)`` with ``sim`` the dot product of the (for ``"cos"``:
``F.normalize``-d) embeddings. ``pos(i)`` is query i's positive set (one index, or the True
entries of a ``[B, M]`` mask), ``excl(i)`` the false negatives: candidates whose id equals
the id of one of i's positives, positives themselves excepted.

* row direction (query -> doc):
  ``L_i = -logsumexp_{j in pos(i)} S_ij + logsumexp_{j not in excl(i)} S_ij``
  (one positive: ``-S_{i,p(i)} + logsumexp_j S_ij``).
* column direction (doc -> query, ``symmetric=True``, one positive per query): over all
  queries ``i'`` (the gathered ones under ``gather=True``),
  ``L'_i = -S_{i,p(i)} + logsumexp_{i'} S_{i',p(i)}``, leaving out queries ``i' != i`` whose
  positive has the id of ``p(i)`` (the same index when no ids are given); the per-query
  loss is ``(L_i + L'_i) / 2``.

Computation in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # F.normalize's default


def similarity_inputs(x: torch.Tensor, similarity: str) -> torch.Tensor:
    """The embedding that enters the dot product: ``F.normalize(x)`` for cos, ``x`` for dot."""
    return F.normalize(x, p=2.0, dim=-1, eps=NORM_EPS) if similarity == "cos" else x


def positive_id_table(is_pos: torch.Tensor, cand_ids: torch.Tensor):
    """``(table [B, U] bool, compact [M] int64)``: ``table[i, u]`` is True when one of query
    i's positives has the u-th distinct id; ``compact[j]`` is candidate j's id index."""
    _, compact = torch.unique(cand_ids, return_inverse=True)
    U = int(compact.max()) + 1 if compact.numel() else 0
    table = torch.zeros(is_pos.shape[0], U, dtype=torch.bool, device=is_pos.device)
    rows, cols = is_pos.nonzero(as_tuple=True)
    table[rows, compact[cols]] = True
    return table, compact


def contrastive_loss_reference(
    queries: torch.Tensor,
    cands: torch.Tensor,
    scale: torch.Tensor,
    *,
    similarity: str = "cos",
    pos_index: torch.Tensor | None = None,
    pos_mask: torch.Tensor | None = None,
    cand_ids: torch.Tensor | None = None,
    symmetric: bool = False,
    all_queries: torch.Tensor | None = None,
    all_pos_index: torch.Tensor | None = None,
    query_offset: int = 0,
) -> torch.Tensor:
    """Per-query loss ``[B]``.

    Args:
        queries: ``[B, D]``; cands: ``[M, D]`` (already gathered across ranks if wanted);
        scale: 0-d tensor. Exactly one of ``pos_index [B]`` (into ``cands``) or
        ``pos_mask [B, M]`` bool. ``cand_ids [M]`` optional document ids.
        symmetric: add the column direction; its queries are ``all_queries [Bg, D]`` with
        positives ``all_pos_index [Bg]`` (default: ``queries`` / ``pos_index``) and local
        query ``i`` is row ``query_offset + i`` of ``all_queries``.
    """
    B = queries.shape[0]
    M = cands.shape[0]
    qn = similarity_inputs(queries, similarity)
    dn = similarity_inputs(cands, similarity)
    S = scale * (qn @ dn.t())  # [B, M]
    dev = S.device
    neg_inf = torch.full((), float("-inf"), dtype=S.dtype, device=dev)

    if pos_mask is None:
        is_pos = torch.zeros(B, M, dtype=torch.bool, device=dev)
        is_pos[torch.arange(B, device=dev), pos_index] = True
    else:
        is_pos = pos_mask
    if cand_ids is not None:
        # same_id[i, j]: candidate j shares its id with one of query i's positives
        table, compact = positive_id_table(is_pos, cand_ids)
        excluded = table[:, compact] & ~is_pos
    else:
        excluded = torch.zeros_like(is_pos)
    lse = torch.logsumexp(torch.where(excluded, neg_inf, S), dim=1)
    pos_lse = torch.logsumexp(torch.where(is_pos, S, neg_inf), dim=1)
    loss = lse - pos_lse
    if not symmetric:
        return loss

    all_q = queries if all_queries is None else all_queries
    all_p = pos_index if all_pos_index is None else all_pos_index
    Bg = all_q.shape[0]
    an = similarity_inputs(all_q, similarity)
    # column block: S_col[i', i] = S_{i', p(i)} for all queries i' and local positives p(i)
    S_col = scale * (an @ dn[pos_index].t())  # [Bg, B]
    key_all = all_p if cand_ids is None else cand_ids[all_p]  # [Bg]: id of each query's positive
    self_row = torch.arange(B, device=dev) + query_offset
    shares = key_all[:, None] == key_all[self_row][None, :]
    not_self = torch.arange(Bg, device=dev)[:, None] != self_row[None, :]
    col_lse = torch.logsumexp(torch.where(shares & not_self, neg_inf, S_col), dim=0)
    pos_logit = S[torch.arange(B, device=dev), pos_index]
    loss_col = col_lse - pos_logit
    return 0.5 * (loss + loss_col)
