"""Streamed metrics must match one-shot scikit-learn / scipy references."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    hamming_loss,
    matthews_corrcoef,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)

from strop.evaluate.metrics import (
    ClassificationMetrics,
    MultiLabelMetrics,
    RegressionMetrics,
    greater_is_better,
    tune_threshold,
)

SPLITS = ["one", "even", "random", "singles"]


def batches(n, how, seed=0):
    """Index slices covering range(n) in order: one batch, 4 even, random sizes (incl. empty), or size 1."""
    if how == "one":
        cuts = [0, n]
    elif how == "even":
        cuts = np.linspace(0, n, 5).astype(int).tolist()
    elif how == "random":
        inner = np.random.default_rng(seed).integers(0, n + 1, size=6)
        cuts = [0, *sorted(inner.tolist()), n]  # repeated cuts give empty batches
    elif how == "singles":
        cuts = list(range(n + 1))
    return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


def stream(metric, a, b, how, seed=0):
    for s in batches(len(a), how, seed):
        metric.update(a[s], b[s])
    return metric.compute()


# ---------------------------------------------------------------- single label


def sk_mcc(labels, preds):
    # sklearn warns (harmlessly) when only one label occurs; the warning is not ours to test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return matthews_corrcoef(labels, preds)


def classification_reference(preds, labels, k):
    ks = list(range(k))
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=ks, zero_division=0)
    return {
        "accuracy": accuracy_score(labels, preds),
        "macro_f1": f1_score(labels, preds, labels=ks, average="macro", zero_division=0),
        "micro_f1": f1_score(labels, preds, labels=ks, average="micro", zero_division=0),
        "weighted_f1": f1_score(labels, preds, labels=ks, average="weighted", zero_division=0),
        "mcc": sk_mcc(labels, preds),
        "per_class": (p, r, f, s),
        "confusion_matrix": confusion_matrix(labels, preds, labels=ks),
    }


def check_classification(got, preds, labels, k, names):
    ref = classification_reference(preds, labels, k)
    for key in ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "mcc"):
        assert isinstance(got[key], float), key
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    p, r, f, s = ref["per_class"]
    assert list(got["per_class"]) == names
    for i, name in enumerate(names):
        row = got["per_class"][name]
        assert row["precision"] == pytest.approx(p[i], abs=1e-12)
        assert row["recall"] == pytest.approx(r[i], abs=1e-12)
        assert row["f1"] == pytest.approx(f[i], abs=1e-12)
        assert row["support"] == s[i]
    assert got["confusion_matrix"] == ref["confusion_matrix"].tolist()
    assert all(type(v) is int for row in got["confusion_matrix"] for v in row)
    assert got["n"] == len(labels)


@pytest.mark.parametrize("k", [2, 7])
@pytest.mark.parametrize("how", SPLITS)
def test_classification_matches_sklearn(k, how):
    rng = np.random.default_rng(k)
    labels = rng.integers(0, k, size=200)
    # Mostly-correct predictions so the metrics are not all near chance.
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, k, size=200))
    names = [f"c{i}" for i in range(k)]
    got = stream(ClassificationMetrics(names), preds, labels, how, seed=k)
    check_classification(got, preds, labels, k, names)


def test_class_never_predicted_and_class_absent_from_labels():
    k = 5
    rng = np.random.default_rng(1)
    labels = rng.choice([0, 1, 2, 3], size=120)  # class 4 never a true label
    preds = rng.choice([0, 1, 3, 4], size=120)  # class 2 never predicted
    names = list("abcde")
    got = stream(ClassificationMetrics(names), preds, labels, "random")
    check_classification(got, preds, labels, k, names)
    assert got["per_class"]["c"]["precision"] == 0.0
    assert got["per_class"]["e"]["recall"] == 0.0
    assert got["per_class"]["e"]["support"] == 0


def test_classification_single_example():
    m = ClassificationMetrics(["neg", "pos"])
    m.update(np.array([1]), np.array([1]))
    got = m.compute()
    check_classification(got, np.array([1]), np.array([1]), 2, ["neg", "pos"])
    assert got["accuracy"] == 1.0 and got["n"] == 1


@pytest.mark.parametrize(
    "preds, labels",
    [
        ([1, 1, 1, 1], [0, 1, 0, 1]),  # constant predictions
        ([0, 1, 0, 1], [2, 2, 2, 2]),  # constant labels
        ([2, 2, 2], [2, 2, 2]),  # all correct, one class
    ],
)
def test_mcc_degenerate_is_zero(preds, labels):
    got = stream(ClassificationMetrics(["a", "b", "c"]), np.array(preds), np.array(labels), "even")
    assert got["mcc"] == 0.0
    assert got["mcc"] == sk_mcc(labels, preds)


def test_classification_torch_input():
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    preds = torch.tensor([0, 2, 2, 2, 1, 1])
    m = ClassificationMetrics(["a", "b", "c"])
    m.update(preds[:4], labels[:4])
    m.update(preds[4:], labels[4:])
    check_classification(m.compute(), preds.numpy(), labels.numpy(), 3, ["a", "b", "c"])


def test_classification_empty_and_bad_input():
    got = ClassificationMetrics(["a", "b"]).compute()
    assert got["n"] == 0 and got["accuracy"] == 0.0 and got["mcc"] == 0.0
    assert got["confusion_matrix"] == [[0, 0], [0, 0]]
    assert got["per_class"]["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    with pytest.raises(ValueError):
        ClassificationMetrics(["a", "b"]).update(np.array([2]), np.array([0]))
    with pytest.raises(ValueError):
        ClassificationMetrics(["a", "b"]).update(np.array([0, 1]), np.array([0]))


# ----------------------------------------------------------------- multi label


def check_multilabel(got, probs, labels, names, threshold=0.5):
    pred = (probs >= threshold).astype(int)
    kw = dict(zero_division=0)
    assert got["micro_f1"] == pytest.approx(f1_score(labels, pred, average="micro", **kw), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro", **kw), abs=1e-12)
    assert got["micro_precision"] == pytest.approx(precision_score(labels, pred, average="micro", **kw), abs=1e-12)
    assert got["micro_recall"] == pytest.approx(recall_score(labels, pred, average="micro", **kw), abs=1e-12)
    assert got["exact_match"] == pytest.approx(accuracy_score(labels, pred), abs=1e-12)
    assert got["hamming_loss"] == pytest.approx(hamming_loss(labels, pred), abs=1e-12)
    p, r, f, s = precision_recall_fscore_support(labels, pred, **kw)
    for i, name in enumerate(names):
        row = got["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[i], r[i], f[i]), abs=1e-12)
        assert row["support"] == s[i]
    assert got["n"] == len(labels) and got["threshold"] == threshold
    for key in ("micro_f1", "macro_f1", "micro_precision", "micro_recall", "exact_match", "hamming_loss"):
        assert isinstance(got[key], float), key


@pytest.mark.parametrize("threshold", [0.3, 0.5])
@pytest.mark.parametrize("how", SPLITS)
def test_multilabel_matches_sklearn(how, threshold):
    rng = np.random.default_rng(3)
    n, L = 150, 6
    labels = (rng.random((n, L)) < 0.3).astype(int)
    labels[:20] = 0  # rows with no positive label at all
    labels[:, 5] = 0  # a label that is never positive
    probs = np.clip(0.5 * labels + 0.6 * rng.random((n, L)), 0, 1)
    probs[:5] = 0.0  # some all-negative rows predicted exactly right
    names = [f"l{i}" for i in range(L)]
    got = stream(MultiLabelMetrics(names, threshold), probs, labels, how)
    check_multilabel(got, probs, labels, names, threshold)


def test_multilabel_torch_and_empty():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.5, 0.2]])
    labels = torch.tensor([[1, 0], [0, 0], [1, 1]])
    m = MultiLabelMetrics(["x", "y"])
    m.update(probs, labels)
    check_multilabel(m.compute(), probs.numpy(), labels.numpy(), ["x", "y"])

    got = MultiLabelMetrics(["x", "y"], threshold=0.4).compute()
    assert got["n"] == 0 and got["micro_f1"] == 0.0 and got["exact_match"] == 0.0
    assert got["hamming_loss"] == 0.0 and got["threshold"] == 0.4


def test_tune_threshold_beats_default():
    # Positives score 0.3-0.45, negatives 0.0-0.2: any threshold in (0.2, 0.3] is perfect, 0.5 predicts nothing.
    rng = np.random.default_rng(4)
    labels = (rng.random((100, 4)) < 0.4).astype(int)
    probs = np.where(labels == 1, rng.uniform(0.3, 0.45, labels.shape), rng.uniform(0.0, 0.2, labels.shape))

    def micro_f1(t):
        return f1_score(labels, (probs >= t).astype(int), average="micro", zero_division=0)

    t = tune_threshold(probs, labels)
    assert isinstance(t, float)
    assert micro_f1(t) >= micro_f1(0.5)
    assert micro_f1(t) == 1.0 and micro_f1(0.5) == 0.0
    assert t == pytest.approx(0.3)  # of the perfect grid points {0.25, 0.3}, closest to 0.5
    assert tune_threshold(torch.tensor(probs), torch.tensor(labels)) == t


def test_tune_threshold_ties_prefer_half():
    # All probabilities are 0 or 1: every threshold in the grid gives the same F1.
    labels = np.array([[1, 0], [0, 1], [1, 1]])
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert tune_threshold(probs, labels) == 0.5
    assert tune_threshold(probs, labels, grid=[0.2, 0.7, 0.4]) == 0.4


# ------------------------------------------------------------------ regression


def check_regression(got, preds, targets):
    assert got["mse"] == pytest.approx(mean_squared_error(targets, preds), rel=1e-10)
    assert got["rmse"] == pytest.approx(math.sqrt(mean_squared_error(targets, preds)), rel=1e-10)
    assert got["mae"] == pytest.approx(mean_absolute_error(targets, preds), rel=1e-10)
    assert got["pearson"] == pytest.approx(pearsonr(preds, targets)[0], abs=1e-10)
    assert got["spearman"] == pytest.approx(spearmanr(preds, targets)[0], abs=1e-12)
    assert got["n"] == len(preds)
    assert all(isinstance(got[k], float) for k in ("mse", "rmse", "mae", "pearson", "spearman"))


@pytest.mark.parametrize("how", SPLITS)
def test_regression_matches_scipy(how):
    rng = np.random.default_rng(5)
    targets = rng.normal(3.0, 2.0, size=120)
    preds = targets + rng.normal(0, 1.0, size=120)
    preds[::10] = np.round(preds[::10])  # some ties for the ranks
    targets[::7] = 1.0
    got = stream(RegressionMetrics(), preds, targets, how)
    check_regression(got, preds, targets)


def test_regression_large_offset_is_stable():
    # Raw sums of squares would cancel catastrophically at this offset.
    rng = np.random.default_rng(6)
    targets = 1e8 + rng.normal(size=200)
    preds = targets + 0.5 * rng.normal(size=200)
    got = stream(RegressionMetrics(), preds, targets, "random")
    assert got["pearson"] == pytest.approx(pearsonr(preds, targets)[0], abs=1e-6)


def test_regression_column_vectors_and_torch():
    targets = torch.linspace(0, 1, 10).reshape(-1, 1)
    preds = (targets**2).to(torch.bfloat16)
    m = RegressionMetrics()
    m.update(preds[:3], targets[:3])
    m.update(preds[3:], targets[3:])
    got = m.compute()
    check_regression(got, preds.float().numpy().ravel().astype(np.float64), targets.numpy().ravel().astype(np.float64))
    assert got["spearman"] == pytest.approx(1.0)


def test_regression_constant_and_empty():
    m = RegressionMetrics()
    targets = np.array([0.1, 0.7, 0.3, 0.9])
    m.update(np.full(2, 0.1), targets[:2])
    m.update(np.full((2, 1), 0.1), targets[2:])
    got = m.compute()
    assert got["pearson"] == 0.0 and got["spearman"] == 0.0
    assert got["mse"] == pytest.approx(mean_squared_error(targets, np.full(4, 0.1)))

    one = RegressionMetrics()
    one.update([2.0], [1.0])
    assert one.compute() == {"mse": 1.0, "rmse": 1.0, "mae": 1.0, "pearson": 0.0, "spearman": 0.0, "n": 1}

    got = RegressionMetrics().compute()
    assert got == {"mse": 0.0, "rmse": 0.0, "mae": 0.0, "pearson": 0.0, "spearman": 0.0, "n": 0}


# --------------------------------------------------------------------- helpers


def test_metric_direction():
    for m in ("mse", "rmse", "mae", "loss", "hamming_loss"):
        assert greater_is_better(m) is False
    for m in ("accuracy", "micro_f1", "macro_f1", "mcc", "pearson", "spearman", "exact_match"):
        assert greater_is_better(m) is True
