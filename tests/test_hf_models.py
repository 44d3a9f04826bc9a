"""``rk.hf.lm_head`` and ``rk.hf.rag_nll`` against tiny random transformers models.

* ``lm_head``: for every supported family, ``softcap(hidden_scale * hidden @ weight.T + bias)``
  equals the model's own ``logits`` to 1e-10 in float64; a head it does not know raises a
  ``ValueError`` naming the model class.
* ``rag_nll``: ``RagSequenceForGeneration`` / ``RagTokenForGeneration`` with a DPR question
  encoder and a BART or T5 generator, retrieving through a stand-in retriever (gradients to
  the question encoder) or from caller-given ``doc_scores`` (gradients to them): float64 loss
  and gradients equal ``rag_model(..., labels=labels).loss``'s to 1e-9 relative, over epsilon
  0 / 0.1, exclude_bos_score on / off and reduce_loss on / off; float32 error against the
  float64 model at most 2x the model's own float32 error (plus 1e-6 of the scale).

Models are built from configs with random weights (nothing is downloaded).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import rag_kernels as rk  # noqa: E402
from toolkit import assert_close, impl_params  # noqa: E402

tf = pytest.importorskip("transformers")
retrieval_rag = pytest.importorskip("transformers.models.rag.retrieval_rag")

VOCAB = 37
H = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _cls(name: str):
    cls = getattr(tf, name, None)
    if cls is None:
        pytest.skip(f"transformers {tf.__version__} has no {name}")
    return cls


# ------------------------------------------------------------------------------ lm_head

_DEC = dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=32, num_hidden_layers=1)
_ATT = dict(num_attention_heads=2, num_key_value_heads=1)
_T5 = dict(vocab_size=VOCAB, d_model=H, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
_BART = dict(
    vocab_size=VOCAB, d_model=H, encoder_layers=1, decoder_layers=1,
    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
    decoder_ffn_dim=32, max_position_embeddings=64,
)  # fmt: skip

# id: (config class, model class, config kwargs, expected hidden_scale or None, softcap)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**_DEC, **_ATT}, 1.0, None),
    "smollm-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {**_DEC, **_ATT, "tie_word_embeddings": True},
        1.0,
        None,
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_DEC, **_ATT}, 1.0, None),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**_DEC, **_ATT}, 1.0, None),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_DEC, **_ATT, "head_dim": 8}, 1.0, None),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_DEC, **_ATT, "head_dim": 8}, 1.0, None),
    "gemma2-softcap": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**_DEC, **_ATT, "head_dim": 8, "final_logit_softcapping": 0.2},
        1.0,
        0.2,
    ),
    "gemma2-nocap": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**_DEC, **_ATT, "head_dim": 8, "final_logit_softcapping": None},
        1.0,
        None,
    ),
    "gemma3-softcap": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**_DEC, **_ATT, "head_dim": 8, "final_logit_softcapping": 0.25},
        1.0,
        0.25,
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            vocab_size=VOCAB,
            n_embd=H,
            n_layer=1,
            n_head=2,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        1.0,
        None,
    ),
    "phi-bias": ("PhiConfig", "PhiForCausalLM", {**_DEC, "num_attention_heads": 2}, 1.0, None),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_DEC, **_ATT, "pad_token_id": 0}, 1.0, None),
    "bart": ("BartConfig", "BartForConditionalGeneration", _BART, 1.0, None),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", _BART, 1.0, None),
    "t5-tied": ("T5Config", "T5ForConditionalGeneration", _T5, H**-0.5, None),
    "t5-untied": (
        "T5Config",
        "T5ForConditionalGeneration",
        {**_T5, "tie_word_embeddings": False},
        1.0,
        None,
    ),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", _T5, None, None),
    "umt5-tied": ("UMT5Config", "UMT5ForConditionalGeneration", _T5, H**-0.5, None),
    "umt5-untied": (
        "UMT5Config",
        "UMT5ForConditionalGeneration",
        {**_T5, "tie_word_embeddings": False},
        1.0,
        None,
    ),
}


def _build(family: str, dtype=torch.float64, seed=0):
    cfg_name, model_name, kw, _, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = _cls(model_name)(_cls(cfg_name)(**kw)).to(dtype).eval()
    with torch.no_grad():  # biases are zeros at init: make them visible
        fb = getattr(model, "final_logits_bias", None)
        if fb is not None:
            fb.copy_(torch.randn(fb.shape, dtype=dtype))
        bias = model.get_output_embeddings().bias
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, dtype=dtype))
    return model


def _model_logits_and_hidden(model, seed=1):
    """``(model(...).logits, the hidden state it feeds its head)``, found independently."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    if not model.config.is_encoder_decoder:
        logits = model(input_ids=ids).logits
        return logits, model.base_model(input_ids=ids)[0]
    dec = torch.randint(3, VOCAB, (2, 5), generator=g)
    logits = model(input_ids=ids, decoder_input_ids=dec).logits
    if hasattr(model, "model"):  # BART family: the base model's output is the decoder's
        return logits, model.model(input_ids=ids, decoder_input_ids=dec)[0]
    enc = model.encoder(input_ids=ids)[0]
    return logits, model.decoder(input_ids=dec, encoder_hidden_states=enc)[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lm_head_reproduces_model_logits(family):
    model = _build(family)
    head = rk.hf.lm_head(model)
    _, _, _, scale, cap = FAMILIES[family]
    if scale is None:  # mT5: transformers 5 never scales, 4.x scales when tied
        scale = 1.0 if int(tf.__version__.split(".")[0]) >= 5 else H**-0.5
    if family == "umt5-untied" and not hasattr(model.config, "scale_decoder_outputs"):
        # a UMT5Config without scale_decoder_outputs (transformers 5.17) drops
        # tie_word_embeddings=False: the model is tied, and scales, whatever was asked
        scale = H**-0.5
    assert isinstance(head, rk.hf.LMHead)
    assert head.weight is model.get_output_embeddings().weight  # the parameter itself
    assert head.hidden_scale == pytest.approx(scale, rel=1e-15)
    assert head.softcap == cap
    own = model.get_output_embeddings().bias
    if family in ("bart", "mbart"):
        torch.testing.assert_close(head.bias, model.final_logits_bias[0], rtol=0, atol=0)
    elif own is not None:
        assert head.bias is own
    else:
        assert head.bias is None
    logits, hidden = _model_logits_and_hidden(model)
    z = head.hidden_scale * hidden @ head.weight.T
    if head.bias is not None:
        z = z + head.bias
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    assert_close(z, logits, rtol=1e-10, name=f"{family} logits")
    assert_close(head.logits(hidden), logits, rtol=1e-10, name=f"{family} LMHead.logits")


def test_lm_head_of_a_rag_model_is_its_generators():
    m = _rag("bart", "sequence", retriever=False)
    a, b = rk.hf.lm_head(m), rk.hf.lm_head(m.rag.generator)
    assert a.weight is b.weight and a.hidden_scale == b.hidden_scale
    torch.testing.assert_close(a.bias, b.bias, rtol=0, atol=0)


class _Custom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(4, 5)

    def get_output_embeddings(self):
        return self.lm_head


def _llama_with_projection_head():
    m = _build("llama")
    m.lm_head = torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.Linear(H, VOCAB))
    return m


def _llama_overriding_forward():
    base = _cls("LlamaForCausalLM")

    class ScaledLlama(base):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    return ScaledLlama(_cls("LlamaConfig")(**_DEC, **_ATT))


def _cohere():
    cfg = _cls("CohereConfig")(**_DEC, **_ATT, logit_scale=0.5)
    return _cls("CohereForCausalLM")(cfg)


BAD_HEADS = {
    "not-transformers": (_Custom, "_Custom"),
    "projection-head": (_llama_with_projection_head, "LlamaForCausalLM.*Sequential"),
    "overrides-forward": (_llama_overriding_forward, "ScaledLlama.*overrides forward"),
    "unknown-logit-scale": (_cohere, "CohereForCausalLM"),
}


@pytest.mark.parametrize("case", list(BAD_HEADS))
def test_lm_head_rejects_heads_it_does_not_know(case):
    make, match = BAD_HEADS[case]
    with pytest.raises(ValueError, match=match):
        rk.hf.lm_head(make())


def test_lm_head_rejects_a_bad_softcap():
    m = _build("gemma2-softcap")
    m.config.final_logit_softcapping = -1.0
    with pytest.raises(ValueError, match="Gemma2ForCausalLM.*final_logit_softcapping"):
        rk.hf.lm_head(m)


# ------------------------------------------------------------------------------ rag_nll

B, K, LQ, LD, T = 2, 3, 5, 4, 6
N_INDEX = 7  # documents in the stand-in index


class _Retriever(retrieval_rag.RagRetriever):
    """A stand-in index: inner-product top-K over fixed random doc embeddings; the context is
    the document's tokens then the question's (what ``RagRetriever`` returns, minus text)."""

    def __init__(self, dim: int, pad: int, tokenized_docs: bool = False, seed: int = 5):
        g = torch.Generator().manual_seed(seed)
        self.embeds = torch.randn(N_INDEX, dim, generator=g)  # float32, like a faiss index
        self.doc_tokens = torch.randint(3, VOCAB, (N_INDEX, LD), generator=g)
        self.doc_tokens[0, -1] = pad  # a padded document
        self.pad = pad
        self.return_tokenized_docs = tokenized_docs

    def __call__(self, question_input_ids, question_hidden_states, prefix=None, n_docs=None,
                 return_tensors=None):  # fmt: skip
        q = torch.from_numpy(question_hidden_states)
        doc_ids = (q @ self.embeds.T).topk(n_docs, dim=1).indices  # [B, K]
        docs = self.doc_tokens[doc_ids].reshape(-1, LD)  # [B*K, LD]
        ctx = torch.cat([docs, question_input_ids.repeat_interleave(n_docs, 0)], dim=1)
        out = {
            "context_input_ids": ctx,
            "context_attention_mask": (ctx != self.pad).long(),
            "retrieved_doc_embeds": self.embeds[doc_ids],
            "doc_ids": doc_ids,
        }
        if self.return_tokenized_docs:
            out["tokenized_doc_ids"] = docs
            out["tokenized_doc_attention_mask"] = (docs != self.pad).long()
        return out


GEN_CONFIGS = {
    "bart": (
        "BartConfig",
        "BartForConditionalGeneration",
        dict(
            _BART,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            init_std=0.3,
        ),
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(_T5, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, initializer_factor=2.0),
    ),
}
_DPR = dict(
    vocab_size=VOCAB, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=32, max_position_embeddings=64,
)  # fmt: skip


def _rag(
    gen: str, kind: str, *, retriever: bool, ctx_encoder: bool = False, seed=0, patch_bos=True
):
    cfg_name, model_name, kw = GEN_CONFIGS[gen]
    torch.manual_seed(seed)
    q_enc = _cls("DPRQuestionEncoder")(_cls("DPRConfig")(**_DPR))
    generator = _cls(model_name)(_cls(cfg_name)(**kw))
    fb = getattr(generator, "final_logits_bias", None)
    if fb is not None:
        fb.copy_(torch.randn(fb.shape))
    cfg = tf.RagConfig.from_question_encoder_generator_configs(
        q_enc.config, generator.config, n_docs=K
    )
    if patch_bos and not hasattr(cfg.generator, "bos_token_id"):
        # transformers 5's T5Config has no bos_token_id, which RagSequenceForGeneration.get_nll
        # reads (``config.bos_token_id or config.generator.bos_token_id``): T5 has no BOS.
        cfg.generator.bos_token_id = None
    cls = tf.RagSequenceForGeneration if kind == "sequence" else tf.RagTokenForGeneration
    model = cls(cfg, question_encoder=q_enc, generator=generator)
    if retriever:
        model.set_retriever(_Retriever(H, generator.config.pad_token_id, ctx_encoder))
    if ctx_encoder:
        model.set_context_encoder_for_training(_cls("DPRContextEncoder")(_cls("DPRConfig")(**_DPR)))
    return model.double().eval()


def _inputs(model, seed=3):
    """Question, contexts, doc scores and labels; labels padded in one row, BOS (BART) at
    ``labels[:, 1]`` so that ``exclude_bos_score`` has an effect."""
    gcfg = model.rag.generator.config
    pad = gcfg.pad_token_id
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, LQ), generator=g)
    ids[1, -1] = pad
    labels = torch.randint(3, VOCAB, (B, T), generator=g)
    labels[:, 0] = gcfg.decoder_start_token_id
    if getattr(gcfg, "bos_token_id", None) is not None:
        labels[:, 1] = gcfg.bos_token_id
    labels[1, -2:] = pad
    ctx = torch.randint(3, VOCAB, (B * K, LD + LQ), generator=g)
    ctx[0, -2:] = pad
    return dict(
        input_ids=ids,
        attention_mask=(ids != pad).long(),
        context_input_ids=ctx,
        context_attention_mask=(ctx != pad).long(),
        doc_scores=torch.randn(B, K, generator=g, dtype=torch.float64),
        labels=labels,
    )


def _call_kwargs(inp, path):
    """The arguments of the call: the question (retrieve) or contexts + doc scores (given)."""
    if path == "retrieve":
        return {k: inp[k] for k in ("input_ids", "attention_mask", "labels")}
    return {k: inp[k] for k in ("context_input_ids", "context_attention_mask", "doc_scores",
                                "labels")}  # fmt: skip


def _leaves(model, kw):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(kw.get("doc_scores"), torch.Tensor):
        params.append(("doc_scores", kw["doc_scores"]))
    return params


def _component(name: str) -> str:
    """``rag.generator`` / ``rag.question_encoder`` / ``rag.ctx_encoder`` / ``doc_scores``."""
    return ".".join(name.split(".")[:2]) if name.startswith("rag.") else name


def _loss_and_grads(loss, leaves, seed=1):
    """The loss and, per model component, its gradients flattened into one vector (so that
    an analytically zero parameter gradient, e.g. an attention key bias's, is measured
    against the component's scale, not its own)."""
    g = torch.Generator().manual_seed(seed)
    up = (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.dtype)
    grads = torch.autograd.grad(
        loss, [p for _, p in leaves], up, allow_unused=True, materialize_grads=True
    )
    groups: dict[str, list[torch.Tensor]] = {}
    for (name, _), gr in zip(leaves, grads, strict=True):
        groups.setdefault(_component(name), []).append(gr.reshape(-1))
    return loss.detach(), {k: torch.cat(v) for k, v in groups.items()}


def _prepared(kw, dtype):
    out = dict(kw)
    if "doc_scores" in out:
        out["doc_scores"] = out["doc_scores"].detach().to(dtype).requires_grad_(True)
    return out


def _theirs(model, kw, **opts):
    return model(**kw, **{k: v for k, v in opts.items() if v is not None}).loss


def _check_parity(model, kw, opts, tol=1e-9, impl="auto"):
    kw_h, kw_o = _prepared(kw, torch.float64), _prepared(kw, torch.float64)
    theirs = _theirs(model, kw_h, **opts)
    ours = rk.hf.rag_nll(model, **kw_o, **opts, impl=impl)
    assert ours.dtype == torch.float64 and ours.shape == theirs.shape
    lt, gt = _loss_and_grads(theirs, _leaves(model, kw_h))
    lo, go = _loss_and_grads(ours, _leaves(model, kw_o))
    assert_close(lo, lt, rtol=tol, atol=tol * 1e-6, name=f"loss {opts}")
    assert go.keys() == gt.keys()
    for name in gt:
        assert_close(go[name], gt[name], rtol=tol, atol=tol * 1e-6, name=f"d {name} {opts}")


PARITY = [
    pytest.param(gen, kind, path, id=f"{gen}-{kind}-{path}")
    for gen in GEN_CONFIGS
    for kind in ("sequence", "token")
    for path in ("retrieve", "given")
]


@pytest.mark.parametrize("gen,kind,path", PARITY)
def test_rag_nll_float64_parity(gen, kind, path):
    model = _rag(gen, kind, retriever=path == "retrieve")
    kw = _call_kwargs(_inputs(model), path)
    for eps in (0.0, 0.1):
        model.config.label_smoothing = eps  # what the model's forward reads
        for reduce_loss in (False, True):
            for exclude in (False, True) if kind == "sequence" else (None,):
                opts = dict(reduce_loss=reduce_loss, exclude_bos_score=exclude)
                _check_parity(model, kw, opts)
    if kind == "sequence" and gen == "bart":  # every row starts with BOS: exclusion bites
        kw_ = _prepared(kw, torch.float64)
        on = rk.hf.rag_nll(model, **kw_, exclude_bos_score=True)
        off = rk.hf.rag_nll(model, **kw_, exclude_bos_score=False)
        assert (on < off).all()
    # gradients did reach the question encoder (retrieve) or the doc scores (given)
    kw = _prepared(kw, torch.float64)
    leaves = dict(_leaves(model, kw))
    loss = rk.hf.rag_nll(model, **kw, reduce_loss=True)
    which = "rag.question_encoder" if path == "retrieve" else "doc_scores"
    watched = [p for n, p in leaves.items() if n.startswith(which)]
    grads = torch.autograd.grad(loss, watched, allow_unused=True, materialize_grads=True)
    assert any(g.abs().max() > 0 for g in grads), f"no gradient reached {which}"


@pytest.mark.parametrize("impl", impl_params("linear_logprob", ("reference", "cpu")))
@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_rag_nll_config_defaults_and_decoder_inputs(kind, impl):
    """reduce_loss / exclude_bos_score / label_smoothing / n_docs from the config, and separate
    decoder_input_ids + decoder_attention_mask (scored: decoder_input_ids by the sequence
    model, labels by the token model, as transformers does)."""
    model = _rag("bart", kind, retriever=True)
    model.config.reduce_loss = True
    model.config.label_smoothing = 0.1
    if kind == "sequence":
        model.config.exclude_bos_score = True
    inp = _inputs(model)
    kw = _call_kwargs(inp, "retrieve")
    _check_parity(model, kw, {}, impl=impl)
    dec = inp["labels"].clone()
    dec[0, 3] = 5 if dec[0, 3] != 5 else 6  # differs from labels
    pad = model.rag.generator.config.pad_token_id
    kw = dict(kw, decoder_input_ids=dec, decoder_attention_mask=(dec != pad).long())
    _check_parity(model, kw, {}, impl=impl)
    _check_parity(model, kw, dict(n_docs=K), impl=impl)


def test_rag_nll_context_encoder_training():
    """``set_context_encoder_for_training``: doc scores from the context encoder, which gets
    gradients too."""
    model = _rag("bart", "sequence", retriever=True, ctx_encoder=True)
    model.config.label_smoothing = 0.1
    kw = _call_kwargs(_inputs(model), "retrieve")
    _check_parity(model, kw, dict(exclude_bos_score=True))
    loss = rk.hf.rag_nll(model, **kw)
    ctx = [p for n, p in model.named_parameters() if n.startswith("rag.ctx_encoder")]
    grads = torch.autograd.grad(loss.sum(), ctx, allow_unused=True, materialize_grads=True)
    assert any(g.abs().max() > 0 for g in grads)


F32 = [
    pytest.param(gen, kind, path, id=f"{gen}-{kind}-{path}")
    for gen in GEN_CONFIGS
    for kind in ("sequence", "token")
    for path in ("retrieve", "given")
]


@pytest.mark.parametrize("gen,kind,path", F32)
def test_rag_nll_float32_within_2x_transformers(gen, kind, path):
    """fp32 error vs the fp64 model <= 2x the fp32 model's own error + 1e-6 of the scale."""
    m64 = _rag(gen, kind, retriever=path == "retrieve")
    m64.config.label_smoothing = 0.1
    m32 = copy.deepcopy(m64).float()
    kw = _call_kwargs(_inputs(m64), path)
    opts = dict(exclude_bos_score=True) if kind == "sequence" else {}
    k64, k32h = _prepared(kw, torch.float64), _prepared(kw, torch.float32)
    k32o = _prepared(kw, torch.float32)
    lt, gt = _loss_and_grads(_theirs(m64, k64, **opts), _leaves(m64, k64))
    lh, gh = _loss_and_grads(_theirs(m32, k32h, **opts), _leaves(m32, k32h))
    ours = rk.hf.rag_nll(m32, **k32o, **opts)
    assert ours.dtype == torch.float32
    lo, go = _loss_and_grads(ours, _leaves(m32, k32o))
    assert_close(lo, lt, ref=lh, rtol=1e-6, atol=1e-12, name="loss")
    assert go.keys() == gh.keys() == gt.keys()
    for name in gt:
        assert_close(go[name], gt[name], ref=gh[name], rtol=1e-6, atol=1e-12, name=f"d {name}")


def test_rag_nll_rejects_what_it_cannot_do():
    seq = _rag("bart", "sequence", retriever=False)
    tok = _rag("bart", "token", retriever=False)
    inp = _inputs(seq)
    kw = _call_kwargs(inp, "given")
    with pytest.raises(ValueError, match="BartForConditionalGeneration"):
        rk.hf.rag_nll(seq.rag.generator, **kw)
    with pytest.raises(ValueError, match="labels"):
        rk.hf.rag_nll(seq, **dict(kw, labels=None))
    with pytest.raises(ValueError, match="doc_scores"):
        rk.hf.rag_nll(seq, **dict(kw, doc_scores=None))
    with pytest.raises(ValueError, match="exclude_bos_score"):
        rk.hf.rag_nll(tok, **kw, exclude_bos_score=True)
    # a generator whose forward is not transformers' own
    base = type(seq.rag.generator)

    class Patched(base):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    seq.rag.generator.__class__ = Patched
    with pytest.raises(ValueError, match="Patched.*overrides forward"):
        rk.hf.rag_nll(seq, **kw)


def test_rag_nll_t5_sequence_without_generator_bos_token_id():
    """transformers 5's T5Config has no ``bos_token_id``; its RagSequenceForGeneration loss
    then raises AttributeError, rag_nll takes None (T5 has no BOS), as the patched model does."""
    plain = _rag("t5", "sequence", retriever=False, patch_bos=False)
    patched = _rag("t5", "sequence", retriever=False)
    kw = _call_kwargs(_inputs(plain), "given")
    for exclude in (False, True):
        got = rk.hf.rag_nll(plain, **kw, exclude_bos_score=exclude)
        want = _theirs(patched, kw, exclude_bos_score=exclude)
        assert_close(got, want, rtol=1e-9, atol=1e-15, name="loss")
