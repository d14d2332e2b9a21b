"""Streamed evaluation metrics.

Each metric object is fed batch by batch through ``update`` and summarised by
``compute``. Only sufficient statistics are kept (a confusion matrix, per-label
counts, running moments), except for Spearman correlation, whose ranks need
the full prediction and target vectors.

Inputs may be numpy arrays, Python sequences or torch tensors (on any device);
torch is never imported here.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata, spearmanr

__all__ = [
    "ClassificationMetrics",
    "ScoredClassificationMetrics",
    "CalibrationError",
    "MultiLabelMetrics",
    "ScoredMultiLabelMetrics",
    "RegressionMetrics",
    "tune_threshold",
    "youden_threshold",
    "decide",
    "softmax",
    "label_auc",
    "roc_curve",
    "greater_is_better",
]

_LOWER_IS_BETTER = frozenset({"mse", "rmse", "mae", "loss", "hamming_loss", "perplexity", "ece"})

def _to_numpy(x) -> np.ndarray:
    """Array-like or torch tensor -> numpy array (same shape)."""
    if hasattr(x, "detach"):  # torch tensor, duck-typed so torch stays optional
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _div(num, den):
    """Element-wise num / den with 0.0 where den == 0 (sklearn's zero_division=0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _prf(tp, fp, fn):
    """Per-class precision, recall, F1 from count arrays (K,) -> three (K,) float arrays.

    F1 is 2tp / (2tp + fp + fn), which equals the harmonic mean of precision and
    recall whenever it is defined and is 0.0 otherwise (as in sklearn).
    """
    precision = _div(tp, tp + fp)
    recall = _div(tp, tp + fn)
    f1 = _div(2 * tp, 2 * tp + fp + fn)
    return precision, recall, f1


def _per_class(names, precision, recall, f1, support) -> dict:
    return {
        name: {
            "precision": float(p),
            "recall": float(r),
            "f1": float(f),
            "support": int(s),
        }
        for name, p, r, f, s in zip(names, precision, recall, f1, support)
    }


class ClassificationMetrics:
    """Single-label classification, streamed through a (K, K) confusion matrix."""

    def __init__(self, label_names: list[str]):
        if len(label_names) == 0:
            raise ValueError("label_names must not be empty")
        self.label_names = list(label_names)
        self.num_classes = len(self.label_names)
        # rows = true label, cols = predicted label
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, preds, labels) -> None:
        """preds, labels: int arrays (batch,) with values in [0, K)."""
        preds = _to_numpy(preds).reshape(-1).astype(np.int64)
        labels = _to_numpy(labels).reshape(-1).astype(np.int64)
        if preds.shape != labels.shape:
            raise ValueError(f"preds {preds.shape} and labels {labels.shape} differ in length")
        k = self.num_classes
        for name, arr in (("preds", preds), ("labels", labels)):
            if arr.size and (arr.min() < 0 or arr.max() >= k):
                raise ValueError(f"{name} must lie in [0, {k}); got [{arr.min()}, {arr.max()}]")
        # One bincount over flattened (true, pred) cell indices fills the whole matrix.
        self.confusion += np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)

    def compute(self) -> dict:
        cm = self.confusion
        n = int(cm.sum())
        tp = np.diag(cm)
        support = cm.sum(axis=1)  # (K,) true counts
        predicted = cm.sum(axis=0)  # (K,) predicted counts
        precision, recall, f1 = _prf(tp, predicted - tp, support - tp)

        accuracy = float(tp.sum() / n) if n else 0.0
        return {
            "accuracy": accuracy,
            "macro_f1": float(f1.mean()),
            # Every example is exactly one TP or one (FP, FN) pair, so micro F1 = accuracy.
            "micro_f1": accuracy,
            "weighted_f1": float(_div((f1 * support).sum(), support.sum())),
            "mcc": _multiclass_mcc(cm),
            "per_class": _per_class(self.label_names, precision, recall, f1, support),
            "confusion_matrix": cm.tolist(),
            "n": n,
        }


def roc_auc(probs, labels) -> float:
    """ROC AUC of class probabilities, the MedMNIST convention (as scikit-learn's roc_auc_score): two classes, the
    AUC of class 1's probability; more, the mean of each class's one-vs-rest AUC over the classes the labels hold
    both present and absent. probs: (n, K) floats; labels: (n,) ints in [0, K). Ties count half (Mann-Whitney U).
    0.5 (chance) where no class is both present and absent: a score cannot rank one class against nothing."""
    probs = _to_numpy(probs).astype(np.float64)
    labels = _to_numpy(labels).reshape(-1).astype(np.int64)
    k = probs.shape[1]
    classes = [1] if k == 2 else range(k)
    aucs = [_binary_auc(probs[:, c], labels == c) for c in classes]
    aucs = [a for a in aucs if a is not None]
    return float(np.mean(aucs)) if aucs else 0.5


def _binary_auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)  # average ranks: a tie between a positive and a negative counts one half
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def softmax(logits: np.ndarray) -> np.ndarray:
    """(n, K) logits -> (n, K) probabilities, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def decide(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(n, K) class probabilities -> (n,) decided classes: the likeliest, except that with two classes class 1
    is decided from `threshold` on (a tuned threshold; at 0.5 the likeliest is decided, as argmax does)."""
    probs = np.asarray(probs)
    if probs.shape[1] == 2 and threshold != 0.5:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(1)


class ScoredClassificationMetrics(ClassificationMetrics):
    """Single-label classification from class probabilities: ClassificationMetrics of the argmax plus `roc_auc`,
    which needs every score, so the probabilities are kept (n x K floats), and `ece` (CalibrationError)."""

    def __init__(self, label_names: list[str], threshold: float = 0.5):
        super().__init__(label_names)
        self.threshold = float(threshold)  # two classes: class 1 from this probability on (0.5 = argmax)
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.calibration = CalibrationError()

    def update(self, probs, labels) -> None:
        """probs: (batch, K) class probabilities; labels: (batch,) ints in [0, K)."""
        probs = _to_numpy(probs).reshape(-1, self.num_classes)
        labels = _to_numpy(labels).reshape(-1)
        super().update(decide(probs, self.threshold), labels)
        self.calibration.update_probs(probs, labels)
        self._probs.append(probs.astype(np.float64))
        self._labels.append(labels.astype(np.int64))

    def compute(self) -> dict:
        out = super().compute()
        out["ece"] = self.calibration.compute()["ece"]
        if self._probs:
            out["roc_auc"] = roc_auc(np.concatenate(self._probs), np.concatenate(self._labels))
        else:
            out["roc_auc"] = 0.5
        return out


def roc_curve(score, positive) -> tuple[np.ndarray, np.ndarray] | None:
    """ROC points of one score against a yes/no truth: (false positive rates, true positive rates), each
    (m,) from (0, 0) to (1, 1), one point per distinct score (a tie moves both rates at once: the diagonal
    step that makes the area under the points `roc_auc`'s). None where the truth is all yes or all no."""
    score = _to_numpy(score).reshape(-1).astype(np.float64)
    positive = _to_numpy(positive).reshape(-1).astype(bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-score, kind="stable")
    score, positive = score[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(score)), score.size - 1]  # the last example at each distinct score
    tp = np.cumsum(positive)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


class CalibrationError:
    """Expected calibration error, streamed (Naeini et al. 2015; Guo et al. 2017). Examples fall into
    `bins` equal-width bins of confidence (the predicted class's probability): (0, 1/B], (1/B, 2/B], ...,
    ((B-1)/B, 1], a confidence of exactly 0 in the first; ECE = sum over bins of
    (n_b / n) |accuracy_b - mean confidence_b|. Three numbers per bin are kept (count, sum of confidences,
    count correct), so batches merge exactly. 15 bins by default, as Guo et al. measured with."""

    def __init__(self, bins: int = 15):
        self.edges = np.linspace(0.0, 1.0, bins + 1)
        self.count = np.zeros(bins, dtype=np.int64)
        self.confidence = np.zeros(bins, dtype=np.float64)
        self.correct = np.zeros(bins, dtype=np.int64)

    def update(self, confidence, correct) -> None:
        """confidence: (batch,) floats in [0, 1]; correct: (batch,) bools (the prediction was right)."""
        conf = _to_numpy(confidence).reshape(-1).astype(np.float64)
        right = _to_numpy(correct).reshape(-1).astype(bool)
        if conf.shape != right.shape:
            raise ValueError(f"confidence {conf.shape} and correct {right.shape} differ in length")
        bins = len(self.count)
        # searchsorted(side=left) - 1 is the b with edges[b] < c <= edges[b + 1]: bins closed on the right
        which = np.clip(np.searchsorted(self.edges, conf, side="left") - 1, 0, bins - 1)
        self.count += np.bincount(which, minlength=bins)
        self.confidence += np.bincount(which, weights=conf, minlength=bins)
        self.correct += np.bincount(which[right], minlength=bins)

    def update_probs(self, probs, labels) -> None:
        """probs: (batch, K) class probabilities; labels: (batch,) true class ids."""
        probs = _to_numpy(probs)
        self.update(probs.max(1), probs.argmax(1) == _to_numpy(labels).reshape(-1))

    def compute(self) -> dict:
        """{'ece': float, 'bins': [{'bin': [lo, hi], 'n', 'accuracy', 'confidence'}] of the bins holding
        any}."""
        n = int(self.count.sum())
        rows, ece = [], 0.0
        for b in np.flatnonzero(self.count):
            acc, conf = self.correct[b] / self.count[b], self.confidence[b] / self.count[b]
            ece += abs(acc - conf) * self.count[b] / n
            rows.append({"bin": [float(self.edges[b]), float(self.edges[b + 1])], "n": int(self.count[b]),
                         "accuracy": float(acc), "confidence": float(conf)})
        return {"ece": float(ece), "bins": rows}


def _multiclass_mcc(cm: np.ndarray) -> float:
    """Gorodkin's multi-class MCC from a (K, K) confusion matrix (as sklearn); 0.0 if undefined."""
    cm = cm.astype(np.float64)  # products of counts overflow int64 on large sets
    n = cm.sum()
    t = cm.sum(axis=1)
    p = cm.sum(axis=0)
    cov_tp = np.trace(cm) * n - t @ p
    cov_pp = n * n - p @ p
    cov_tt = n * n - t @ t
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / math.sqrt(cov_tt * cov_pp))


class MultiLabelMetrics:
    """Multi-label: per-label tp/fp/fn counts + exact-match count at a fixed threshold."""

    def __init__(self, label_names: list[str], threshold: float = 0.5):
        if len(label_names) == 0:
            raise ValueError("label_names must not be empty")
        self.label_names = list(label_names)
        self.threshold = float(threshold)
        num_labels = len(self.label_names)
        self.tp = np.zeros(num_labels, dtype=np.int64)
        self.fp = np.zeros(num_labels, dtype=np.int64)
        self.fn = np.zeros(num_labels, dtype=np.int64)
        self.exact = 0
        self.n = 0

    def update(self, probs, labels) -> None:
        """probs: float (batch, L) in [0, 1]; labels: {0, 1} (batch, L)."""
        num_labels = len(self.label_names)
        probs = _to_numpy(probs).reshape(-1, num_labels)
        labels = _to_numpy(labels).reshape(-1, num_labels).astype(bool)
        if probs.shape != labels.shape:
            raise ValueError(f"probs {probs.shape} and labels {labels.shape} differ")
        pred = probs >= self.threshold
        self.tp += (pred & labels).sum(axis=0)
        self.fp += (pred & ~labels).sum(axis=0)
        self.fn += (~pred & labels).sum(axis=0)
        self.exact += int((pred == labels).all(axis=1).sum())
        self.n += probs.shape[0]

    def compute(self) -> dict:
        tp, fp, fn = self.tp, self.fp, self.fn
        precision, recall, f1 = _prf(tp, fp, fn)
        tp_all, fp_all, fn_all = tp.sum(), fp.sum(), fn.sum()
        n_cells = self.n * len(self.label_names)
        return {
            "micro_f1": float(_div(2 * tp_all, 2 * tp_all + fp_all + fn_all)),
            "macro_f1": float(f1.mean()),
            "micro_precision": float(_div(tp_all, tp_all + fp_all)),
            "micro_recall": float(_div(tp_all, tp_all + fn_all)),
            "exact_match": float(_div(self.exact, self.n)),
            "hamming_loss": float(_div(fp_all + fn_all, n_cells)),
            "per_class": _per_class(self.label_names, precision, recall, f1, tp + fn),
            "n": self.n,
            "threshold": self.threshold,
        }


def label_auc(probs, labels) -> float:
    """ROC AUC of several labels per example (ChestMNIST's convention, scikit-learn's macro average): the mean of
    each label's AUC over the labels the examples hold both present and absent; 0.5 where none is.
    probs, labels: (n, L) scores and 0/1."""
    probs = _to_numpy(probs).astype(np.float64)
    labels = _to_numpy(labels).astype(bool)
    aucs = [_binary_auc(probs[:, j], labels[:, j]) for j in range(probs.shape[1])]
    aucs = [a for a in aucs if a is not None]
    return float(np.mean(aucs)) if aucs else 0.5


class ScoredMultiLabelMetrics(MultiLabelMetrics):
    """MultiLabelMetrics at the threshold plus `roc_auc` (label_auc), which needs every score: the probabilities
    are kept (n x L floats)."""

    def __init__(self, label_names: list[str], threshold: float = 0.5):
        super().__init__(label_names, threshold)
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, probs, labels) -> None:
        super().update(probs, labels)
        self._probs.append(_to_numpy(probs).reshape(-1, len(self.label_names)).astype(np.float64))
        self._labels.append(_to_numpy(labels).reshape(-1, len(self.label_names)))

    def compute(self) -> dict:
        out = super().compute()
        out["roc_auc"] = label_auc(np.concatenate(self._probs), np.concatenate(self._labels)) if self._probs else 0.5
        return out


def youden_threshold(score, positive) -> float:
    """The decision threshold on `score` (n,) that maximises Youden's J = sensitivity + specificity - 1 against
    the yes/no truth `positive` (n,): one of the grid 0.01..0.99 (step 0.01, so a saved threshold reads plainly);
    ties -> the one closest to 0.5, then the lower. 0.5 where one side is missing (J is undefined)."""
    score = _to_numpy(score).astype(np.float64).reshape(-1)
    positive = _to_numpy(positive).astype(bool).reshape(-1)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    best_key, best_t = None, 0.5
    for t in np.round(np.arange(1, 100) * 0.01, 2):
        decided = score >= t
        j = (decided & positive).sum() / n_pos + (~decided & ~positive).sum() / n_neg - 1.0
        key = (-round(float(j), 12), abs(t - 0.5), t)
        if best_key is None or key < best_key:
            best_key, best_t = key, float(t)
    return best_t


def tune_threshold(probs, labels, grid=None) -> float:
    """Global decision threshold maximising micro F1 on validation data. probs, labels: (n, L). Default grid 0.05..0.95 step 0.05; ties -> the threshold closest to 0.5."""
    probs = _to_numpy(probs).astype(np.float64)
    labels = _to_numpy(labels).astype(bool)
    if probs.shape != labels.shape:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} differ")
    if grid is None:
        grid = np.round(np.arange(1, 20) * 0.05, 2)  # rounded so 0.5 is exactly 0.5
    grid = [float(t) for t in np.asarray(grid, dtype=np.float64).reshape(-1)]
    if not grid:
        raise ValueError("grid must not be empty")

    best_key, best_t = None, None
    for t in grid:
        pred = probs >= t
        tp = int((pred & labels).sum())
        wrong = int((pred != labels).sum())  # fp + fn
        f1 = 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0
        # Higher F1 first, then closeness to 0.5, then the lower threshold (determinism).
        key = (-f1, abs(t - 0.5), t)
        if best_key is None or key < best_key:
            best_key, best_t = key, t
    return best_t


class RegressionMetrics:
    """Regression: streamed sums for MSE/MAE/Pearson; keeps the predictions only for Spearman (ranks need them)."""

    def __init__(self):
        self.n = 0
        self.sum_sq_err = 0.0
        self.sum_abs_err = 0.0
        # Running means and (co-)moments, merged per batch with Chan et al.'s
        # formula: stable where raw sums of squares would cancel catastrophically.
        self.mean_p = 0.0
        self.mean_t = 0.0
        self.m2_p = 0.0
        self.m2_t = 0.0
        self.c_pt = 0.0
        # Exact constancy test: a constant side gives a tiny non-zero m2 through rounding.
        self.min_p = self.min_t = math.inf
        self.max_p = self.max_t = -math.inf
        self._preds: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []

    def update(self, preds, targets) -> None:
        """preds, targets: float arrays (batch,) or (batch, 1)."""
        p = _to_numpy(preds).astype(np.float64).reshape(-1)
        t = _to_numpy(targets).astype(np.float64).reshape(-1)
        if p.shape != t.shape:
            raise ValueError(f"preds {p.shape} and targets {t.shape} differ in length")
        nb = p.size
        if nb == 0:
            return
        err = p - t
        self.sum_sq_err += float(err @ err)
        self.sum_abs_err += float(np.abs(err).sum())

        mb_p, mb_t = float(p.mean()), float(t.mean())
        dp, dt = p - mb_p, t - mb_t
        n_old, n_new = self.n, self.n + nb
        delta_p, delta_t = mb_p - self.mean_p, mb_t - self.mean_t
        w = n_old * nb / n_new
        self.m2_p += float(dp @ dp) + delta_p * delta_p * w
        self.m2_t += float(dt @ dt) + delta_t * delta_t * w
        self.c_pt += float(dp @ dt) + delta_p * delta_t * w
        self.mean_p += delta_p * nb / n_new
        self.mean_t += delta_t * nb / n_new
        self.n = n_new

        self.min_p, self.max_p = min(self.min_p, p.min()), max(self.max_p, p.max())
        self.min_t, self.max_t = min(self.min_t, t.min()), max(self.max_t, t.max())
        self._preds.append(p)
        self._targets.append(t)

    def _constant(self) -> bool:
        return self.n < 2 or self.min_p == self.max_p or self.min_t == self.max_t

    def compute(self) -> dict:
        if self.n == 0:
            return {"mse": 0.0, "rmse": 0.0, "mae": 0.0, "pearson": 0.0, "spearman": 0.0, "n": 0}
        mse = self.sum_sq_err / self.n
        pearson = spearman = 0.0
        if not self._constant():
            pearson = self.c_pt / math.sqrt(self.m2_p * self.m2_t)
            pearson = min(1.0, max(-1.0, pearson))  # rounding can overshoot |r| = 1
            spearman = float(spearmanr(np.concatenate(self._preds), np.concatenate(self._targets))[0])
        return {
            "mse": float(mse),
            "rmse": math.sqrt(mse),
            "mae": float(self.sum_abs_err / self.n),
            "pearson": float(pearson),
            "spearman": spearman,
            "n": self.n,
        }


def greater_is_better(metric: str) -> bool:
    """False for error-like metrics (mse, rmse, mae, loss, hamming_loss); True otherwise."""
    return metric not in _LOWER_IS_BETTER
