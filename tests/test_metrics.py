"""GLUE's metrics against scikit-learn and scipy on fixed inputs, degenerate ones included; ROUGE against the
`rouge-score` package."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics as skm

from lmforge.data import DataWarning
from lmforge.metrics import (
    accuracy,
    binary_f1,
    classification_metrics,
    confusion_matrix,
    corpus_rouge,
    lcs_length,
    macro_f1,
    matthews_corrcoef,
    pearson,
    ranks,
    regression_metrics,
    rouge_scores,
    spearman,
)
from lmforge.objectives import Classification, Regression

RNG = np.random.default_rng(0)
CLASS_CASES = {
    "binary": (RNG.integers(0, 2, 200), RNG.integers(0, 2, 200), 2),
    "three-way": (RNG.integers(0, 3, 300), RNG.integers(0, 3, 300), 3),
    "perfect": (np.arange(10) % 4, np.arange(10) % 4, 4),
    "constant prediction": (RNG.integers(0, 2, 50), np.zeros(50, dtype=int), 2),
    "constant labels": (np.ones(40, dtype=int), RNG.integers(0, 2, 40), 2),
    "all wrong": (np.array([0, 1, 0, 1]), np.array([1, 0, 1, 0]), 2),
    "absent class": (np.array([0, 0, 1, 1, 0]), np.array([0, 2, 1, 1, 0]), 3),
}


@pytest.mark.parametrize("case", list(CLASS_CASES))
def test_classification_metrics_match_scikit_learn(case: str) -> None:
    y, p, n = CLASS_CASES[case]
    confusion = confusion_matrix(torch.tensor(y), torch.tensor(p), n)
    assert confusion.tolist() == skm.confusion_matrix(y, p, labels=list(range(n))).tolist()
    assert accuracy(confusion) == pytest.approx(skm.accuracy_score(y, p), abs=1e-12)
    assert macro_f1(confusion) == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns on the degenerate cases
        assert matthews_corrcoef(confusion) == pytest.approx(skm.matthews_corrcoef(y, p), abs=1e-12)
    if n == 2:
        assert binary_f1(confusion) == pytest.approx(skm.f1_score(y, p, zero_division=0), abs=1e-12)
        assert set(classification_metrics(confusion)) == {"accuracy", "macro_f1", "mcc", "f1"}


def test_degenerate_classification_values() -> None:
    y, p, n = CLASS_CASES["constant prediction"]
    confusion = confusion_matrix(torch.tensor(y), torch.tensor(p), n)
    assert matthews_corrcoef(confusion) == 0.0  # no crash, no NaN
    assert binary_f1(confusion) == 0.0  # the positive class is never predicted
    assert matthews_corrcoef(confusion_matrix(torch.tensor([0, 1]), torch.tensor([1, 0]), 2)) == -1.0
    with pytest.raises(ValueError, match="2 x 2"):
        binary_f1(torch.zeros(3, 3))


REGRESSION_CASES = {
    "noisy": (RNG.normal(size=100), None),
    "ties": (np.array([1.0, 2, 2, 3, 3, 3, 5, 5, 0, 1]), np.array([2.0, 2, 1, 4, 4, 3, 5, 0, 0, 1])),
    "anti": (np.arange(20.0), -np.arange(20.0) ** 3),
    "two values": (np.array([1.0, 2.0]), np.array([3.0, 1.0])),
}


@pytest.mark.parametrize("case", list(REGRESSION_CASES))
def test_correlations_match_scipy(case: str) -> None:
    x, y = REGRESSION_CASES[case]
    y = x + RNG.normal(size=x.shape) if y is None else y
    assert pearson(torch.tensor(x), torch.tensor(y)) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert spearman(torch.tensor(x), torch.tensor(y)) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert ranks(torch.tensor(x)).tolist() == pytest.approx(stats.rankdata(x).tolist())
    mse = regression_metrics(torch.tensor(x), torch.tensor(y))["mse"]
    assert mse == pytest.approx(skm.mean_squared_error(y, x), rel=1e-12)


def test_constant_series_has_no_correlation_as_in_scipy() -> None:
    x, y = np.full(10, 2.0), RNG.normal(size=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(stats.pearsonr(x, y).statistic) and math.isnan(stats.spearmanr(x, y).statistic)
    assert math.isnan(pearson(torch.tensor(x), torch.tensor(y)))
    assert math.isnan(spearman(torch.tensor(x), torch.tensor(y)))
    assert math.isnan(pearson(torch.tensor([1.0]), torch.tensor([2.0])))
    with pytest.raises(ValueError, match="differ in length"):
        pearson(torch.zeros(3), torch.zeros(4))


def test_objectives_summaries() -> None:
    """Classification warns on a label absent from the evaluation set and still scores; Regression reports
    the correlations of the concatenated predictions."""
    confusion = confusion_matrix(torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]), 3).double()
    with pytest.warns(DataWarning, match=r"no example of label\(s\) \[2\]"):
        out = Classification(3).summarize({"loss_sum": torch.tensor(3.0), "confusion": confusion})
    assert out["accuracy"] == pytest.approx(2 / 3) and out["examples"] == 3 and "mcc" in out
    x, y = RNG.normal(size=30), RNG.normal(size=30)
    pairs = torch.tensor(np.stack([x, y], 1))
    out = Regression().summarize({"loss_sum": torch.tensor(float(((x - y) ** 2).sum())), "pairs": pairs})
    assert out["loss"] == pytest.approx(out["mse"]) and out["examples"] == 30
    assert out["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)


# --- ROUGE ----------------------------------------------------------------------------------------------------

ROUGE_CASES = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat on the mat", "a cat was sitting on a mat"),
    ("Blair 'to stand down' in 2007?", "Blair set to stand down, says aide"),
    ("the the the the", "the cat the"),  # clipped counts
    ("", "an empty prediction"),
    ("an empty reference", ""),
    ("...!!!", "no tokens in the prediction"),
    ("UK's £5bn deal - Café owners cheer", "uk s 5bn deal cafe owners cheer"),  # non-ASCII letters drop out
    ("A B C D E F", "F E D C B A"),  # one-token LCS, no bigram
    ("x1 y2 z3 x1 y2", "y2 x1 y2 z3"),
    ("Numbers 2004 and 2005 rise", "2005 numbers rise and 2004"),
]


@pytest.fixture(scope="module")
def rouge_reference():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


@pytest.mark.parametrize("prediction, reference", ROUGE_CASES)
def test_rouge_matches_the_rouge_score_package(prediction, reference, rouge_reference):
    expected = rouge_reference.score(reference, prediction)  # (target, prediction)
    got = rouge_scores(prediction, reference)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(expected[key].fmeasure, abs=1e-12), key


def test_rouge_on_random_word_strings_matches_the_package(rouge_reference):
    rng = np.random.default_rng(1)
    words = ["bank", "rates", "rise", "uk", "shares", "fall", "Blair", "2005", "net", "sales", "a", "the"]
    preds, refs = [], []
    for _ in range(200):
        preds.append(" ".join(rng.choice(words, rng.integers(0, 12))))
        refs.append(" ".join(rng.choice(words, rng.integers(1, 12))))
    got = corpus_rouge(preds, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = np.mean([rouge_reference.score(r, p)[key].fmeasure for p, r in zip(preds, refs, strict=True)])
        assert got[key] == pytest.approx(expected, abs=1e-12), key
    with pytest.raises(ValueError, match="as many predictions as references"):
        corpus_rouge(["a"], ["a", "b"])


def test_rouge_closed_form():
    # prediction 4 tokens, reference 6; unigram overlap 3 -> P 3/4, R 3/6, F 0.6; bigrams: "b c" only of 3 / 5
    got = rouge_scores("a b c z", "a q b c r s")
    assert got["rouge1"] == pytest.approx(0.6)
    assert got["rouge2"] == pytest.approx(2 * (1 / 3) * (1 / 5) / (1 / 3 + 1 / 5))
    assert got["rougeL"] == pytest.approx(0.6)  # LCS a b c
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example
    assert rouge_scores("same words", "SAME, words!") == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
