"""Encoder-decoder generators (BART, T5) in the co-training loop, with tiny random models and
tokenizers built offline and saved to directories, as ``--generator PATH`` loads them.

* the RAG loss the loop computes (``CoTrainer.micro_step``: encoder = prompt, decoder =
  answer + EOS shifted right, decoder hidden states + ``rk.hf.lm_head``) equals a float64
  full-logits reference (``model(...).logits`` of each unpadded (passage, question) row ->
  log-softmax -> marginalisation over the K passages) to 1e-9, loss and gradients, in both
  modes, with and without label smoothing; BART's ``final_logits_bias`` is random and T5's
  tied-embedding scale is on, so dropping either fails;
* ``adist``'s cross-attention equals the unpadded rows' ``cross_attentions``, and its passage
  mask covers exactly the passage's tokens;
* every retriever objective trains the query encoder; ``--generator-train-layers``,
  ``--freeze-generator``, ``--gradient-checkpointing``, ``--precision bf16``,
  ``--max-answer-tokens``, checkpoints and ``--resume``;
* ``rag-kernels train --generator DIR --steps 2`` then ``rag-kernels eval --resume``;
* marginal decoding (RAG-Token greedy, RAG-Sequence thorough) of a seq2seq model equals
  brute force (one unpadded forward per document and step), and K = 1 is HF greedy
  ``generate``;
* clear errors: a seq2seq head rag_kernels does not know, no decoder start token, a causal
  LM given to the seq2seq helpers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import rag_kernels as rk  # noqa: E402
from toolkit import assert_close, cli_error_line, tiny_dataset  # noqa: E402

tf = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("faiss")

from rag_kernels.cotrain.cli import main  # noqa: E402
from rag_kernels.cotrain.data import write_corpus, write_qa  # noqa: E402
from rag_kernels.cotrain.eval.decoding import (  # noqa: E402
    rag_sequence_decode,
    rag_token_decode,
    score_candidates,
)
from rag_kernels.cotrain.eval.predictions import read_predictions  # noqa: E402
from rag_kernels.cotrain.prompts import DEFAULT_PROMPT_TEMPLATE  # noqa: E402
from rag_kernels.cotrain.training import CoTrainer, TrainConfig  # noqa: E402
from rag_kernels.cotrain.training.checkpoint import read_checkpoint  # noqa: E402

FAMILIES = ("bart", "t5")
K = 3
MAX_DOC = 96


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ tiny models, saved
def _texts() -> list[str]:
    ds = tiny_dataset(dev=True)
    return (
        [DEFAULT_PROMPT_TEMPLATE]
        + [f"{p.title}. {p.text}" for p in ds.corpus]
        + [f"{q.question} {q.answers[0]}" for q in ds.train + ds.dev + ds.test]
    )


def _bart_tokenizer():
    """A real ``BartTokenizer`` (byte-level BPE, ``<s> … </s>``) trained on the test texts."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _texts(),
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    merges = json.loads(bpe._tokenizer.to_str())["model"]["merges"]
    return tf.BartTokenizer(vocab=bpe.get_vocab(), merges=[tuple(m) for m in merges])


def _t5_tokenizer():
    """A real ``T5Tokenizer`` (unigram, ``… </s>``; pad 0, EOS 1) trained on the test texts."""
    uni = tokenizers.SentencePieceUnigramTokenizer()
    uni.train_from_iterator(
        _texts(),
        vocab_size=120,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    vocab = [tuple(v) for v in json.loads(uni._tokenizer.to_str())["model"]["vocab"]]
    return tf.T5Tokenizer(vocab=vocab, extra_ids=0)


def build_model(family: str, tok, *, seed: int = 0, **over):
    """A 2+2-layer random BART / T5 for ``tok`` (no dropout; peaked distributions: no
    near-ties in greedy decoding). BART's ``final_logits_bias`` is made random."""
    torch.manual_seed(seed)
    if family == "bart":
        kw = dict(
            vocab_size=len(tok), d_model=16, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
            decoder_ffn_dim=32, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None, dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0, init_std=0.3,
        )  # fmt: skip
        model = tf.BartForConditionalGeneration(tf.BartConfig(**{**kw, **over}))
        with torch.no_grad():
            model.final_logits_bias.normal_()
        return model
    kw = dict(
        vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id, dropout_rate=0.0, initializer_factor=2.0,
    )  # fmt: skip
    return tf.T5ForConditionalGeneration(tf.T5Config(**{**kw, **over}))


def save_generator(path, family: str, **over) -> str:
    tok = _bart_tokenizer() if family == "bart" else _t5_tokenizer()
    build_model(family, tok, **over).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gen_dirs(tmp_path_factory):
    """{family: directory with a tiny random model + its tokenizer}."""
    root = tmp_path_factory.mktemp("seq2seq")
    return {f: save_generator(root / f, f) for f in FAMILIES}


def config(tmp_path, gen_dir, **kw) -> TrainConfig:
    base = dict(
        generator=gen_dir,
        retriever="tiny-random",
        steps=1,
        batch_size=2,
        docs=K,
        output_dir=str(tmp_path / "run"),
        progress=False,
        max_new_tokens=3,
        eval_batch_size=4,
        lr_generator=1e-3,
        lr_retriever=1e-3,
        warmup_steps=0,
        generator_train_layers=-1,
        max_doc_tokens=MAX_DOC,
        skip_initial_eval=True,
    )
    base.update(kw)
    return TrainConfig(**base)


def fixed_retrieval(tr, examples, seed=0):
    """Make ``tr.retrieve`` return fixed documents and float64 scores (the generator part of
    the step alone); returns ``(docs [B][K] texts, scores [B, K])``."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(len(tr.texts), generator=g)[:K] for _ in examples])
    scores = torch.randn(len(examples), K, generator=g, dtype=torch.float64) * 2
    tr.retrieve = lambda questions, k, grad: (rows, scores, None)
    return [[tr.texts[i] for i in r] for r in rows.tolist()], scores


def passage_of(tok, text: str) -> str:
    ids = tok(text, add_special_tokens=False)["input_ids"][:MAX_DOC]
    return tok.decode(ids)


def reference_loss(model, tok, questions, docs, answers, scores, mode: str, eps: float):
    """The RAG loss from the full float64 logits of every unpadded (passage, question) row:
    encoder = the tokenizer's encoding of the filled default template, decoder input =
    [decoder_start_token_id] + answer, labels = answer + EOS."""
    start = model.config.decoder_start_token_id
    losses = []
    for b, q in enumerate(questions):
        y = tok(answers[b], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        dec = torch.tensor([[start] + y[:-1]])
        lps = []
        for d in docs[b]:
            text = DEFAULT_PROMPT_TEMPLATE.format(passage=passage_of(tok, d), question=q)
            ids = torch.tensor([tok(text)["input_ids"]])
            logits = model(input_ids=ids, decoder_input_ids=dec).logits[0]
            lps.append(torch.log_softmax(logits.double(), -1))
        lp = torch.stack(lps)  # [K, T, V]
        V = lp.shape[-1]
        pi = torch.log_softmax(scores[b].double(), -1)
        tgt = lp[:, torch.arange(len(y)), torch.tensor(y)]  # [K, T]
        if mode == "sequence":
            nll = -torch.logsumexp(pi + tgt.sum(-1), 0)
            smooth = -torch.logsumexp(pi + lp.sum(-1).sum(-1), 0)
            losses.append((1 - eps) * nll + eps / V * smooth)
        else:
            marg = torch.logsumexp(pi[:, None, None] + lp, 0)  # [T, V]
            per_token = -(1 - eps) * marg[torch.arange(len(y)), torch.tensor(y)]
            losses.append((per_token - eps / V * marg.sum(-1)).sum())
    return torch.stack(losses).mean()


@pytest.fixture(scope="module")
def trainers(gen_dirs, tmp_path_factory):
    """{family: a float64 CoTrainer with the retriever frozen} (the generator part)."""
    out = {}
    for f in FAMILIES:
        cfg = config(tmp_path_factory.mktemp(f"t64{f}"), gen_dirs[f], freeze_retriever=True)
        tr = CoTrainer(cfg, dataset=tiny_dataset())
        tr.generator.double()
        out[f] = tr
    return out


# ------------------------------------------------------------------ the loss of the loop
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "mode,eps",
    [
        pytest.param("sequence", 0.0, id="sequence"),
        pytest.param("token", 0.0, id="token"),
        pytest.param("sequence", 0.1, id="sequence-smoothed"),
        pytest.param("token", 0.1, id="token-smoothed"),
    ],
)
def test_loop_rag_loss_equals_full_logits_reference(trainers, family, mode, eps):
    tr = trainers[family]
    tr.cfg = dataclasses.replace(tr.cfg, mode=mode, label_smoothing=eps)
    tr.generator.zero_grad(set_to_none=True)
    examples = tr.data.train[:2]
    docs, scores = fixed_retrieval(tr, examples, seed=len(mode) + int(10 * eps))
    ref_model = copy.deepcopy(tr.generator)
    logs = tr.micro_step(examples)

    questions = [ex.question for ex in examples]
    answers = [ex.answers[0] for ex in examples]
    want = reference_loss(ref_model, tr.tokenizer, questions, docs, answers, scores, mode, eps)
    want.backward()
    assert_close(torch.tensor(logs["generator"], dtype=torch.float64), want, rtol=1e-9, name="loss")
    ref_params = dict(ref_model.named_parameters())
    n_grads = 0
    for name, p in tr.generator.named_parameters():
        g_ref = ref_params[name].grad
        if g_ref is None or not g_ref.abs().max() > 0:
            assert p.grad is None or not p.grad.abs().max() > 0, name
            continue
        assert_close(p.grad, g_ref, rtol=1e-9, atol=1e-12, name=f"grad {name}")
        n_grads += 1
    assert n_grads > 10

    # the library's one-call form gives the same loss
    batch = rk.hf.build_seq2seq_rag_batch(
        tr.tokenizer, questions, [[passage_of(tr.tokenizer, d) for d in ds] for ds in docs],
        answers, max_doc_tokens=None,
    )  # fmt: skip
    with torch.no_grad():
        lib = rk.hf.seq2seq_rag_loss(tr.generator, batch, scores, mode=mode, label_smoothing=eps)
    assert_close(lib, want, rtol=1e-9, name="rk.hf.seq2seq_rag_loss")


@pytest.mark.parametrize("family", FAMILIES)
def test_adist_cross_attention_matches_unpadded_rows(trainers, family):
    tr = trainers[family]
    tok = tr.tokenizer
    tr.generator.set_attn_implementation("eager")
    examples = tr.data.train[2:4]
    docs, _ = fixed_retrieval(tr, examples, seed=7)
    questions = [ex.question for ex in examples]
    answers = [ex.answers[0] for ex in examples]
    with torch.no_grad():
        hidden, target, attention = tr.generator_hidden(questions, docs, answers, attention=True)
    assert attention.shape == (2, K) and bool(((attention > 0) & (attention < 1)).all())

    from rag_kernels.cotrain.models import build_seq2seq_generator_batch
    from rag_kernels.cotrain.training.feedback import encoder_passage_mask

    batch = build_seq2seq_generator_batch(tok, questions, docs, answers, max_doc_tokens=MAX_DOC)
    mask = encoder_passage_mask(tok, batch, questions, docs, DEFAULT_PROMPT_TEMPLATE, MAX_DOC)
    start = tr.generator.config.decoder_start_token_id
    for b in range(2):
        y = tok(answers[b], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for k in range(K):
            r = b * K + k
            n = int(batch.attention_mask[r].sum())
            ids = batch.input_ids[r, :n]
            # the mask covers exactly the passage's tokens
            got = tok.decode(ids[mask[r, :n]]).strip()
            assert got == passage_of(tok, docs[b][k]).strip(), (got, docs[b][k])
            with torch.no_grad():
                out = tr.generator(
                    input_ids=ids[None],
                    decoder_input_ids=torch.tensor([[start] + y[:-1]]),
                    output_attentions=True,
                )
            per_layer = [a[0].mean(0).mean(0)[mask[r, :n]].sum() for a in out.cross_attentions]
            want = torch.stack(per_layer).mean()
            assert_close(attention[b, k], want, rtol=1e-6, name=f"attention[{b},{k}]")
    tr.generator.set_attn_implementation("sdpa")


# ------------------------------------------------------------------ the options
OBJECTIVES = ("rag", "emdr2", "pdist", "lsr", "loop", "adist", "contrastive")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_retriever_objective_trains_the_query_encoder(gen_dirs, tmp_path, family, objective):
    mode = "token" if objective in ("adist", "emdr2") else "sequence"
    cfg = config(tmp_path, gen_dirs[family], retriever_objective=objective, mode=mode)
    tr = CoTrainer(cfg, dataset=tiny_dataset())
    tr.refresh_index()
    before_r = [p.detach().clone() for p in tr.ret_params]
    before_g = [p.detach().clone() for p in tr.gen_params]
    logs = tr.train_step()
    assert torch.isfinite(torch.tensor(logs["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before_r, tr.ret_params, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(before_g, tr.gen_params, strict=True))
    if objective != "rag":
        assert logs["retriever"] > 0 or objective == "contrastive"


def _decoder_param_names(model, family: str, top: int) -> set[str]:
    prefix = "model.decoder" if family == "bart" else "decoder"
    stack = "layers" if family == "bart" else "block"
    names = {n for n, _ in model.named_parameters() if n.startswith(f"{prefix}.{stack}.")}
    n_layers = len(model.get_decoder().layers if family == "bart" else model.decoder.block)
    keep = {n for n in names if int(n.split(".")[3 if family == "bart" else 2]) >= n_layers - top}
    if family == "t5":
        keep |= {n for n, _ in model.named_parameters() if n.startswith("decoder.final_layer")}
    return keep


@pytest.mark.parametrize("family", FAMILIES)
def test_train_layers_and_freeze_generator(gen_dirs, tmp_path, family):
    tr = CoTrainer(
        config(tmp_path / "a", gen_dirs[family], generator_train_layers=1),
        dataset=tiny_dataset(),
    )
    names = {n for n, p in tr.generator.named_parameters() if p.requires_grad}
    assert names == _decoder_param_names(tr.generator, family, 1) and names
    before = {n: p.detach().clone() for n, p in tr.generator.named_parameters()}
    tr.train_step()
    for n, p in tr.generator.named_parameters():
        assert torch.equal(p, before[n]) == (n not in names), n
    frozen = CoTrainer(
        config(tmp_path / "b", gen_dirs[family], freeze_generator=True), dataset=tiny_dataset()
    )
    assert frozen.gen_params == [] and frozen.ret_params
    logs = frozen.train_step()
    assert torch.isfinite(torch.tensor(logs["loss"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(gen_dirs, tmp_path, family):
    grads = []
    for i, ckpt in enumerate((False, True)):
        cfg = config(
            tmp_path / str(i), gen_dirs[family], gradient_checkpointing=ckpt,
            freeze_retriever=True,
        )  # fmt: skip
        tr = CoTrainer(cfg, dataset=tiny_dataset())
        tr.generator.double().train()  # float64: the recomputation's rounding is negligible
        examples = tr.data.train[:2]
        fixed_retrieval(tr, examples, seed=3)
        tr.micro_step(examples)
        grads.append({n: p.grad for n, p in tr.generator.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n, g in grads[0].items():
        assert_close(grads[1][n], g, rtol=1e-10, atol=1e-13, name=n)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_and_max_answer_tokens(gen_dirs, tmp_path, family):
    cfg = config(tmp_path, gen_dirs[family], precision="bf16", max_answer_tokens=1)
    tr = CoTrainer(cfg, dataset=tiny_dataset())
    examples = tr.data.train[:2]
    docs, _ = fixed_retrieval(tr, examples)
    hidden, target, _ = tr.generator_hidden(
        [ex.question for ex in examples], docs, [ex.answers[0] for ex in examples]
    )
    first = [
        tr.tokenizer(ex.answers[0], add_special_tokens=False)["input_ids"][0] for ex in examples
    ]
    assert hidden.shape[:3] == (2, K, 1) and target.tolist() == [[t] for t in first]
    tr.refresh_index()
    del tr.retrieve  # back to the real retrieval
    logs = tr.train_step()
    assert torch.isfinite(torch.tensor(logs["loss"])) and logs["grad_norm_generator"] > 0


def read_log(cfg) -> list[dict]:
    with open(os.path.join(cfg.output_dir, "train_log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_gives_the_same_next_steps(gen_dirs, tmp_path, family):
    kw = dict(eval_limit=2, retriever_objective="pdist")
    full = config(tmp_path / "a", gen_dirs[family], steps=3, **kw)
    CoTrainer(full, dataset=tiny_dataset()).fit()
    part = config(tmp_path / "b", gen_dirs[family], steps=1, **kw)
    CoTrainer(part, dataset=tiny_dataset()).fit()
    st = read_checkpoint(os.path.join(part.output_dir, "checkpoint.pt"))
    decoder = "model.decoder.layers.1." if family == "bart" else "decoder.block.1."
    assert any(k.startswith(decoder) for k in st["generator"])
    resumed = config(tmp_path / "b", gen_dirs[family], steps=3, resume=True, **kw)
    CoTrainer(resumed, dataset=tiny_dataset()).fit()
    want, got = read_log(full), read_log(resumed)
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(want, got, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), a["step"]


# ------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("seq2seq_data")
    ds = tiny_dataset()
    files = {k: str(d / f"{k}.jsonl") for k in ("corpus", "train", "eval")}
    write_corpus(files["corpus"], ds.corpus)
    write_qa(files["train"], ds.train)
    write_qa(files["eval"], ds.test)
    return files


@pytest.mark.parametrize(
    "family,mode,objective,decoding",
    [
        pytest.param("bart", "sequence", "pdist", "marginal", id="bart-sequence-pdist"),
        pytest.param("t5", "token", "adist", "marginal", id="t5-token-adist"),
        pytest.param("bart", "token", "adist", "top1", id="bart-token-adist-top1"),
        pytest.param("t5", "sequence", "loop", "top1", id="t5-sequence-loop-top1"),
    ],
)
def test_train_then_eval_cli(gen_dirs, data_files, tmp_path, capsys, family, mode, objective,
                             decoding):  # fmt: skip
    out = str(tmp_path / "run")
    argv = [
        "train", "--generator", gen_dirs[family], "--retriever", "tiny-random", "--steps", "2",
        "--batch-size", "2", "--docs", str(K), "--mode", mode, "--retriever-objective",
        objective, "--eval-decoding", decoding, "--max-new-tokens", "3", "--eval-batch-size",
        "2", "--lr-generator", "1e-3", "--progress", "false", "--output-dir", out,
        *[x for k, v in data_files.items() for x in (f"--{k}", v)],
    ]  # fmt: skip
    assert main(argv) == 0
    with open(os.path.join(out, "metrics.json")) as fh:
        metrics = json.load(fh)
    assert {"initial", "final"} <= set(metrics) and "f1" in metrics["final"]
    assert len(read_log(TrainConfig(output_dir=out))) == 2
    capsys.readouterr()
    assert main(["eval", "--output-dir", out, "--resume", "--progress", "false"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(ln.startswith("eval: loaded ") and "checkpoint" in ln for ln in lines)
    recs = read_predictions(os.path.join(out, "predictions.jsonl"))
    assert len(recs) == len(tiny_dataset().test)
    assert all(isinstance(r["prediction"], str) and len(r["retrieved"]) == K for r in recs)


def test_unknown_seq2seq_head_and_missing_decoder_start_are_user_errors(tmp_path, capsys):
    tok = _bart_tokenizer()
    pegasus = tmp_path / "pegasus"
    torch.manual_seed(0)
    tf.PegasusForConditionalGeneration(
        tf.PegasusConfig(
            vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
            decoder_ffn_dim=32, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
    ).save_pretrained(pegasus)  # fmt: skip
    tok.save_pretrained(pegasus)
    nostart = save_generator(tmp_path / "nostart", "bart", decoder_start_token_id=None)
    common = ["train", "--retriever", "tiny-random", "--steps", "1", "--progress", "false"]
    capsys.readouterr()
    tf.utils.logging.disable_progress_bar()  # from_pretrained's bar would share stderr
    try:
        line = cli_error_line(
            capsys, *common, "--generator", str(pegasus), "--output-dir", str(tmp_path / "a")
        )
        assert "PegasusForConditionalGeneration" in line and "LM head" in line
        line = cli_error_line(
            capsys, *common, "--generator", nostart, "--output-dir", str(tmp_path / "b")
        )
        assert "cannot load the model" in line and "decoder_start_token_id" in line
    finally:
        tf.utils.logging.enable_progress_bar()


def test_seq2seq_helpers_reject_a_causal_lm_and_a_bad_batch(trainers):
    llama = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1,
        )
    )  # fmt: skip
    batch = rk.hf.Seq2SeqRagBatch(
        torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long),
        torch.ones(1, 3, dtype=torch.long), 2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="causal LM.*rag_hidden"):
        rk.hf.seq2seq_rag_hidden(llama, batch)
    bart = trainers["bart"].generator
    with pytest.raises(ValueError, match="batch.target must have shape"):
        rk.hf.seq2seq_rag_hidden(bart, dataclasses.replace(batch, n_docs=1))
    with pytest.raises(TypeError, match="Seq2SeqRagBatch"):
        rk.hf.seq2seq_rag_hidden(bart, object())
    with pytest.raises(TypeError, match="come from the model"):
        rk.hf.seq2seq_rag_loss(bart, batch, torch.zeros(1, 2), bias=None)
    long = dataclasses.replace(
        batch,
        input_ids=torch.ones(2, 300, dtype=torch.long),
        attention_mask=torch.ones(2, 300, dtype=torch.long),
    )
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        rk.hf.seq2seq_rag_hidden(bart, long)


# ------------------------------------------------------------------ decoding vs brute force
@pytest.fixture(scope="module", params=FAMILIES)
def s2s(request):
    """(family, a float64 tiny random model, EOS id, pad id)."""
    f = request.param
    tok = _bart_tokenizer() if f == "bart" else _t5_tokenizer()
    model = build_model(f, tok, seed=1).double().eval()
    return f, model, tok.eos_token_id, tok.pad_token_id


def _prompts(vocab: int, G, Kd, seed=1, low=3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (G, Kd), generator=g)
    prompts = [
        [torch.randint(low, vocab, (int(n),), generator=g).tolist() for n in row] for row in lengths
    ]
    prior = torch.log_softmax(2 * torch.randn(G, Kd, generator=g, dtype=torch.float64), -1)
    return prompts, prior


def _logp(model, prompt, dec):
    """log p(. | prompt, dec[:j]) at every decoder position j: one unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([dec]))
    return torch.log_softmax(logits.logits[0], -1)


def _brute_token(model, prompts, prior, n, eos):
    start = model.config.decoder_start_token_id
    y = []
    for _ in range(n):
        marg = torch.logsumexp(
            torch.stack(
                [prior[k] + _logp(model, p, [start] + y)[-1] for k, p in enumerate(prompts)]
            ),
            0,
        )
        t = int(marg.argmax())
        if t == eos:
            return y, True
        y.append(t)
    return y, False


def _brute_score(model, prompt, y):
    lp = _logp(model, prompt, [model.config.decoder_start_token_id] + y[:-1])
    return sum(float(lp[j, t]) for j, t in enumerate(y))


def test_seq2seq_rag_token_matches_brute_force(s2s):
    _, model, eos, pad = s2s
    prompts, prior = _prompts(model.config.vocab_size, 4, 3)
    got = rag_token_decode(
        model, prompts, prior, max_new_tokens=6, eos_token_id=eos, pad_token_id=pad
    )
    want = [_brute_token(model, p, prior[g], 6, eos)[0] for g, p in enumerate(prompts)]
    assert got == want and any(got)


def test_seq2seq_greedy_is_hf_generate(s2s):
    _, model, eos, pad = s2s
    prompts, _ = _prompts(model.config.vocab_size, 3, 1, seed=2)
    for p in (row[0] for row in prompts):
        got = rag_token_decode(
            model, [[p]], torch.zeros(1, 1), max_new_tokens=5, eos_token_id=eos,
            pad_token_id=pad, keep_eos=True,
        )[0]  # fmt: skip
        ref = model.generate(
            torch.tensor([p]), max_new_tokens=5, do_sample=False, num_beams=1,
            eos_token_id=eos, pad_token_id=pad,
        )[0, 1:].tolist()  # fmt: skip
        assert got == ref[: len(got)] and (len(got) == 5 or got[-1] == eos)


def test_seq2seq_rag_sequence_picks_the_best_marginal_candidate(s2s):
    _, model, eos, pad = s2s
    prompts, prior = _prompts(model.config.vocab_size, 3, 3, seed=3)
    choices = rag_sequence_decode(
        model, prompts, prior, max_new_tokens=6, eos_token_id=eos, pad_token_id=pad
    )
    for g, (ch, ps) in enumerate(zip(choices, prompts, strict=True)):
        greedy = []
        for p in ps:
            y, ended = _brute_token(model, [p], torch.zeros(1), 6, eos)
            y = y + [eos] if ended else y
            if y not in greedy:
                greedy.append(y)
        assert ch.candidates == greedy
        brute = torch.tensor(
            [[_brute_score(model, p, y) for p in ps] for y in greedy], dtype=torch.float64
        )
        assert_close(ch.scores, brute, rtol=1e-9, atol=1e-12, name="scores")
        marg = torch.logsumexp(prior[g][None] + brute, -1)
        assert_close(ch.log_marginal, marg, rtol=1e-9, atol=1e-12, name="log_marginal")
        assert ch.best == int(marg.argmax())
        best = greedy[ch.best]
        assert ch.answer == (best[:-1] if best[-1] == eos else best)


def test_seq2seq_score_candidates_chunking_is_exact(s2s):
    _, model, eos, pad = s2s
    prompts, _ = _prompts(model.config.vocab_size, 2, 3, seed=4)
    cands = [[[7, 8, eos], [9]], [[10, 11, 12, 13]]]
    a = score_candidates(model, prompts, cands, chunk_rows=64, pad_token_id=pad, eos_token_id=eos)
    b = score_candidates(model, prompts, cands, chunk_rows=2, pad_token_id=pad, eos_token_id=eos)
    for x, y, ps, cs in zip(a, b, prompts, cands, strict=True):
        ref = torch.tensor(
            [[_brute_score(model, p, c) for p in ps] for c in cs], dtype=torch.float64
        )
        assert_close(x, ref, rtol=1e-9, atol=1e-12, name="chunk 64")
        assert_close(y, ref, rtol=1e-9, atol=1e-12, name="chunk 2")
