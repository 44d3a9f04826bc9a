"""Evaluation metrics: retrieval (recall@k, MRR@k) and answers (EM, F1, ROUGE-L, BLEU,
grounding rate). ``rouge-score`` and ``sacrebleu`` are imported only when used."""

from .metrics import (
    METRIC_KEYS,
    bleu,
    evaluate_all,
    exact_match,
    grounding_rate,
    mrr_at_k,
    normalize_answer,
    recall_at_k,
    rouge_l,
    token_f1,
)

__all__ = [
    "METRIC_KEYS",
    "recall_at_k",
    "mrr_at_k",
    "exact_match",
    "token_f1",
    "normalize_answer",
    "rouge_l",
    "bleu",
    "grounding_rate",
    "evaluate_all",
]
