"""FAISS index over document embeddings (inner product on normalised vectors = cosine).

``kind="flat"`` (``IndexFlatIP``, exact, the default) or ``kind="ivf"`` (``IndexIVFFlat``
for large corpora; ``nlist`` cells, at most the number of vectors (fewer are used, with a
warning, on a smaller corpus); ``nprobe`` cells searched per query, ``0`` = ``min(8, nlist)``;
``nprobe = nlist`` searches every cell and returns what the flat index returns). A GPU index is used when faiss was
built with GPU support and ``device`` is CUDA. The index keeps the embedding matrix it was
built from, so a training step can read retrieved documents' embeddings without
re-encoding (frozen document encoder), and a checkpoint can store it.
"""

from __future__ import annotations

import numpy as np
import torch


class DenseIndex:
    def __init__(self, kind: str = "flat", nlist: int = 64, nprobe: int = 8, use_gpu: bool = False):
        if kind not in ("flat", "ivf"):
            raise ValueError(f"kind must be 'flat' or 'ivf', got {kind!r}")
        self.kind, self.nlist, self.nprobe, self.use_gpu = kind, nlist, nprobe, use_gpu
        self.embeddings: torch.Tensor | None = None
        self._index = None

    def build(self, embeddings: torch.Tensor) -> DenseIndex:
        """(Re)build from ``[M, D]`` float embeddings (rows = corpus order)."""
        import faiss

        emb = embeddings.detach().float().cpu().contiguous()
        self.embeddings = emb
        x = emb.numpy()
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
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
        index.add(x)
        self._index = index
        return self

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ``(scores [B,k], indices [B,k])`` for ``[B, D]`` queries (no gradient)."""
        if self._index is None:
            raise RuntimeError("DenseIndex.search called before build()")
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        scores, idx = self._index.search(q, k)
        return torch.from_numpy(scores), torch.from_numpy(idx).long()

    def __len__(self) -> int:
        return 0 if self.embeddings is None else self.embeddings.shape[0]

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "embeddings": self.embeddings,
        }

    def load_state_dict(self, state: dict) -> None:
        self.kind, self.nlist, self.nprobe = state["kind"], state["nlist"], state["nprobe"]
        if state["embeddings"] is not None:
            self.build(state["embeddings"])
