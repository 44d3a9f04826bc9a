"""Evaluation metrics against reference implementations: pytrec_eval (retrieval),
rouge-score and sacrebleu (called directly), known SQuAD examples."""

import math
import random

import numpy as np
import pytest

from rag_kernels.cotrain.eval import (
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


def _random_rankings(seed, n_queries=37, n_docs=53, depth=25):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(n_docs)]
    ranked, positives = [], []
    for _q in range(n_queries):
        ranked.append(rng.sample(docs, depth))
        # 0 to 3 positives; some outside the ranked list, some queries with none
        positives.append(rng.sample(docs, rng.choice([0, 1, 1, 2, 3])))
    return ranked, positives


def _pytrec_eval():
    """The reference implementation, never skipped: pytrec-eval-terrier is in the test extra
    (pyproject.toml), so a missing or broken install fails these tests with the import error
    instead of skipping them (as a skip, the 16 comparisons went unnoticed in CI)."""
    try:
        import pytrec_eval
    except ImportError as e:
        raise AssertionError(
            f"pytrec_eval cannot be imported ({type(e).__name__}: {e}); install the test "
            "extra: pip install 'pytrec-eval-terrier' (pip install -e '.[test]')"
        ) from e
    return pytrec_eval


def _trec(ranked, positives, k):
    """hit@k and MRR@k from pytrec_eval on the run truncated to depth k."""
    pytrec_eval = _pytrec_eval()
    qrels = {f"q{i}": {p: 1 for p in pos} for i, pos in enumerate(positives) if pos}
    run = {
        f"q{i}": {d: float(len(r) - j) for j, d in enumerate(r[:k])}  # strictly decreasing
        for i, r in enumerate(ranked)
        if positives[i]
    }
    res = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "success.1"}).evaluate(run)
    n = len(res)
    hit = sum(v["recip_rank"] > 0 for v in res.values()) / n
    mrr = sum(v["recip_rank"] for v in res.values()) / n
    return hit, mrr


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 5, 10, 20])
def test_recall_mrr_match_pytrec_eval(seed, k):
    ranked, positives = _random_rankings(seed)
    hit, mrr = _trec(ranked, positives, k)
    assert recall_at_k(ranked, positives, k) == pytest.approx(hit, abs=1e-12)
    assert mrr_at_k(ranked, positives, k) == pytest.approx(mrr, abs=1e-12)


def test_recall_success_1_matches_trec_success():
    pytrec_eval = _pytrec_eval()
    ranked, positives = _random_rankings(5)
    qrels = {f"q{i}": {p: 1 for p in pos} for i, pos in enumerate(positives) if pos}
    run = {
        f"q{i}": {d: float(100 - j) for j, d in enumerate(r)}
        for i, r in enumerate(ranked)
        if positives[i]
    }
    res = pytrec_eval.RelevanceEvaluator(qrels, {"success.1,5,10"}).evaluate(run)
    for k in (1, 5, 10):
        want = sum(v[f"success_{k}"] for v in res.values()) / len(res)
        assert recall_at_k(ranked, positives, k) == pytest.approx(want)


def test_retrieval_hand_examples():
    ranked = [["a", "b", "c"], ["x", "y", "z"], ["p", "q", "r"]]
    positives = [["b"], ["z", "w"], []]  # the third query has no positive: left out
    assert recall_at_k(ranked, positives, 1) == 0.0
    assert recall_at_k(ranked, positives, 2) == 0.5
    assert recall_at_k(ranked, positives, 3) == 1.0
    assert mrr_at_k(ranked, positives, 10) == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert mrr_at_k(ranked, positives, 2) == pytest.approx(0.25)
    assert math.isnan(recall_at_k([["a"]], [[]], 1))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: recall_at_k([["a"]], [["a"], ["b"]], 1), ValueError, "same length"),
        (lambda: recall_at_k([["a"]], [["a"]], 0), ValueError, "k must be"),
        (lambda: mrr_at_k("abc", [["a"]], 1), TypeError, "ranked_ids"),
        (lambda: recall_at_k([[1]], [["a"]], 1), TypeError, r"ranked_ids\[0\]\[0\]"),
        (lambda: rouge_l(["a"], [[]]), ValueError, "at least one"),
        (lambda: bleu(["a", "b"], [["a"]]), ValueError, "same length"),
        (lambda: grounding_rate([None], [["a"]]), TypeError, "predictions"),
        (
            lambda: evaluate_all(predictions=["a"], answers=[[]]),
            ValueError,
            r"^answers\[0\] must hold at least one string",  # was references_list[0]
        ),
    ],
    ids=[
        "len-mismatch",
        "k-zero",
        "not-a-list",
        "non-str-id",
        "no-reference",
        "bleu-len",
        "none-prediction",
        "evaluate-all-no-answer",
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "pred, answers, em, f1",
    [
        ("The Cat", ["cat"], 1.0, 1.0),
        ("the cat sat", ["a cat"], 0.0, 2 * (1 / 2) * 1 / (1 / 2 + 1)),
        ("Denver Broncos", ["Denver Broncos", "Broncos"], 1.0, 1.0),
        ("Broncos!", ["Denver Broncos"], 0.0, 2 * 1 * 0.5 / 1.5),
        ("  saint   Bernadette  Soubirous. ", ["Saint Bernadette Soubirous"], 1.0, 1.0),
        ("1432", ["1423"], 0.0, 0.0),
        ("", ["Oskar Brell"], 0.0, 0.0),
        ("the", ["an"], 1.0, 0.0),  # SQuAD v1.1: both empty -> EM 1, F1 0
        ("red red", ["red"], 0.0, 2 * 0.5 * 1 / 1.5),
    ],
    ids=[
        "case-article",
        "partial",
        "multi-answer",
        "punct-partial",
        "whitespace",
        "year",
        "empty",
        "articles-only",
        "repeated-token",
    ],
)
def test_squad_em_f1(pred, answers, em, f1):
    assert exact_match(pred, answers) == em
    assert token_f1(pred, answers) == pytest.approx(f1)


def test_normalize_answer():
    assert normalize_answer("The  Quick, brown-fox!") == "quick brownfox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # only whole-word articles go


_PREDS = ["Oskar Brell built it", "teal", "in 1432", "", "the river Oss near Tellmar"]
_REFS = [
    ["Oskar Brell"],
    ["teal", "blue green"],
    ["1432"],
    ["Hesk"],
    ["river Oss", "the Oss river", "Oss"],
]


@pytest.mark.parametrize("use_stemmer", [False, True], ids=["plain", "stemmer"])
def test_rouge_l_matches_rouge_score(use_stemmer):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    want = []
    for p, refs in zip(_PREDS, _REFS, strict=True):
        want.append(max(scorer.score(r, p)["rougeL"].fmeasure for r in refs))
    got = rouge_l(_PREDS, _REFS, use_stemmer=use_stemmer)
    assert got == pytest.approx(sum(want) / len(want), abs=1e-12)
    assert 0.0 < got < 1.0


def test_bleu_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    preds = ["the cat sat on the mat today", "a quick brown fox jumps", "hello there world"]
    refs = [
        ["the cat sat on the mat"],
        ["the quick brown fox jumps", "a fast brown fox leaps"],
        ["hello world"],
    ]
    streams = [[r[0] for r in refs], [None, refs[1][1], None]]
    want = sacrebleu.corpus_bleu(preds, streams).score / 100
    assert bleu(preds, refs) == pytest.approx(want, abs=1e-12)
    assert 0.0 < want < 1.0
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    assert bleu(["a b c d"], [["a b c d"]]) == 1.0  # sacrebleu: 100.00000000000004
    # single reference each, options passed through
    want = sacrebleu.corpus_bleu(preds, [[r[0] for r in refs]], lowercase=True).score / 100
    assert bleu(preds, [[r[0]] for r in refs], lowercase=True) == pytest.approx(want)


@pytest.mark.parametrize(
    "pred, texts, grounded",
    [
        ("Oskar Brell", ["It was built by Oskar Brell in 1432."], True),
        ("oskar brell.", ["It was built by Oskar Brell in 1432."], True),
        ("The teal", ["Painted TEAL, it stands in Hesk."], True),
        ("Oskar", ["x", "built by Oskar Brell"], True),
        ("art", ["a party of artists"], False),  # whole tokens only
        ("Brell Oskar", ["built by Oskar Brell"], False),  # order matters
        ("", ["anything"], False),
        ("the", ["the bridge"], False),  # empty after normalisation
        ("Hesk", [], False),  # nothing retrieved
    ],
    ids=[
        "exact",
        "case-punct",
        "article",
        "second-passage",
        "subword",
        "order",
        "empty",
        "article-only",
        "no-passages",
    ],
)
def test_grounding_cases(pred, texts, grounded):
    assert grounding_rate([pred], [texts]) == float(grounded)


def test_grounding_rate_average():
    preds = ["Oskar Brell", "Hesk", "nowhere"]
    texts = [["Oskar Brell built it"], ["It lies in Hesk."], ["It lies in Hesk."]]
    assert grounding_rate(preds, texts) == pytest.approx(2 / 3)


def test_evaluate_all_keys_and_values():
    ranked, positives = _random_rankings(3)
    preds = ["Oskar Brell", "teal", "1432"]
    answers = [["Oskar Brell"], ["ochre"], ["the 1432"]]
    texts = [["built by Oskar Brell"], ["painted teal"], ["in 1431"]]
    out = evaluate_all(
        ranked_ids=ranked,
        positive_ids=positives,
        predictions=preds,
        answers=answers,
        retrieved_texts=texts,
    )
    assert (
        tuple(out)
        == METRIC_KEYS
        == (
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
    )
    assert out["recall@5"] == recall_at_k(ranked, positives, 5)
    assert out["mrr@10"] == mrr_at_k(ranked, positives, 10)
    assert out["em"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["rougeL"] == pytest.approx(rouge_l(preds, answers))
    assert out["bleu"] == pytest.approx(bleu(preds, answers))
    assert out["grounding"] == pytest.approx(2 / 3)
    assert all(isinstance(v, float) for v in out.values())


def test_evaluate_all_missing_parts_are_none():
    out = evaluate_all(predictions=["a"], answers=[["a"]])
    assert tuple(out) == METRIC_KEYS
    assert out["recall@1"] is None and out["grounding"] is None and out["em"] == 1.0
    out = evaluate_all(ranked_ids=[["a"]], positive_ids=[[]])  # no positives: undefined
    assert out["recall@1"] is None and out["mrr@10"] is None and out["f1"] is None


def test_numpy_integer_k_is_an_int():
    """The index takes a numpy k (from an argsort, say); the metrics refused it."""
    ranked, positives = [["a", "b", "c"]], [["b"]]
    assert recall_at_k(ranked, positives, np.int64(2)) == recall_at_k(ranked, positives, 2)
    assert mrr_at_k(ranked, positives, np.int32(3)) == pytest.approx(0.5)
