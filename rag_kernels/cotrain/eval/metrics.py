"""Retrieval and answer metrics for the co-training loop.

Scale: every metric here is in [0, 1] (BLEU included: sacrebleu's 0-100 score / 100), so that
``metrics.json`` holds one scale throughout.

Retrieval (one ranked list of passage ids per query, best first; ``positive_ids`` the gold
ids of each query): queries without any positive are left out of the average; when no
query has a positive the metric is ``nan`` (``evaluate_all`` reports ``None``).

Answers: SQuAD v1.1 normalisation (lower case, punctuation removed, articles a/an/the
removed, whitespace collapsed); exact match and token F1 take the maximum over the
reference answers, as in the official SQuAD v1.1 script.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from numbers import Integral

__all__ = [
    "normalize_answer",
    "recall_at_k",
    "mrr_at_k",
    "exact_match",
    "token_f1",
    "rouge_l",
    "bleu",
    "grounding_rate",
    "evaluate_all",
    "METRIC_KEYS",
]

METRIC_KEYS = (
    "recall@1",
    "recall@5",
    "recall@20",
    "mrr@10",
    "em",
    "f1",
    "rougeL",
    "bleu",
    "grounding",
)

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lower, drop punctuation, drop a/an/the, squash spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


# --- validation ---------------------------------------------------------------------------


def _check_list(name: str, x: object) -> None:
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise TypeError(f"{name} must be a list, got {type(x).__name__}")


def _check_same_len(a_name: str, a: Sequence, b_name: str, b: Sequence) -> None:
    _check_list(a_name, a)
    _check_list(b_name, b)
    if len(a) != len(b):
        raise ValueError(
            f"{a_name} and {b_name} must have the same length (one entry per query), "
            f"got {len(a)} and {len(b)}"
        )


def _check_k(k: object) -> int:
    if not isinstance(k, Integral) or isinstance(k, bool) or k < 1:  # numpy ints too
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


def _check_strings(name: str, xs: Sequence) -> None:
    for i, x in enumerate(xs):
        if not isinstance(x, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(x).__name__}")


def _check_string_lists(name: str, xss: Sequence, *, nonempty: bool = False) -> None:
    for i, xs in enumerate(xss):
        _check_list(f"{name}[{i}]", xs)
        if nonempty and len(xs) == 0:
            raise ValueError(f"{name}[{i}] must hold at least one string, got an empty list")
        _check_strings(f"{name}[{i}]", xs)


# --- retrieval ----------------------------------------------------------------------------


def _first_hit(ranked: Sequence[str], positives: set[str], k: int) -> int | None:
    for rank, pid in enumerate(ranked[:k], start=1):
        if pid in positives:
            return rank
    return None


def recall_at_k(ranked_ids: list[list[str]], positive_ids: list[list[str]], k: int) -> float:
    """Share of queries with at least one positive among their top ``k`` ids (hit rate;
    equals recall@k when each query has one positive). Shapes: ``[Q][≥0]`` and ``[Q][≥0]``."""
    _check_same_len("ranked_ids", ranked_ids, "positive_ids", positive_ids)
    k = _check_k(k)
    _check_string_lists("ranked_ids", ranked_ids)
    _check_string_lists("positive_ids", positive_ids)
    hits, n = 0, 0
    for ranked, pos in zip(ranked_ids, positive_ids, strict=True):
        if not pos:
            continue
        n += 1
        hits += _first_hit(ranked, set(pos), k) is not None
    return hits / n if n else math.nan


def mrr_at_k(ranked_ids: list[list[str]], positive_ids: list[list[str]], k: int = 10) -> float:
    """Mean reciprocal rank of the first positive within the top ``k`` (0 when none)."""
    _check_same_len("ranked_ids", ranked_ids, "positive_ids", positive_ids)
    k = _check_k(k)
    _check_string_lists("ranked_ids", ranked_ids)
    _check_string_lists("positive_ids", positive_ids)
    total, n = 0.0, 0
    for ranked, pos in zip(ranked_ids, positive_ids, strict=True):
        if not pos:
            continue
        n += 1
        rank = _first_hit(ranked, set(pos), k)
        total += 1.0 / rank if rank is not None else 0.0
    return total / n if n else math.nan


# --- answers ------------------------------------------------------------------------------


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the normalised prediction equals some normalised answer, else 0.0."""
    _check_strings("prediction", [prediction])
    _check_list("answers", answers)
    _check_strings("answers", answers)
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:  # SQuAD v1.1: also 0 when both normalise to nothing
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: list[str]) -> float:
    """Bag-of-tokens F1 between normalised prediction and answer, maximised over answers."""
    _check_strings("prediction", [prediction])
    _check_list("answers", answers)
    _check_strings("answers", answers)
    p = normalize_answer(prediction).split()
    return max((_f1(p, normalize_answer(a).split()) for a in answers), default=0.0)


def rouge_l(
    predictions: list[str], references_list: list[list[str]], *, use_stemmer: bool = False
) -> float:
    """Mean over predictions of the ROUGE-L F-measure (``rouge-score``), maximised over each
    prediction's references; in [0, 1]. ``rouge-score``'s tokenizer keeps only [a-z0-9]."""
    _check_same_len("predictions", predictions, "references_list", references_list)
    _check_strings("predictions", predictions)
    _check_string_lists("references_list", references_list, nonempty=True)
    if not predictions:
        return math.nan
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    total = 0.0
    for pred, refs in zip(predictions, references_list, strict=True):
        total += scorer.score_multi(refs, pred)["rougeL"].fmeasure
    return total / len(predictions)


def bleu(predictions: list[str], references_list: list[list[str]], **kwargs) -> float:
    """Corpus BLEU of ``sacrebleu`` (default 13a tokenisation, exponential smoothing) / 100,
    in [0, 1]. Each prediction may have its own number of references; ``kwargs`` go to
    ``sacrebleu.metrics.BLEU``. Short answers have few 3-/4-grams, so BLEU is low and
    coarse on 1-4-word answers: read it next to EM/F1."""
    _check_same_len("predictions", predictions, "references_list", references_list)
    _check_strings("predictions", predictions)
    _check_string_lists("references_list", references_list, nonempty=True)
    if not predictions:
        return math.nan
    from sacrebleu.metrics import BLEU

    n_refs = max(len(r) for r in references_list)
    # sacrebleu wants reference streams; None pads a query with fewer references
    streams = [[r[i] if i < len(r) else None for r in references_list] for i in range(n_refs)]
    # sacrebleu's 100 can come out as 100.00000000000004: kept in [0, 1] as documented
    return min(1.0, BLEU(**kwargs).corpus_score(list(predictions), streams).score / 100.0)


def grounding_rate(predictions: list[str], retrieved_texts: list[list[str]]) -> float:
    """Share of predictions supported by a retrieved passage: the normalised prediction
    (:func:`normalize_answer`) occurs as a contiguous run of whole tokens in the normalised
    text of at least one passage retrieved for that query. An empty (after normalisation)
    prediction is not grounded. Shapes: ``[Q]`` and ``[Q][K]``."""
    _check_same_len("predictions", predictions, "retrieved_texts", retrieved_texts)
    _check_strings("predictions", predictions)
    _check_string_lists("retrieved_texts", retrieved_texts)
    if not predictions:
        return math.nan
    grounded = 0
    for pred, texts in zip(predictions, retrieved_texts, strict=True):
        p = normalize_answer(pred)
        if p and any(f" {p} " in f" {normalize_answer(t)} " for t in texts):
            grounded += 1
    return grounded / len(predictions)


def evaluate_all(
    *,
    ranked_ids: list[list[str]] | None = None,
    positive_ids: list[list[str]] | None = None,
    predictions: list[str] | None = None,
    answers: list[list[str]] | None = None,
    retrieved_texts: list[list[str]] | None = None,
) -> dict[str, float | None]:
    """All metrics, keys exactly :data:`METRIC_KEYS`. A metric whose inputs are missing (or
    that is undefined, e.g. no query has a positive) is ``None`` so the dict stays valid
    JSON. ``ranked_ids`` should hold at least 20 ids per query for ``recall@20``;
    ``retrieved_texts`` are the passages the generator saw (for ``grounding``)."""
    out: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
    if ranked_ids is not None and positive_ids is not None:
        for k in (1, 5, 20):
            out[f"recall@{k}"] = recall_at_k(ranked_ids, positive_ids, k)
        out["mrr@10"] = mrr_at_k(ranked_ids, positive_ids, 10)
    if predictions is not None and answers is not None:
        _check_same_len("predictions", predictions, "answers", answers)
        _check_string_lists("answers", answers, nonempty=True)  # named as the caller knows it
        if predictions:
            out["em"] = sum(
                exact_match(p, a) for p, a in zip(predictions, answers, strict=True)
            ) / len(answers)
            out["f1"] = sum(
                token_f1(p, a) for p, a in zip(predictions, answers, strict=True)
            ) / len(answers)
        out["rougeL"] = rouge_l(predictions, answers)
        out["bleu"] = bleu(predictions, answers)
    if predictions is not None and retrieved_texts is not None:
        out["grounding"] = grounding_rate(predictions, retrieved_texts)
    return {k: (None if v is None or math.isnan(v) else float(v)) for k, v in out.items()}
