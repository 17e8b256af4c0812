"""GLUE's metrics: accuracy, F1 (binary and macro), Matthews correlation, Pearson and Spearman correlation;
and ROUGE-1/2/L for generated text.

Classification metrics are computed from a confusion matrix (rows: true labels, columns: predictions), which
batches and ranks combine by summation; the correlations take the predictions and labels themselves. The
definitions follow scikit-learn (`accuracy_score`, `f1_score`, `matthews_corrcoef`) and scipy (`pearsonr`,
`spearmanr`), and the tests check them against both, degenerate inputs included: a constant prediction has
Matthews correlation 0; a constant series has no correlation, reported as NaN as scipy does.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

# metric name -> (problem type it applies to, what it measures); the names `--metric` accepts.
METRICS = {
    "accuracy": ("classify", "share of correct predictions"),
    "f1": ("classify", "F1 of the positive class (label index 1) of a two-class problem"),
    "macro_f1": ("classify", "unweighted mean of per-class F1"),
    "mcc": ("classify", "Matthews correlation coefficient (multi-class as scikit-learn)"),
    "pearson": ("regress", "Pearson correlation of predictions and labels"),
    "spearman": ("regress", "Spearman rank correlation of predictions and labels"),
    "mse": ("regress", "mean squared error"),
}


def confusion_matrix(labels: Tensor, predictions: Tensor, n_labels: int) -> Tensor:
    """Counts (n_labels, n_labels): rows are true labels, columns predictions."""
    counts = torch.bincount(labels * n_labels + predictions, minlength=n_labels * n_labels)
    return counts.view(n_labels, n_labels)


def accuracy(confusion: Tensor) -> float:
    """Correct predictions / all predictions (0 for an empty matrix)."""
    total = float(confusion.sum())
    return float(confusion.diagonal().sum()) / total if total else 0.0


def _per_class_f1(confusion: Tensor) -> tuple[Tensor, Tensor]:
    confusion = confusion.double()
    tp = confusion.diagonal()
    support, predicted = confusion.sum(1), confusion.sum(0)
    f1 = 2 * tp / (support + predicted).clamp(min=1)  # = 2PR / (P + R); 0 when the class has no true positive
    return f1, (support + predicted) > 0


def macro_f1(confusion: Tensor) -> float:
    """Unweighted mean of per-class F1 over the classes that occur as a label or a prediction.

    As scikit-learn's default; a class's F1 is 0 when it has no true positives."""
    f1, present = _per_class_f1(confusion)
    return float(f1[present].mean()) if present.any() else 0.0


def binary_f1(confusion: Tensor, positive: int = 1) -> float:
    """F1 of class `positive` (scikit-learn's `f1_score(average="binary")`); 0 when it has no true positive.

    Raises ValueError for a confusion matrix that is not 2 x 2."""
    if tuple(confusion.shape) != (2, 2):
        raise ValueError(f"binary F1 needs a 2 x 2 confusion matrix, got shape {tuple(confusion.shape)}")
    return float(_per_class_f1(confusion)[0][positive])


def matthews_corrcoef(confusion: Tensor) -> float:
    """Matthews correlation coefficient, multi-class (Gorodkin's R_K, as scikit-learn); 0 when undefined
    (every label or every prediction the same class)."""
    c = confusion.double()
    n = c.sum()
    correct = c.diagonal().sum()
    t, p = c.sum(1), c.sum(0)  # true and predicted counts per class
    cov_yp = correct * n - (t * p).sum()
    cov_yy = n * n - (t * t).sum()
    cov_pp = n * n - (p * p).sum()
    if cov_yy == 0 or cov_pp == 0:
        return 0.0
    return float(cov_yp / torch.sqrt(cov_yy * cov_pp))


def _as_vectors(predictions: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    x, y = torch.as_tensor(predictions).double().flatten(), torch.as_tensor(labels).double().flatten()
    if x.shape != y.shape:
        raise ValueError(f"predictions ({x.numel()}) and labels ({y.numel()}) differ in length")
    return x, y


def pearson(predictions: Tensor, labels: Tensor) -> float:
    """Pearson correlation; NaN for fewer than 2 values or a constant series (scipy's answer)."""
    x, y = _as_vectors(predictions, labels)
    if x.numel() < 2:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    denom = torch.sqrt((x * x).sum() * (y * y).sum())
    if denom == 0:
        return math.nan
    return float(((x * y).sum() / denom).clamp(-1.0, 1.0))


def ranks(values: Tensor) -> Tensor:
    """1-based ranks with ties given their average rank (scipy's `rankdata(method="average")`)."""
    v = torch.as_tensor(values).double().flatten()
    order = torch.argsort(v, stable=True)
    sorted_v = v[order]
    n = v.numel()
    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = sorted_v[1:] != sorted_v[:-1]
    group = torch.cumsum(new_group.long(), 0) - 1  # group index of each sorted value
    positions = torch.arange(1, n + 1, dtype=torch.double)
    sums = torch.zeros(int(group[-1]) + 1 if n else 0, dtype=torch.double).index_add_(0, group, positions)
    counts = torch.bincount(group).double()
    out = torch.empty(n, dtype=torch.double)
    out[order] = (sums / counts)[group]
    return out


def spearman(predictions: Tensor, labels: Tensor) -> float:
    """Spearman rank correlation: Pearson of the average ranks; NaN where Pearson is undefined."""
    x, y = _as_vectors(predictions, labels)
    if x.numel() < 2:
        return math.nan
    return pearson(ranks(x), ranks(y))


def classification_metrics(confusion: Tensor) -> dict[str, float]:
    """accuracy, macro_f1 and mcc of a confusion matrix, plus binary f1 when there are two classes."""
    out = {"accuracy": accuracy(confusion), "macro_f1": macro_f1(confusion), "mcc": matthews_corrcoef(confusion)}
    if confusion.shape[0] == 2:
        out["f1"] = binary_f1(confusion)
    return out


def regression_metrics(predictions: Tensor, labels: Tensor) -> dict[str, float]:
    """mse, pearson and spearman of predictions against labels."""
    x, y = _as_vectors(predictions, labels)
    mse = float(((x - y) ** 2).mean()) if x.numel() else math.nan
    return {"mse": mse, "pearson": pearson(x, y), "spearman": spearman(x, y)}


# --- ROUGE: n-gram and longest-common-subsequence overlap of generated and reference texts ------------------

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_tokens(text: str) -> list[str]:
    """ROUGE's tokens of a text (as the `rouge-score` package without stemming): lower-cased runs of ASCII
    letters and digits; everything else separates tokens."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _f_measure(overlap: int, n_prediction: int, n_reference: int) -> float:
    precision = overlap / max(n_prediction, 1)
    recall = overlap / max(n_reference, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(len(a) len(b)))."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures of one prediction against one reference (each in [0, 1]).

    ROUGE-n: clipped n-gram overlap, precision = overlap / prediction n-grams, recall = overlap / reference
    n-grams, F = 2PR / (P + R) (0 when there is no overlap). ROUGE-L: the same with the longest common
    subsequence of the token lists (sentence-level, no summary-level split on newlines).
    """
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    out = {}
    for n in (1, 2):
        p, r = _ngrams(pred, n), _ngrams(ref, n)
        out[f"rouge{n}"] = _f_measure(sum((p & r).values()), sum(p.values()), sum(r.values()))
    out["rougeL"] = _f_measure(lcs_length(pred, ref), len(pred), len(ref)) if pred and ref else 0.0
    return out


def corpus_rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures over aligned predictions and references (ValueError when their counts
    differ or are zero)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"ROUGE needs as many predictions as references, at least one; got {len(predictions)} "
                         f"and {len(references)}")
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        for k, v in rouge_scores(prediction, reference).items():
            totals[k] += v
    return {k: v / len(predictions) for k, v in totals.items()}
