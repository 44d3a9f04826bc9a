"""FAISS index over document embeddings (inner product on normalised vectors = cosine): the
whole corpus in one process (:class:`DenseIndex`), or 1/world of it on every process of a
torch.distributed group (:class:`ShardedIndex`), both returning the same results.

**Kinds.** ``kind="flat"`` (``IndexFlatIP``, exact, the default) or ``kind="ivf"``
(``IndexIVFFlat`` for large corpora; ``nlist`` cells, at most the number of vectors (fewer
are used, with a warning, on a smaller corpus or shard); ``nprobe`` cells searched per query,
``0`` = ``min(8, nlist)``; ``nprobe = nlist`` searches every cell and returns what the flat
index returns). A GPU index is used when ``use_gpu`` and faiss was built with GPU support
(``faiss.StandardGpuResources``; the ``faiss-cpu`` wheel has none and stays on the CPU), on
CUDA device ``gpu_device``. The index keeps the embedding matrix it was built from (on the
CPU), so a training step can read retrieved documents' embeddings without re-encoding
(frozen document encoder), and a checkpoint can store it.

**The result order** (both classes). Per query, the ``k`` passages first in the total order
"higher score first, then lower passage index" (the passage's row in the corpus), best
first. The score is ``s(q, d) = fl32(Σ_i q_i d_i)`` with the sum taken in float64 (the
products of float32 numbers are exact in float64; numpy's pairwise sum, whose order depends
on ``D`` only): a function of the pair alone, the same whatever the batch of queries, the
shard, or the FAISS code path (BLAS or SIMD, CPU or GPU) that found the candidates. FAISS
finds candidates with its own float32 scores ``g``, and ``|g - s| <= ε(q) = 2 (γ_D + u +
2 γ'_D) ‖q‖ max_j ‖d_j‖`` (``u = 2^-24``, ``γ_D = D u / (1 - D u)``, ``γ'_D`` the same with
``2^-53``: the dot-product rounding bound ``|fl(xᵀy) - xᵀy| <= γ_D |x|ᵀ|y|`` for either sum,
with ``|x|ᵀ|y| <= ‖x‖ ‖y‖``, and a factor 2 to spare; it assumes FAISS computes in float32,
as its flat and IVF-flat indexes do). The index asks FAISS for ``k' > k`` candidates and
doubles ``k'`` until the last one's ``g`` satisfies ``g_{k'} + ε < s_(k)`` (the k-th best
exact score among the candidates), or FAISS returns fewer than ``k'`` (all of the searched
passages). Every passage left out then has ``s <= g + ε <= g_{k'} + ε < s_(k)``: the
candidates hold the exact top-k, ties included, and are sorted by ``(-s, index)``. Duplicate
passages therefore come in corpus order, and the k-th place among tied passages goes to the
lowest index.

**Sharded** (:class:`ShardedIndex`). Rank ``r`` of the group holds the contiguous rows
``[start, stop)`` of :func:`shard_range` (blocks of ``align`` rows, e.g. the embedding batch,
so that a rank embeds the same batches as one process would: the same padding, the same
embeddings), embeds and indexes only those, and a refresh re-embeds only those. A search is
collective (every rank calls it, each with its own queries, the same ``k``): an all-gather of
the batch sizes, one of the queries, a local top-k of every rank's queries on the shard
(the order above, passage indices global), **one all-gather of the (score, passage index)
pairs**, and a merge, on every rank for its own queries, by the same order. The global
top-k of a query is the top-k of the union of the shards' top-k (each of its members is in
its own shard's top-k, the order being the same restricted to a shard), so a flat sharded
index returns exactly what a :class:`DenseIndex` over the same embeddings returns: the same
indices and the same scores. An IVF index trains one quantiser per shard (and searches
``nprobe`` cells of each): its results are those of ``world`` smaller IVF indexes, not
those of one IVF index over the corpus (equal to it, and to the flat index, only with
``nprobe = nlist``, which searches everything).

A slot that the searched passages cannot fill (IVF: fewer than ``k`` vectors in the probed
cells) holds index ``-1`` and score ``-inf`` (and a zero embedding); ``k`` larger than the
corpus is a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["DenseIndex", "ShardedIndex", "shard_range", "top_k_by_score_then_id"]

_U32, _U64 = 2.0**-24, 2.0**-53
_NO_ID = np.iinfo(np.int64).max  # sort key of an empty slot: after every passage
_GPU_MAX_K = 2048  # the most results FAISS's GPU indexes return per query
_RESCORE_BYTES = 1 << 26  # the float64 candidate block rescored at once


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def shard_range(n: int, world: int, rank: int, align: int = 1) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank`` when ``n`` rows are split into ``world``
    contiguous shards: blocks of ``align`` rows (the last one shorter) are dealt out in
    order, ``⌊r B / world⌋`` blocks before rank ``r`` (``B`` blocks in all), so the shards
    differ by at most one block. With fewer blocks than ranks the split is by rows
    (``align = 1``); with fewer rows than ranks some shards are empty."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) with world >= 1, got {rank} of {world}")
    if n < 0 or align < 1:
        raise ValueError(f"n must be >= 0 and align >= 1, got n={n}, align={align}")
    blocks = -(-n // align)
    if blocks < world:
        align, blocks = 1, n
    return min(n, rank * blocks // world * align), min(n, (rank + 1) * blocks // world * align)


def top_k_by_score_then_id(
    scores: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` columns of ``(scores, ids) [Q, m]`` per row in the order "higher score
    first, then lower id"; empty slots (id ``-1``, score ``-inf``) go last."""
    key = np.where(ids >= 0, ids, _NO_ID)
    order = np.lexsort((key, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


class DenseIndex:
    """The whole corpus in one FAISS index (one process, or every rank holding all of it)."""

    def __init__(
        self,
        kind: str = "flat",
        nlist: int = 64,
        nprobe: int = 8,
        use_gpu: bool = False,
        gpu_device: int = 0,
    ):
        if kind not in ("flat", "ivf"):
            raise ValueError(f"kind must be 'flat' or 'ivf', got {kind!r}")
        for name, v, lo in (("nlist", nlist, 1), ("nprobe", nprobe, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        nlist, nprobe = int(nlist), int(nprobe)
        self.kind, self.nlist, self.nprobe = kind, nlist, nprobe
        self.use_gpu, self.gpu_device = use_gpu, gpu_device
        self.embeddings: torch.Tensor | None = None  # this process's rows, [stop - start, D]
        self._index = None
        self.start = 0  # the corpus row of this process's first row
        self.built_at: int | None = None  # the training step of the last build (set by the loop)
        self._max_norm = 0.0
        self._dim: int | None = None

    # ------------------------------------------------------------------ building
    def build(self, embeddings: torch.Tensor) -> DenseIndex:
        """(Re)build from ``[M, D]`` float embeddings (rows = corpus order, from ``start``)."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError(
                "embeddings must be a [M, D] tensor, got "
                f"{tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__}"
            )
        emb = embeddings.detach().float().cpu().contiguous()
        if not bool(torch.isfinite(emb).all()):
            raise ValueError("embeddings: non-finite values (NaN or ±inf) cannot be indexed")
        self.embeddings, self._dim = emb, emb.shape[1]
        self._max_norm = float(emb.norm(dim=1).max()) if len(emb) else 0.0
        self._index = self._faiss_index(emb.numpy()) if len(emb) else None
        return self

    def refresh(
        self, texts: Sequence[str], encode: Callable[[list[str]], torch.Tensor], *, dim: int
    ) -> DenseIndex:
        """(Re)embed and rebuild: ``encode`` (texts -> ``[n, dim]``) is called on this
        process's rows of the corpus ``texts`` only (all of them here; one shard in
        :class:`ShardedIndex`), and not at all for an empty shard."""
        lo, hi = self.rows_held(len(texts))
        part = list(texts[lo:hi])
        return self.build(encode(part) if part else torch.empty(0, dim))

    def rows_held(self, n: int) -> tuple[int, int]:
        """The corpus rows ``[start, stop)`` this process embeds, of a corpus of ``n``."""
        return 0, n

    def _faiss_index(self, x: np.ndarray):
        import faiss

        D = x.shape[1]
        if self.kind == "flat":
            index = faiss.IndexFlatIP(D)
        else:
            quantizer = faiss.IndexFlatIP(D)
            nlist = min(self.nlist, len(x))
            if nlist < self.nlist and not getattr(self, "_warned", False):
                from ..errors import warn

                self._warned = True
                warn(f"IVF index: {self.nlist} cells for {len(x)} passages; using {nlist}")
            index = faiss.IndexIVFFlat(quantizer, D, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(x)
            index.nprobe = min(self.nprobe or 8, nlist)
        if self.use_gpu and hasattr(faiss, "StandardGpuResources"):
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, self.gpu_device, index)
        index.add(x)
        return index

    @property
    def on_gpu(self) -> bool:
        return self._index is not None and type(self._index).__name__.startswith("Gpu")

    def __len__(self) -> int:
        """The number of passages searched (the whole corpus, every shard included)."""
        return 0 if self.embeddings is None else self.embeddings.shape[0]

    # ------------------------------------------------------------------ searching
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ``(scores [B,k] float32, indices [B,k] int64)`` for ``[B, D]`` queries, best
        first, in the order of the module docstring (no gradient)."""
        s, i = self._search(queries, k)
        return torch.from_numpy(s), torch.from_numpy(i)

    def search_with_embeddings(
        self, queries: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`search` plus the results' embeddings ``[B, k, D]`` (float32, CPU; zeros in
        empty slots)."""
        s, i = self._search(queries, k)
        ids = torch.from_numpy(i)
        return torch.from_numpy(s), ids, self._local_rows(ids)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings ``[*ids.shape, D]`` of corpus rows ``ids`` (float32, CPU)."""
        self._check_built()
        ids = self._check_ids(ids, len(self))
        return self.embeddings[ids.cpu()]

    def _search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_built()
        q = self._queries(queries)
        if problem := self._k_problem(k, len(self)):
            raise ValueError(problem)
        return self._local_topk(q, k)

    def _check_built(self) -> None:
        if self.embeddings is None:
            raise RuntimeError(f"{type(self).__name__}.search called before build()")

    def _queries(self, queries) -> np.ndarray:
        if problem := self._queries_problem(queries):
            raise ValueError(problem)
        return np.ascontiguousarray(queries.detach().float().cpu().numpy())

    def _queries_problem(self, queries) -> str | None:
        if not isinstance(queries, torch.Tensor) or queries.dim() != 2:
            got = (
                tuple(queries.shape)
                if isinstance(queries, torch.Tensor)
                else type(queries).__name__
            )
            return f"queries must be a [B, D] tensor, got {got}"
        if queries.shape[1] != self._dim:
            return f"queries must have D={self._dim} columns (the index's), got {queries.shape[1]}"
        # after the cast the search makes: a float64 beyond float32's range overflows there
        if not bool(torch.isfinite(queries.detach().float()).all()):
            return (
                "queries: non-finite values (NaN or ±inf, or beyond float32's range, which "
                "the index searches in) cannot be searched"
            )
        return None

    def _k_problem(self, k, n: int) -> str | None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            return f"k must be an int >= 1, got {k!r}"
        if k > n:
            return f"k={k} exceeds the number of passages in the index ({n})"
        if self.on_gpu and k > _GPU_MAX_K:
            return f"k={k}: a GPU index returns at most {_GPU_MAX_K} results per query"
        return None

    @staticmethod
    def _check_ids(ids, n: int) -> torch.Tensor:
        if (
            not isinstance(ids, torch.Tensor)
            or ids.is_floating_point()
            or ids.is_complex()
            or ids.dtype == torch.bool  # would read rows 0 and 1
        ):
            raise ValueError(f"ids must be an integer tensor, got {ids!r:.80}")
        ids = ids.long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise ValueError(f"ids must be corpus rows in [0, {n}), got {ids.min()}..{ids.max()}")
        return ids

    def _local_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of the global rows ``ids`` held here; zeros for any other id."""
        local = ids - self.start
        mine = (local >= 0) & (local < self.embeddings.shape[0])
        out = torch.zeros(*ids.shape, self._dim, dtype=torch.float32)
        out[mine] = self.embeddings[local[mine]]
        return out

    def _exact_scores(self, q: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """``s(q_b, d_c)`` for local candidate rows ``cand [T, m]`` (-1: empty -> -inf)."""
        x = self.embeddings.numpy()
        out = np.empty(cand.shape, np.float32)
        step = max(1, _RESCORE_BYTES // (8 * max(1, cand.shape[1] * x.shape[1])))
        for a in range(0, len(cand), step):
            c = cand[a : a + step]
            rows = x[np.maximum(c, 0)].astype(np.float64)
            out[a : a + step] = (q[a : a + step, None, :].astype(np.float64) * rows).sum(-1)
        out[cand < 0] = -np.inf
        return out

    def _local_topk(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows' top-k for ``q [Q, D]``: ``(scores, global ids) [Q, k]``,
        empty slots ``(-inf, -1)`` (fewer than ``k`` rows here, or IVF cells exhausted)."""
        Q, n = q.shape[0], self.embeddings.shape[0]
        scores = np.full((Q, k), -np.inf, np.float32)
        ids = np.full((Q, k), -1, np.int64)
        if n == 0 or Q == 0:
            return scores, ids
        kq = min(k, n)
        limit = min(n, _GPU_MAX_K) if self.on_gpu else n
        c = 2 * (_gamma(q.shape[1], _U32) + _U32 + 2 * _gamma(q.shape[1], _U64))
        eps = c * np.linalg.norm(q.astype(np.float64), axis=1) * self._max_norm
        todo = np.arange(Q)
        m = min(limit, 2 * kq + 8)  # head room: most queries need no second search
        while todo.size:
            g, cand = self._index.search(np.ascontiguousarray(q[todo]), m)
            cand = cand.astype(np.int64)
            s = self._exact_scores(q[todo], cand)
            s_top, i_top = top_k_by_score_then_id(s, cand, kq)
            exhausted = (cand[:, -1] < 0) | (m >= n)  # every searched passage is a candidate
            done = exhausted | (g[:, -1].astype(np.float64) + eps[todo] < s_top[:, -1])
            i_top = np.where(i_top >= 0, i_top + self.start, -1)
            scores[todo[done], :kq], ids[todo[done], :kq] = s_top[done], i_top[done]
            todo = todo[~done]
            if todo.size and m >= limit:
                raise RuntimeError(
                    f"{todo.size} queries have more than {limit} passages within {eps.max():.2e} "
                    f"of their k-th score (a GPU index returns at most {_GPU_MAX_K} "
                    "candidates): the exact order cannot be established; deduplicate the "
                    "corpus or use a CPU index"
                )
            m = min(limit, 2 * m)
        return scores, ids

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "embeddings": self.embeddings,
            "built_at": self.built_at,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state; one without embeddings (a sharded index's, see
        :meth:`ShardedIndex.state_dict`) leaves the index unbuilt, to be re-embedded."""
        self.kind, self.nlist, self.nprobe = state["kind"], state["nlist"], state["nprobe"]
        self.built_at = state.get("built_at")
        if state["embeddings"] is None:
            self.embeddings, self._index = None, None
        else:
            self.build(self._rows_of_state(state["embeddings"]))

    def _rows_of_state(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings


class ShardedIndex(DenseIndex):
    """1/world of the corpus on every rank of ``group`` (default: the whole world): rows
    :func:`shard_range` ``(n, world, rank, align)``; searches are collective and return what
    a :class:`DenseIndex` over the whole corpus returns (flat; see the module docstring).

    Collectives per :meth:`search` of ``B_r`` queries per rank (``B = max_r B_r``, the
    ``Σ_r B_r`` queries searched on every shard): all-gathers of ``4`` int64 per rank (batch
    size, ``k``, ``D``, a validity flag: an error on one rank is raised on every rank), of
    the queries (``world · B · D`` float32) and of the local top-k (``world · Σ_r B_r · k``
    pairs of float64: score and passage index, both exact in float64).
    :meth:`search_with_embeddings` adds one all-reduce (sum) of ``Σ_r B_r · k · D`` float32,
    each rank filling the rows it owns (the others are zero: the sum is exact);
    :meth:`rows` gathers the ids (``world · n`` int64) and all-reduces ``world · n · D``."""

    def __init__(
        self,
        n: int,
        kind: str = "flat",
        nlist: int = 64,
        nprobe: int = 8,
        use_gpu: bool = False,
        gpu_device: int = 0,
        *,
        group=None,
        align: int = 1,
    ):
        import torch.distributed as dist

        super().__init__(kind, nlist, nprobe, use_gpu, gpu_device)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedIndex needs an initialised torch.distributed group")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.n = n
        self.start, self.stop = shard_range(n, self.world, self.rank, align)

    def rows_held(self, n: int) -> tuple[int, int]:
        if n != self.n:
            raise ValueError(f"the index was made for a corpus of {self.n} passages, got {n}")
        return self.start, self.stop

    def build(self, embeddings: torch.Tensor) -> ShardedIndex:
        """(Re)build from this rank's rows ``[stop - start, D]`` (corpus rows start..stop)."""
        if isinstance(embeddings, torch.Tensor) and embeddings.shape[0] != self.stop - self.start:
            raise ValueError(
                f"embeddings: rank {self.rank} holds corpus rows [{self.start}, {self.stop}) "
                f"({self.stop - self.start} rows), got {embeddings.shape[0]}"
            )
        super().build(embeddings)
        return self

    def __len__(self) -> int:
        return 0 if self.embeddings is None else self.n

    # ------------------------------------------------------------------ collectives
    def _device(self) -> torch.device:
        import torch.distributed as dist

        backend = str(dist.get_backend(self.group))
        if "nccl" in backend and "gloo" not in backend:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[world, *t.shape]``: ``t`` of every rank (equal shapes), on the CPU."""
        import torch.distributed as dist

        t = t.to(self._device()).contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        return torch.stack(parts).cpu()

    def _all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.to(self._device()).contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.cpu()

    def _agree(self, values: Sequence[int], problem: str | None) -> torch.Tensor:
        """All-gather ``values`` and a validity flag; raise ``problem`` (or the first rank's)
        on every rank if any rank has one, so that no rank waits in a later collective."""
        header = self._all_gather(torch.tensor([*values, problem is None], dtype=torch.int64))
        if problem is not None:
            raise ValueError(problem)
        bad = (header[:, -1] == 0).nonzero()
        if len(bad):
            raise ValueError(f"rank {int(bad[0])} of the sharded index search: bad arguments")
        return header[:, :-1]

    # ------------------------------------------------------------------ searching
    def _search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._collective_search(queries, k)[:2]

    def search_with_embeddings(self, queries, k):
        s, i, emb = self._collective_search(queries, k, embeddings=True)
        return torch.from_numpy(s), torch.from_numpy(i), emb

    def _collective_search(self, queries, k: int, *, embeddings: bool = False):
        self._check_built()
        problem = self._queries_problem(queries) or self._k_problem(k, self.n)
        ok = problem is None
        B = queries.shape[0] if ok else 0
        header = self._agree([B, k if ok else 0, self._dim], problem)
        if len(set(header[:, 1].tolist())) > 1:
            raise ValueError(f"k must be the same on every rank, got {header[:, 1].tolist()}")
        sizes = header[:, 0].tolist()
        Bmax, total = max(sizes), sum(sizes)
        mine = slice(sum(sizes[: self.rank]), sum(sizes[: self.rank + 1]))
        q = queries.detach().float().cpu()
        q = torch.cat([q, q.new_zeros(Bmax - B, self._dim)]) if B < Bmax else q
        everyone = self._all_gather(q)  # [world, Bmax, D]
        allq = np.ascontiguousarray(
            torch.cat([everyone[r, :n] for r, n in enumerate(sizes)]).numpy()
        )
        s, i = self._local_topk(allq, k)  # [total, k], this shard's
        pairs = torch.stack([torch.from_numpy(s).double(), torch.from_numpy(i).double()], -1)
        gathered = self._all_gather(pairs)  # [world, total, k, 2]
        rows = slice(0, total) if embeddings else mine  # every rank's winners: to fill rows
        cand_s = gathered[:, rows, :, 0].permute(1, 0, 2).reshape(-1, self.world * k)
        cand_i = gathered[:, rows, :, 1].permute(1, 0, 2).reshape(-1, self.world * k)
        top_s, top_i = top_k_by_score_then_id(cand_s.float().numpy(), cand_i.long().numpy(), k)
        if not embeddings:
            return top_s, top_i
        emb = self._all_reduce_sum(self._local_rows(torch.from_numpy(top_i)))
        return top_s[mine], top_i[mine], emb[mine]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings ``[*ids.shape, D]`` of corpus rows ``ids`` (collective: every rank
        calls it, each with its own ids)."""
        self._check_built()
        try:
            flat, problem = self._check_ids(ids, self.n).reshape(-1), None
        except ValueError as e:
            flat, problem = torch.zeros(0, dtype=torch.int64), str(e)
        sizes = self._agree([flat.numel()], problem)[:, 0].tolist()
        padded = torch.cat([flat, flat.new_zeros(max(sizes) - flat.numel())])
        everyone = self._all_gather(padded)  # [world, n_max]
        allids = torch.cat([everyone[r, :n] for r, n in enumerate(sizes)])
        emb = self._all_reduce_sum(self._local_rows(allids))
        a = sum(sizes[: self.rank])
        return emb[a : a + flat.numel()].reshape(*ids.shape, self._dim)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """No embeddings: the shards are on the other ranks, and a checkpoint is written by
        rank 0 alone. Loading it (sharded or not) leaves the index to be re-embedded."""
        return dict(super().state_dict(), embeddings=None, shards=self.world)

    def _rows_of_state(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.shape[0] != self.n:
            raise ValueError(
                f"the state holds {embeddings.shape[0]} embeddings, the corpus {self.n} passages"
            )
        return embeddings[self.start : self.stop]
