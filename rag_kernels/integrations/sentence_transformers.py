"""sentence-transformers losses computed by :func:`rag_kernels.contrastive_loss`.

Drop-ins for ``SentenceTransformerTrainer`` (``loss=...``) that never materialise the
``[B, M]`` score matrix (docs/design.md §2.5):

* :class:`ContrastiveLoss` replaces ``MultipleNegativesRankingLoss`` (MNRL) and, with
  ``symmetric=True``, ``MultipleNegativesSymmetricRankingLoss`` (= MNRL with
  ``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"``);
* :class:`CachedContrastiveLoss` replaces ``CachedMultipleNegativesRankingLoss`` (and its
  symmetric variant): GradCache inside the loss, so a batch of any size trains in the memory
  of one ``mini_batch_size`` mini-batch.

Inputs are MNRL's: the columns ``(anchor, positive)``, ``(anchor, positive, negative)`` or
``(anchor, positive, negative_1, ..., negative_n)``; labels are ignored. The candidates are
``cat(positives, negatives_1, ..., negatives_n)`` and anchor i's positive is row i, scored
with ``scale * cos`` (``similarity="cos"``, the default, as MNRL) or ``scale * dot``
(``"dot"``, e.g. DPR with ``scale=1``). The loss is the mean over anchors; the values and
gradients equal sentence-transformers' within fp32 rounding (tests/test_st_losses.py).
``gather_across_devices=True`` scores local anchors against every rank's candidates with
gradient, with MNRL's gradient scale under DDP (see :mod:`rag_kernels.ops.contrastive`).
Not offered: MNRL's ``directions`` other than the two above, ``partition_mode="joint"`` with
several directions, ``hardness_mode`` and a custom ``similarity_fct``.

Usage::

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from rag_kernels.integrations.sentence_transformers import CachedContrastiveLoss

    model = SentenceTransformer(...)
    loss = CachedContrastiveLoss(model, mini_batch_size=32)   # or ContrastiveLoss(model)
    SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss).train()

This module imports only torch: sentence-transformers is imported inside ``forward`` (for
its merged column forward, when available) and the model is duck-typed, i.e. anything that
maps a feature dict to ``{"sentence_embedding": [B, D], ...}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import get_device_states, set_device_states

from ..ops.contrastive import contrastive_loss

__all__ = ["ContrastiveLoss", "CachedContrastiveLoss"]

SIMILARITIES = ("cos", "dot")

_CITATION_INFONCE = """
@misc{oord2019representationlearningcontrastivepredictive,
      title={Representation Learning with Contrastive Predictive Coding},
      author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
      year={2019},
      eprint={1807.03748},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/1807.03748},
}
"""

_CITATION_SYMMETRIC = """
@misc{günther2024jinaembeddings28192token,
      title={Jina Embeddings 2: 8192-Token General-Purpose Text Embeddings for Long Documents},
      author={Michael Günther and Jackmin Ong and Isabelle Mohr and Alaeddine Abdessalem and Tanguy Abel and Mohammad Kalim Akram and Susana Guzman and Georgios Mastrapas and Saba Sturua and Bo Wang and Maximilian Werk and Nan Wang and Han Xiao},
      year={2024},
      eprint={2310.19923},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2310.19923},
}
"""

_CITATION_GRADCACHE = """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""


# ----------------------------------------------------------------------------- shared


def _check_options(scale: Any, similarity: Any, symmetric: Any, gather: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a positive float, got {type(scale).__name__}")
    if not (float(scale) > 0 and math.isfinite(float(scale))):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if similarity not in SIMILARITIES:
        raise ValueError(
            f"similarity must be one of {SIMILARITIES} ('cos' as MNRL's cos_sim, 'dot' for the "
            f"dot product), got {similarity!r}"
        )
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if not isinstance(gather, bool):
        raise TypeError(f"gather_across_devices must be a bool, got {type(gather).__name__}")
    return float(scale)


def _check_columns(n: int, loss_name: str) -> None:
    if n < 2:
        raise ValueError(
            f"{loss_name} needs the columns (anchor, positive) or (anchor, positive, "
            f"negative_1, ..., negative_n), got {n} column(s)"
        )


def _queries_and_candidates(embeddings: list[Tensor], loss_name: str) -> tuple[Tensor, Tensor]:
    """``(anchors [B, D], cat(positives, negatives...) [(1 + n) B, D])`` from the columns."""
    _check_columns(len(embeddings), loss_name)
    B = embeddings[0].shape[0]
    for k, e in enumerate(embeddings):
        if e.dim() != 2 or e.shape[0] != B:
            raise ValueError(
                f"{loss_name}: every column must embed to [B, D] with the anchors' B={B}, "
                f"column {k} gave shape {tuple(e.shape)}"
            )
    return embeddings[0], torch.cat(embeddings[1:], dim=0)


def _config(loss: nn.Module) -> dict[str, Any]:
    return {
        "scale": loss.scale,
        "similarity": loss.similarity,
        "symmetric": loss.symmetric,
        "gather_across_devices": loss.gather_across_devices,
    }


def _embed_columns(model: nn.Module, features: list[dict[str, Any]]) -> list[Tensor]:
    """One ``sentence_embedding`` per column, as MNRL embeds them.

    With sentence-transformers >= 5.x its ``embed_columns`` runs the candidate columns in one
    merged forward (the anchors in their own); otherwise one forward per column.
    """
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:
        return [model(f)["sentence_embedding"] for f in features]
    return embed_columns(model, features)


# ----------------------------------------------------------------------------- ContrastiveLoss


class ContrastiveLoss(nn.Module):
    """``MultipleNegativesRankingLoss`` computed by :func:`rag_kernels.contrastive_loss`.

    Args:
        model: the ``SentenceTransformer`` (any module mapping a feature dict to a dict with
            ``"sentence_embedding"``). Stored as ``self.model``, which the trainer replaces by
            the wrapped (DDP / compiled) model.
        scale: inverse temperature (MNRL's ``scale``; 20 for cos, 1 for dot).
        similarity: ``"cos"`` (MNRL's ``cos_sim``) or ``"dot"``.
        symmetric: also the doc -> query direction, averaged (``MultipleNegativesSymmetric
            RankingLoss``; the column direction runs over the positives only).
        gather_across_devices: score against the candidates of every rank (torch.distributed).
    """

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity: str = "cos",
        symmetric: bool = False,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__()
        self.scale = _check_options(scale, similarity, symmetric, gather_across_devices)
        self.model = model
        self.similarity = similarity
        self.symmetric = symmetric
        self.gather_across_devices = gather_across_devices

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None):
        features = list(sentence_features)
        _check_columns(len(features), type(self).__name__)
        return self.compute_loss_from_embeddings(_embed_columns(self.model, features), labels)

    def compute_loss_from_embeddings(
        self, embeddings: list[Tensor], labels: Tensor | None = None
    ) -> Tensor:
        """The loss from the per-column embeddings ``[anchors, positives, negatives...]``."""
        queries, docs = _queries_and_candidates(list(embeddings), type(self).__name__)
        return contrastive_loss(
            queries,
            docs,
            scale=self.scale,
            similarity=self.similarity,
            symmetric=self.symmetric,
            gather=self.gather_across_devices,
        )

    def get_config_dict(self) -> dict[str, Any]:
        return _config(self)

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return _CITATION_SYMMETRIC if self.symmetric else _CITATION_INFONCE


# ----------------------------------------------------------------------------- GradCache


class _ReplayRng:
    """The CPU and CUDA RNG state before a mini-batch's first forward, replayed (in a forked
    RNG, so the caller's stream is untouched) for its second forward: dropout matches."""

    def __init__(self, *tensors: Any) -> None:
        self.cpu = torch.get_rng_state()
        self.devices, self.states = get_device_states(*tensors)

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu)
        set_device_states(self.devices, self.states)

    def __exit__(self, *exc) -> None:
        self._fork.__exit__(*exc)
        self._fork = None


def _batch_size(features: dict[str, Any], loss_name: str) -> int:
    if "cu_seq_lens_q" in features:
        raise ValueError(
            f"{loss_name} splits the batch into mini-batches along dim 0 and does not support "
            "flattened (padding-free, cu_seq_lens) inputs: use ContrastiveLoss, or a padding "
            "data collator"
        )
    for key in ("input_ids", "attention_mask"):
        v = features.get(key)
        if isinstance(v, Tensor) and v.dim() >= 2:
            return v.shape[0]
    for v in features.values():
        if isinstance(v, Tensor) and v.dim() >= 2:
            return v.shape[0]
    raise ValueError(
        f"{loss_name} needs [B, ...] feature tensors (e.g. input_ids [B, T]) to split into "
        f"mini-batches; got {sorted(features)} (a StaticEmbedding model's flat input_ids + "
        "offsets cannot be split: use ContrastiveLoss)"
    )


def _check_splittable(features: dict[str, Any], B: int, loss_name: str) -> None:
    for key, v in features.items():
        if key == "prompt_length" or not isinstance(v, Tensor) or v.dim() == 0:
            continue
        if v.shape[0] != B:
            raise ValueError(
                f"{loss_name} cannot split the feature {key!r} of shape {tuple(v.shape)} into "
                f"mini-batches of the batch of {B} rows (its dim 0 is not the batch); use "
                "ContrastiveLoss for such models"
            )


def _minibatch(features: dict[str, Any], begin: int, end: int, B: int) -> dict[str, Any]:
    """Rows ``begin:end`` of every ``[B, ...]`` tensor, trailing all-padding columns dropped
    (so a short mini-batch is embedded at its own width); other entries pass through."""
    width = keep = None
    mask = features.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        width = mask.shape[1]
        active = mask[begin:end].bool().any(dim=0)
        if bool(active.any()):
            last = int(active.nonzero().max()) + 1
            keep = last if last < width else None
    out: dict[str, Any] = {}
    for key, v in features.items():
        if (
            isinstance(v, Tensor)
            and v.dim() > 0
            and v.shape[0] == B
            and (key != "prompt_length" or B > 1)
        ):
            v = v[begin:end]
            if keep is not None and v.dim() >= 2 and v.shape[1] == width:
                v = v[:, :keep]
        out[key] = v
    return out


def _replay_cached_gradients(
    grad_output: Tensor, *, loss_obj, features, ranges, batch_sizes, states, cache, autocast
) -> None:
    """Backward hook on the returned loss: re-embed every mini-batch with graph (same RNG
    state and autocast as the first pass) and backpropagate its cached embedding gradient,
    scaled by ``grad_output`` (so gradient accumulation and loss scaling reach it)."""
    model = loss_obj.model
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    remaining = sum(len(c) for c in cache)
    device_type, enabled, dtype = autocast
    with torch.enable_grad():
        for f, column_ranges, B, column_states, grads in zip(
            features, ranges, batch_sizes, states, cache, strict=True
        ):
            for (begin, end), rng, g in zip(column_ranges, column_states, grads, strict=True):
                remaining -= 1
                # under DDP, all-reduce once, after the last mini-batch
                sync = nullcontext() if not ddp or remaining == 0 else model.no_sync()
                with sync, rng, torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    emb = loss_obj.model(_minibatch(f, begin, end, B))["sentence_embedding"]
                    if emb.requires_grad:
                        emb.backward(g.to(emb.dtype) * grad_output.to(emb.dtype))


class CachedContrastiveLoss(nn.Module):
    """:class:`ContrastiveLoss` with GradCache (Gao et al., 2021), as
    ``CachedMultipleNegativesRankingLoss``: the same loss and gradients, activation memory of
    one mini-batch.

    ``forward`` (1) embeds every column in mini-batches of ``mini_batch_size`` rows without a
    graph, recording each mini-batch's RNG state; (2) computes the loss with
    :func:`rag_kernels.contrastive_loss` on the detached embeddings and backpropagates it to
    them (the cache; the fused op needs no chunking of this step, it never forms ``[B, M]``);
    (3) returns the loss as a leaf whose backward hook re-embeds each mini-batch with graph
    (same RNG state, so dropout matches; same autocast) and backpropagates its cached
    gradient. So ``trainer``'s ``loss.backward()`` (or yours) fills the parameters' ``.grad``;
    a forward without a later backward costs the first two steps only. Under DDP the
    replay all-reduces once, after the last mini-batch. Under ``torch.no_grad`` (evaluation)
    it returns the loss without caching.

    ``uses_gradient_cache = True`` and :meth:`calculate_loss` follow sentence-transformers'
    cached-loss protocol, so ``MatryoshkaLoss`` wraps this loss as it wraps CachedMNRL.
    Inputs must be ``[B, ...]`` tensors split along dim 0 (not a StaticEmbedding model's, nor
    padding-free flattened batches: a clear error says so).
    """

    uses_gradient_cache = True

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity: str = "cos",
        symmetric: bool = False,
        mini_batch_size: int = 32,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__()
        self.scale = _check_options(scale, similarity, symmetric, gather_across_devices)
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int):
            raise TypeError(f"mini_batch_size must be an int, got {type(mini_batch_size).__name__}")
        if mini_batch_size <= 0:
            raise ValueError(f"mini_batch_size must be positive, got {mini_batch_size}")
        self.model = model
        self.similarity = similarity
        self.symmetric = symmetric
        self.mini_batch_size = mini_batch_size
        self.gather_across_devices = gather_across_devices

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """The loss from per-column lists of mini-batch embeddings; with ``with_backward``,
        backpropagate it to them (their ``.grad``) and return it detached."""
        queries, docs = _queries_and_candidates(
            [torch.cat(list(mbs), dim=0) for mbs in reps], type(self).__name__
        )
        loss = contrastive_loss(
            queries,
            docs,
            scale=self.scale,
            similarity=self.similarity,
            symmetric=self.symmetric,
            gather=self.gather_across_devices,
        )
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None):
        name = type(self).__name__
        features = list(sentence_features)
        _check_columns(len(features), name)
        batch_sizes = [_batch_size(f, name) for f in features]
        for f, B in zip(features, batch_sizes, strict=True):
            _check_splittable(f, B, name)
        mbs = self.mini_batch_size
        ranges = [[(b, min(b + mbs, B)) for b in range(0, B, mbs)] for B in batch_sizes]
        grad_enabled = torch.is_grad_enabled()

        # (1) embed without graph, recording the RNG state before each mini-batch
        reps: list[list[Tensor]] = []
        states: list[list[_ReplayRng]] = []
        with torch.no_grad():
            for f, column_ranges, B in zip(features, ranges, batch_sizes, strict=True):
                column_reps, column_states = [], []
                for begin, end in column_ranges:
                    mb = _minibatch(f, begin, end, B)
                    if grad_enabled:
                        column_states.append(_ReplayRng(*mb.values()))
                    emb = self.model(mb)["sentence_embedding"]
                    column_reps.append(emb.detach().requires_grad_(grad_enabled))
                reps.append(column_reps)
                states.append(column_states)
        if not grad_enabled:
            return self.calculate_loss(reps, labels)

        # (2) the loss and its gradients w.r.t. the embeddings: the cache
        device_type = reps[0][0].device.type
        autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        loss = self.calculate_loss(reps, labels, with_backward=True)
        cache = [[r.grad for r in column] for column in reps]
        unused = [str(k) for k, column in enumerate(cache) if any(g is None for g in column)]
        if unused:
            raise ValueError(
                f"{name}: the loss did not use input column(s) {', '.join(unused)} (no gradient "
                "reached their embeddings); remove them from the dataset"
            )

        # (3) a leaf whose backward replays the mini-batches with graph
        loss = loss.detach().requires_grad_(True)
        loss.register_hook(
            partial(
                _replay_cached_gradients,
                loss_obj=self,
                features=features,
                ranges=ranges,
                batch_sizes=batch_sizes,
                states=states,
                cache=cache,
                autocast=autocast,
            )
        )
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        return {**_config(self), "mini_batch_size": self.mini_batch_size}

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return _CITATION_GRADCACHE
