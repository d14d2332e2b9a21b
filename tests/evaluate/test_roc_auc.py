"""ROC AUC (evaluate/metrics.py) against scikit-learn's roc_auc_score, the function MedMNIST's evaluator calls:
binary (class 1's probability), several classes (one-vs-rest, macro average), ties, and the streamed accumulator."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from strop.evaluate.metrics import ScoredClassificationMetrics, roc_auc


def probs_of(n: int, k: int, seed: int, decimals: int | None = None) -> np.ndarray:
    p = np.random.default_rng(seed).random((n, k))
    p = p / p.sum(1, keepdims=True)
    return np.round(p, decimals) if decimals is not None else p


@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: many tied scores, which count one half
def test_binary_auc_is_class_ones_as_sklearn(decimals):
    p, y = probs_of(60, 2, 0, decimals), np.random.default_rng(1).integers(0, 2, 60)
    assert roc_auc(p, y) == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 1])
def test_several_classes_average_one_vs_rest_as_sklearn(decimals):
    p, y = probs_of(80, 4, 2, decimals), np.random.default_rng(3).integers(0, 4, 80)
    # sklearn's multi_class="ovr" is this mean; it refuses rounded scores that no longer sum to 1, so per class
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in range(4)])
    assert roc_auc(p, y) == pytest.approx(expected, abs=1e-12)
    if decimals is None:
        assert roc_auc(p, y) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)


def test_a_class_absent_from_the_labels_is_left_out_of_the_average():
    p, y = probs_of(30, 3, 4), np.random.default_rng(5).integers(0, 2, 30)  # class 2 never occurs
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in (0, 1)])
    assert roc_auc(p, y) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(p, np.zeros(30, dtype=int)) == 0.5  # one class only: nothing to rank, chance


def test_streamed_accumulator_equals_the_whole_set():
    p, y = probs_of(50, 3, 6), np.random.default_rng(7).integers(0, 3, 50)
    metrics = ScoredClassificationMetrics(["a", "b", "c"])
    for start in range(0, 50, 16):  # batches of 16, 16, 16, 2
        metrics.update(p[start:start + 16], y[start:start + 16])
    out = metrics.compute()
    assert out["roc_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"), abs=1e-12)
    assert out["accuracy"] == pytest.approx(float((p.argmax(1) == y).mean()), abs=1e-12)
