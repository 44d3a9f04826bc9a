"""Fuzz worker for tests/test_fuzz.py: runs one op's seeded random cases, reports JSON lines.

Run by the test in a subprocess (so a SIGFPE / SIGSEGV / abort in a kernel is a failed case,
not a dead pytest); also the way to reproduce one case by hand::

    TRITON_INTERPRET=1 .venv/bin/python tests/fuzz_worker.py linear_logprob --only 17 -v

Several ops may run in one process (``op1,op2``; ``--start op2:17`` resumes after a crash).
Every stdout line ``@@FUZZ {json}`` is an event: ``begin`` (a case/impl/dtype is about to run:
the last one seen names the culprit of a crash), ``result`` (one record per case x impl x
dtype: ``status`` ok / mismatch / error / expected-error / wrong-error / no-error),
``op-done`` and ``done``. Case ``i`` of op ``op`` is drawn from ``random.Random(seed)`` and a seeded
``torch.Generator`` with ``seed = case_seed(base_seed, op, kind, i)``: the same case whatever the
number of cases. Cases ``0 .. valid-1`` are valid, ``valid .. valid+invalid-1`` invalid.

A valid case holds float64 master inputs (exactly representable in the case dtype), options,
the names of the differentiable inputs, optionally a "poisoned" copy (NaN / +inf / -inf in
positions the op promises never to read: ignored target rows, masked documents, masked tokens)
and optionally the output positions that must be NaN (a NaN placed in an active input). For
each implementation (and the case dtype, plus float64 for the implementations that take it)
the value and the gradients for a random non-uniform upstream gradient are compared with the
float64 reference (``impl="reference"``, or an independent float64 oracle for ops without
implementations) computed on the CLEAN inputs:

* float64: ``max|a - e| <= 1e-9 * max(max|e|, 1e-3)``;
* float32: ``max|a - e| <= 1e-4 * max(max|e|, 1e-3)``;
* bfloat16 / float16: ``max|a - e| <= 2 * max|y - e| + 2u * max(max|e|, 1e-3)``, ``y`` plain
  PyTorch in the same dtype (the reference run on the 16-bit inputs), ``u`` its unit roundoff;

non-finite expected entries must be reproduced exactly (NaN for NaN, same-signed inf).
"""

from __future__ import annotations

import json
import os
import sys
import time

PREFIX = "@@FUZZ "


def emit(**event) -> None:
    sys.stdout.write(PREFIX + json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def _selftest_main(argv) -> None:
    """Pure-Python worker that crashes on purpose (tests the crash reporting of test_fuzz.py)."""
    import signal

    start = int(argv[argv.index("--start") + 1].rpartition(":")[2]) if "--start" in argv else 0
    for case in range(start, 5):
        emit(
            ev="begin",
            op="_selftest",
            case=case,
            seed=case,
            impl="default",
            dtype="-",
            phase="run",
            desc={},
        )
        if case == 1:
            os.kill(os.getpid(), signal.SIGSEGV)
        if case == 2:
            os.kill(os.getpid(), signal.SIGFPE)
        if case == 3:
            time.sleep(600)
        emit(
            ev="result",
            op="_selftest",
            case=case,
            seed=case,
            kind="valid",
            impl="default",
            dtype="-",
            status="ok",
            desc={},
        )
    emit(ev="done")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "_selftest":
    _selftest_main(sys.argv)
    sys.exit(0)

os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

import rag_kernels as rk  # noqa: E402
import triton_interpreter_compat  # noqa: E402
from rag_kernels.ops import registry  # noqa: E402
from rag_kernels.ops.token_smoothing import token_smoothing_with_logprob  # noqa: E402

triton_interpreter_compat.install()  # Triton < 3.9 interpreter with NumPy >= 2.4

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPE_NAMES = {F64: "fp64", F32: "fp32", BF16: "bf16", F16: "fp16"}
UNIT_ROUNDOFF = {BF16: 2.0**-8, F16: 2.0**-11}
NAN, INF = float("nan"), float("inf")
DEFAULT_SEED = 20240611


def case_seed(base: int, op: str, kind: str, index: int) -> int:
    digest = hashlib.sha256(f"{base}:{op}:{kind}:{index}".encode()).hexdigest()
    return int(digest[:12], 16)


# ------------------------------------------------------------------------------ the case


@dataclass
class Case:
    op: str
    index: int
    seed: int
    kind: str  # "valid" | "invalid"
    desc: dict
    dtype: torch.dtype = F64
    t: dict = field(default_factory=dict)  # clean inputs: float64 masters, ids, masks
    o: dict = field(default_factory=dict)  # non-tensor options
    grads: tuple = ()  # differentiable inputs (gradients compared)
    poisoned: dict | None = None  # t with masked positions holding NaN / +-inf
    nan_expect: list | None = None  # per output: bool mask that must be NaN (or None)
    compare_grads: bool = True
    alt: Callable | None = None  # (t) -> t2 whose results must be bitwise equal
    mutation: tuple | None = None  # invalid: (label, fn(t, o), exception types, arg name)
    rng: random.Random | None = None
    gen: torch.Generator | None = None
    upstream: list | None = None  # the random upstream gradient, shared by every run


class Draw:
    """Seeded draws of one case."""

    def __init__(self, seed: int, edge: str | None = None):
        self.rng = random.Random(seed)
        self.g = torch.Generator().manual_seed(seed % (2**63))
        self.edge = edge  # forced edge case of the first cases: "B0", "T0" or "ones"

    def choice(self, seq):
        return self.rng.choice(seq)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def dim(self, choices, p0: float = 0.0, role: str | None = None) -> int:
        """A size from ``choices``, 0 with probability ``p0``; the edge cases force the sizes
        of the dims with a ``role`` ("B", "T", "K", ...): 0 for "<role>0", 1 for "ones"."""
        x = 0 if self.rng.random() < p0 else self.rng.choice(choices)
        if role is not None and self.edge == role + "0":
            return 0
        if role is not None and self.edge == "ones":
            return 1
        return x

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g, dtype=F64)

    def rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g, dtype=F64)

    def randint(self, lo: int, hi: int, shape) -> torch.Tensor:
        return torch.randint(lo, hi, tuple(shape), generator=self.g, dtype=torch.int64)

    def bern(self, p: float, shape) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=self.g) < p

    def dtype(self, allow16: bool = True):
        dts = (F64, F64, F32, F32, BF16, F16) if allow16 else (F64, F32)
        return self.choice(dts)

    def poison_values(self, shape) -> torch.Tensor:
        vals = torch.tensor([NAN, INF, -INF], dtype=F64)
        return vals[torch.randint(0, 3, tuple(shape), generator=self.g)]

    def index_in(self, mask: torch.Tensor):
        """A random True position of ``mask`` (None when there is none)."""
        idx = mask.nonzero()
        if idx.shape[0] == 0:
            return None
        return tuple(idx[self.rng.randrange(idx.shape[0])].tolist())


def rep(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 values exactly representable in ``dtype``."""
    return x.to(dtype).to(F64)


def poison(d: Draw, x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN / +inf / -inf wherever ``where`` (broadcast to x) is True."""
    where = where.expand(x.shape) if where.shape != x.shape else where
    return torch.where(where, d.poison_values(x.shape), x)


def maybe_int32(d: Draw, ids: torch.Tensor) -> torch.Tensor:
    return ids.to(torch.int32) if d.chance(0.2) else ids


def keep_one_doc(d: Draw, mask: torch.Tensor) -> torch.Tensor:
    """``mask [B, K]`` with at least one True per row."""
    mask = mask.clone()
    for b in range(mask.shape[0]):
        if not mask[b].any():
            mask[b, d.rng.randrange(mask.shape[1])] = True
    return mask


def reduce_expect(per_query: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_query if reduction == "none" else per_query.any().reshape(())


# ------------------------------------------------------------------------------ linear_logprob


def gen_linear_logprob(d: Draw, base: bool) -> Case:
    p0 = 0.0 if base else 0.1
    rank = 3 if d.edge else d.choice((1, 2, 3, 3, 3))
    if rank == 1:
        lead = (d.dim((1, 2, 3, 5, 8, 13, 33), p0),)
    elif rank == 2:
        lead = (d.dim((1, 2, 3, 5), p0), d.dim((1, 2, 4, 7), p0))
    else:
        lead = (
            d.dim((1, 2, 3), p0, "B"),
            d.dim((1, 2, 3, 4, 5), 0, "K"),
            d.dim((1, 2, 3, 5, 8), p0, "T"),
        )
    H = d.dim((1, 2, 3, 5, 8, 16, 17, 32), 0, "H")
    V = d.dim((1, 2, 3, 7, 16, 31, 64, 97), 0, "V")
    dtype = F32 if base else d.dtype()
    ignore_index = d.choice((-100, -100, -1, 0, V))
    tshape = list(lead)
    if d.edge == "mixed":  # size-1 and larger dims, the target shared over all of them
        lead = (d.choice((2, 3)), 1, d.choice((2, 5)))
    shared = rank >= 2 and not base and (d.chance(0.5) or d.edge in ("B0", "T0", "mixed"))
    if shared:  # size 1 over one run of dims i..j, e.g. [B, 1, T] for hidden [B, K, T, H]
        i = 1 if rank == 3 and (d.chance(0.5) or d.edge) else d.rng.randrange(rank)
        j = i if rank == 3 and i == 1 else d.rng.randrange(i, rank)
        if d.edge == "mixed":
            i, j = 0, rank - 1
        for k in range(i, j + 1):
            tshape[k] = 1
    target = d.randint(0, V, tshape)
    p_ign = d.choice((0.0, 0.25, 0.6, 1.0)) if not base else 0.25
    target = torch.where(d.bern(p_ign, tshape), torch.full_like(target, ignore_index), target)
    target = maybe_int32(d, target)
    sigma = d.choice((0.3, 2.0, 8.0))
    t = {
        "hidden": rep(d.randn(*lead, H), dtype),
        "weight": rep(d.randn(V, H) * (sigma / math.sqrt(H)), dtype),
        "target": target,
        "bias": rep(d.randn(V) * sigma / 2, dtype) if d.chance(0.5) else None,
    }
    o = {
        "ignore_index": ignore_index,
        "softcap": d.choice((None, None, 0.7, 5, 30.0)),
        "return_stats": d.chance(0.5),
    }
    ign = (target == ignore_index).expand(lead)  # rows that must never be read
    desc = dict(
        lead=lead,
        H=H,
        V=V,
        target_shape=tuple(tshape),
        target_dtype=str(target.dtype),
        bias=t["bias"] is not None,
        ignored=int(ign.sum()),
        sigma=sigma,
        **o,
    )
    c = Case("linear_logprob", 0, 0, "valid", desc, dtype, t, o, grads=("hidden", "weight", "bias"))
    if shared and d.chance(0.6):
        c.alt = lambda tt: {**tt, "target": tt["target"].expand(lead).contiguous()}
        desc["alt"] = "expanded target must agree exactly"
    n_out = 3 if o["return_stats"] else 1
    nan_kind = None if base else d.choice((None, None, None, "poison", "poison", "nan"))
    if nan_kind == "poison" and ign.any():
        c.poisoned = {**t, "hidden": poison(d, t["hidden"], ign[..., None])}
        desc["poisoned"] = "ignored rows of hidden"
    elif nan_kind == "nan" and (~ign).any():
        where = d.choice(
            ("hidden", "weight", "bias") if t["bias"] is not None else ("hidden", "weight")
        )
        if where == "hidden":
            r = d.index_in(~ign)
            t["hidden"][r + (d.rng.randrange(H),)] = NAN
            must = torch.zeros(lead, dtype=torch.bool)
            must[r] = True
        else:
            if where == "weight":
                t["weight"][d.rng.randrange(V), d.rng.randrange(H)] = NAN
            else:
                t["bias"][d.rng.randrange(V)] = NAN
            must = ~ign
        c.nan_expect = [must] * n_out
        c.compare_grads = False
        c.alt = None
        desc["nan_in"] = where
    return c


def call_linear_logprob(t, o, impl):
    out = rk.linear_logprob(
        t["hidden"],
        t["weight"],
        t["target"],
        bias=t["bias"],
        ignore_index=o["ignore_index"],
        softcap=o["softcap"],
        impl=o.get("impl", impl),
        return_stats=o["return_stats"],
        **({"filter_eps": o["filter_eps"]} if "filter_eps" in o else {}),
    )
    return tuple(out) if o["return_stats"] else (out,)


def _other_float(x: torch.Tensor) -> torch.Tensor:
    return x.to(F32 if x.dtype != F32 else F64)


def _bump_last(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x[..., :1]], dim=-1)


def _setv(name, fn):
    def mutate(t, o):
        t[name] = fn(t[name], t, o)

    return mutate


def _opt(name, value):
    def mutate(t, o):
        o[name] = value

    return mutate


def _target_id(value_fn, name="target"):
    def mutate(t, o):
        x = t[name].clone()
        x.view(-1)[0] = value_fn(t, o)
        t[name] = x

    return mutate


def _bad_id(t, o) -> int:
    """A target id out of [0, V) that is not the ignore_index (nor hf's pad_token_id)."""
    V = t["weight"].shape[0]
    return V if o.get("ignore_index") != V else V + 1


def _vocab0(t, o):
    t["weight"] = t["weight"][:0]
    if t.get("bias") is not None:
        t["bias"] = t["bias"][:0]


def _hidden0(t, o):
    t["hidden"] = t["hidden"][..., :0]
    t["weight"] = t["weight"][:, :0]


def _ensure_bias(fn):
    def mutate(t, o):
        if t.get("bias") is None:
            t["bias"] = torch.zeros(t["weight"].shape[0], dtype=t["weight"].dtype)
        t["bias"] = fn(t["bias"])

    return mutate


TE, VE = TypeError, ValueError

LM_HEAD_MUTATIONS = [
    ("hidden int64", _setv("hidden", lambda x, t, o: x.long()), TE, "hidden"),
    ("hidden is a list", _setv("hidden", lambda x, t, o: x.tolist()), TE, "hidden"),
    ("H=0", _hidden0, VE, "hidden"),
    ("V=0", _vocab0, VE, "weight"),
    ("weight 1-D", _setv("weight", lambda x, t, o: x[0]), VE, "weight"),
    ("weight H mismatch", _setv("weight", lambda x, t, o: _bump_last(x)), VE, "weight"),
    ("weight dtype", _setv("weight", lambda x, t, o: _other_float(x)), TE, "weight"),
    ("weight on meta", _setv("weight", lambda x, t, o: x.to("meta")), VE, "weight"),
    ("bias wrong length", _ensure_bias(lambda b: torch.cat([b, b[:1]])), VE, "bias"),
    ("bias 2-D", _ensure_bias(lambda b: b[None]), VE, "bias"),
    ("bias dtype", _ensure_bias(_other_float), TE, "bias"),
    ("softcap=inf", _opt("softcap", INF), VE, "softcap"),
    ("softcap=nan", _opt("softcap", NAN), VE, "softcap"),
    ("softcap=True", _opt("softcap", True), VE, "softcap"),
    ("softcap=-1", _opt("softcap", -1.0), VE, "softcap"),
    ("softcap=0", _opt("softcap", 0), VE, "softcap"),
    ("softcap='3'", _opt("softcap", "3"), VE, "softcap"),
    ("impl=bogus", _opt("impl", "bogus"), VE, "impl"),
]

LLP_MUTATIONS = LM_HEAD_MUTATIONS + [
    ("hidden 0-d", _setv("hidden", lambda x, t, o: x.reshape(-1)[:1].reshape(())), VE, "hidden"),
    ("target float", _setv("target", lambda x, t, o: x.double()), TE, "target"),
    ("target wrong shape", _setv("target", lambda x, t, o: _bump_last(x)), VE, "target"),
    ("target extra dim", _setv("target", lambda x, t, o: x[..., None]), VE, "target"),
    ("target id = V", _target_id(_bad_id), VE, "target"),
    (
        "target id = -2",
        _target_id(lambda t, o: -2 if o["ignore_index"] != -2 else -3),
        VE,
        "target",
    ),
    ("target on meta", _setv("target", lambda x, t, o: x.to("meta")), VE, "target"),
    ("ignore_index=1.5", _opt("ignore_index", 1.5), TE, "ignore_index"),
    ("ignore_index=True", _opt("ignore_index", True), TE, "ignore_index"),
    ("filter_eps=1.5", _opt("filter_eps", 1.5), VE, "filter_eps"),
]


# ------------------------------------------------------------------------------ marginalize


def gen_marginalize(op: str):
    def gen(d: Draw, base: bool) -> Case:
        p0 = 0.0 if base else 0.1
        B = d.dim((1, 2, 3, 5), p0, "B")
        K = d.choice((2, 3, 4)) if base else d.dim((1, 1, 2, 3, 4, 7), 0, "K")
        T = d.dim((1, 2, 3, 6, 9), p0, "T")
        dtype = F32 if base else d.dtype()
        lp = -d.rand(B, K, T).pow(2) * d.choice((0.5, 3.0, 20.0))
        scores = d.randn(B, K) * d.choice((0.5, 3.0, 10.0))
        tm = d.bern(d.choice((0.5, 0.8, 1.0)), (B, T)) if d.chance(0.6) else None
        dm = keep_one_doc(d, d.bern(d.choice((0.4, 0.8)), (B, K))) if d.chance(0.6) else None
        t = {
            "token_logprobs": rep(lp, dtype),
            "doc_scores": rep(scores, dtype),
            "token_mask": tm,
            "doc_mask": dm,
        }
        o = {"reduction": d.choice(("none", "sum", "mean"))}
        if op == "document_posterior":
            o = {"mode": d.choice(("sequence", "token"))}
        desc = dict(B=B, K=K, T=T, token_mask=tm is not None, doc_mask=dm is not None, **o)
        grads = () if op == "document_posterior" else ("token_logprobs", "doc_scores")
        c = Case(op, 0, 0, "valid", desc, dtype, t, o, grads=grads)
        if base:
            return c
        keep_tok = tm if tm is not None else torch.ones(B, T, dtype=torch.bool)
        keep_doc = dm if dm is not None else torch.ones(B, K, dtype=torch.bool)
        active = keep_tok[:, None, :] & keep_doc[:, :, None]
        kind = d.choice((None, None, "poison", "poison", "nan", "neginf"))
        if kind == "poison" and not bool(active.all()):
            c.poisoned = {**t, "token_logprobs": poison(d, t["token_logprobs"], ~active)}
            if dm is not None and d.chance(0.7):
                c.poisoned["doc_scores"] = t["doc_scores"].masked_fill(~dm, -INF)
            desc["poisoned"] = "masked tokens/docs of token_logprobs, -inf masked doc scores"
        elif kind == "nan" and active.any():
            b, k, tt = d.index_in(active)
            t["token_logprobs"][b, k, tt] = NAN
            must = torch.zeros(B, dtype=torch.bool)
            must[b] = True
            if op == "document_posterior":
                m = torch.zeros(B, K, dtype=torch.bool) if o["mode"] == "sequence" else None
                if m is not None:
                    m[b] = keep_doc[b]
                else:
                    m = torch.zeros(B, K, T, dtype=torch.bool)
                    m[b, :, tt] = keep_doc[b]
                c.nan_expect = [m]
            else:
                c.nan_expect = [reduce_expect(must, o["reduction"])]
            c.compare_grads = False
            desc["nan_in"] = [b, k, tt]
        elif kind == "neginf" and active.any():
            # -inf log-probs are legal (probability 0); on every kept doc of a token: loss +inf
            b, k, tt = d.index_in(active)
            docs = keep_doc[b] if d.chance(0.5) else torch.arange(K) == k
            t["token_logprobs"][b, docs, tt] = -INF
            desc["neg_inf"] = [b, tt, docs.nonzero()[:, 0].tolist()]
        return c

    return gen


def call_marginalize(op: str):
    fn = {"rag_sequence_loss": rk.rag_sequence_loss, "rag_token_loss": rk.rag_token_loss}.get(op)

    def call(t, o, impl):
        if op == "document_posterior":
            return (
                rk.document_posterior(
                    t["token_logprobs"],
                    t["doc_scores"],
                    token_mask=t["token_mask"],
                    doc_mask=t["doc_mask"],
                    mode=o["mode"],
                ),
            )
        return (
            fn(
                t["token_logprobs"],
                t["doc_scores"],
                token_mask=t["token_mask"],
                doc_mask=t["doc_mask"],
                reduction=o["reduction"],
                impl=o.get("impl", impl),
            ),
        )

    return call


def posterior_oracle(t, o):
    lp, s, tm, dm = t["token_logprobs"], t["doc_scores"], t["token_mask"], t["doc_mask"]
    B, K, T = lp.shape
    tm = torch.ones(B, T, dtype=torch.bool) if tm is None else tm
    dm = torch.ones(B, K, dtype=torch.bool) if dm is None else dm
    keep = tm[:, None, :] & dm[:, :, None]
    lp = torch.where(keep, lp.double(), 0.0)
    s = torch.where(dm, s.double(), -INF)
    prior = s - torch.logsumexp(s, dim=1, keepdim=True)
    if o["mode"] == "sequence":
        joint = torch.where(dm, prior + lp.sum(-1), -INF)
        w = torch.exp(joint - joint.max(dim=1, keepdim=True).values)
        return (w / w.sum(dim=1, keepdim=True),)
    joint = torch.where(dm[:, :, None], prior[:, :, None] + lp, -INF)
    w = torch.exp(joint - joint.max(dim=1, keepdim=True).values)
    return (w / w.sum(dim=1, keepdim=True),)


def _K0(names):
    def mutate(t, o):
        for n in names:
            if t.get(n) is not None:
                t[n] = t[n][:, :0]

    return mutate


def _mask_first(name="doc_mask", shape_of="doc_scores"):
    def mutate(t, o):
        m = torch.ones(t[shape_of].shape[:2], dtype=torch.bool)
        m[0, 1] = False
        t[name] = m

    return mutate


def _score_at(value, masked: bool, name="doc_scores"):
    def mutate(t, o):
        s = t[name].clone()
        if masked:
            m = torch.ones(s.shape, dtype=torch.bool)
            m[0, 1] = False
            t["doc_mask"] = m
            s[0, 1] = value
        else:
            t["doc_mask"] = None
            s[0, 0] = value
        t[name] = s

    return mutate


def _empty_doc_row(t, o):
    m = torch.ones(t["doc_scores"].shape, dtype=torch.bool)
    m[-1] = False
    t["doc_mask"] = m


def _tm_ones(fn):
    def mutate(t, o):
        B, _, T = t["token_logprobs"].shape
        t["token_mask"] = fn(torch.ones(B, T, dtype=torch.bool))

    return mutate


SCORE_MUTATIONS = [
    ("doc_scores NaN", _score_at(NAN, False), VE, "doc_scores"),
    ("doc_scores +inf", _score_at(INF, False), VE, "doc_scores"),
    ("doc_scores -inf unmasked", _score_at(-INF, False), VE, "doc_scores"),
    ("doc_scores NaN masked", _score_at(NAN, True), VE, "doc_scores"),
    ("doc_scores +inf masked", _score_at(INF, True), VE, "doc_scores"),
    (
        "doc_mask float",
        _setv("doc_mask", lambda x, t, o: torch.ones(t["doc_scores"].shape)),
        TE,
        "doc_mask",
    ),
    (
        "doc_mask wrong shape",
        _setv(
            "doc_mask",
            lambda x, t, o: torch.ones(
                t["doc_scores"].shape[0], t["doc_scores"].shape[1] + 1, dtype=torch.bool
            ),
        ),
        VE,
        "doc_mask",
    ),
    ("doc_mask empty row", _empty_doc_row, VE, "doc_mask"),
]

MARG_MUTATIONS = SCORE_MUTATIONS + [
    (
        "token_logprobs 2-D",
        _setv("token_logprobs", lambda x, t, o: x[:, :, 0]),
        VE,
        "token_logprobs",
    ),
    ("token_logprobs int", _setv("token_logprobs", lambda x, t, o: x.long()), TE, "token_logprobs"),
    (
        "token_logprobs list",
        _setv("token_logprobs", lambda x, t, o: x.tolist()),
        TE,
        "token_logprobs",
    ),
    ("K=0", _K0(("token_logprobs", "doc_scores", "doc_mask")), VE, "token_logprobs"),
    ("doc_scores 1-D", _setv("doc_scores", lambda x, t, o: x[:, 0]), VE, "doc_scores"),
    ("doc_scores wrong K", _setv("doc_scores", lambda x, t, o: _bump_last(x)), VE, "doc_scores"),
    ("doc_scores int", _setv("doc_scores", lambda x, t, o: x.long()), TE, "doc_scores"),
    ("doc_scores on meta", _setv("doc_scores", lambda x, t, o: x.to("meta")), VE, "doc_scores"),
    ("token_mask float", _tm_ones(lambda m: m.float()), TE, "token_mask"),
    ("token_mask wrong shape", _tm_ones(_bump_last), VE, "token_mask"),
    ("token_mask list", _tm_ones(lambda m: m.tolist()), TE, "token_mask"),
]

MARGINALIZE_MUTATIONS = MARG_MUTATIONS + [
    ("reduction=avg", _opt("reduction", "avg"), VE, "reduction"),
    ("impl=bogus", _opt("impl", "bogus"), VE, "impl"),
]
POSTERIOR_MUTATIONS = MARG_MUTATIONS + [("mode=bogus", _opt("mode", "bogus"), VE, "mode")]


# ------------------------------------------------------------------------------ rag_loss


def _lm_head(d: Draw, dtype, H, V, sigma):
    return (
        rep(d.randn(V, H) * (sigma / math.sqrt(H)), dtype),
        rep(d.randn(V) * sigma / 2, dtype) if d.chance(0.5) else None,
    )


def gen_rag(op: str):
    """rag_loss / generator_feedback / token_smoothing / token_smoothing_with_logprob."""

    def gen(d: Draw, base: bool) -> Case:
        p0 = 0.0 if base else 0.1
        B = d.dim((1, 1, 2, 3), p0, "B")
        K = d.choice((2, 3)) if base else d.choice((1, 1, 2, 3, 4))  # "ones": any K (B=T=1)
        T = d.dim((1, 1, 2, 3, 5), p0, "T")
        H = d.dim((1, 2, 3, 8, 13), 0, "H")
        V = d.dim((1, 2, 3, 7, 16, 37), 0, "V")
        dtype = F32 if base else d.dtype()
        sigma = d.choice((0.5, 2.0, 6.0))
        weight, bias = _lm_head(d, dtype, H, V, sigma)
        has_target = op != "token_smoothing"
        has_docs = op != "generator_feedback"
        ignore_index = d.choice((-100, -1)) if has_target else -1
        target = d.randint(0, V, (B, T))
        ign = d.bern(d.choice((0.0, 0.3, 0.7)), (B, T)) if has_target else torch.zeros(B, T) > 0
        target = maybe_int32(d, torch.where(ign, torch.full_like(target, ignore_index), target))
        dm = keep_one_doc(d, d.bern(0.6, (B, K))) if has_docs and d.chance(0.5) else None
        t = {"hidden": rep(d.randn(B, K, T, H), dtype), "weight": weight, "bias": bias}
        if has_target:
            t["target"] = target
        if has_docs:
            t["doc_scores"] = rep(d.randn(B, K) * d.choice((0.5, 3.0)), dtype)
            t["doc_mask"] = dm
        o = {"softcap": d.choice((None, None, 1.0, 10))}
        if has_target:
            o["ignore_index"] = ignore_index
        if op == "rag_loss":
            o.update(
                mode=d.choice(("sequence", "token")),
                label_smoothing=d.choice((0.0, 0.0, 0.1)),
                reduction=d.choice(("none", "sum", "mean")),
                grad_skip_eps=d.choice((0.0,) * 9 + (0.05,)) if not base else 0.0,
            )
        desc = dict(
            B=B,
            K=K,
            T=T,
            H=H,
            V=V,
            bias=bias is not None,
            doc_mask=dm is not None,
            ignored=int(ign.sum()),
            sigma=sigma,
            **o,
        )
        grads = () if op == "generator_feedback" else ("hidden", "weight", "bias", "doc_scores")
        c = Case(op, 0, 0, "valid", desc, dtype, t, o, grads=grads)
        if op == "rag_loss" and o["grad_skip_eps"] > 0:
            c.compare_grads = False  # approximate gradients by design (bound in the docstring)
        if base:
            return c
        keep_doc = dm if dm is not None else torch.ones(B, K, dtype=torch.bool)
        active = ~ign[:, None, :] & keep_doc[:, :, None]  # [B, K, T] rows that are read
        kind = d.choice((None, "poison", "poison", "nan"))
        if kind == "poison" and not bool(active.all()):
            c.poisoned = {**t, "hidden": poison(d, t["hidden"], ~active[..., None])}
            if dm is not None and d.chance(0.7):
                c.poisoned["doc_scores"] = t["doc_scores"].masked_fill(~dm, -INF)
            desc["poisoned"] = "hidden of ignored tokens / masked docs, -inf masked doc scores"
        elif kind == "nan" and active.any():
            where = d.choice(("hidden", "hidden", "weight"))
            if where == "hidden":
                b, k, tt = d.index_in(active)
                t["hidden"][b, k, tt, d.rng.randrange(H)] = NAN
                rows = torch.zeros(B, K, T, dtype=torch.bool)
                rows[b, k, tt] = True
            else:
                t["weight"][d.rng.randrange(V), d.rng.randrange(H)] = NAN
                rows = active
            c.nan_expect = nan_outputs(op, o, rows, active, keep_doc)
            c.compare_grads = False
            desc["nan_in"] = where
        return c

    return gen


def nan_outputs(op, o, rows, active, keep_doc):
    """Output positions that must be NaN when the rows ``rows [B,K,T]`` hold a NaN logit."""
    if op == "rag_loss":
        return [reduce_expect(rows.any(dim=(1, 2)), o["reduction"])]
    if op == "generator_feedback":
        per_doc = rows.any(dim=2)
        return [rows, per_doc, per_doc]
    # token_smoothing: out[b, t] over the kept docs; with_logprob: lp on the kept, non-ignored rows
    out = (rows & keep_doc[:, :, None]).any(dim=1)
    return [out] if op == "token_smoothing" else [out, rows & active]


def call_rag(op: str):
    def call(t, o, impl):
        impl = o.get("impl", impl)
        if op == "rag_loss":
            return (
                rk.rag_loss(
                    t["hidden"],
                    t["weight"],
                    t["target"],
                    t["doc_scores"],
                    mode=o["mode"],
                    bias=t["bias"],
                    ignore_index=o["ignore_index"],
                    label_smoothing=o["label_smoothing"],
                    doc_mask=t["doc_mask"],
                    softcap=o["softcap"],
                    grad_skip_eps=o["grad_skip_eps"],
                    reduction=o["reduction"],
                    impl=impl,
                ),
            )
        if op == "generator_feedback":
            return tuple(
                rk.generator_feedback(
                    t["hidden"],
                    t["weight"],
                    t["target"],
                    bias=t["bias"],
                    ignore_index=o["ignore_index"],
                    softcap=o["softcap"],
                    impl=impl,
                )
            )
        if op == "token_smoothing":
            return (
                rk.token_smoothing(
                    t["hidden"],
                    t["weight"],
                    t["doc_scores"],
                    bias=t["bias"],
                    softcap=o["softcap"],
                    doc_mask=t["doc_mask"],
                    impl=impl,
                ),
            )
        return tuple(
            token_smoothing_with_logprob(
                t["hidden"],
                t["weight"],
                t["doc_scores"],
                t["target"],
                bias=t["bias"],
                softcap=o["softcap"],
                doc_mask=t["doc_mask"],
                ignore_index=o["ignore_index"],
                impl=impl,
            )
        )

    return call


TARGET_2D_MUTATIONS = [
    ("target 1-D", _setv("target", lambda x, t, o: x[0]), VE, "target"),
    ("target float", _setv("target", lambda x, t, o: x.double()), TE, "target"),
    ("target wrong T", _setv("target", lambda x, t, o: _bump_last(x)), VE, "target"),
    ("target id = V", _target_id(_bad_id), VE, "target"),
    ("ignore_index=1.5", _opt("ignore_index", 1.5), TE, "ignore_index"),
]
HIDDEN4_MUTATIONS = [
    ("hidden 3-D", _setv("hidden", lambda x, t, o: x[:, 0]), VE, "hidden"),
]
DOCS_MUTATIONS = SCORE_MUTATIONS + [
    ("K=0", _K0(("hidden", "doc_scores", "doc_mask")), VE, "hidden"),
    ("doc_scores 1-D", _setv("doc_scores", lambda x, t, o: x[:, 0]), VE, "doc_scores"),
    ("doc_scores wrong K", _setv("doc_scores", lambda x, t, o: _bump_last(x)), VE, "doc_scores"),
]
RAG_LOSS_MUTATIONS = (
    LM_HEAD_MUTATIONS
    + HIDDEN4_MUTATIONS
    + TARGET_2D_MUTATIONS
    + DOCS_MUTATIONS
    + [
        ("mode=bogus", _opt("mode", "bogus"), VE, "mode"),
        ("label_smoothing=1.5", _opt("label_smoothing", 1.5), VE, "label_smoothing"),
        ("label_smoothing=1.0", _opt("label_smoothing", 1.0), VE, "label_smoothing"),
        ("label_smoothing=-0.1", _opt("label_smoothing", -0.1), VE, "label_smoothing"),
        ("label_smoothing='0.1'", _opt("label_smoothing", "0.1"), VE, "label_smoothing"),
        ("grad_skip_eps=1.0", _opt("grad_skip_eps", 1.0), VE, "grad_skip_eps"),
        ("reduction=avg", _opt("reduction", "avg"), VE, "reduction"),
    ]
)
FEEDBACK_MUTATIONS = LM_HEAD_MUTATIONS + HIDDEN4_MUTATIONS + TARGET_2D_MUTATIONS
TS_MUTATIONS = LM_HEAD_MUTATIONS + HIDDEN4_MUTATIONS + DOCS_MUTATIONS
TSL_MUTATIONS = TS_MUTATIONS + TARGET_2D_MUTATIONS


# ------------------------------------------------------------------------------ hf drop-ins


def gen_hf(op: str):
    def gen(d: Draw, base: bool) -> Case:
        B = d.choice((1, 2, 3)) if base else d.dim((1, 1, 2, 3), 0.05, "B")
        K = d.choice((2, 3)) if base else d.choice((1, 2, 3, 4))
        # T >= 1 (T = 0 is a ValueError of the drop-ins); edge "T0" gives T = 1
        T = d.choice((2, 3, 5)) if base else max(1, d.dim((1, 2, 3, 5, 7), 0, "T"))
        H = d.dim((1, 2, 5, 8, 16), 0, "H")
        V = d.choice((2, 3, 7, 16, 37))
        dtype = F32 if base else d.dtype()
        sigma = d.choice((0.5, 2.0, 6.0))
        weight, bias = _lm_head(d, dtype, H, V, sigma)
        pad = d.rng.randrange(V)
        bos = d.choice((None, d.rng.randrange(V))) if op == "rag_sequence_get_nll" else None
        target = d.randint(0, V, (B, T))
        for b in range(B):
            target[b, d.rng.randrange(T + 1) :] = pad
        if bos is not None and T >= 2 and d.chance(0.6):
            target[:, 1] = bos
        target = maybe_int32(d, target)
        t = {
            "hidden": rep(d.randn(B * K, T, H), dtype),
            "weight": weight,
            "bias": bias,
            "doc_scores": rep(d.randn(B, K) * d.choice((0.5, 3.0)), dtype),
            "target": target,
        }
        o = {
            "pad_token_id": pad,
            "reduce_loss": d.chance(0.5),
            "epsilon": d.choice((0.0, 0.0, 0.1, 1.0)),
            "n_docs": d.choice((None, K)),
            "softcap": d.choice((None, None, 2.0)),
        }
        if op == "rag_sequence_get_nll":
            o.update(bos_token_id=bos, exclude_bos_score=d.chance(0.5))
        shifted = torch.cat([target[:, 1:], torch.full_like(target[:, :1], pad)], dim=1)
        keep = shifted != pad  # [B, T]
        desc = dict(B=B, K=K, T=T, H=H, V=V, bias=bias is not None, kept=int(keep.sum()), **o)
        c = Case(
            op, 0, 0, "valid", desc, dtype, t, o, grads=("hidden", "weight", "bias", "doc_scores")
        )
        if base:
            return c
        rows = keep[:, None, :].expand(B, K, T).reshape(B * K, T)
        kind = d.choice((None, "poison", "poison", "nan"))
        scorable = keep.clone()
        if o.get("exclude_bos_score") and bos is not None:
            scorable[:, 0] = False  # position 0 may be dropped from the likelihood
        if kind == "poison" and not bool(rows.all()):
            c.poisoned = {**t, "hidden": poison(d, t["hidden"], ~rows[..., None])}
            desc["poisoned"] = "hidden rows whose shifted target is pad"
        elif kind == "nan" and scorable.any():
            b, tt = d.index_in(scorable)
            k = d.rng.randrange(K)
            t["hidden"][b * K + k, tt, d.rng.randrange(H)] = NAN
            must = torch.zeros(B, dtype=torch.bool)
            must[b] = True
            c.nan_expect = [must.any().reshape(()) if o["reduce_loss"] else must]
            c.compare_grads = False
            desc["nan_in"] = [b, k, tt]
        return c

    return gen


def call_hf(op: str):
    fn = getattr(rk.hf, op)

    def call(t, o, impl):
        kw = {k: v for k, v in o.items() if k != "impl"}
        return (
            fn(
                t["hidden"],
                t["weight"],
                t["doc_scores"],
                t["target"],
                bias=t["bias"],
                impl=o.get("impl", impl),
                **kw,
            ),
        )

    return call


def _hf_T0(t, o):
    t["hidden"] = t["hidden"][:, :0]
    t["target"] = t["target"][:, :0]


def _hf_target_id(value_fn):
    """A bad target id where the drop-ins read it: column 0 is never read (transformers
    predicts target[:, 1:]), so the last column; with T = 1 nothing is read, and a target of
    the wrong T stands in."""

    def mutate(t, o):
        x = t["target"].clone()
        if x.shape[1] < 2:
            t["target"] = torch.cat([x, x], dim=1)
            return
        x[0, -1] = value_fn(t, o)
        t["target"] = x

    return mutate


HF_MUTATIONS = [m for m in LM_HEAD_MUTATIONS if not m[0].startswith("target id")] + [
    ("target id = V", _hf_target_id(_bad_id), VE, "target"),
    (
        "target id = -2",
        _hf_target_id(lambda t, o: -2 if o["pad_token_id"] != -2 else -3),
        VE,
        "target",
    ),
    ("hidden 4-D", _setv("hidden", lambda x, t, o: x[None]), VE, "hidden"),
    ("T=0", _hf_T0, VE, "hidden"),
    ("doc_scores 1-D", _setv("doc_scores", lambda x, t, o: x[:, 0]), VE, "doc_scores"),
    (
        "doc_scores wrong B",
        _setv("doc_scores", lambda x, t, o: torch.cat([x, x[:1]])),
        VE,
        "doc_scores",
    ),
    ("doc_scores NaN", _score_at(NAN, False), VE, "doc_scores"),
    ("n_docs=0", _opt("n_docs", 0), VE, "n_docs"),
    (
        "n_docs not a divisor",
        lambda t, o: o.__setitem__("n_docs", t["hidden"].shape[0] + 1),
        VE,
        "n_docs",
    ),
    ("n_docs=1.5", _opt("n_docs", 1.5), TE, "n_docs"),
    ("target wrong T", _setv("target", lambda x, t, o: _bump_last(x)), VE, "target"),
    ("target float", _setv("target", lambda x, t, o: x.double()), TE, "target"),
    ("pad_token_id=1.5", _opt("pad_token_id", 1.5), TE, "pad_token_id"),
    ("pad_token_id=None", _opt("pad_token_id", None), TE, "pad_token_id"),
    ("epsilon=1.5", _opt("epsilon", 1.5), VE, "epsilon"),
    ("epsilon=-0.1", _opt("epsilon", -0.1), VE, "epsilon"),
    ("epsilon=True", _opt("epsilon", True), VE, "epsilon"),
    ("reduce_loss=1", _opt("reduce_loss", 1), TE, "reduce_loss"),
]
HF_SEQ_MUTATIONS = HF_MUTATIONS + [
    ("bos_token_id=1.5", _opt("bos_token_id", 1.5), TE, "bos_token_id"),
    ("exclude_bos_score='yes'", _opt("exclude_bos_score", "yes"), TE, "exclude_bos_score"),
]


# ------------------------------------------------------------------------------ contrastive


def gen_contrastive(d: Draw, base: bool) -> Case:
    B = max(1, d.dim((1, 2, 3, 5, 8), 0, "B"))  # B = 0 is a ValueError
    D = d.dim((1, 2, 3, 8, 17), 0, "D")
    kind = d.choice(("none", "index", "index", "mask")) if not base else "index"
    M = B + d.rng.randrange(5) if kind == "none" else d.dim((1, 2, 3, 5, 8, 11), 0, "M")
    dtype = F32 if base else d.dtype()
    sim = d.choice(("cos", "dot"))
    positives = None
    if kind == "index":
        positives = maybe_int32(d, d.randint(0, M, (B,)))
    elif kind == "mask":
        positives = d.bern(0.3, (B, M))
        for b in range(B):
            if not positives[b].any():
                positives[b, d.rng.randrange(M)] = True
    symmetric = kind != "mask" and d.chance(0.4)
    doc_ids = maybe_int32(d, d.randint(0, max(1, M // 2), (M,))) if d.chance(0.4) else None
    q, docs = d.randn(B, D), d.randn(M, D)
    if sim == "dot":
        q, docs = q / math.sqrt(D), docs * d.choice((0.5, 2.0))
    if d.chance(0.15):
        q[d.rng.randrange(B)] = 0.0  # a zero embedding (F.normalize's eps)
    scale = d.choice((20.0, 5.0, 1.0) if sim == "cos" else (1.0, 0.5, 3.0))
    t = {
        "queries": rep(q, dtype),
        "docs": rep(docs, dtype),
        "positives": positives,
        "doc_ids": doc_ids,
    }
    grads = ("queries", "docs")
    if d.chance(0.3):
        t["scale"] = rep(torch.tensor(scale, dtype=F64), dtype)
        grads = grads + ("scale",)
    o = {
        "scale": scale,
        "similarity": sim,
        "symmetric": symmetric,
        "reduction": d.choice(("none", "sum", "mean")),
    }
    desc = dict(
        B=B, D=D, M=M, positives=kind, doc_ids=doc_ids is not None, scale_tensor="scale" in t, **o
    )
    c = Case("contrastive_loss", 0, 0, "valid", desc, dtype, t, o, grads=grads)
    if not base and d.chance(0.15):
        i = d.rng.randrange(B)
        t["queries"][i, d.rng.randrange(D)] = NAN
        must = torch.zeros(B, dtype=torch.bool)
        must[i] = True
        c.nan_expect = [reduce_expect(must, o["reduction"])]
        c.compare_grads = False
        desc["nan_in"] = ["queries", i]
    return c


def call_contrastive(t, o, impl):
    kw = {k: v for k, v in o.items() if k != "impl"}
    if "scale" in t:
        kw["scale"] = t["scale"]
    return (
        rk.contrastive_loss(
            t["queries"],
            t["docs"],
            t["positives"],
            doc_ids=t["doc_ids"],
            impl=o.get("impl", impl),
            **kw,
        ),
    )


def _positives(fn):
    def mutate(t, o):
        B, M = t["queries"].shape[0], t["docs"].shape[0]
        t["positives"] = fn(B, M, t)

    return mutate


def _scale(value):
    def mutate(t, o):
        t.pop("scale", None)  # a tensor scale would override the option
        o["scale"] = value

    return mutate


CONTRASTIVE_MUTATIONS = [
    ("queries is a list", _setv("queries", lambda x, t, o: x.tolist()), TE, "queries"),
    ("queries 1-D", _setv("queries", lambda x, t, o: x[0]), VE, "queries"),
    ("queries int", _setv("queries", lambda x, t, o: x.long()), TE, "queries"),
    ("B=0", _setv("queries", lambda x, t, o: x[:0]), VE, "queries"),
    ("docs D mismatch", _setv("docs", lambda x, t, o: _bump_last(x)), VE, "docs"),
    ("docs dtype", _setv("docs", lambda x, t, o: _other_float(x)), TE, "docs"),
    ("docs on meta", _setv("docs", lambda x, t, o: x.to("meta")), VE, "docs"),
    (
        "positives=None, M<B",
        lambda t, o: (
            t.__setitem__("positives", None),
            t.__setitem__("doc_ids", None),
            t.__setitem__("docs", t["docs"][: t["queries"].shape[0] - 1]),
        ),
        VE,
        "positives",
    ),
    ("positives = M", _positives(lambda B, M, t: torch.full((B,), M)), VE, "positives"),
    ("positives = -1", _positives(lambda B, M, t: torch.full((B,), -1)), VE, "positives"),
    ("positives float", _positives(lambda B, M, t: torch.zeros(B)), TE, "positives"),
    (
        "positives 2-D index",
        _positives(lambda B, M, t: torch.zeros(B, 1, dtype=torch.long)),
        VE,
        "positives",
    ),
    (
        "positives mask wrong shape",
        _positives(lambda B, M, t: torch.ones(B, M + 1) > 0),
        VE,
        "positives",
    ),
    (
        "positives mask empty row",
        _positives(lambda B, M, t: torch.zeros(B, M) > 0),
        VE,
        "positives",
    ),
    ("positives list", _positives(lambda B, M, t: [0] * B), TE, "positives"),
    (
        "symmetric with mask",
        lambda t, o: (
            o.__setitem__("symmetric", True),
            _positives(lambda B, M, t: torch.ones(B, M) > 0)(t, o),
        ),
        VE,
        "symmetric",
    ),
    ("symmetric='yes'", _opt("symmetric", "yes"), TE, "symmetric"),
    ("gather='no'", _opt("gather", "no"), TE, "gather"),
    ("scale=-1", _scale(-1.0), VE, "scale"),
    ("scale=inf", _scale(INF), VE, "scale"),
    ("scale=nan", _scale(NAN), VE, "scale"),
    ("scale=True", _scale(True), TE, "scale"),
    ("scale='20'", _scale("20"), TE, "scale"),
    (
        "scale 1-D tensor",
        lambda t, o: t.__setitem__("scale", torch.ones(1, dtype=t["queries"].dtype)),
        VE,
        "scale",
    ),
    ("similarity=l2", _opt("similarity", "l2"), VE, "similarity"),
    (
        "doc_ids wrong shape",
        lambda t, o: t.__setitem__(
            "doc_ids", torch.zeros(t["docs"].shape[0] + 1, dtype=torch.long)
        ),
        VE,
        "doc_ids",
    ),
    (
        "doc_ids float",
        lambda t, o: t.__setitem__("doc_ids", torch.zeros(t["docs"].shape[0])),
        TE,
        "doc_ids",
    ),
    ("reduction=batchmean", _opt("reduction", "batchmean"), VE, "reduction"),
    ("impl=bogus", _opt("impl", "bogus"), VE, "impl"),
]


# ------------------------------------------------------------------------------ retriever


def gen_retriever(op: str):
    def gen(d: Draw, base: bool) -> Case:
        B = d.choice((1, 2, 3)) if base else d.dim((1, 2, 3, 5), 0.1, "B")
        K = d.choice((2, 3, 4)) if base else d.dim((1, 2, 3, 4, 7), 0, "K")
        dtype = F32 if base else d.dtype()
        dm = keep_one_doc(d, d.bern(0.7, (B, K))) if d.chance(0.5) else None
        t = {"doc_scores": rep(d.randn(B, K) * d.choice((0.3, 1.0, 3.0)), dtype), "doc_mask": dm}
        o = {}
        keep_doc = dm if dm is not None else torch.ones(B, K, dtype=torch.bool)
        if op == "emdr2_loss":
            T = d.dim((1, 2, 3, 6), 0.0 if base else 0.1, None if base else "T")
            tm = d.bern(0.7, (B, T)) if d.chance(0.5) else None
            t["gen_logprobs"] = rep(-d.rand(B, K, T).pow(2) * d.choice((1.0, 5.0)), dtype)
            t["token_mask"] = tm
            o.update(
                level=d.choice(("token", "answer")),
                reduction=d.choice(("mean", "sum", "none")),
                retriever_temperature=d.choice((1.0, 0.1, 2.0)),
            )
            other = "gen_logprobs"
            keep_tok = tm if tm is not None else torch.ones(B, T, dtype=torch.bool)
            active = keep_tok[:, None, :] & keep_doc[:, :, None]
        else:
            other = {
                "pdist_loss": "gen_scores",
                "loop_loss": "nll_without_doc",
                "adist_loss": "attention_scores",
                "lsr_loss": "lm_logprobs",
            }[op]
            t[other] = rep(d.randn(B, K) * d.choice((0.3, 1.0, 3.0)), dtype)
            reds = ("batchmean", "mean", "sum", "none")
            if op == "lsr_loss":
                o.update(
                    retriever_temperature=d.choice((1.0, 0.5)),
                    lm_temperature=d.choice((1.0, 0.3)),
                    direction=d.choice(("retriever||lm", "lm||retriever")),
                    reduction=d.choice(reds),
                )
            else:
                o.update(
                    retriever_temperature=d.choice((0.01, 0.1, 1.0)),
                    generator_temperature=d.choice((0.01, 0.1, 1.0)),
                    reduction=d.choice(reds),
                )
            active = keep_doc
        o["_other"] = other
        desc = dict(
            B=B,
            K=K,
            doc_mask=dm is not None,
            shape=tuple(t[other].shape),
            **{k: v for k, v in o.items() if k != "_other"},
        )
        # the generator-side input is detached inside the function: its gradient must be 0
        c = Case(op, 0, 0, "valid", desc, dtype, t, o, grads=("doc_scores", other))
        if base:
            return c
        kind = d.choice((None, "poison", "poison", "nan", "neginf"))
        if kind == "poison" and not bool(active.all()):
            pmask = ~active
            c.poisoned = {**t, other: poison(d, t[other], pmask)}
            if dm is not None and d.chance(0.7):
                c.poisoned["doc_scores"] = t["doc_scores"].masked_fill(~dm, -INF)
            desc["poisoned"] = f"masked entries of {other}, -inf masked doc scores"
        elif kind in ("nan", "neginf") and active.any():
            pos = d.index_in(active)
            if kind == "neginf" and op != "emdr2_loss" and int(active[pos[0]].sum()) == 1:
                # the query's only unmasked document: a target -inf on every document of a
                # query is a ValueError (tests/test_retriever.py), not a valid case
                return c
            t[other][pos] = NAN if kind == "nan" else -INF
            desc["nan_in" if kind == "nan" else "neg_inf"] = [other, list(pos)]
            if kind == "nan":
                must = torch.zeros(B, dtype=torch.bool)
                must[pos[0]] = True
                red = o["reduction"]
                c.nan_expect = [must if red == "none" else must.any().reshape(())]
                c.compare_grads = False
        return c

    return gen


def call_retriever(op: str):
    fn = getattr(rk.retriever, op)

    def call(t, o, impl):
        other = o["_other"]
        kw = {k: v for k, v in o.items() if k not in ("_other", "impl")}
        if op == "emdr2_loss":
            kw["token_mask"] = t["token_mask"]
        return (fn(t["doc_scores"], t[other], doc_mask=t["doc_mask"], **kw),)

    return call


def _masked_log_softmax(x, dm, tau):
    x = x.double() / tau
    if dm is not None:
        x = torch.where(dm, x, -INF)
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def _kl(log_p, log_q, dm, reduction):
    active = log_p != -INF
    if dm is not None:
        active = active & dm
    lp, lq = torch.where(active, log_p, 0.0), torch.where(active, log_q, 0.0)
    per = torch.where(active, lp.exp() * (lp - lq), 0.0).sum(-1)
    if reduction == "none":
        return per
    total = per.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / log_p.shape[0]
    return total / (dm.sum() if dm is not None else log_p.numel())


def retriever_oracle(op: str):
    def oracle(t, o):
        s, dm, other = t["doc_scores"], t["doc_mask"], t[o["_other"]].detach().double()
        if op == "emdr2_loss":
            tm = t["token_mask"]
            B, K, T = other.shape
            keep_tok = tm if tm is not None else torch.ones(B, T, dtype=torch.bool)
            keep_doc = dm if dm is not None else torch.ones(B, K, dtype=torch.bool)
            prior = _masked_log_softmax(s, dm, o["retriever_temperature"])
            g = torch.where(keep_tok[:, None, :] & keep_doc[:, :, None], other, 0.0)
            red = o["reduction"]
            if o["level"] == "answer":
                joint = torch.where(keep_doc, prior + g.sum(-1), -INF)
                per = -torch.logsumexp(joint, dim=-1)
                return (per if red == "none" else per.sum() if red == "sum" else per.mean(),)
            joint = torch.where(keep_doc[:, :, None], prior[:, :, None] + g, -INF)
            per_tok = torch.where(keep_tok, torch.logsumexp(joint, dim=1), 0.0)
            per = -per_tok.sum(-1)
            if red == "none":
                return (per,)
            return (per.sum() if red == "sum" else per.sum() / max(int(keep_tok.sum()), 1),)
        if op == "lsr_loss":
            log_r = _masked_log_softmax(s, dm, o["retriever_temperature"])
            log_lm = _masked_log_softmax(other, dm, o["lm_temperature"])
            if o["direction"] == "retriever||lm":
                return (_kl(log_r, log_lm, dm, o["reduction"]),)
            return (_kl(log_lm, log_r, dm, o["reduction"]),)
        log_p = _masked_log_softmax(other, dm, o["generator_temperature"])
        log_q = _masked_log_softmax(s, dm, o["retriever_temperature"])
        return (_kl(log_p, log_q, dm, o["reduction"]),)

    return oracle


def _temp_mutations(names):
    out = []
    for n in names:
        out += [
            (f"{n}=0", _opt(n, 0.0), VE, n),
            (f"{n}=-1", _opt(n, -1.0), VE, n),
            (f"{n}=inf", _opt(n, INF), VE, n),
            (f"{n}=nan", _opt(n, NAN), VE, n),
            (f"{n}=True", _opt(n, True), TE, n),
            (f"{n}='1'", _opt(n, "1"), TE, n),
        ]
    return out


def retriever_mutations(op: str):
    other = {
        "emdr2_loss": "gen_logprobs",
        "pdist_loss": "gen_scores",
        "loop_loss": "nll_without_doc",
        "adist_loss": "attention_scores",
        "lsr_loss": "lm_logprobs",
    }[op]
    muts = SCORE_MUTATIONS + [
        ("doc_scores 1-D", _setv("doc_scores", lambda x, t, o: x[:, 0]), VE, "doc_scores"),
        ("doc_scores int", _setv("doc_scores", lambda x, t, o: x.long()), TE, "doc_scores"),
        (f"{other} int", _setv(other, lambda x, t, o: x.long()), TE, other),
        (f"{other} wrong K", _setv(other, lambda x, t, o: torch.cat([x, x[:, :1]], 1)), VE, other),
        (f"{other} on meta", _setv(other, lambda x, t, o: x.to("meta")), VE, other),
        ("reduction=avg", _opt("reduction", "avg"), VE, "reduction"),
    ]
    if op == "emdr2_loss":
        muts += [
            ("gen_logprobs 2-D", _setv(other, lambda x, t, o: x[:, :, 0]), VE, other),
            (
                "token_mask wrong shape",
                lambda t, o: t.__setitem__(
                    "token_mask",
                    torch.ones(t[other].shape[0], t[other].shape[2] + 1, dtype=torch.bool),
                ),
                VE,
                "token_mask",
            ),
            (
                "token_mask float",
                lambda t, o: t.__setitem__(
                    "token_mask", torch.ones(t[other].shape[0], t[other].shape[2])
                ),
                TE,
                "token_mask",
            ),
            ("level=bogus", _opt("level", "bogus"), VE, "level"),
            ("reduction=batchmean", _opt("reduction", "batchmean"), VE, "reduction"),
        ] + _temp_mutations(("retriever_temperature",))
    else:
        muts += [(f"{other} 1-D", _setv(other, lambda x, t, o: x[:, 0]), VE, other)]
        if op == "lsr_loss":
            muts += [("direction=bogus", _opt("direction", "bogus"), VE, "direction")]
            muts += _temp_mutations(("retriever_temperature", "lm_temperature"))
        else:
            muts += _temp_mutations(("retriever_temperature", "generator_temperature"))
    return muts


# ------------------------------------------------------------------------------ the op table


@dataclass
class Op:
    name: str
    registry_ops: tuple  # registry ops whose impls this op takes (intersection); () = no impl
    gen: Callable
    call: Callable
    mutations: list
    valid_cases: int  # default number of valid cases
    oracle: Callable | None = None
    no_fp64: tuple = ()  # impls that do not take float64 (documented)
    partners: dict = field(default_factory=dict)  # grad name -> matmul partner inputs
    grad_mult: Callable | None = None  # (case, grad name) -> extra factor of its natural size


LM_PARTNERS = {"hidden": ("weight",), "weight": ("hidden",)}


def _contrastive_mult(c: Case, name: str) -> float:
    scale = _maxabs(c.t["scale"]) if "scale" in c.t else float(c.o["scale"])
    return max(1.0, scale)


def _retriever_mult(c: Case, name: str) -> float:
    return 1.0 / min(c.o.get("retriever_temperature", 1.0), 1.0)


def _ops() -> dict:
    lm = ("triton",)  # the Triton LM-head / smoothing / contrastive kernels take no float64
    ops = [
        Op(
            "linear_logprob",
            ("linear_logprob",),
            gen_linear_logprob,
            call_linear_logprob,
            LLP_MUTATIONS,
            200,
            no_fp64=lm,
            partners=LM_PARTNERS,
        ),
        Op(
            "rag_sequence_loss",
            ("marginalize",),
            gen_marginalize("rag_sequence_loss"),
            call_marginalize("rag_sequence_loss"),
            MARGINALIZE_MUTATIONS,
            160,
        ),
        Op(
            "rag_token_loss",
            ("marginalize",),
            gen_marginalize("rag_token_loss"),
            call_marginalize("rag_token_loss"),
            MARGINALIZE_MUTATIONS,
            160,
        ),
        Op(
            "document_posterior",
            (),
            gen_marginalize("document_posterior"),
            call_marginalize("document_posterior"),
            POSTERIOR_MUTATIONS,
            200,
            oracle=posterior_oracle,
        ),
        Op(
            "rag_loss",
            ("linear_logprob", "token_smoothing"),
            gen_rag("rag_loss"),
            call_rag("rag_loss"),
            RAG_LOSS_MUTATIONS,
            200,
            no_fp64=lm,
            partners=LM_PARTNERS,
        ),
        Op(
            "generator_feedback",
            ("linear_logprob",),
            gen_rag("generator_feedback"),
            call_rag("generator_feedback"),
            FEEDBACK_MUTATIONS,
            120,
            no_fp64=lm,
            partners=LM_PARTNERS,
        ),
        Op(
            "token_smoothing",
            ("token_smoothing",),
            gen_rag("token_smoothing"),
            call_rag("token_smoothing"),
            TS_MUTATIONS,
            120,
            no_fp64=lm,
            partners=LM_PARTNERS,
        ),
        Op(
            "token_smoothing_with_logprob",
            ("token_smoothing",),
            gen_rag("token_smoothing_with_logprob"),
            call_rag("token_smoothing_with_logprob"),
            TSL_MUTATIONS,
            120,
            no_fp64=lm,
            partners=LM_PARTNERS,
        ),
        Op(
            "rag_sequence_get_nll",
            ("linear_logprob",),
            gen_hf("rag_sequence_get_nll"),
            call_hf("rag_sequence_get_nll"),
            HF_SEQ_MUTATIONS,
            150,
            no_fp64=lm,
            partners=LM_PARTNERS,
        ),
        Op(
            "rag_token_get_nll",
            ("linear_logprob", "token_smoothing"),
            gen_hf("rag_token_get_nll"),
            call_hf("rag_token_get_nll"),
            HF_MUTATIONS,
            120,
            no_fp64=lm,
            partners=LM_PARTNERS,
        ),
        Op(
            "contrastive_loss",
            ("contrastive",),
            gen_contrastive,
            call_contrastive,
            CONTRASTIVE_MUTATIONS,
            200,
            no_fp64=lm,
            partners={"queries": ("docs",), "docs": ("queries",), "scale": ("queries", "docs")},
            grad_mult=_contrastive_mult,
        ),
    ]
    for name in ("emdr2_loss", "pdist_loss", "loop_loss", "adist_loss", "lsr_loss"):
        ops.append(
            Op(
                name,
                (),
                gen_retriever(name),
                call_retriever(name),
                retriever_mutations(name),
                200,
                oracle=retriever_oracle(name),
                grad_mult=_retriever_mult,
            )
        )
    return {op.name: op for op in ops}


OPS = _ops()


def op_impls(name: str) -> tuple[str, ...]:
    """The implementations a fuzz op runs: those every registry op it composes has here."""
    op = OPS[name]
    if not op.registry_ops:
        return ("default",)
    sets = [rk.available_impls(r) for r in op.registry_ops]
    return tuple(i for i in sets[0] if all(i in s for s in sets))


def num_cases(name: str) -> tuple[int, int]:
    """(valid, invalid) cases of op ``name``: the op's default (sized for CI: all ops take ~40 s
    of CPU in all), or RAG_KERNELS_FUZZ_CASES valid cases; every bad-input mutation
    at least twice (on different random bases)."""
    op = OPS[name]
    raw = os.environ.get("RAG_KERNELS_FUZZ_CASES", "")
    valid = int(raw) if raw else op.valid_cases
    invalid = 2 * len(op.mutations) if not raw else max(2 * len(op.mutations), valid // 2)
    return valid, invalid


EDGES = ("B0", "T0", "ones", "ones", "mixed")


def make_case(name: str, index: int, base_seed: int, n_valid: int) -> Case:
    op = OPS[name]
    kind = "valid" if index < n_valid else "invalid"
    seed = case_seed(base_seed, name, kind, index if kind == "valid" else index - n_valid)
    # the first valid cases of every op are the edge cases, whatever the seed
    edge = EDGES[index] if kind == "valid" and index < min(len(EDGES), n_valid) else None
    d = Draw(seed, edge)
    c = op.gen(d, kind == "invalid")
    c.op, c.index, c.seed, c.kind, c.rng, c.gen = name, index, seed, kind, d.rng, d.g
    c.desc["dtype"] = DTYPE_NAMES[c.dtype]
    if edge:
        c.desc["edge"] = edge
    if kind == "invalid":
        j = index - n_valid
        c.mutation = op.mutations[j % len(op.mutations)]
        c.desc["mutation"] = c.mutation[0]
    # kernel tiles / threads: small tiles make tiny shapes span several tiles
    c.desc["threads"] = d.choice((1, 2))
    c.desc["llp_tiles"] = d.choice(((256, 2048), (1, 1), (2, 3), (4, 16), (7, 5)))
    c.desc["ts_tiles"] = d.choice(((0, 0, 0, 0), (1, 1, 1, 1), (2, 3, 3, 2), (4, 8, 5, 16)))
    return c


def apply_knobs(c: Case) -> None:
    torch.set_num_threads(min(c.desc["threads"], os.cpu_count() or 1))
    if registry.cpu_available():
        from rag_kernels.ops.linear_logprob import cpu as llp_cpu
        from rag_kernels.ops.token_smoothing import cpu as ts_cpu

        llp_cpu.TILE_ROWS, llp_cpu.TILE_VOCAB = c.desc["llp_tiles"]
        ts_cpu.TILES = tuple(c.desc["ts_tiles"])


# ------------------------------------------------------------------------------ evaluation


class Result:
    def __init__(self, outs, grads):
        self.outs, self.grads = outs, grads


def evaluate(c: Case, tensors: dict, impl: str, dtype, upstream: list | None) -> Result:
    """Run the op (or its oracle, impl="oracle") on ``tensors`` cast to ``dtype``; the gradients
    of the differentiable inputs for ``upstream`` (drawn from the first outputs when None)."""
    op = OPS[c.op]
    leaves = {}
    for name, x in tensors.items():
        if isinstance(x, torch.Tensor):
            x = x.to(dtype) if x.is_floating_point() else x
            x = x.clone()
            if name in c.grads and x.is_floating_point():
                x.requires_grad_(True)
        leaves[name] = x
    o = dict(c.o)
    if impl == "oracle":
        outs = tuple(op.oracle({k: v for k, v in leaves.items()}, o))
    else:
        outs = tuple(op.call(leaves, o, impl))
    if upstream is None:
        upstream = []
        for out in outs:
            if not out.requires_grad:
                upstream.append(None)
                continue
            u = torch.randn(out.shape, generator=c.gen, dtype=F64)
            if out.dim() == 0:
                u = (0.5 + 1.5 * u.abs()) * u.sign()
            elif out.numel() > 1:
                u = torch.where(torch.rand(out.shape, generator=c.gen) < 0.15, 0.0, u)
            upstream.append(u.float().double())  # representable in fp32: the same g everywhere
        c.upstream = upstream
    grads = {}
    pairs = [(out, u) for out, u in zip(outs, upstream, strict=True) if u is not None]
    pairs = [(out, u) for out, u in pairs if out.requires_grad]
    names = [n for n in c.grads if isinstance(leaves.get(n), torch.Tensor)]
    names = [n for n in names if leaves[n].requires_grad]
    if pairs and names:
        gs = torch.autograd.grad(
            [out for out, _ in pairs],
            [leaves[n] for n in names],
            grad_outputs=[u.to(out.dtype) for out, u in pairs],
            allow_unused=True,
        )
        for n, gr in zip(names, gs, strict=True):
            grads[n] = (gr if gr is not None else torch.zeros_like(leaves[n])).detach()
    for n in names:
        grads.setdefault(n, torch.zeros_like(leaves[n]).detach())
    return Result([out.detach() for out in outs], grads)


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def compare(
    name: str, a: torch.Tensor, e: torch.Tensor, dtype, y: torch.Tensor | None, floor: float = 1.0
):
    """None when ``a`` matches ``e`` (the float64 truth) under the rule of ``dtype``; else a dict.

    The scale is ``max(max|e|, floor)``: ``floor`` is the natural size of the quantity (1 for
    the op's outputs, ``max|upstream| x max|matmul partner|`` for a gradient), so a gradient
    that is ~0 by cancellation of O(1) terms is held to the rounding of those terms."""
    if tuple(a.shape) != tuple(e.shape):
        return {"what": name, "problem": f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"}
    a, e = a.double(), e.double()
    fin = torch.isfinite(e)
    same_nonfinite = (a == e) | (torch.isnan(a) & torch.isnan(e))
    bad = ~fin & ~same_nonfinite
    overflow = fin & ~torch.isfinite(a)
    if y is not None and dtype in UNIT_ROUNDOFF:
        # a 16-bit result out of range: fine where plain PyTorch in that dtype gives the same
        yd = y.double()
        overflow &= ~((yd == a) | (torch.isnan(yd) & torch.isnan(a)))
    bad |= overflow
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        return {
            "what": name,
            "problem": "non-finite mismatch",
            "index": list(i),
            "actual": _num(float(a[i])),
            "expected": _num(float(e[i])),
            "count": int(bad.sum()),
            "actual_nan": int(torch.isnan(a).sum()),
            "expected_nan": int(torch.isnan(e).sum()),
        }
    if not fin.any():
        return None
    fin = fin & torch.isfinite(a)
    diff = torch.where(fin, (a - e).abs(), 0.0)
    err = float(diff.max())
    scale = max(float(torch.where(fin, e.abs(), 0.0).max()), floor)
    if dtype == F64:
        bound = 1e-9 * scale
    elif dtype == F32:
        bound = 1e-4 * scale
    else:
        y_err = 0.0
        if y is not None:
            yd = torch.where(fin, (y.double() - e).abs(), 0.0)
            y_err = float(torch.nan_to_num(yd, nan=0.0, posinf=0.0).max())
        bound = 2.0 * y_err + 2.0 * UNIT_ROUNDOFF[dtype] * scale
    if err <= bound:
        return None
    i = tuple(int(v) for v in (diff == err).nonzero()[0].tolist())
    return {
        "what": name,
        "problem": "value mismatch",
        "max_err": err,
        "bound": bound,
        "scale": scale,
        "index": list(i),
        "actual": float(a[i]),
        "expected": float(e[i]),
    }


def _maxabs(x) -> float:
    if not isinstance(x, torch.Tensor) or x.numel() == 0 or not x.is_floating_point():
        return 0.0
    return float(torch.nan_to_num(x.double(), nan=0.0, posinf=0.0, neginf=0.0).abs().max())


def grad_floor(c: Case, name: str) -> float:
    """Natural size of the gradient of input ``name``: every op here is log-softmax-like, so
    its gradient w.r.t. a logit-like input is O(|upstream|); a matmul operand's is that times
    its partner's size; a temperature / scale multiplies it."""
    op = OPS[c.op]
    u = max([_maxabs(x) for x in (c.upstream or []) if x is not None] + [1e-3])
    for partner in op.partners.get(name, ()):
        u *= max(1.0, _maxabs(c.t.get(partner)))
    if op.grad_mult is not None:
        u *= op.grad_mult(c, name)
    return u


def out_names(c: Case, n: int) -> list[str]:
    return [f"out[{i}]" for i in range(n)] if n > 1 else ["out"]


def compare_results(c, got: Result, ref: Result, dtype, yard: Result | None, grads: bool):
    problems = []
    names = out_names(c, len(ref.outs))
    if len(got.outs) != len(ref.outs):
        return [
            {"what": "outputs", "problem": f"{len(got.outs)} outputs, expected {len(ref.outs)}"}
        ]
    for k, (a, e) in enumerate(zip(got.outs, ref.outs, strict=True)):
        p = compare(names[k], a, e, dtype, yard.outs[k] if yard else None)
        if p:
            problems.append(p)
    if grads:
        for n, e in ref.grads.items():
            a = got.grads.get(n)
            if a is None:
                problems.append({"what": f"grad {n}", "problem": "missing"})
                continue
            y = yard.grads.get(n) if yard else None
            p = compare(f"grad {n}", a, e, dtype, y, grad_floor(c, n))
            if p:
                problems.append(p)
    return problems


def exact_problems(c, a: Result, b: Result) -> list:
    problems = []

    def same(x, y):
        return x.shape == y.shape and bool(((x == y) | (torch.isnan(x) & torch.isnan(y))).all())

    for k, (x, y) in enumerate(zip(a.outs, b.outs, strict=True)):
        if not same(x, y):
            err = float((x.double() - y.double()).abs().nan_to_num(nan=INF).max())
            problems.append(
                {"what": f"out[{k}] (alt)", "problem": "not bitwise equal", "max_diff": _num(err)}
            )
    for n in a.grads:
        if not same(a.grads[n], b.grads[n]):
            err = float((a.grads[n].double() - b.grads[n].double()).abs().nan_to_num(nan=INF).max())
            problems.append(
                {"what": f"grad {n} (alt)", "problem": "not bitwise equal", "max_diff": _num(err)}
            )
    return problems


def nan_policy_problems(c: Case, res: Result, who: str) -> list:
    problems = []
    for k, must in enumerate(c.nan_expect or []):
        if must is None:
            continue
        out = res.outs[k]
        if out.shape != must.shape:
            problems.append(
                {"what": f"out[{k}]", "problem": f"shape {tuple(out.shape)} != {tuple(must.shape)}"}
            )
            continue
        dropped = must & ~torch.isnan(out)
        if dropped.any():
            i = tuple(dropped.nonzero()[0].tolist())
            problems.append(
                {
                    "what": f"out[{k}]",
                    "problem": f"NaN in an active input dropped ({who})",
                    "index": list(i),
                    "actual": _num(float(out[i])),
                    "count": int(dropped.sum()),
                }
            )
    return problems


def record(c: Case, impl: str, dtype, status: str, **extra) -> None:
    emit(
        ev="result",
        op=c.op,
        case=c.index,
        seed=c.seed,
        kind=c.kind,
        impl=impl,
        dtype=DTYPE_NAMES.get(dtype, str(dtype)),
        status=status,
        desc=c.desc,
        **extra,
    )


def begin(c: Case, impl: str, dtype, phase: str) -> None:
    emit(
        ev="begin",
        op=c.op,
        case=c.index,
        seed=c.seed,
        impl=impl,
        dtype=DTYPE_NAMES.get(dtype, str(dtype)),
        phase=phase,
        desc=c.desc,
    )


def run_valid(c: Case, impls: tuple) -> None:
    op = OPS[c.op]
    ref_impl = "oracle" if op.oracle is not None else "reference"
    owner = "default" if op.oracle is not None else "reference"  # who a reference failure is on
    try:
        begin(c, owner, F64, "float64 truth")
        ref = evaluate(c, c.t, ref_impl, F64, None)
    except Exception:
        record(c, owner, F64, "error", phase="float64 truth", traceback=traceback.format_exc())
        return
    if c.nan_expect is not None:
        problems = nan_policy_problems(c, ref, "float64 " + ref_impl)
        if problems:
            record(c, owner, F64, "mismatch", phase="float64 truth", problems=problems)
    runs = [(impl, c.dtype) for impl in impls if not (c.dtype == F64 and impl in op.no_fp64)]
    if c.dtype != F64:
        runs += [(impl, F64) for impl in impls if impl not in op.no_fp64]
    yard = None
    if c.dtype in UNIT_ROUNDOFF:
        yimpl = "default" if op.oracle is not None else "reference"
        try:
            begin(c, yimpl, c.dtype, "16-bit yardstick")
            yard = evaluate(c, c.t, yimpl, c.dtype, c.upstream)
        except Exception:
            record(
                c,
                yimpl,
                c.dtype,
                "error",
                phase="16-bit yardstick",
                traceback=traceback.format_exc(),
            )
            return
    inputs = c.poisoned if c.poisoned is not None else c.t
    for impl, dtype in runs:
        begin(c, impl, dtype, "run")
        try:
            got = evaluate(c, inputs, impl, dtype, c.upstream)
            problems = compare_results(
                c, got, ref, dtype, yard if dtype == c.dtype else None, c.compare_grads
            )
            if c.nan_expect is not None:
                problems += nan_policy_problems(c, got, impl)
            if c.alt is not None:
                begin(c, impl, dtype, "alt")
                problems += exact_problems(
                    c, got, evaluate(c, c.alt(inputs), impl, dtype, c.upstream)
                )
        except Exception:
            record(c, impl, dtype, "error", traceback=traceback.format_exc())
            continue
        record(c, impl, dtype, "mismatch" if problems else "ok", problems=problems)


def run_invalid(c: Case, impls: tuple) -> None:
    op = OPS[c.op]
    label, mutate, exc_types, arg = c.mutation
    impl = c.rng.choice(impls)
    if c.dtype == F64 and impl in op.no_fp64:
        impl = impls[0]
    c.desc["impl"] = impl
    t = {
        k: (v.to(c.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in c.t.items()
    }
    o = dict(c.o)
    begin(c, "-", c.dtype, "invalid")
    try:
        mutate(t, o)
        op.call(t, o, impl)
    except exc_types as exc:
        msg = str(exc)
        if arg in msg:
            record(c, "-", c.dtype, "expected-error", error=f"{type(exc).__name__}: {msg}")
        else:
            record(
                c,
                "-",
                c.dtype,
                "wrong-error",
                expected=f"{exc_types} naming {arg!r}",
                error=f"{type(exc).__name__}: {msg}",
            )
        return
    except Exception as exc:
        record(
            c,
            "-",
            c.dtype,
            "wrong-error",
            expected=f"{exc_types} naming {arg!r}",
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
        )
        return
    record(c, "-", c.dtype, "no-error", expected=f"{exc_types} naming {arg!r}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ops", help=f"comma-separated ops, of: {', '.join(sorted(OPS))}")
    p.add_argument("--valid", type=int, default=None, help="number of valid cases per op")
    p.add_argument("--invalid", type=int, default=None, help="number of invalid cases per op")
    p.add_argument("--start", default=None, help="OP:INDEX, the first case to run")
    p.add_argument("--only", type=int, default=None, help="run only this case index")
    p.add_argument(
        "--seed", type=int, default=int(os.environ.get("RAG_KERNELS_FUZZ_SEED", DEFAULT_SEED))
    )
    p.add_argument("-v", "--verbose", action="store_true", help="human-readable, to stderr")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")  # the interpreter's numpy warnings on NaN / inf inputs
    ops = args.ops.split(",")
    bad = [op for op in ops if op not in OPS]
    if bad:
        p.error(f"unknown op(s) {bad}; ops: {', '.join(sorted(OPS))}")
    start_op, start = ops[0], 0
    if args.start:
        start_op, _, idx = args.start.rpartition(":")
        start = int(idx)
    for op in ops[ops.index(start_op) :]:
        t0 = time.process_time()
        n_valid, n_invalid = num_cases(op)
        n_valid = n_valid if args.valid is None else args.valid
        n_invalid = n_invalid if args.invalid is None else args.invalid
        impls = op_impls(op)
        first = start if op == start_op else 0
        indices = [args.only] if args.only is not None else range(first, n_valid + n_invalid)
        for i in indices:
            c = make_case(op, i, args.seed, n_valid)
            if args.verbose:
                print(f"{op} case {i} seed {c.seed} {c.kind}: {c.desc}", file=sys.stderr)
            apply_knobs(c)
            if c.kind == "valid":
                run_valid(c, impls)
            else:
                run_invalid(c, impls)
        emit(ev="op-done", op=op, cpu_s=round(time.process_time() - t0, 2))
    emit(ev="done")


if __name__ == "__main__":
    main()
