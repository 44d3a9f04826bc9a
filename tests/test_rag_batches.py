"""Causal-LM RAG batches (rk.hf.build_rag_batch / rag_hidden / causal_rag_loss) on tiny random
Llama and GPT-2 models with a word-level tokenizer, with and without a chat template.

The reference runs the full model (with its logits) once per (query, document) on the
unpadded row and computes -log sum_k softmax(s)_k prod_t p(y_t | doc k) (RAG-Sequence) and
-sum_t log sum_k softmax(s)_k p(y_t | doc k) (RAG-Token) in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rag_kernels as rk

transformers = pytest.importorskip("transformers")
from rag_kernels.cotrain.assets import build_tiny_tokenizer  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}[BOS] {{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
    "{% if add_generation_prompt %}[BOS] assistant :{% endif %}"
)
QUESTIONS = ["who built the tower of varn", "what does queen maribet collect"]
DOCS = [
    [
        "the tower of varn was built by oskar brell in spring",
        "plums are salted in hesk",
        "a comet returns every winter and the river sotha freezes",
    ],
    ["queen maribet collects green glass clocks", "oskar designs libraries", "the sea"],
]
ANSWERS = ["oskar brell", "green glass clocks"]
CORPUS = [*QUESTIONS, *(d for ds in DOCS for d in ds), *ANSWERS]
CORPUS.append("Context : Question Answer with a few words . user assistant")


@pytest.fixture(scope="module")
def toks():
    plain = build_tiny_tokenizer(CORPUS)
    chat = build_tiny_tokenizer(CORPUS)
    chat.chat_template = CHAT_TEMPLATE
    return {"plain": plain, "chat": chat}


def _llama(vocab, tok):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _gpt2(vocab, tok):
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def models(toks):
    tok = toks["plain"]
    torch.manual_seed(0)
    out = {}
    for name, make in (("llama", _llama), ("gpt2", _gpt2)):
        m = make(len(tok), tok).double().eval()
        with torch.no_grad():  # a less uniform head than the random init
            m.get_output_embeddings().weight.mul_(8.0)
        out[name] = m
    return out


def ref_row(tok, question, document, answer) -> tuple[list[int], int]:
    """The unpadded row written out by hand, and its number of answer tokens (EOS included)."""
    content = f"Context: {document}\nQuestion: {question}\nAnswer with a few words."
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    if tok.chat_template:
        text = tok.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        prompt = ids(text)
    else:
        prompt = [tok.bos_token_id] + ids(content + "\nAnswer:")
    a = ids(answer) + [tok.eos_token_id]
    return prompt + a, len(a)


def reference_loss(model, tok, scores, mode):
    """Full model with logits per (query, doc), unpadded, default positions; float64."""
    B, K = scores.shape
    prior = F.log_softmax(scores, -1)
    losses = []
    for b in range(B):
        lps = []
        for k in range(K):
            row, n = ref_row(tok, QUESTIONS[b], DOCS[b][k], ANSWERS[b])
            ids = torch.tensor([row])
            logp = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # [P, V]
            P = len(row)
            pos = torch.arange(P - n - 1, P - 1)  # logits at t predict token t + 1
            lps.append(logp[pos, ids[0, pos + 1]])  # [n]
        lp = torch.stack(lps)  # [K, n]
        if mode == "sequence":
            losses.append(-torch.logsumexp(prior[b] + lp.sum(-1), 0))
        else:
            losses.append(-torch.logsumexp(prior[b][:, None] + lp, 0).sum())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_answers_sit_at_the_same_positions_for_the_k_docs(toks, kind):
    tok = toks[kind]
    batch = rk.hf.build_rag_batch(tok, QUESTIONS, DOCS, ANSWERS)
    B, K = len(QUESTIONS), len(DOCS[0])
    BK, L = batch.input_ids.shape
    assert (BK, batch.n_docs, batch.ignore_index) == (B * K, K, -100)
    assert batch.target.shape == (B, L - 1)
    assert isinstance(batch, rk.hf.RagBatch)
    lengths = set()
    for b in range(B):
        a = tok(ANSWERS[b], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(a)
        want_t = torch.full((L - 1,), -100)
        want_t[L - 1 - n :] = torch.tensor(a)
        assert torch.equal(batch.target[b], want_t)
        for k in range(K):
            i = b * K + k
            row, _ = ref_row(tok, QUESTIONS[b], DOCS[b][k], ANSWERS[b])
            m = batch.attention_mask[i].bool()
            assert m[L - len(row) :].all() and not m[: L - len(row)].any()  # left padding
            assert batch.input_ids[i, m].tolist() == row
            assert (batch.input_ids[i, ~m] == tok.pad_token_id).all()
            assert batch.input_ids[i, L - n :].tolist() == a  # same answer slots for every k
            assert batch.position_ids[i, m].tolist() == list(range(len(row)))
            assert (batch.position_ids[i, ~m] == 0).all()
            lengths.add(len(row))
            if kind == "chat":
                assert "assistant" in tok.decode(row[: len(row) - n])
    assert len(lengths) > 2  # the docs have different lengths: padding is exercised


@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("kind", ["plain", "chat"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_rag_loss_matches_full_model_reference(models, toks, arch, kind, mode):
    model, tok = models[arch], toks[kind]
    batch = rk.hf.build_rag_batch(tok, QUESTIONS, DOCS, ANSWERS)
    scores = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.9, -1.2]], dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    res = []
    for fn in (
        lambda s: reference_loss(model, tok, s, mode),
        lambda s: rk.hf.causal_rag_loss(model, batch, s, mode=mode),
    ):
        s = scores.clone().requires_grad_()
        loss = fn(s)
        res.append((loss.detach(), *torch.autograd.grad(loss, [s, *params])))
    assert res[1][0].dtype == torch.float64
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
    assert res[0][1].abs().sum() > 0  # doc_scores get a gradient


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_keeps_per_doc_loglik(models, toks, arch):
    """Each padded row's answer log-likelihood equals a single unpadded row's (position_ids);
    for GPT-2 (absolute positions) positions that count from the padding would change it."""
    model, tok = models[arch], toks["plain"]
    batch = rk.hf.build_rag_batch(tok, QUESTIONS, DOCS, ANSWERS)
    head = rk.hf.lm_head(model)
    with torch.no_grad():
        h = rk.hf.rag_hidden(model, batch)  # [B, K, L-1, H]
        B, K, T, _ = h.shape
        assert (B, K, T) == (2, 3, batch.input_ids.shape[1] - 1)
        lp = rk.linear_logprob(h, head.weight, batch.target[:, None, :]).sum(-1)  # [B, K]
        for b in range(B):
            for k in range(K):
                row, n = ref_row(tok, QUESTIONS[b], DOCS[b][k], ANSWERS[b])
                single = rk.hf.build_rag_batch(tok, [QUESTIONS[b]], [[DOCS[b][k]]], [ANSWERS[b]])
                assert single.input_ids[0].tolist() == row  # no padding in a single row
                h1 = rk.hf.rag_hidden(model, single)
                lp1 = rk.linear_logprob(h1, head.weight, single.target[:, None, :]).sum()
                torch.testing.assert_close(lp[b, k], lp1, rtol=1e-10, atol=1e-10)
        if arch == "gpt2":
            m = batch.attention_mask
            naive = rk.hf.RagBatch(
                batch.input_ids, m, torch.arange(m.shape[1]).expand_as(m), batch.target, K
            )
            lpn = rk.linear_logprob(
                rk.hf.rag_hidden(model, naive), head.weight, batch.target[:, None, :]
            ).sum(-1)
            assert (lpn - lp).abs().max() > 1e-3


def test_prompt_options_and_limits(toks):
    tok = toks["chat"]
    qs, ds, ans = QUESTIONS[:1], [DOCS[0][:2]], ANSWERS[:1]
    fmt = "Question: {question} Context: {document}"
    b1 = rk.hf.build_rag_batch(tok, qs, ds, ans, prompt=fmt, chat_template=False)
    b2 = rk.hf.build_rag_batch(
        tok, qs, ds, ans, prompt=lambda q, d: fmt.format(question=q, document=d),
        chat_template=False,
    )  # fmt: skip
    assert torch.equal(b1.input_ids, b2.input_ids)
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]
    row = [tok.bos_token_id] + ids(fmt.format(question=qs[0], document=ds[0][0]))
    row += ids(ans[0]) + [tok.eos_token_id]
    assert b1.input_ids[0, b1.attention_mask[0].bool()].tolist() == row
    # the chat template wraps a custom prompt too; it is used iff chat_template=True
    p = rk.hf.rag_prompt_ids(tok, qs[0], ds[0][0], prompt=fmt)
    assert tok.decode(p).startswith("[BOS] user") and p != row[: len(p)]
    # documents are cut to max_doc_tokens tokens
    p3 = rk.hf.rag_prompt_ids(tok, qs[0], ds[0][0], max_doc_tokens=3, chat_template=False)
    cut = tok.decode(ids(ds[0][0])[:3])
    assert p3 == rk.hf.rag_prompt_ids(tok, qs[0], cut, max_doc_tokens=None, chat_template=False)
    # at most max_answer_tokens target tokens; a cut answer has no EOS
    b3 = rk.hf.build_rag_batch(tok, qs, ds, ans, max_answer_tokens=1)
    kept = b3.target[b3.target != -100].tolist()
    assert kept == ids(ans[0])[:1]
    b4 = rk.hf.build_rag_batch(tok, qs, ds, ans, add_eos=False, ignore_index=-1)
    assert b4.target[b4.target != -1].tolist() == ids(ans[0]) and b4.ignore_index == -1


def test_ddp_wrapped_model_goes_through_the_wrapper(models, toks, tmp_path):
    """Under DistributedDataParallel the body runs inside DDP's forward (so DDP syncs the
    gradients), with the same hidden states, loss and gradients as the bare model."""
    import torch.distributed as dist

    model, tok = models["llama"], toks["plain"]
    batch = rk.hf.build_rag_batch(tok, QUESTIONS, DOCS, ANSWERS)
    scores = torch.randn(2, 3, dtype=torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        calls = []
        h = ddp.register_forward_pre_hook(lambda *a: calls.append(1))
        res = []
        for m in (model, ddp):
            model.zero_grad()
            loss = rk.hf.causal_rag_loss(m, batch, scores, mode="token")
            loss.backward()
            res.append((loss.detach(), *(p.grad.clone() for p in model.parameters())))
        h.remove()
        assert calls == [1]
        for a, b in zip(*res, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    finally:
        model.zero_grad(set_to_none=True)
        dist.destroy_process_group()


def test_bf16_autocast(models, toks):
    """Under autocast the body and the fused head run in bf16 (the loss stays fp32)."""
    model, tok = models["llama"], toks["plain"]
    m = _llama(len(tok), tok)
    m.load_state_dict(model.state_dict())
    batch = rk.hf.build_rag_batch(tok, QUESTIONS, DOCS, ANSWERS)
    s = torch.zeros(2, 3)
    ref = rk.hf.causal_rag_loss(m, batch, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rk.hf.causal_rag_loss(m, batch, s)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, rtol=5e-2, atol=5e-2)


class _NoSpecials:
    """A tokenizer without pad and EOS ids."""

    pad_token_id = eos_token_id = bos_token_id = None
    chat_template = None

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, add_special_tokens=False):
        return self.tok(text, add_special_tokens=add_special_tokens)

    def decode(self, ids):
        return self.tok.decode(ids)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(questions="who"), TypeError, r"^questions must be a list of str"),
        (dict(questions=QUESTIONS[:1]), ValueError, r"questions, documents and answers .* 1, 2, 2"),
        (dict(documents=[DOCS[0], DOCS[1][:2]]), ValueError, r"documents\[1\] has 2"),
        (dict(documents=["a doc", "b doc"]), TypeError, r"^documents\[0\] must be a list"),
        (dict(documents=[[], []]), ValueError, r"documents\[0\] must hold at least one"),
        (dict(answers=["oskar", ""]), ValueError, r"^answers\[1\] is empty"),
        (dict(answers=["oskar", "   "]), ValueError, r"^answers\[1\] is empty"),
        (dict(answers=["oskar", 3]), TypeError, r"^answers\[1\] must be a str"),
        (dict(prompt="{question} only"), ValueError, r"^prompt .*missing: \{document\}"),
        (dict(prompt="{question} {document} {extra}"), ValueError, r"^prompt .*unknown: \{extra\}"),
        (dict(prompt=3), TypeError, r"^prompt must be"),
        (dict(prompt=lambda q, d: None), TypeError, r"^prompt\(question, document\) must return"),
        (dict(max_doc_tokens=0), ValueError, r"^max_doc_tokens must be a positive int"),
        (dict(max_answer_tokens=0), ValueError, r"^max_answer_tokens must be a positive int"),
        (dict(ignore_index=None), TypeError, r"^ignore_index must be an int"),
        (dict(ignore_index=6), ValueError, r"^answers\[0\] has a token id equal to ignore_index"),
        (dict(chat_template="yes"), TypeError, r"^chat_template must be a bool"),
        (dict(no_specials=True), ValueError, r"add_eos=True but the tokenizer has no eos"),
        (dict(no_specials=True, add_eos=False), ValueError, r"no pad_token_id .*pass pad_token_id"),
    ],
)
def test_build_errors_name_the_argument(toks, change, exc, match):
    tok = toks["plain"]
    kw = dict(questions=QUESTIONS, documents=DOCS, answers=ANSWERS)
    if change.pop("no_specials", False):
        tok = _NoSpecials(tok)
    kw.update(change)
    if "ignore_index" in kw and isinstance(kw["ignore_index"], int):
        kw["ignore_index"] = tok(ANSWERS[0])["input_ids"][0]  # a real answer token id
    args = [kw.pop(k) for k in ("questions", "documents", "answers")]
    with pytest.raises(exc, match=match):
        rk.hf.build_rag_batch(tok, *args, **kw)


def test_loss_errors_name_the_argument(models, toks):
    model, tok = models["llama"], toks["plain"]
    batch = rk.hf.build_rag_batch(tok, QUESTIONS, DOCS, ANSWERS)
    s = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"bias, softcap come from the model"):
        rk.hf.causal_rag_loss(model, batch, s, bias=None, softcap=2.0)
    with pytest.raises(TypeError, match=r"ignore_index come from the model"):
        rk.hf.causal_rag_loss(model, batch, s, ignore_index=-1)
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) smoothing"):
        rk.hf.causal_rag_loss(model, batch, s, smoothing=0.1)
    with pytest.raises(ValueError, match=r"doc_scores must have shape \(B, n_docs\) = \(2, 3\)"):
        rk.hf.causal_rag_loss(model, batch, s[:, :2])
    with pytest.raises(ValueError, match=r"^mode must be one of"):
        rk.hf.causal_rag_loss(model, batch, s, mode="seq")
    with pytest.raises(TypeError, match=r"batch must be a rk.hf.RagBatch"):
        rk.hf.rag_hidden(model, {"input_ids": batch.input_ids})
    bad = rk.hf.RagBatch(batch.input_ids, batch.attention_mask, batch.position_ids,
                         batch.target[:, 1:], batch.n_docs)  # fmt: skip
    with pytest.raises(ValueError, match=r"batch.target must have shape \(B, L-1\)"):
        rk.hf.rag_hidden(model, bad)
    bad = rk.hf.RagBatch(batch.input_ids, batch.attention_mask, batch.position_ids,
                         batch.target, 4)  # fmt: skip
    with pytest.raises(ValueError, match=r"batch.n_docs must be a positive divisor"):
        rk.hf.rag_hidden(model, bad)
    with pytest.raises(ValueError, match=r"rk.hf.rag_hidden: Linear is not a model"):
        rk.hf.rag_hidden(torch.nn.Linear(2, 2), batch)


def test_cotrain_names_are_the_hf_helpers():
    from rag_kernels.cotrain import models

    assert models.GeneratorBatch is rk.hf.RagBatch
