"""A runnable tour of the library on a small model: ``python -m rag_kernels demo``.

Builds a tiny random Llama generator (transformers) and a bag-of-words retriever, retrieves
K documents per query, and computes the library's losses from the generator's last hidden
states and tied LM-head weight (every RAG loss and retriever objective but adist, which
needs the generator's attention to the passages: ``train --retriever-objective adist``) — checking the fast path against the reference
as it goes — then runs a few co-training steps and prints the losses.
"""

from __future__ import annotations

import time

import torch

import rag_kernels as rk
from rag_kernels.losses import retriever as R
from rag_kernels.losses.cotraining import CoTrainingLoss

from .errors import ArgumentParser, UserError

PASSAGES = [
    "The lighthouse of Varn Isle is painted teal and was built by Oskar Brell.",
    "Mount Quellen is climbed every spring by the guild of amber weavers.",
    "The river Sotha freezes only in years when the comet Ilva is visible.",
    "Queen Maribet of Dorrow collected clocks made from green glass.",
    "The town of Hesk trades salted plums for copper with the Varn islanders.",
    "Oskar Brell also designed the floating library of Dorrow.",
    "Amber weavers dye their cloth with crushed Sotha river snails.",
    "The comet Ilva returns every forty-one years.",
]
QA = [
    ("Who built the lighthouse of Varn Isle?", "Oskar Brell", 0),
    ("Who climbs Mount Quellen?", "the amber weavers", 1),
    ("When does the river Sotha freeze?", "when Ilva is visible", 2),
    ("What did Queen Maribet collect?", "green glass clocks", 3),
]


def _tokenize(text: str, vocab: int) -> list[int]:
    # A deterministic toy tokenizer (hash of lower-cased words): enough for a demo.
    return [3 + (sum(map(ord, w)) * 2654435761 % (vocab - 3)) for w in text.lower().split()]


class BowRetriever(torch.nn.Module):
    """Bag-of-words bi-encoder: mean of token embeddings, dot-product scores / sqrt(D)."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(vocab, dim, mode="mean")

    def encode(self, texts: list[str], vocab: int) -> torch.Tensor:
        ids = [torch.tensor(_tokenize(t, vocab)) for t in texts]
        offsets = torch.tensor([0] + [len(x) for x in ids[:-1]]).cumsum(0)
        return self.emb(torch.cat(ids), offsets)


def build(vocab: int = 211, hidden: int = 48, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg), BowRetriever(vocab, 32)


def batch(generator, retriever, k: int):
    """Retrieve top-k passages per question; return hidden [B,K,T,H], target [B,T], scores [B,K]."""
    vocab = generator.config.vocab_size
    q = retriever.encode([x[0] for x in QA], vocab)
    d = retriever.encode(PASSAGES, vocab)
    scores_all = q @ d.T / q.shape[-1] ** 0.5
    top = scores_all.detach().topk(k, dim=-1).indices  # [B,K]
    scores = scores_all.gather(1, top)
    B = len(QA)
    seqs, answers = [], []
    for b, (question, answer, _) in enumerate(QA):
        a = _tokenize(answer, vocab) + [2]
        answers.append(a)
        for j in range(k):
            prompt = [1] + _tokenize(PASSAGES[top[b, j]], vocab) + _tokenize(question, vocab)
            seqs.append((prompt, a))
    T = max(len(p) + len(a) for p, a in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100)
    for i, (p, a) in enumerate(seqs):  # right-align so every answer ends at position T-1
        ids[i, T - len(p) - len(a) : T] = torch.tensor(p + a)
        labels[i, T - len(a) : T] = torch.tensor(a)
    out = generator.model(input_ids=ids, attention_mask=(ids != 0).long())
    H = out.last_hidden_state.shape[-1]
    # hidden[t] predicts token t+1: shift the labels, keep the answer span only
    hidden = out.last_hidden_state[:, :-1].reshape(B, k, T - 1, H)
    target = labels[:, 1:].reshape(B, k, T - 1)[:, 0]
    gold = torch.tensor([x[2] for x in QA])
    return hidden, target, scores, top, q, d, gold


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="rag-kernels demo", description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=3, help="documents retrieved per query (K)")
    ap.add_argument("--steps", type=int, default=20, help="co-training steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 1 <= args.docs <= len(PASSAGES):
        raise UserError(f"--docs {args.docs}: must be in [1, {len(PASSAGES)}]")
    if args.steps < 0:
        raise UserError(f"--steps {args.steps}: must be >= 0")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed {args.seed}: must be in [0, 2**63)")

    generator, retriever = build(seed=args.seed)
    W = generator.lm_head.weight  # tied to the input embeddings
    impl = "auto"
    print(f"rag_kernels {rk.__version__}: compiled CPU core loaded = {rk.cpu_available()}")
    hidden, target, scores, top, q, d, gold = batch(generator, retriever, args.docs)
    B, K, T, H = hidden.shape
    print(f"generator: tiny Llama (V={W.shape[0]}, H={H}); B={B} queries x K={K} docs x T={T}")

    print("\n-- generator losses (fast path vs reference) --")
    for mode in ("sequence", "token"):
        for eps in (0.0, 0.1):
            fast = rk.rag_loss(hidden, W, target, scores, mode=mode, label_smoothing=eps, impl=impl)
            ref = rk.rag_loss(
                hidden.double(),
                W.double(),
                target,
                scores.double(),
                mode=mode,
                label_smoothing=eps,
                impl="reference",
            )
            print(
                f"rag_loss mode={mode:8s} eps={eps:.1f}: {fast.item():9.4f}  (float64 reference "
                f"{ref.item():9.4f}, |diff| {abs(fast.item() - ref.item()):.1e})"
            )

    fb = rk.generator_feedback(hidden, W, target, impl=impl)  # no grad, no logits
    g, m, gbar = fb.token_logprobs, target != -100, fb.mean_logprob
    print("\n-- retriever objectives (generator feedback is detached) --")
    objectives = {
        "emdr2 (token)": R.emdr2_loss(scores, g, token_mask=m, level="token"),
        "emdr2 (answer)": R.emdr2_loss(scores, g, token_mask=m, level="answer"),
        "pdist": R.pdist_loss(scores, gbar, retriever_temperature=1.0, generator_temperature=1.0),
        "loop": R.loop_loss(scores, -gbar, retriever_temperature=1.0, generator_temperature=1.0),
        "lsr (retriever||lm)": R.lsr_loss(scores, fb.sum_logprob, direction="retriever||lm"),
        "lsr (lm||retriever)": R.lsr_loss(scores, fb.sum_logprob, direction="lm||retriever"),
        "contrastive (cos, x20)": rk.contrastive_loss(q, d, gold, scale=20.0, similarity="cos"),
    }
    for name, value in objectives.items():
        print(f"{name:24s} {value.item():9.4f}")

    print(f"\n-- {args.steps} co-training steps: rag_loss(sequence) + PDist, AdamW --")
    combine = CoTrainingLoss(balancing="fixed", retriever_weight=0.5)
    opt = torch.optim.AdamW(
        [
            {"params": generator.parameters(), "lr": 3e-3},
            {"params": retriever.parameters(), "lr": 3e-2},
        ]
    )
    t0 = time.perf_counter()
    for step in range(args.steps):
        hidden, target, scores, top, *_ = batch(generator, retriever, args.docs)
        gen = rk.rag_loss(hidden, W, target, scores, mode="sequence", impl=impl)
        fb = rk.generator_feedback(hidden, W, target, impl=impl)
        ret = R.pdist_loss(
            scores, fb.mean_logprob, retriever_temperature=1.0, generator_temperature=0.1
        )
        out = combine(gen, ret, step=step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            hit = (top == gold[:, None]).any(-1).float().mean().item()
            logs = out.as_dict()
            print(
                f"step {step:3d}  total {logs['loss']:8.4f}  generator {logs['generator']:8.4f}  "
                f"retriever {logs['retriever']:7.4f}  gold-in-top-{args.docs} {hit:.2f}"
            )
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
