"""Vocabulary-parallel LM head (``vocab_group`` / ``vocab_start``) on 2 and 3 gloo processes
with uneven shards (3 ranks: not in rank order), against the single-process op on the full
head in float64: ``rk.linear_logprob`` (lp, lse, sum_logprob, dh, each rank's dW / db rows;
bias, softcap, ignore_index, a broadcast target, ``reduce_hidden_grad=False``; reference, cpu
and, on 2 ranks, triton under TRITON_INTERPRET=1), ``rk.token_smoothing``, ``rk.rag_loss``
(both modes, label smoothing, masked documents, NaN-poisoned ignored rows),
``rk.generator_feedback``, the ``rk.hf`` drop-ins, and bad arguments.

Every worker runs all cases once (one spawn per world size) and saves its results; the tests
compare them with the single-process values computed here."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rag_kernels as rk
from rag_kernels.ops.registry import available_impls
from rag_kernels.ops.token_smoothing import token_smoothing_with_logprob
from toolkit import IGNORE, assert_close, make_linear_logprob, make_rag, poisoned

F64 = torch.float64
V_FULL = 23
# rank -> (vocab_start, rows): uneven; with 3 ranks rank 0 holds the middle block
LAYOUTS = {2: [(0, 13), (13, 10)], 3: [(8, 8), (0, 8), (16, 7)]}
WORLDS = tuple(LAYOUTS)
IMPLS = [i for i in ("reference", "cpu") if i in available_impls("linear_logprob")]
TS_IMPLS = [i for i in ("reference", "cpu") if i in available_impls("token_smoothing")]
RTOL = 1e-12  # float64, relative to the largest magnitude of each quantity

LLP_CASES = {
    "plain": dict(),
    "bias_softcap": dict(bias=True, softcap=2.5),
    "ignore_is_an_id": dict(ignore_index=5),  # a valid vocabulary id marks ignored rows
    "broadcast_target": dict(broadcast=True, bias=True),  # hidden [B,K,T,H], target [B,1,T]
    "no_dh_reduce": dict(reduce_hidden_grad=False),
    # a -inf bias over ids 13..22: with 2 ranks rank 1's whole shard, with 3 ranks rank 2's
    # and part of rank 0's (S is -inf: sum_logprob carries no upstream gradient here). The
    # kernels only: the reference's local logsumexp of an all -inf row has a NaN gradient
    # (plain PyTorch's), which reaches dh through the 0 upstream weight of that shard.
    "masked_shard": dict(bias=True, masked=slice(13, V_FULL)),
}
KERNEL_ONLY = {
    "masked_shard",
    "sequence_masked_shard",
    "token_masked_shard",
    "token_eps0.1_masked_shard",
}
TRITON_CASES = ["bias_softcap", "masked_shard"]


def _runs(impl, case):
    return not (impl == "reference" and case in KERNEL_ONLY)


def _masked_bias(bias, masked):
    """``bias`` with -inf on the ids ``masked``."""
    bias = bias.clone()
    bias[masked] = float("-inf")
    return bias


def _off_mask(target, masked):
    """``target`` with the ids of ``masked`` (``masked.start ..``) moved below it (ignored
    entries, negative, stay)."""
    return torch.where(target >= masked.start, target % masked.start, target)


RAG_CASES = {
    f"{mode}_eps{eps}": dict(mode=mode, label_smoothing=eps)
    for mode in ("sequence", "token")
    for eps in (0.0, 0.1)
}
RAG_CASES["token_eps0.2_bias_softcap"] = dict(mode="token", label_smoothing=0.2, bias=True,
                                              softcap=3.0)  # fmt: skip
RAG_CASES["sequence_eps0.2_bias_softcap"] = dict(mode="sequence", label_smoothing=0.2,
                                                 bias=True, softcap=3.0)  # fmt: skip
for _mode in ("sequence", "token"):  # a -inf bias over ids 13..22 (LLP_CASES["masked_shard"])
    RAG_CASES[f"{_mode}_masked_shard"] = dict(mode=_mode, bias=True, masked=slice(13, V_FULL))
# ... under label smoothing: the RAG-Token statistic is -inf (loss +inf; the shard's part was
# NaN); its gradient is the kernels' (masked columns carry no posterior weight), so the
# single-process cpu kernel is the oracle (the reference's logsumexp of -infs has a NaN
# gradient; test_reliability_ops checks the kernel against the reference on the unmasked
# vocabulary)
RAG_CASES["token_eps0.1_masked_shard"] = dict(
    mode="token", label_smoothing=0.1, bias=True, masked=slice(13, V_FULL)
)
KERNEL_ORACLE = {"token_eps0.1_masked_shard"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_(True)


def _grad(x):
    return None if x is None or x.grad is None else x.grad.detach().clone()


def _shard(x, world, rank):
    """This rank's rows of a full head tensor (weight [V, H] or bias [V])."""
    if x is None:
        return None
    start, rows = LAYOUTS[world][rank]
    return x[start : start + rows]


# --------------------------------------------------------------------------------- cases
# Each case function takes the head (full, or this rank's rows) and ``vp`` (the vocab-parallel
# keyword arguments, {} for the single process) and returns the values and gradients.


def _llp_data(case):
    kw = LLP_CASES[case]
    if kw.get("broadcast"):
        g = torch.Generator().manual_seed(7)
        B, K, T, H = 2, 3, 4, 5
        hidden = torch.randn(B, K, T, H, generator=g, dtype=F64)
        target = torch.randint(0, V_FULL, (B, 1, T), generator=g)
        target[0, 0, 1] = IGNORE
        hidden = poisoned(hidden, (target == IGNORE).expand(B, K, T))
        weight = torch.randn(V_FULL, H, generator=g, dtype=F64) / H**0.5
        bias = torch.randn(V_FULL, generator=g, dtype=F64)
        ups = [torch.rand(B, K, T, generator=g, dtype=F64) for _ in range(3)]
        return hidden, weight, target, bias, ups, IGNORE
    c = make_linear_logprob(9, 6, V_FULL, bias=True, n_ignore=2, wscale=3.0, seed=3)
    ignore = kw.get("ignore_index", IGNORE)
    target = c.target.clone()
    if "masked" in kw:
        bias, target = _masked_bias(c.bias, kw["masked"]), _off_mask(target, kw["masked"])
        return c.hidden, c.weight, target, bias, [*c.upstream[:2], 0 * c.upstream[2]], ignore
    if ignore != IGNORE:
        target[target == IGNORE] = ignore  # the rows NaN-poisoned by make_linear_logprob
        target[(target == ignore) & ~torch.isnan(c.hidden[:, 0])] = 0  # no stray ignored id
    return c.hidden, c.weight, target, c.bias, c.upstream, ignore


def run_llp(case, impl, weight, bias, vp, dtype=F64):
    kw = LLP_CASES[case]
    hidden, _, target, _, ups, ignore = _llp_data(case)
    h, w = _leaf(hidden.to(dtype)), _leaf(weight.to(dtype))
    b = _leaf(bias.to(dtype)) if kw.get("bias") else None
    extra = {"reduce_hidden_grad": False} if kw.get("reduce_hidden_grad") is False and vp else {}
    st = rk.linear_logprob(
        h, w, target, bias=b, ignore_index=ignore, softcap=kw.get("softcap"), impl=impl,
        return_stats=True, **vp, **extra,
    )  # fmt: skip
    # (a zero upstream weight leaves its term out: 0 * -inf would make the loss NaN)
    loss = sum((u * x.double()).sum() for u, x in zip(ups, st, strict=True) if u.any())
    loss.backward()
    return dict(lp=st.logprob, lse=st.lse, S=st.sum_logprob, dh=h.grad, dW=w.grad, db=_grad(b))


def _rag_data(bias_on):
    hidden, weight, target, scores, doc_mask = make_rag(2, 3, 6, 5, V_FULL, seed=11)
    # NaN where nothing may be read: ignored positions, the masked document
    bad = (target == IGNORE)[:, None, :].expand(2, 3, 6) | ~doc_mask[:, :, None].expand(2, 3, 6)
    hidden = poisoned(hidden, bad)
    g = torch.Generator().manual_seed(12)
    bias = torch.randn(V_FULL, generator=g, dtype=F64) * 0.5 if bias_on else None
    weights = torch.rand(2, generator=g, dtype=F64) + 0.5  # per-query upstream weights
    return hidden, weight, target, scores, doc_mask, bias, weights


def run_rag(case, impl, weight, bias, vp):
    kw = dict(RAG_CASES[case])
    bias_on = kw.pop("bias", False)
    masked = kw.pop("masked", None)
    hidden, _, target, scores, doc_mask, _, up = _rag_data(bias_on)
    if masked is not None:
        target = _off_mask(target, masked)
    h, w, s = _leaf(hidden), _leaf(weight), _leaf(scores)
    b = _leaf(bias) if bias_on else None
    loss = rk.rag_loss(
        h, w, target, s, bias=b, doc_mask=doc_mask, reduction="none", impl=impl, **kw, **vp
    )
    (loss * up).sum().backward()
    return dict(loss=loss, dh=h.grad, dW=w.grad, db=_grad(b), ds=s.grad)


def run_token_smoothing(impl, weight, bias, vp):
    hidden, _, target, scores, doc_mask, _, _ = _rag_data(True)
    # without a target every token counts: finite rows there; the masked document stays NaN
    hidden1 = torch.where((target == IGNORE)[:, None, :, None], 0.3, hidden)
    g = torch.Generator().manual_seed(13)
    up = torch.rand(2, 6, generator=g, dtype=F64)
    h, w, s, b = _leaf(hidden1), _leaf(weight), _leaf(scores), _leaf(bias)
    out = rk.token_smoothing(h, w, s, bias=b, softcap=4.0, doc_mask=doc_mask, impl=impl, **vp)
    (out * up).sum().backward()
    res = dict(out=out, dh=h.grad, dW=w.grad, db=b.grad, ds=s.grad)
    h2, w2, s2 = _leaf(hidden), _leaf(weight), _leaf(scores)
    out2, lp2 = token_smoothing_with_logprob(h2, w2, s2, target, doc_mask=doc_mask, impl=impl, **vp)
    (out2 * up).sum().add((lp2 * 0.3).sum()).backward()
    res.update(out2=out2, lp2=lp2, dh2=h2.grad, dW2=w2.grad, ds2=s2.grad)
    return res


def run_feedback(impl, weight, bias, vp):
    hidden, _, target, _, doc_mask, _, _ = _rag_data(False)
    hidden = torch.where(doc_mask[:, :, None, None], hidden, 0.2)  # no doc_mask here: finite
    fb = rk.generator_feedback(hidden, weight, target, bias=bias, impl=impl, **vp)
    return dict(tok=fb.token_logprobs, sum=fb.sum_logprob, mean=fb.mean_logprob)


def run_hf(token, impl, weight, bias, vp):
    hidden, _, target, scores, _, _, up = _rag_data(True)
    B, K, T, H = hidden.shape
    target = target.clamp(min=0)  # hf convention: pad_token_id (here 1, a valid id) is masked
    target[0, -2:] = 1
    hidden = torch.nan_to_num(hidden, nan=0.5).reshape(B * K, T, H)
    h, w, s, b = _leaf(hidden), _leaf(weight), _leaf(scores), _leaf(bias)
    fn = rk.hf.rag_token_get_nll if token else rk.hf.rag_sequence_get_nll
    loss = fn(h, w, s, target, pad_token_id=1, epsilon=0.1, bias=b, impl=impl, **vp)
    (loss * up).sum().backward()
    return dict(loss=loss, dh=h.grad, dW=w.grad, db=b.grad, ds=s.grad)


def _all_cases(world):
    """(key, function(weight, bias, vp)) of every case for ``world`` ranks."""
    cases = []
    for impl in IMPLS:
        for case in [c for c in LLP_CASES if _runs(impl, c)]:
            cases.append(
                (("llp", case, impl), lambda w, b, vp, c=case, i=impl: run_llp(c, i, w, b, vp))
            )
        for case in [c for c in RAG_CASES if _runs(impl, c)]:
            cases.append(
                (("rag", case, impl), lambda w, b, vp, c=case, i=impl: run_rag(c, i, w, b, vp))
            )
        cases.append((("feedback", impl), lambda w, b, vp, i=impl: run_feedback(i, w, b, vp)))
        for token in (False, True):
            cases.append(
                (("hf", token, impl), lambda w, b, vp, t=token, i=impl: run_hf(t, i, w, b, vp))
            )
    for impl in TS_IMPLS:
        cases.append((("ts", impl), lambda w, b, vp, i=impl: run_token_smoothing(i, w, b, vp)))
    if world == 2 and "triton" in available_impls("linear_logprob"):
        for case in TRITON_CASES:
            cases.append(
                (("llp", case, "triton"),
                 lambda w, b, vp, c=case: run_llp(c, "triton", w, b, vp, dtype=torch.float32))
            )  # fmt: skip
    return cases


def _head(key):
    """The full head of a case: weight [V, H] and bias [V] (float64)."""
    if key[0] == "llp":
        _, w, _, b, _, _ = _llp_data(key[1])
        return w, b
    _, w, _, _, _, b, _ = _rag_data(True)
    masked = RAG_CASES.get(key[1], {}).get("masked") if key[0] == "rag" else None
    if masked is not None:
        b = _masked_bias(b, masked)
    return w, b


# ---------------------------------------------------------------------------- bad arguments


def _errors(world, rank):
    """Bad vocab-parallel arguments: the error each rank raises (type name, message)."""
    group = dist.group.WORLD
    c = make_linear_logprob(4, 3, V_FULL, seed=5)
    start, rows = LAYOUTS[world][rank]
    w = c.weight[start : start + rows]

    def call(target=c.target, weight=w, hidden=c.hidden, **kw):
        kw = {"vocab_group": group, "vocab_start": start, **kw}
        return rk.linear_logprob(hidden, weight, target, impl="reference", **kw)

    def bad_target(value, only_rank=None):
        t = c.target.clone()
        if only_rank is None or rank == only_rank:
            t[1] = value
        return t

    other_id = int((c.target[1] + 1) % V_FULL)
    h_rag, w_rag, y_rag, s_rag, _ = make_rag(1, 2, 3, 3, V_FULL, seed=2)

    attempts = {
        "gap": lambda: call(vocab_start=start + (1 if rank == world - 1 else 0)),
        "overlap": lambda: call(vocab_start=max(start - 1, 0) if rank == world - 1 else start),
        "target_differs": lambda: call(target=bad_target(other_id, only_rank=world - 1)),
        "target_too_large": lambda: call(target=bad_target(V_FULL)),
        "target_negative": lambda: call(target=bad_target(-3)),
        "vocab_start_missing": lambda: call(vocab_start=None),
        "vocab_start_negative": lambda: call(vocab_start=-1),
        "vocab_start_not_int": lambda: call(vocab_start=1.0),
        "group_not_a_group": lambda: call(vocab_group="world"),
        "reduce_hidden_grad_not_bool": lambda: call(reduce_hidden_grad=1),
        "bias_not_shard_shaped": lambda: call(bias=torch.zeros(V_FULL, dtype=F64)),
        # hidden / target differ in shape or dtype on the last rank: gloo aborted one rank
        # (a size mismatch in the gather) and the others got a garbage layout error
        "rows_differ": lambda: call(
            target=c.target[: 3 if rank == world - 1 else 4],
            hidden=c.hidden[: 3 if rank == world - 1 else 4],
        ),
        "dtype_differs": lambda: call(
            hidden=c.hidden.float() if rank == world - 1 else c.hidden,
            weight=w.float() if rank == world - 1 else w,
        ),
        "rag_loss_gap": lambda: rk.rag_loss(
            h_rag,
            w_rag[start : start + rows],
            y_rag,
            s_rag,
            vocab_group=group,
            vocab_start=start + (1 if rank == world - 1 else 0),
            impl="reference",
        ),  # fmt: skip
    }
    # one rank only passes a bad argument: it raises its own error, the others stop too
    # (before, they waited in the op's first collective until the gloo timeout)
    last = rank == world - 1
    h_ts = torch.randn(1, 2, 3, 3, dtype=F64)
    s_ts = torch.randn(1, 2, dtype=F64)
    y_hf = y_rag.clamp(min=2)
    y_neg = y_rag.clone()
    y_neg[0, -1] = -5
    attempts.update(
        {
            "one_rank_target_negative": lambda: call(target=bad_target(-3, only_rank=world - 1)),
            "one_rank_vocab_start": lambda: call(vocab_start=-1 if last else start),
            "one_rank_bias_shape": lambda: call(
                bias=torch.zeros(rows + (1 if last else 0), dtype=F64)
            ),
            "one_rank_softcap": lambda: call(softcap=-1.0 if last else None),
            "one_rank_rag_loss": lambda: rk.rag_loss(
                h_rag,
                w_rag[start : start + rows],
                y_rag,
                s_rag,
                vocab_group=group,
                vocab_start=start,
                label_smoothing=0.5 if not last else 1.5,
                impl="reference",
            ),
            "one_rank_feedback": lambda: rk.generator_feedback(
                h_rag,
                w_rag[start : start + rows],
                y_neg if last else y_rag,
                vocab_group=group,
                vocab_start=start,
                impl="reference",
            ),
            "one_rank_token_smoothing": lambda: rk.token_smoothing(
                h_ts,
                w_rag[start : start + rows],
                s_ts,
                doc_mask=torch.ones(1, 3 if last else 2, dtype=torch.bool),
                vocab_group=group,
                vocab_start=start,
                impl="reference",
            ),
            "one_rank_hf": lambda: rk.hf.rag_token_get_nll(
                h_rag.reshape(2, 3, -1),
                w_rag[start : start + rows],
                s_rag,
                y_hf,
                pad_token_id=1,
                epsilon=2.0 if last else 0.1,
                vocab_group=group,
                vocab_start=start,
                impl="reference",
            ),
        }
    )
    out = {}
    for name, fn in attempts.items():
        try:
            fn()
            out[name] = None
        except Exception as e:  # noqa: BLE001 - recorded and checked by the tests
            out[name] = (type(e).__name__, str(e))
    # a group this process is not in, and a group of one rank (the plain op)
    solo = dist.new_group([0])  # every rank must call new_group
    if rank == 0:
        out["solo_plain"] = call(vocab_group=solo, vocab_start=0, weight=c.weight).detach()
        try:
            call(vocab_group=solo, vocab_start=3, weight=c.weight)
            out["solo_start"] = None
        except ValueError as e:
            out["solo_start"] = ("ValueError", str(e))
    else:
        try:
            call(vocab_group=solo)
            out["non_member"] = None
        except ValueError as e:
            out["non_member"] = ("ValueError", str(e))
    return out


# ------------------------------------------------------------------------------- spawning


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90)
    )
    try:
        vp = {"vocab_group": dist.group.WORLD, "vocab_start": LAYOUTS[world][rank][0]}
        results = {}
        for key, fn in _all_cases(world):
            w, b = _head(key)
            results[key] = fn(_shard(w, world, rank), _shard(b, world, rank), vp)
        results["errors"] = _errors(world, rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world, tmp, timeout=600.0):
    ctx = mp.start_processes(
        _worker, args=(world, _free_port(), tmp), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError(f"vocab-parallel workers ({world} ranks) did not finish")


@pytest.fixture(scope="module", params=WORLDS, ids=[f"world{w}" for w in WORLDS])
def ranks(request):
    world = request.param
    with tempfile.TemporaryDirectory() as tmp:
        _spawn(world, tmp)
        return world, [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def _compare(world, got, expected, rtol=RTOL, head_rows=("dW", "db", "dW2")):
    """Every rank's values equal the single-process ones; head gradients are each rank's rows."""
    for rank, res in enumerate(got):
        for name, e in expected.items():
            a = res[name]
            if e is None:
                assert a is None, f"rank {rank} {name}: expected None"
                continue
            if name in head_rows:
                e = _shard(e, world, rank)
            assert_close(a, e, rtol=rtol, name=f"rank {rank} {name}")


# ---------------------------------------------------------------------------------- tests


def _params(cases):
    return [
        pytest.param(case, impl, id=f"{case}-{impl}")
        for impl in IMPLS
        for case in cases
        if _runs(impl, case)
    ]


@pytest.mark.parametrize("case,impl", _params(LLP_CASES))
def test_linear_logprob(ranks, case, impl):
    world, got = ranks
    key = ("llp", case, impl)
    w, b = _head(key)
    expected = run_llp(case, "reference", w, b, {})
    results = [g[key] for g in got]
    if case == "no_dh_reduce":  # each rank's dh is its shard's part; they sum to the whole
        assert_close(sum(r["dh"] for r in results), expected.pop("dh"), rtol=RTOL, name="sum dh")
        assert not torch.allclose(results[0]["dh"], results[1]["dh"])
    _compare(world, results, expected)


@pytest.mark.parametrize("case", TRITON_CASES)
def test_linear_logprob_triton(ranks, case):
    """The Triton kernels (TRITON_INTERPRET=1 here, fp32) share the collective logic."""
    world, got = ranks
    key = ("llp", case, "triton")
    if key not in got[0]:
        why = "run on 2 ranks only" if world != 2 else "triton unavailable here"
        pytest.skip(f"triton vocab-parallel case: {why}")
    w, b = _head(key)
    expected = run_llp(case, "reference", w, b, {})
    _compare(world, [g[key] for g in got], expected, rtol=2e-5)


@pytest.mark.parametrize("case,impl", _params(RAG_CASES))
def test_rag_loss(ranks, case, impl):
    world, got = ranks
    w, b = _head(("rag", case))
    expected = run_rag(case, "cpu" if case in KERNEL_ORACLE else "reference", w, b, {})
    _compare(world, [g[("rag", case, impl)] for g in got], expected)


@pytest.mark.parametrize("impl", TS_IMPLS)
def test_token_smoothing(ranks, impl):
    world, got = ranks
    w, b = _head(("ts",))
    _compare(world, [g[("ts", impl)] for g in got], run_token_smoothing("reference", w, b, {}))


@pytest.mark.parametrize("impl", IMPLS)
def test_generator_feedback(ranks, impl):
    world, got = ranks
    w, b = _head(("feedback",))
    _compare(world, [g[("feedback", impl)] for g in got], run_feedback("reference", w, b, {}))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("token", [False, True], ids=["sequence", "token"])
def test_hf_drop_ins(ranks, token, impl):
    world, got = ranks
    w, b = _head(("hf",))
    expected = run_hf(token, "reference", w, b, {})
    _compare(world, [g[("hf", token, impl)] for g in got], expected)


ERRORS = {
    "gap": ("ValueError", "vocab_start / weight: the LM-head shards of vocab_group must tile"),
    "overlap": ("ValueError", "vocab_start / weight: the LM-head shards of vocab_group must tile"),
    "target_differs": ("ValueError", "target must be the same on every rank of vocab_group"),
    "target_too_large": ("ValueError", f"target must hold ids in [0, {V_FULL})"),
    "target_negative": (
        "ValueError",
        "target must hold ids in [0, V) or ignore_index=-100, got -3",
    ),
    "vocab_start_missing": ("ValueError", "vocab_start is required with vocab_group"),
    "vocab_start_negative": ("ValueError", "vocab_start must be an int >= 0, got -1"),
    "vocab_start_not_int": ("ValueError", "vocab_start must be an int >= 0, got 1.0"),
    "group_not_a_group": ("TypeError", "vocab_group must be a torch.distributed ProcessGroup"),
    "reduce_hidden_grad_not_bool": ("TypeError", "reduce_hidden_grad must be a bool"),
    "bias_not_shard_shaped": ("ValueError", "bias must have shape"),
    "rag_loss_gap": ("ValueError", "vocab_start / weight: the LM-head shards of vocab_group"),
    "rows_differ": ("ValueError", "every rank must pass the same number of rows of hidden"),
    "dtype_differs": ("ValueError", "every rank must pass the same dtype of hidden, got rank 0"),
}


# a bad argument on the last rank only: (its own error, type and text)
ONE_RANK_ERRORS = {
    "one_rank_target_negative": ("ValueError", "target must hold ids in [0, V) or ignore_index"),
    "one_rank_vocab_start": ("ValueError", "vocab_start must be an int >= 0, got -1"),
    "one_rank_bias_shape": ("ValueError", "bias must have shape"),
    "one_rank_softcap": ("ValueError", "softcap"),
    "one_rank_rag_loss": ("ValueError", "label_smoothing must be a float in [0, 1), got 1.5"),
    "one_rank_feedback": ("ValueError", "target must hold ids in [0, V) or ignore_index"),
    "one_rank_token_smoothing": ("ValueError", "doc_mask"),
    "one_rank_hf": ("ValueError", "epsilon must be a number in [0, 1], got 2.0"),
}


@pytest.mark.parametrize("name", list(ONE_RANK_ERRORS))
def test_bad_argument_on_one_rank_stops_every_rank(ranks, name):
    """The rank with the bad argument raises its own error; the others raise one naming it,
    instead of waiting in a collective until the process group's timeout."""
    world, got = ranks
    kind, text = ONE_RANK_ERRORS[name]
    for rank, res in enumerate(got):
        err = res["errors"][name]
        assert err is not None, f"rank {rank}: {name} did not raise"
        if rank == world - 1:
            assert err[0] == kind and text in err[1], f"rank {rank}: {name} raised {err}"
        else:
            want = f"vocab_group: rank {world - 1} of the group rejected its arguments"
            assert err[0] == "ValueError" and want in err[1], f"rank {rank}: {name} raised {err}"


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_arguments_raise_on_every_rank(ranks, name):
    world, got = ranks
    kind, text = ERRORS[name]
    for rank, res in enumerate(got):
        err = res["errors"][name]
        assert err is not None, f"rank {rank}: {name} did not raise"
        assert err[0] == kind and text in err[1], f"rank {rank}: {name} raised {err}"


def test_group_of_one_rank_and_non_members(ranks):
    world, got = ranks
    c = make_linear_logprob(4, 3, V_FULL, seed=5)
    plain = rk.linear_logprob(c.hidden, c.weight, c.target, impl="reference")
    assert_close(got[0]["errors"]["solo_plain"], plain, rtol=RTOL, name="one-rank group")
    kind, msg = got[0]["errors"]["solo_start"]
    assert "vocab_start must be 0 when vocab_group has a single rank" in msg
    for rank in range(1, world):
        kind, msg = got[rank]["errors"]["non_member"]
        assert "is not a member of the group" in msg, msg


def test_without_process_group():
    """No torch.distributed here: a vocab_group is an error, vocab_start alone too."""
    c = make_linear_logprob(4, 3, V_FULL, seed=5)
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="vocab_group was given but torch.distributed is not"):
        rk.linear_logprob(c.hidden, c.weight, c.target, vocab_group=object(), vocab_start=0)
    with pytest.raises(ValueError, match="vocab_start=3 was given without vocab_group"):
        rk.linear_logprob(c.hidden, c.weight, c.target, vocab_start=3)
    h, w, y, s, _ = make_rag(1, 2, 3, 3, V_FULL)
    with pytest.raises(ValueError, match="without vocab_group"):
        rk.rag_loss(h, w, y, s, vocab_start=0)
