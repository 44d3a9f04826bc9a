"""Vocabulary-parallel LM head: each rank of a process group holds a contiguous block of rows
of the head, ``weight [V_r, H]`` (global ids ``[s_r, s_r + V_r)``), and the ranks together
return exactly what the unsharded op returns on the full ``[V, H]`` head.

Math (docs/design.md §2.8). Every rank holds the same ``hidden`` and ``target`` (replicated);
rank r runs the unchanged local op (any implementation) on its shard with the target mapped to
a local id, ``y_r = y - s_r`` where it owns ``y`` and any in-shard id (0) where it does not,
and gets per row its local ``lse_r = logsumexp_{v in r} z_v``, ``lp_r = z_{y_r} - lse_r`` and
``S_r = sum_{v in r} z_v - V_r lse_r``. One all-gather of the per-row ``[N, 4]`` stack
``(lse_r, lp_r, S_r, y)`` (plus one row with ``(s_r, V_r)``), float64, gives every rank::

    LSE = logsumexp_r lse_r
    lp  = lp_o + lse_o - LSE                      (o = the rank that owns y)
    S   = sum_r S_r + sum_r V_r (lse_r - LSE)     (= sum_v z_v - V LSE)

so the forward needs that single collective (the math needs the other shards' log-sum-exps
before any row's value is known; one round suffices). The gathered targets and layout let
every rank check, identically, that the shards tile ``[0, V)`` and that the targets agree.

Gradients. The loss built on these replicated values is computed identically on every rank,
so the all-gather's backward hands each rank its own slice (no collective). Autograd through
the formulas gives the local op upstream weights ``g_lp,r = g 1[r = o]``, ``g_S,r = g_S`` and
``g_lse,r = g_lse m_r + g (1[r = o] - m_r) + g_S (V_r - V m_r)`` (``m_r = exp(lse_r - LSE)``,
``g``, ``g_lse``, ``g_S`` the upstream gradients of ``lp``, ``LSE``, ``S``), for which the
local backward's ``dz_rv = g (1[v = y] - p_v) + g_S (1 - V p_v) + g_lse p_v`` uses the *global*
``p_v = m_r p_rv`` (the clamped target of a non-owner gets weight 0). Each rank's ``dW`` and
``db`` are thus exactly its rows of the full gradient; ``dh`` is a sum over shards, formed by
one all-reduce of ``[N, H]`` in the backward (:func:`rag_kernels.ops.distributed.copy_to_group`;
``reduce_hidden_grad=False`` leaves it to a framework that already reduces it).

RAG-Token label smoothing (``out_bt = sum_v log sum_k exp(pi_bk + z_bkt(v) - LSE_bkt)``) needs
the global LSE inside the sum over v. The token-smoothing op takes it without a kernel change:
with the per-(b, k, t) shifted prior ``s_bkt = pi_bk - LSE_bkt + lse_r,bkt``, run on the shard
with every (b, t) as its own query (``hidden`` as ``[B T, K, 1, H]``), it returns
``sum_{v in r} log sum_k exp(log_softmax_k(s) + log p_r(v))``; adding back
``V_r logsumexp_k s_bkt`` gives rank r's part of ``out``, and one all-reduce of ``[B, T]``
sums the parts. Forward: the all-gather above, then that all-reduce (the second needs the first's
result). Backward: the all-reduce of ``dh`` and one all-reduce of ``[B, K, T]`` (the gradient of
the replicated ``pi - LSE`` that each shard's part sends back).

Everything is float64 in the combination (the per-row vectors are small); results come back in
the local op's dtype. The local ops are passed in (``local_core``): this module imports no op
package, so the ops can dispatch here without an import cycle.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import validation as V
from .distributed import (
    all_gather_replicated,
    check_agreement,
    copy_to_group,
    dtype_code,
    gather_ints,
    group_info,
    sum_over_group,
)

F64 = torch.float64


@dataclass(frozen=True)
class VocabShard:
    """This rank's place in a vocabulary-parallel head: the process group, the global id of its
    first row, its rank and the group size (its row count is ``weight.shape[0]``)."""

    group: object
    start: int
    rank: int
    world: int
    reduce_hidden_grad: bool = True


def vocab_shard(vocab_group, vocab_start, reduce_hidden_grad=True) -> VocabShard | None:
    """Validate the vocabulary-parallel arguments of a public call.

    Returns None for the plain op (no ``vocab_group``, or a group of one rank, whose
    ``vocab_start`` must then be 0). Raises naming the argument: ``vocab_start`` without
    ``vocab_group`` or the reverse, torch.distributed not initialised, a ``vocab_group`` that
    is not a process group or that this process is not a member of, a ``vocab_start`` that is
    not a non-negative int, a ``reduce_hidden_grad`` that is not a bool."""
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(
            f"reduce_hidden_grad must be a bool, got {type(reduce_hidden_grad).__name__}"
        )
    if vocab_group is None:
        if vocab_start is not None:
            raise ValueError(
                f"vocab_start={vocab_start!r} was given without vocab_group: pass the process "
                "group over which the LM head's rows are sharded, or neither"
            )
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "vocab_group was given but torch.distributed is not initialised "
            "(call torch.distributed.init_process_group first)"
        )
    if vocab_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"vocab_group: this process (global rank {dist.get_rank()}) is not a member of the "
            "group; every rank of vocab_group must call with its own shard, others must not pass it"
        )
    if not isinstance(vocab_group, dist.ProcessGroup):
        raise TypeError(
            f"vocab_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD or "
            f"one from dist.new_group), got {type(vocab_group).__name__}"
        )
    rank, world = group_info(vocab_group)
    if rank < 0:
        raise ValueError(
            f"vocab_group: this process (global rank {dist.get_rank()}) is not a member of the "
            "group"
        )
    if vocab_start is None:
        raise ValueError(
            "vocab_start is required with vocab_group: the global id of this rank's first "
            "LM-head row"
        )
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0, got {vocab_start!r}")
    if world == 1:
        if vocab_start != 0:
            raise ValueError(
                f"vocab_start must be 0 when vocab_group has a single rank (it holds the whole "
                f"head), got {vocab_start}"
            )
        return None
    return VocabShard(vocab_group, vocab_start, rank, world, reduce_hidden_grad)


def _agreement_device(group, like) -> torch.device:
    """The device of the verdict exchange: ``like``'s when it is a tensor, else the current
    CUDA device for an NCCL-only group, else the CPU."""
    if isinstance(like, torch.Tensor):
        return like.device
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def validated_together(vocab_group, like) -> Iterator[None]:
    """Run a vocab-parallel call's argument validation (the ``with`` body) so that a bad
    argument on one rank stops every rank of ``vocab_group``, not only that one.

    Without this, the rank whose arguments fail raises before the op's first collective while
    the others enter it and wait there until the process group's timeout. With value checks on
    (:func:`rag_kernels.ops.validation.value_checks_enabled`), the ranks exchange a small
    header after validating (one all-gather on ``like``'s device, read on the host): whether
    the rank's validation raised, and the rows, hidden size and dtype of ``like`` (the
    replicated ``hidden``). A rank whose validation raised re-raises its own error, naming the
    argument; every other rank raises a ValueError naming the ranks that rejected their
    arguments. Ranks that disagree on the header's shapes or dtype (which would make the
    op's collectives mismatch: gloo aborted one rank, another computed from garbage) all raise
    the same ValueError (:func:`check_agreement`). With value checks off (or under
    ``torch.compile``), or when ``vocab_group`` is not a usable group of two or more ranks
    (``vocab_shard`` then raises on its own, or the call is the plain op), the body runs as
    is. A rank that does not pass ``vocab_group`` at all cannot take part: the others then
    still wait."""
    usable = (
        isinstance(vocab_group, dist.ProcessGroup)
        and V.value_checks_enabled()
        and dist.is_available()
        and dist.is_initialized()
        and vocab_group is not dist.GroupMember.NON_GROUP_MEMBER
    )
    if usable:
        rank, world = group_info(vocab_group)
        usable = rank >= 0 and world > 1
    if not usable:
        yield
        return
    device = _agreement_device(vocab_group, like)
    try:
        yield
    except Exception:
        gather_ints([1, 0, 0, -1], device, vocab_group)
        raise
    header = gather_ints(
        [0, like.shape[:-1].numel(), like.shape[-1], dtype_code(like.dtype)], device, vocab_group
    )
    failed = [r for r, h in enumerate(header) if h[0]]
    if failed:
        which = ", ".join(str(r) for r in failed)
        raise ValueError(
            f"vocab_group: rank{'s' if len(failed) > 1 else ''} {which} of the group rejected "
            "its arguments (the error raised there names the argument); every rank of the "
            "group stops, none waits in a collective"
        )
    check_agreement(
        "vocab_group (hidden and target are replicated)",
        header,
        ("number of rows of hidden / target", "hidden size H", "dtype of hidden"),
    )


def check_shard_targets(checks: V.ValueChecks, name: str, target, ignore_index: int) -> None:
    """The part of the target-range check a shard can do alone (ids >= 0 or ``ignore_index``);
    the upper bound ``< V`` is checked against the whole vocabulary after the all-gather."""
    if not checks.enabled or target.numel() == 0:
        return
    bad = (target < 0) & (target != ignore_index)

    def fail():
        raise ValueError(
            f"{name} must hold ids in [0, V) or ignore_index={ignore_index}, got "
            f"{target[bad][0].item()} ({int(bad.sum())} invalid entries)"
        )

    checks.add(bad.any(), fail)


class ShardedLogprob(NamedTuple):
    """Global per-row statistics (replicated on every rank), this shard's own log-sum-exp, and
    the whole vocabulary size as a 0-d float64 tensor (known only after the all-gather)."""

    logprob: torch.Tensor
    lse: torch.Tensor
    sum_logprob: torch.Tensor
    local_lse: torch.Tensor
    vocab_size: torch.Tensor


def _check_gathered(g: torch.Tensor, n: int, shard: VocabShard, ignore_index: int, owned):
    """Value checks on the gathered layout and targets (the same data, so the same verdict, on
    every rank): the shards tile ``[0, V)``; the targets agree; each kept target has an owner."""
    checks = V.ValueChecks()
    if not checks.enabled:
        return
    starts, sizes = g[:, n, 0], g[:, n, 1]
    order = torch.argsort(starts)
    s, z = starts[order], sizes[order]
    gap = (s[0] != 0) | (s[1:] != s[:-1] + z[:-1]).any()

    def fail_layout():
        pairs = ", ".join(
            f"rank {r}: vocab_start={int(a)}, rows={int(b)}"
            for r, (a, b) in enumerate(zip(starts.tolist(), sizes.tolist(), strict=True))
        )
        raise ValueError(
            "vocab_start / weight: the LM-head shards of vocab_group must tile the vocabulary "
            f"[0, V) in contiguous, non-overlapping blocks of rows; got {pairs}"
        )

    checks.add(gap, fail_layout)
    tgt = g[:, :n, 3]
    differ = tgt != tgt[shard.rank]

    def fail_differ():
        r, i = (int(x) for x in differ.nonzero()[0])
        raise ValueError(
            f"target must be the same on every rank of vocab_group (hidden and target are "
            f"replicated; only the head is sharded): row {i} holds {int(tgt[shard.rank, i])} on "
            f"rank {shard.rank} and {int(tgt[r, i])} on rank {r}"
        )

    checks.add(differ.any(), fail_differ)
    t = tgt[shard.rank]
    bad = (t != ignore_index) & ~owned

    def fail_range():
        raise ValueError(
            f"target must hold ids in [0, {int(sizes.sum())}) (the whole vocabulary of "
            f"vocab_group) or the ignore index, got {int(t[bad][0])} ({int(bad.sum())} invalid "
            "entries)"
        )

    checks.add(bad.any(), fail_range)
    checks.run()


def sharded_linear_logprob(
    local_core, hidden, weight, target, bias, opts, impl: str, shard: VocabShard, *,
    hidden_in_group: bool = False,
) -> ShardedLogprob:  # fmt: skip
    """The fused LM-head statistics of the whole head from this rank's shard (module docstring).

    ``local_core`` is :func:`rag_kernels.ops.linear_logprob.linear_logprob_core`; ``hidden``,
    ``target`` (global ids, ``opts.ignore_index`` for ignored rows, the op's broadcast layouts
    allowed) are replicated; ``weight`` / ``bias`` are this rank's rows. ``hidden_in_group``:
    the caller already passed ``hidden`` through :func:`copy_to_group` (or wants no
    ``dh`` reduction). Collectives: one all-gather of ``[N + 1, 4]`` float64 per rank forward;
    one all-reduce of ``[N, H]`` backward when ``shard.reduce_hidden_grad``. The arguments are
    validated by the caller inside :func:`validated_together`, which also checks that the
    ranks agree on the rows, H and dtype of ``hidden``.
    """
    group, start, size = shard.group, shard.start, weight.shape[0]
    shape = hidden.shape[:-1]
    if shard.reduce_hidden_grad and not hidden_in_group:
        hidden = copy_to_group(hidden, group)
    keep = target != opts.ignore_index
    local = target - start
    owned = keep & (local >= 0) & (local < size)
    # -1 marks ignored rows locally (a global ignore_index may be a valid local id); a row this
    # rank does not own still needs its local lse and S: any in-shard id (0) does, lp_r unused.
    local_target = torch.where(owned, local, torch.zeros_like(local))
    local_target = torch.where(keep, local_target, torch.full_like(local, -1))
    st = local_core(
        hidden, weight, local_target, bias, dataclasses.replace(opts, ignore_index=-1), impl, True
    )
    dt = st.lse.dtype
    with V.autocast_disabled(hidden):
        rows_t = target.expand(shape).reshape(-1)
        n = rows_t.shape[0]
        cols = [st.lse.reshape(-1), st.logprob.reshape(-1), st.sum_logprob.reshape(-1), rows_t]
        stack = torch.stack([c.to(F64) for c in cols], dim=1)
        layout = stack.new_zeros(1, 4)  # filled with scalars: no host-to-device copy (sync)
        layout[0, 0], layout[0, 1] = start, size
        g = all_gather_replicated(torch.cat([stack, layout]), group)  # [W, N + 1, 4]
        starts, sizes = g[:, n, 0].detach(), g[:, n, 1].detach()
        t = rows_t.to(F64)
        inside = (t >= starts[:, None]) & (t < (starts + sizes)[:, None])  # [W, N]
        _check_gathered(g.detach(), n, shard, opts.ignore_index, inside.any(dim=0))
        owner = inside.to(torch.int64).argmax(dim=0)  # rows without an owner: ignored / checked
        lse_all = g[:, :n, 0]
        big = torch.logsumexp(lse_all, dim=0)
        rel = lse_all - big  # log m_r <= 0
        lp = (g[:, :n, 1] + rel).gather(0, owner[None])[0]
        # rank r adds sum_v z_v - V_r LSE = S_r + V_r (lse_r - LSE); a shard masked whole by a
        # -inf bias has lse_r = -inf and S_r = NaN (-inf + inf): its part is -inf
        part = g[:, :n, 2] + sizes[:, None] * rel
        masked = (lse_all == float("-inf")) & (sizes[:, None] > 0)
        s = torch.where(masked, float("-inf"), part).sum(dim=0)
        kept = rows_t != opts.ignore_index
        zero = torch.zeros((), dtype=F64, device=g.device)

        def out(x):
            return torch.where(kept, x, zero).to(dt).view(shape)

        return ShardedLogprob(out(lp), out(big), out(s), st.lse.view(shape), sizes.sum())


def sharded_token_smoothing(
    ts_core, llp_core, hidden, weight, doc_scores, target, bias, doc_mask, opts, llp_opts,
    impl: str, shard: VocabShard,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:  # fmt: skip
    """``(out [B, T], lp [B, K, T] or None, vocab_size)`` of the token-smoothing op on the whole
    head from this rank's shard (module docstring).

    ``ts_core`` / ``llp_core`` are the token-smoothing and LM-head cores; ``target [B, T]``
    (global ids, negative = ignored: ``out`` and ``lp`` are 0 there) or None; ``opts`` the
    token-smoothing options, ``llp_opts`` the LM-head options with ``ignore_index=-1`` and the
    same softcap. Collectives: forward one all-gather of ``[B K T + 1, 4]`` float64 and one
    all-reduce of ``[B, T]``; backward one all-reduce of ``[B, K, T]`` and (with
    ``shard.reduce_hidden_grad``) one of ``hidden``'s shape.
    """
    B, K, T, H = hidden.shape
    group, dev = shard.group, hidden.device
    if shard.reduce_hidden_grad:
        hidden = copy_to_group(hidden, group)  # once, for both local passes below
    if target is not None:
        keep_tok = target >= 0
        rows = target.clamp(min=-1)[:, None, :]
    else:
        keep_tok = torch.ones(B, T, dtype=torch.bool, device=dev)
        rows = torch.zeros(B, 1, T, dtype=torch.int64, device=dev)  # any id: lse is what counts
    if doc_mask is not None:
        rows = torch.where(doc_mask[:, :, None], rows, -1)
    st = sharded_linear_logprob(
        llp_core, hidden, weight, rows, bias, llp_opts, impl, shard, hidden_in_group=True
    )
    with V.autocast_disabled(hidden):
        out_dt = F64 if F64 in (st.lse.dtype, doc_scores.dtype) else torch.float32
        row_ok = (rows >= 0).expand(B, K, T)
        s_masked = doc_scores.to(out_dt)
        if doc_mask is not None:
            s_masked = torch.where(doc_mask, s_masked, torch.full((), float("-inf"), dtype=out_dt))
        prior = torch.log_softmax(s_masked, dim=-1)[:, :, None]  # [B, K, 1]
        zero = torch.zeros((), dtype=out_dt, device=dev)
        # pi - LSE is replicated and feeds this rank's part only: its gradient is summed.
        shift = copy_to_group(torch.where(row_ok, prior - st.lse.to(out_dt), zero), group)
        s = torch.where(row_ok, shift + st.local_lse.to(out_dt), zero)  # [B, K, T]
        # A shard masked whole (a -inf bias): local_lse = -inf on every kept document, so the
        # part is sum_v log 0 = -inf with no gradient (as the single-process kernels give
        # masked columns no posterior weight); s = 0 stands in for it, or log_softmax_k and
        # logsumexp_k of -infs would be NaN (forward and backward).
        # (row_ok is False on masked documents: their rows were set to -1 above)
        masked = (st.local_lse == float("-inf")) | ~row_ok  # (a NaN lse is not: it propagates)
        dead = masked.all(dim=1) & row_ok.any(dim=1)  # [B, T]
        s = torch.where(dead[:, None, :], zero, s)
        s_q = s.permute(0, 2, 1).reshape(B * T, K)  # every (b, t) its own query
        mask_q = (
            None if doc_mask is None else doc_mask[:, None, :].expand(B, T, K).reshape(B * T, K)
        )
        h_q = hidden.transpose(1, 2).reshape(B * T, K, 1, H)
        # a target only marks ignored tokens (their rows are never read); lp of id 0 is unused
        t_q = None if target is None else torch.where(keep_tok, 0, -1).reshape(B * T, 1)
    part, _ = ts_core(h_q, weight, s_q, t_q, bias, mask_q, opts, impl)
    with V.autocast_disabled(hidden):
        # log_softmax_k inside the op removed logsumexp_k s per vocabulary entry: add it back.
        # (per vocabulary entry with probability mass: the kernels give an entry masked by a
        # -inf bias no posterior weight, so it takes no part in the gradient of the add-back)
        s_docs = s if doc_mask is None else torch.where(doc_mask[:, :, None], s, float("-inf"))
        n_live = weight.shape[0]
        if bias is not None and opts.softcap is None:  # (a softcap keeps -inf finite: -cap)
            n_live = n_live - (bias == float("-inf")).sum().to(out_dt)
        shift_back = n_live * torch.logsumexp(s_docs, dim=1)  # [B, T]
        part = part.view(B, T).to(out_dt) + shift_back
        part = torch.where(dead, torch.full((), float("-inf"), dtype=out_dt, device=dev), part)
        part = torch.where(keep_tok, part, zero)
        total = sum_over_group(part, group)
    return total, (None if target is None else st.logprob), st.vocab_size


__all__ = [
    "VocabShard",
    "ShardedLogprob",
    "vocab_shard",
    "validated_together",
    "check_shard_targets",
    "sharded_linear_logprob",
    "sharded_token_smoothing",
]
