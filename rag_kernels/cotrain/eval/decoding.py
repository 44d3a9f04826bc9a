"""Marginal (RAG) decoding: answers from the K retrieved documents together, as trained.

The RAG loss trains ``p(y|x) = sum_k p(k|x) p(y|x, z_k)`` with ``p(k|x)`` the softmax of the
retriever scores over the K retrieved documents; decoding from the top-1 document alone
ignores the other K-1. Here, with ``log_prior[g, k] = log p(k|x_g)``:

* :func:`rag_token_decode` (RAG-Token): greedy decoding on the document-marginal next-token
  distribution ``p'(y_t) = sum_k p(k|x) p(y_t | x, z_k, y_<t)``; the K prompts of a question
  run as one batch, step by step with the KV cache, and all K receive the chosen token;
* :func:`rag_sequence_decode` (RAG-Sequence, the RAG paper's "thorough decoding" with greedy
  hypotheses): one greedy candidate per document, then every candidate rescored under every
  document, ``log p(y|x) = logsumexp_k(log p(k|x) + sum_t log p(y_t | x, z_k, y_<t))``; the
  answer is the candidate of the largest marginal (identical candidates are merged).

A candidate ends at the first end-of-sequence token, which belongs to it (its probability is
scored: ``p(y)`` is the probability of the answer *and* of stopping there), or after
``max_new_tokens`` tokens. Returned answers are token ids without the end-of-sequence token.

Prompts are token-id lists (any prompt format). For a causal LM, rows are left-padded with
explicit position ids, so a padded batch computes what each unpadded sequence would; works
with any Hugging Face causal LM whose forward takes ``attention_mask``, ``position_ids`` and
``past_key_values`` (``logits_to_keep`` is used when the model accepts it). For an
encoder–decoder model (``config.is_encoder_decoder``: BART, T5, ...) a prompt is the encoder
input: the rows are right-padded and encoded once, and the decoder starts from the model's
decoder start token (``rk.hf.seq2seq_decoder_input_ids`` of a one-token label, as training
shifts the answers) and runs step by step with its cache, cross-attending to the encoder
states; candidates are scored teacher-forced (decoder input = start token + candidate
shifted right). The model's ``generation_config`` (beam search, forced BOS/EOS, minimum
lengths) is not used: decoding is greedy over the (marginal) distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...integrations.hf import seq2seq_decoder_input_ids

__all__ = [
    "SequenceChoice",
    "answer_text",
    "decoder_start_id",
    "marginal_answers",
    "rag_sequence_decode",
    "rag_token_decode",
    "score_candidates",
]

Prompts = Sequence[Sequence[Sequence[int]]]  # [G][K] token-id lists


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _padded(rows: Sequence[Sequence[int]], pad_id: int, left: bool):
    """``(input_ids, attention_mask)`` on CPU, padded to the longest row on the left or right."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            cols = slice(L - len(r), L) if left else slice(0, len(r))
            ids[i, cols] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device):
    """``(input_ids, attention_mask, position_ids)``, left-padded to the longest row."""
    ids, mask = _padded(rows, pad_id, left=True)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _is_seq2seq(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, device):
    """``(input_ids, attention_mask)``, right-padded to the longest row."""
    ids, mask = _padded(rows, pad_id, left=False)
    return ids.to(device), mask.to(device)


def decoder_start_id(model, eos_token_id=None) -> int:
    """The first decoder input of an encoder–decoder ``model``: column 0 of its own shift of
    the one-token label ``[eos]`` (``config.decoder_start_token_id`` for BART and T5), so that
    decoding starts as training's decoder inputs do."""
    eos = next(iter(sorted(_eos_set(eos_token_id))), None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    label = torch.tensor([[0 if eos is None else int(eos)]], device=_device(model))
    return int(seq2seq_decoder_input_ids(model, label)[0, 0])


class _CausalSteps:
    """The K-row next-token logits of a causal LM: the prompts, then one token per step."""

    def __init__(self, model, rows, pad_token_id: int):
        self.model = model
        ids, self.mask, pos = _left_pad(rows, pad_token_id, _device(model))
        self.pos = pos[:, -1:]
        self.out = _forward(
            model, 1, input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True
        )

    def logits(self) -> torch.Tensor:
        return self.out.logits[:, -1]

    def feed(self, tokens: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.pos = self.pos + 1
        self.out = _forward(
            self.model,
            1,
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.pos,
            **_cache(self.out),
            use_cache=True,
        )


class _Seq2SeqSteps:
    """The K-row next-token logits of an encoder–decoder model: the prompts encoded once,
    the decoder from its start token, then one token per step."""

    def __init__(self, model, rows, pad_token_id: int, start: int):
        self.model = model
        ids, self.mask = _right_pad(rows, pad_token_id, _device(model))
        self.encoded = model.get_encoder()(input_ids=ids, attention_mask=self.mask)
        self.out = None
        self.feed(torch.full((len(rows),), start, dtype=torch.long, device=ids.device))

    def logits(self) -> torch.Tensor:
        return self.out.logits[:, -1]

    def feed(self, tokens: torch.Tensor) -> None:
        self.out = self.model(
            encoder_outputs=self.encoded,
            attention_mask=self.mask,
            decoder_input_ids=tokens[:, None],
            **({} if self.out is None else _cache(self.out)),
            use_cache=True,
        )


def _forward(model, keep: int, **kw):
    """``model(**kw)``, keeping the logits of the last ``keep`` positions only if it can."""
    try:
        return model(**kw, logits_to_keep=keep)
    except TypeError:  # an older model class without logits_to_keep
        return model(**kw)


def _cache(out) -> dict:
    """The KV cache of a forward's output as the keyword the next forward takes (``cache`` in
    transformers >= 5.2x, ``past_key_values`` before)."""
    if "cache" in getattr(type(out), "__dataclass_fields__", {}):
        return {"cache": out["cache"]}
    return {"past_key_values": out.past_key_values}


def _check(prompts: Prompts, log_prior: torch.Tensor) -> tuple[int, int]:
    G = len(prompts)
    if G == 0:
        return 0, 0
    K = len(prompts[0])
    if K == 0 or any(len(p) != K for p in prompts):
        raise ValueError("every question needs the same number K >= 1 of document prompts")
    if any(len(r) == 0 for p in prompts for r in p):
        raise ValueError("a prompt is empty")
    if tuple(log_prior.shape) != (G, K):
        raise ValueError(
            f"log_prior must have shape (G, K) = {(G, K)}, got {tuple(log_prior.shape)}"
        )
    return G, K


@torch.no_grad()
def rag_token_decode(
    model,
    prompts: Prompts,
    log_prior: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id=None,
    pad_token_id: int = 0,
    keep_eos: bool = False,
) -> list[list[int]]:
    """Greedy RAG-Token decoding of G questions with K document prompts each
    (``prompts[g][k]``; ``log_prior [G, K]`` = log p(k|x)): at every step the token maximising
    ``logsumexp_k(log_prior[g, k] + log p(y_t | x_g, z_k, y_<t))`` is appended to all K
    prompts of question g. Returns the G answers (with their final end-of-sequence token if
    ``keep_eos``). With K = 1 and a zero prior this is plain greedy decoding."""
    G, K = _check(prompts, log_prior)
    if G == 0:
        return []
    eos = _eos_set(eos_token_id)
    dev = _device(model)
    prior = log_prior.to(dev, torch.float64)
    rows = [r for p in prompts for r in p]
    if _is_seq2seq(model):
        steps = _Seq2SeqSteps(model, rows, pad_token_id, decoder_start_id(model, eos_token_id))
    else:
        steps = _CausalSteps(model, rows, pad_token_id)
    answers: list[list[int]] = [[] for _ in range(G)]
    done = torch.zeros(G, dtype=torch.bool, device=dev)
    for step in range(max_new_tokens):
        logp = torch.log_softmax(steps.logits().to(torch.float64), dim=-1).view(G, K, -1)
        nxt = torch.logsumexp(prior[:, :, None] + logp, dim=1).argmax(-1)  # [G]
        for g in torch.nonzero(~done).flatten().tolist():
            t = int(nxt[g])
            if t in eos:
                done[g] = True
                if keep_eos:
                    answers[g].append(t)
            else:
                answers[g].append(t)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        feed = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        steps.feed(feed.repeat_interleave(K))  # finished questions: ignored filler
    return answers


@torch.no_grad()
def score_candidates(
    model,
    prompts: Prompts,
    candidates: Sequence[Sequence[Sequence[int]]],
    *,
    pad_token_id: int = 0,
    chunk_rows: int = 64,
    eos_token_id=None,
) -> list[torch.Tensor]:
    """``log p(y_c | x_g, z_k)`` (summed over the candidate's tokens) for every candidate
    ``candidates[g][c]`` under every document prompt ``prompts[g][k]``: one ``[C_g, K]``
    float64 tensor per question. Rows (g, c, k) run in batches of ``chunk_rows``. For an
    encoder–decoder model ``eos_token_id`` picks the decoder start (:func:`decoder_start_id`)."""
    dev = _device(model)
    seq2seq = _is_seq2seq(model)
    start = decoder_start_id(model, eos_token_id) if seq2seq else None
    jobs = []  # (g, c, k, prompt, candidate)
    for g, (ps, cs) in enumerate(zip(prompts, candidates, strict=True)):
        for c, y in enumerate(cs):
            if not y:
                raise ValueError("a candidate is empty")
            for k, p in enumerate(ps):
                jobs.append((g, c, k, list(p), list(y)))
    result = [
        torch.zeros(len(cs), len(ps), dtype=torch.float64)
        for ps, cs in zip(prompts, candidates, strict=True)
    ]
    for first in range(0, len(jobs), chunk_rows):
        part = jobs[first : first + chunk_rows]
        T = max(len(y) for *_, y in part)
        target = torch.full((len(part), T), -1, dtype=torch.long)
        if seq2seq:  # decoder input: the start token + the candidate shifted right
            ids, mask = _right_pad([p for _, _, _, p, _ in part], pad_token_id, dev)
            dec, _ = _right_pad([[start] + y[:-1] for *_, y in part], pad_token_id, dev)
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False)
            logits = out.logits  # decoder position j predicts the candidate's token j
            for i, (*_, y) in enumerate(part):
                target[i, : len(y)] = torch.as_tensor(y, dtype=torch.long)
        else:
            ids, mask, pos = _left_pad([p + y for _, _, _, p, y in part], pad_token_id, dev)
            out = _forward(model, T + 1, input_ids=ids, attention_mask=mask, position_ids=pos)
            logits = out.logits[:, -(T + 1) : -1]  # position j predicts the token at j + 1
            for i, (*_, y) in enumerate(part):
                target[i, T - len(y) :] = torch.as_tensor(y, dtype=torch.long)
        logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
        target = target.to(dev)
        tok = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
        total = torch.where(target >= 0, tok, torch.zeros_like(tok)).sum(-1).cpu()
        for i, (g, c, k, _, _) in enumerate(part):
            result[g][c, k] = total[i]
    return result


@dataclass
class SequenceChoice:
    """RAG-Sequence decoding of one question: the distinct greedy candidates (in the order
    of the documents that produced them first, each with its end-of-sequence token if it
    ended with one), ``scores [C, K]`` = log p(y_c|x, z_k), ``log_marginal [C]`` = log p(y_c|x)
    and the index ``best`` of the chosen candidate."""

    candidates: list[list[int]]
    scores: torch.Tensor
    log_marginal: torch.Tensor
    best: int
    answer: list[int]  # the chosen candidate without its end-of-sequence token


@torch.no_grad()
def rag_sequence_decode(
    model,
    prompts: Prompts,
    log_prior: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id=None,
    pad_token_id: int = 0,
    chunk_rows: int = 64,
) -> list[SequenceChoice]:
    """RAG-Sequence thorough decoding (greedy hypotheses) of G questions with K document
    prompts each; see the module docstring."""
    G, K = _check(prompts, log_prior)
    if G == 0:
        return []
    eos = _eos_set(eos_token_id)
    flat = [[r] for p in prompts for r in p]
    greedy = rag_token_decode(
        model,
        flat,
        torch.zeros(len(flat), 1, dtype=torch.float64),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        keep_eos=True,
    )
    candidates = []
    for g in range(G):
        seen: list[list[int]] = []
        for y in greedy[g * K : (g + 1) * K]:
            if y not in seen:
                seen.append(y)
        candidates.append(seen)
    scores = score_candidates(
        model,
        prompts,
        candidates,
        pad_token_id=pad_token_id,
        chunk_rows=chunk_rows,
        eos_token_id=eos_token_id,
    )
    prior = log_prior.detach().to("cpu", torch.float64)
    out = []
    for g in range(G):
        marg = torch.logsumexp(prior[g][None, :] + scores[g], dim=-1)
        best = int(marg.argmax())
        y = candidates[g][best]
        answer = y[:-1] if y and y[-1] in eos else list(y)
        out.append(SequenceChoice(candidates[g], scores[g], marg, best, answer))
    return out


def answer_text(tokenizer, ids: Sequence[int]) -> str:
    """The answer string of generated ids: decoded without special tokens, first line only
    (what top-1 decoding reports)."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    return text.strip().split("\n")[0].strip()


def marginal_answers(
    model,
    tokenizer,
    prompts: Prompts,
    doc_scores: torch.Tensor,
    *,
    mode: str,
    max_new_tokens: int,
) -> list[str]:
    """Answer strings of G questions by marginal decoding over their K document prompts;
    ``doc_scores [G, K]`` are the retriever scores (``p(k|x)`` = their softmax, as in the RAG
    loss); ``mode`` is the run's ``--mode`` (``sequence`` or ``token``)."""
    log_prior = torch.log_softmax(doc_scores.detach().to(torch.float64), dim=-1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kw = dict(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    if mode == "token":
        ids = rag_token_decode(model, prompts, log_prior, **kw)
    elif mode == "sequence":
        ids = [c.answer for c in rag_sequence_decode(model, prompts, log_prior, **kw)]
    else:
        raise ValueError(f"mode must be 'sequence' or 'token', got {mode!r}")
    return [answer_text(tokenizer, y) for y in ids]
