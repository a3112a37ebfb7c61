"""Metrics against values computed by hand, in Korean and English."""

import math
import random

import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from engine.eval import metrics


def test_rouge_l_on_ascii_equals_stock_rouge_score():
    stock = rouge_scorer.RougeScorer(["rougeL"])
    rng = random.Random(1)
    words = "the cat sat on a mat, Blood-pressure HIGH 130/80 mmHg! it's fine: 42 patients".split()
    for _ in range(200):
        p = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        r = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        assert metrics.rouge_l(p, r) == pytest.approx(stock.score(r, p)["rougeL"].fmeasure, abs=1e-12)


def test_rouge_l_korean_by_hand():
    # pred 고혈압 위험 → 고 혈 압 위 험 (5); ref 고혈압은 위험 → 고 혈 압 은 위 험 (6); LCS 5
    p, r = 5 / 5, 5 / 6
    assert metrics.rouge_l("고혈압 위험", "고혈압은 위험") == pytest.approx(2 * p * r / (p + r))
    assert rouge_scorer.RougeScorer(["rougeL"]).score("고혈압은 위험", "고혈압은 위험")["rougeL"].fmeasure == 0.0  # stock: 0
    assert metrics.rouge_l("고혈압은 위험", "고혈압은 위험") == 1.0
    # mixed: tokens [bp, 가, 높, 다] vs [bp, 가, 낮, 다]: LCS 3 of 4
    assert metrics.rouge_l("BP가 높다", "bp가 낮다") == pytest.approx(0.75)


def test_distinct_by_hand():
    toks = [metrics.tokenize("a b a b"), metrics.tokenize("a c")]
    assert metrics.distinct(toks, 1) == pytest.approx(3 / 6)
    assert metrics.distinct(toks, 2) == pytest.approx(3 / 4)  # (a,b) (b,a) (a,b) (a,c)
    ko = [metrics.tokenize("가나 가나")]  # 가 나 가 나
    assert metrics.distinct(ko, 1) == 0.5 and metrics.distinct(ko, 2) == pytest.approx(2 / 3)


def test_bleu_exact_match_length_ratio():
    preds = ["the cat sat on the mat", "혈압이 높습니다"]
    refs = ["the cat sat on the mat", "혈압이 높습니다"]
    c = metrics.corpus(preds, refs)
    assert c["bleu"] == pytest.approx(100.0) and c["exact_match"] == 1.0 and c["length_ratio"] == 1.0
    assert c["rougeL"] == 1.0
    preds = ["the cat is on the mat", "혈압이 높아요"]
    expected = sacrebleu.corpus_bleu(["the cat is on the mat", "혈 압 이 높 아 요"],
                                      [["the cat sat on the mat", "혈 압 이 높 습 니 다"]], tokenize="none").score
    c = metrics.corpus(preds, refs)
    assert c["bleu"] == pytest.approx(expected) and 0 < c["bleu"] < 100
    assert c["exact_match"] == 0.0
    assert c["length_ratio"] == pytest.approx((6 + 6) / (6 + 7))  # 혈 압 이 높 아 요 / 혈 압 이 높 습 니 다
    assert metrics.corpus(["  a   b "], ["a b"])["exact_match"] == 1.0


def test_bootstrap_interval_contains_the_estimate():
    rng = random.Random(0)
    refs = [f"answer number {i} is {'yes' if i % 2 else 'no'}" for i in range(40)]
    preds = [r if rng.random() < 0.5 else "something else entirely" for r in refs]
    ci = metrics.bootstrap(preds, refs, samples=100)
    point = metrics.corpus(preds, refs)
    for k in ("rougeL", "bleu", "exact_match"):
        lo, hi = ci[k]
        assert lo <= point[k] <= hi and lo < hi
    assert not math.isnan(ci["rougeL"][0])


texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\n\t", "...", "!?", "고혈압", "the cat", "The  cat!"]))


@given(texts, texts)
@settings(max_examples=300, deadline=None)
def test_an_exact_match_is_a_perfect_rouge_l_and_length_ratio(prediction, reference):
    """Exact match and ROUGE-L agree on what a perfect prediction is: an empty prediction of an empty
    reference scored exact match 1.0 but ROUGE-L 0.0 (rouge-score's F-measure of nothing against nothing)."""
    row = metrics.per_row(prediction, reference)
    score = metrics.rouge_l(prediction, reference)
    assert 0.0 <= score <= 1.0 and score == metrics.rouge_l(reference, prediction)
    if row["exact_match"]:
        assert score == 1.0 and row["length_ratio"] == 1.0, (prediction, reference)
    have = (metrics.has_tokens(prediction), metrics.has_tokens(reference))
    if have == (False, False):  # the same, empty, token sequence
        assert score == 1.0
    elif False in have:  # something against nothing
        assert score == 0.0
    c = metrics.corpus([prediction], [reference])
    assert c["rougeL"] == score and c["exact_match"] == float(row["exact_match"])


def test_an_empty_pair_is_a_perfect_match():
    c = metrics.corpus([""], [""])
    assert (c["rows"], c["exact_match"], c["rougeL"], c["length_ratio"], c["bleu"]) == (1, 1.0, 1.0, 1.0, 100.0)
    assert metrics.rouge_l("...", "") == 1.0 and metrics.corpus(["..."], [""])["exact_match"] == 0.0  # as "Hello!" / "hello"
    assert metrics.rouge_l("", "the cat") == metrics.rouge_l("the cat", "") == 0.0
    mixed = metrics.corpus(["", "the cat sat on the mat"], ["", "the cat sat on the mat"])
    assert (mixed["exact_match"], mixed["rougeL"], mixed["length_ratio"]) == (1.0, 1.0, 1.0)
    assert mixed["bleu"] == pytest.approx(100.0)
    assert metrics.bootstrap(["", ""], ["", ""], samples=10)["rougeL"] == [1.0, 1.0]
