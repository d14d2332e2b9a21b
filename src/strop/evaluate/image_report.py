"""The report sections of an image classification run: the confusion matrix, ROC curves (one class against
the rest, each with its AUC), the reliability diagram with the expected calibration error (15 bins, as the
run's `ece` metric), and a grid of the split's images, correct ones and the most confident errors, each
beside its Grad-CAM heatmap for the class the model predicted.

Everything is embedded (PNG as data: URIs), so report.html stays one self-contained file.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from strop.evaluate.metrics import CalibrationError, roc_curve
from strop.evaluate.report_parts import (calibration_section, confusion_section, new_figure, plain_text,
                                         png_html)
from strop.explain.image_attribution import explain_images
from strop.explain.overlay import png_data_uri

TILE_SIDE = 160  # pixels of each grid image: at 224 px a grid of 18 pairs stays near 2 MB of page


def image_sections(predictor, examples, results: dict, split: str | None, errors_k: int,
                   correct_k: int = 8) -> tuple[dict[str, str], dict]:
    """({section id: html}, report.json extras) of an image run; without the data (moved since training)
    only the confusion matrix, which results.json holds."""
    scored = "test" if "test" in results else "validation"
    sections = {"confusion": confusion_section(results, predictor.labels, scored)}
    if examples is None or examples.labels is None or len(examples) == 0:
        return sections, {}
    probs = predictor.outputs_of(examples, 64)
    calibration = CalibrationError()
    calibration.update_probs(probs, examples.labels)
    cal = calibration.compute()
    sections["calibration"] = calibration_section(cal, f"{split}, 15 bins")
    sections["roc"], aucs = roc_section(probs, examples.labels, predictor.labels, split)
    sections["images"], grid = grid_section(predictor, examples, probs, correct_k, errors_k)
    return sections, {"calibration": cal, "roc_auc_per_class": aucs, "image_grid": grid}


def roc_section(probs: np.ndarray, labels: np.ndarray, names: list[str], split: str) -> tuple[str, dict]:
    """One ROC curve per class (its probability against every other class), AUC in the legend; classes the
    split holds none of (or only) have no curve."""
    fig, ax = new_figure(4.8, 4.2)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    aucs = {}
    for c, name in enumerate(names):
        points = roc_curve(probs[:, c], labels == c)
        if points is None:
            continue
        fpr, tpr = points
        aucs[name] = float(np.trapezoid(tpr, fpr))
        ax.plot(fpr, tpr, label=plain_text(f"{name} (AUC {aucs[name]:.3f})"))
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(plain_text(f"ROC, one class vs the rest ({split})"))
    ax.legend(fontsize="small")
    return png_html(fig), aucs


def grid_examples(probs: np.ndarray, labels: np.ndarray, correct_k: int, errors_k: int) -> list[int]:
    """Indices to show: up to `correct_k` correct images, taken in turn from each true class (its most
    confident first, so every class shows), then up to `errors_k` errors, the most confident first."""
    predicted, confidence = probs.argmax(1), probs.max(1)
    by_class = []
    for c in range(probs.shape[1]):
        right = np.flatnonzero((predicted == c) & (labels == c))
        by_class.append(list(right[np.argsort(-confidence[right], kind="stable")]))
    correct = []
    while len(correct) < correct_k and any(by_class):
        for queue in by_class:
            if queue and len(correct) < correct_k:
                correct.append(int(queue.pop(0)))
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:errors_k]
    return correct + [int(i) for i in wrong]


def grid_section(predictor, examples, probs: np.ndarray, correct_k: int, errors_k: int) -> tuple[str, list]:
    """Tiles of (image, its Grad-CAM overlay) with true and predicted class; errors framed red."""
    chosen = grid_examples(probs, examples.labels, correct_k, errors_k)
    if not chosen:
        return "", []
    names = [examples.sources[i] for i in chosen]
    found = explain_images(predictor, [examples.pixels[i] for i in chosen], names, integrated=False)
    tiles, rows = [], []
    for i, ex in zip(chosen, found):
        truth = predictor.labels[int(examples.labels[i])]
        right = ex.prediction["label"] == truth
        tiles.append(_tile(ex, truth, right))
        rows.append({"source": ex.source, "true": truth, "predicted": ex.prediction["label"],
                     "score": ex.prediction["score"], "correct": right})
    layer = found[0].layer.describe()
    n_wrong = sum(not r["correct"] for r in rows)
    intro = (f"<p>{len(rows) - n_wrong} correct images (green) and the {n_wrong} most confident errors "
             f"(red); beside each, Grad-CAM of the predicted class at {html.escape(layer)}: red is where "
             "the features that raised that class's score were</p>")
    return intro + f'<div class="grid">{"".join(tiles)}</div>', rows


def _tile(ex, truth: str, right: bool) -> str:
    overlay = ex.overlays()["gradcam"]
    name = html.escape(Path(ex.source).name)
    return (f'<figure class="tile{"" if right else " bad"}">'
            f'<img alt="image" src="{png_data_uri(ex.image, TILE_SIDE)}">'
            f'<img alt="Grad-CAM" src="{png_data_uri(overlay, TILE_SIDE)}">'
            f'<figcaption title="{html.escape(ex.source)}">{name}<br>true <b>{html.escape(truth)}</b> · '
            f'predicted <b>{html.escape(ex.prediction["label"])}</b> ({ex.prediction["score"]:.2f})'
            "</figcaption></figure>")
