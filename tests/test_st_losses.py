"""rag_kernels.integrations.sentence_transformers: ContrastiveLoss / CachedContrastiveLoss vs
sentence-transformers' MNRL / CachedMNRL / MNSRL on a tiny random SentenceTransformer (value,
embedding and parameter gradients; a few SentenceTransformerTrainer steps), and the module's
torch-only import and duck-typed use."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 noise: fused kernel vs materialised softmax


def _close(a, b, what=""):
    """Equal within fp32 noise: rtol 1e-5, and an absolute slack of 1e-5 of the tensor's
    largest entry (parameter gradients are sums with cancellation; some, like the attention
    key biases', are exactly zero in exact arithmetic and pure rounding here)."""
    atol = max(1e-5 * float(b.abs().max()), 1e-9)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


WORDS = (
    "the a cat dog bird fish runs jumps sleeps eats red blue green small big old new house "
    "tree river city road car boat sun moon rain snow book song game food water fire stone"
).split()


def _sentences(n: int, seed: int, lo: int = 2, hi: int = 9) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx))
    return out


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The model is tiny: intra-op threads only add spin-wait overhead (badly so on a loaded
    2-core machine). Restored for the tests after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved 2-layer random BERT (dropout on) with a word-level tokenizer."""
    pytest.importorskip("sentence_transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(
        [" ".join(WORDS)], trainers.WordLevelTrainer(vocab_size=200, special_tokens=specials)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]",
    )  # fmt: skip
    cfg = BertConfig(
        vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_st")
    BertModel(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return str(d)


def _model(tiny_dir):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = Transformer(tiny_dir)
        m = SentenceTransformer(modules=[tr, Pooling(tr.get_embedding_dimension(), "mean")])
    return m.to("cpu")


def _features(model, columns):
    prep = getattr(model, "preprocess", None) or model.tokenize
    return [prep(texts) for texts in columns]


def _fresh(features):
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in f.items()} for f in features]


# ----------------------------------------------------------------------------- loss pairs


def _pair(name, model):
    from sentence_transformers.sentence_transformer import losses as L

    from rag_kernels.integrations.sentence_transformers import (
        CachedContrastiveLoss,
        ContrastiveLoss,
    )

    sym = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    if name == "mnrl":
        return ContrastiveLoss(model), L.MultipleNegativesRankingLoss(model)
    if name == "mnrl-dot":
        return (
            ContrastiveLoss(model, scale=0.5, similarity="dot"),
            L.MultipleNegativesRankingLoss(model, scale=0.5, similarity_fct=_dot),
        )
    if name == "symmetric":
        return ContrastiveLoss(model, symmetric=True), L.MultipleNegativesRankingLoss(model, **sym)
    if name == "mnsrl":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = L.MultipleNegativesSymmetricRankingLoss(model)
        return ContrastiveLoss(model, symmetric=True), ref
    if name == "cached":
        return (
            CachedContrastiveLoss(model, mini_batch_size=3),
            L.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3),
        )
    if name == "cached-symmetric":
        return (
            CachedContrastiveLoss(model, symmetric=True, mini_batch_size=4),
            L.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, **sym),
        )
    raise AssertionError(name)


def _dot(a, b):
    return a @ b.t()


def _param_grads(model, loss_fn, features, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(_fresh(features), None)
    (2.0 * loss).backward()  # a non-unit upstream gradient must reach the cached replay too
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


PAIRS = ["mnrl", "mnrl-dot", "symmetric", "mnsrl", "cached", "cached-symmetric"]


@pytest.mark.parametrize("name", PAIRS)
def test_matches_sentence_transformers(tiny_dir, name):
    """Same batch, same seed (dropout on): equal loss and parameter gradients; equal loss and
    embedding gradients from fixed embeddings."""
    model = _model(tiny_dir)
    model.train()
    B = 7  # with two hard-negative columns; mini-batches of 3 / 4 leave a ragged last one
    cols = [_sentences(B, s) for s in (1, 2, 3, 4)]
    if name == "mnsrl":
        cols = cols[:2]  # the deprecated class takes pairs
    ours, ref = _pair(name, model)
    feats = _features(model, cols)

    lo, go = _param_grads(model, ours, feats, seed=123)
    lr, gr = _param_grads(model, ref, feats, seed=123)
    torch.testing.assert_close(lo, lr, **TOL)
    assert go.keys() == gr.keys() and len(go) > 10
    for n in gr:
        _close(go[n], gr[n], n)

    # embedding gradients from fixed embeddings
    torch.manual_seed(0)
    embs = [torch.randn(B, 32) for _ in cols]
    if name.startswith("cached"):
        reps_o = [[e[:3].clone().requires_grad_(), e[3:].clone().requires_grad_()] for e in embs]
        reps_r = [[r.detach().clone().requires_grad_() for r in mbs] for mbs in reps_o]
        vo = ours.calculate_loss(reps_o, None, with_backward=True)
        vr = ref.calculate_loss(reps_r, None, with_backward=True)
        torch.testing.assert_close(vo, vr, **TOL)
        for a, b in zip(sum(reps_o, []), sum(reps_r, []), strict=True):
            torch.testing.assert_close(a.grad, b.grad, **TOL)
    else:
        eo = [e.clone().requires_grad_() for e in embs]
        er = [e.clone().requires_grad_() for e in embs]
        vo = ours.compute_loss_from_embeddings(eo, None)
        vr = ref.compute_loss_from_embeddings(er, None)
        torch.testing.assert_close(vo, vr, **TOL)
        gs_o = torch.autograd.grad(vo, eo)
        gs_r = torch.autograd.grad(vr, er)
        for a, b in zip(gs_o, gs_r, strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_cached_eval_and_config(tiny_dir):
    """No graph under no_grad; the config, citation and bad arguments."""
    from rag_kernels.integrations.sentence_transformers import (
        CachedContrastiveLoss,
        ContrastiveLoss,
    )

    model = _model(tiny_dir)
    model.eval()
    feats = _features(model, [_sentences(5, 7), _sentences(5, 8)])
    cached, plain = CachedContrastiveLoss(model, mini_batch_size=2), ContrastiveLoss(model)
    with torch.no_grad():
        a, b = cached(_fresh(feats), None), plain(_fresh(feats), None)
    assert not a.requires_grad
    torch.testing.assert_close(a, b, **TOL)
    with torch.no_grad():  # one process: gathering is the identity
        c = ContrastiveLoss(model, gather_across_devices=True)(_fresh(feats), None)
    torch.testing.assert_close(c, b, **TOL)
    assert cached.get_config_dict() == {
        "scale": 20.0,
        "similarity": "cos",
        "symmetric": False,
        "gather_across_devices": False,
        "mini_batch_size": 2,
    }
    assert "gao2021scaling" in cached.citation and "oord" in plain.citation
    assert "günther" in ContrastiveLoss(model, symmetric=True).citation
    assert cached.uses_gradient_cache and dict(plain.named_children())["model"] is model
    with pytest.raises(ValueError, match="similarity"):
        ContrastiveLoss(model, similarity="cosine")
    with pytest.raises(ValueError, match="scale"):
        ContrastiveLoss(model, scale=0.0)
    with pytest.raises(ValueError, match="mini_batch_size"):
        CachedContrastiveLoss(model, mini_batch_size=0)
    with pytest.raises(ValueError, match="columns"):
        plain(_fresh(feats[:1]), None)
    with pytest.raises(ValueError, match="columns"):
        cached(_fresh(feats[:1]), None)


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_matryoshka_wraps_our_losses(tiny_dir, cached):
    """MatryoshkaLoss(ours) == MatryoshkaLoss(MNRL / CachedMNRL): the cached one through the
    ``uses_gradient_cache`` / ``calculate_loss`` protocol."""
    from sentence_transformers.sentence_transformer import losses as L

    model = _model(tiny_dir)
    model.train()
    ours, ref = _pair("cached" if cached else "mnrl", model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, ref = L.MatryoshkaLoss(model, ours, [32, 8]), L.MatryoshkaLoss(model, ref, [32, 8])
    feats = _features(model, [_sentences(7, s) for s in (1, 2, 3)])
    lo, go = _param_grads(model, ours, feats, seed=5)
    lr, gr = _param_grads(model, ref, feats, seed=5)
    torch.testing.assert_close(lo, lr, **TOL)
    for n in gr:
        _close(go[n], gr[n], n)


def test_cached_replay_keeps_autocast(tiny_dir):
    """The replay runs in ``backward``, usually outside the caller's autocast region: it must
    re-enter the forward's autocast, else the gradients belong to other (fp32) embeddings."""
    from rag_kernels.integrations.sentence_transformers import (
        CachedContrastiveLoss,
        ContrastiveLoss,
    )

    model = _model(tiny_dir)
    model.eval()
    lin = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    dtypes = []
    handle = lin.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    feats = _features(model, [_sentences(7, s) for s in (1, 2)])
    grads = []
    for loss_fn in (ContrastiveLoss(model), CachedContrastiveLoss(model, mini_batch_size=3)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(_fresh(feats), None)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    handle.remove()
    assert len(dtypes) == 2 + 2 * 6 and set(dtypes) == {torch.bfloat16}, dtypes
    for n, g in grads[0].items():  # bf16 forwards of other batch shapes: bf16-level agreement
        torch.testing.assert_close(grads[1][n], g, rtol=0.05, atol=0.05 * float(g.abs().max()))


# ----------------------------------------------------------------------------- trainer


def _train(tiny_dir, tmp_path, name, which, data, steps):
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import (
        SentenceTransformerTrainingArguments,
    )

    model = _model(tiny_dir)
    loss = _pair(name, model)[which]
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / f"{name}-{which}"), per_device_train_batch_size=8,
        max_steps=steps, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
        warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", seed=11,
        data_seed=11, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, params


@pytest.mark.parametrize("name", ["mnrl", "cached", "cached-symmetric"])
def test_trainer_steps_match(tiny_dir, tmp_path, name):
    """SentenceTransformerTrainer, same seed, 3 SGD steps with dropout: our loss and
    sentence-transformers' give the same logged losses and final parameters."""
    if (
        importlib.util.find_spec("datasets") is None
        or importlib.util.find_spec("accelerate") is None
    ):
        pytest.skip(
            "SentenceTransformerTrainer needs the `datasets` and `accelerate` packages "
            "(sentence-transformers[train]); not installed"
        )
    from datasets import Dataset

    n, steps = 24, 3
    data = Dataset.from_dict(
        {"anchor": _sentences(n, 21), "positive": _sentences(n, 22), "negative": _sentences(n, 23)}
    )
    lo, po = _train(tiny_dir, tmp_path, name, 0, data, steps)
    lr, pr = _train(tiny_dir, tmp_path, name, 1, data, steps)
    assert len(lo) == steps, lo
    torch.testing.assert_close(torch.tensor(lo), torch.tensor(lr), **TOL)
    init = {n: p.detach() for n, p in _model(tiny_dir).named_parameters()}
    moved = sum(float((po[k] - init[k]).abs().max()) > 1e-4 for k in po)
    assert moved > 10, "training did not change the parameters"
    for k in pr:
        _close(po[k], pr[k], k)


# ----------------------------------------------------------------------------- torch only

TORCH_ONLY_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = ("sentence_transformers", "transformers", "datasets", "tokenizers", "accelerate")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"blocked: {name}")

    sys.meta_path.insert(0, Block())
    import torch
    import rag_kernels as rk
    from rag_kernels.integrations import sentence_transformers as rst

    class Encoder(torch.nn.Module):  # duck-typed: features -> {"sentence_embedding": ...}
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 5)
            self.drop = torch.nn.Dropout(0.3)

        def forward(self, f):
            return {"sentence_embedding": self.drop(self.lin(f["x"]))}

    torch.manual_seed(0)
    enc = Encoder().double()
    B = 7
    feats = [{"x": torch.randn(B, 6, dtype=torch.float64), "modality": "text"} for _ in range(3)]
    report = {"loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)}

    def grads(loss_fn, seed):
        enc.zero_grad()
        torch.manual_seed(seed)
        loss = loss_fn(feats, None)
        (3.0 * loss).backward()
        return loss.detach(), [p.grad.clone() for p in enc.parameters()]

    for sym in (False, True):
        lp, gp = grads(rst.ContrastiveLoss(enc, symmetric=sym), 5)
        torch.manual_seed(5)
        e = [enc(f)["sentence_embedding"] for f in feats]
        ref = rk.contrastive_loss(e[0], torch.cat(e[1:]), symmetric=sym)
        assert torch.allclose(lp, ref.detach()), (lp, ref)
        # cached == plain when the RNG stream is the same: mini_batch_size >= B (one chunk)
        lc, gc = grads(rst.CachedContrastiveLoss(enc, symmetric=sym, mini_batch_size=B), 5)
        assert torch.allclose(lc, lp), (lc, lp)
        assert all(torch.allclose(a, b) for a, b in zip(gc, gp)), "cached grads differ"
        # ragged mini-batches: replayed dropout must give the gradient of the loss it returned
        enc.eval()
        lp, gp = grads(rst.ContrastiveLoss(enc, symmetric=sym), 1)
        lc, gc = grads(rst.CachedContrastiveLoss(enc, symmetric=sym, mini_batch_size=3), 1)
        enc.train()
        assert torch.allclose(lc, lp), (lc, lp)
        assert all(torch.allclose(a, b) for a, b in zip(gc, gp)), "ragged cached grads differ"
    try:
        rst.CachedContrastiveLoss(enc)([{"input_ids": torch.ones(10, dtype=torch.long),
                                         "offsets": torch.arange(4)}] * 2, None)
    except ValueError as err:
        report["static_error"] = str(err)
    report["loaded_after"] = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print("REPORT=" + json.dumps(report))
    """
)


def test_torch_only_import_and_duck_typed_model():
    """With sentence-transformers, transformers, datasets, tokenizers and accelerate blocked,
    the module imports (nothing blocked gets loaded) and both losses train a plain module that
    returns ``{"sentence_embedding": ...}``, the cached one with the plain one's gradients."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_ONLY_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"rc {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    line = [x for x in proc.stdout.splitlines() if x.startswith("REPORT=")]
    assert line, proc.stdout + proc.stderr
    report = json.loads(line[-1][len("REPORT=") :])
    assert report["loaded"] == [] and report["loaded_after"] == [], report
    assert "StaticEmbedding" in report.get("static_error", ""), report
