"""Explaining and reporting image runs: Grad-CAM against a hand computation, the layer it reads, ECE
against a direct numpy computation, `strop explain RUN --image` (PNG overlays, class, bad paths), and the
report of an image run (ROC, calibration, a grid of real images with their heatmaps). One tiny trained run
for all (conftest.tiny_vision_model, toy images whose class is a shape)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGE_CLASSES, tiny_overrides, write_image_folder
from PIL import Image
from torch import nn

import strop
from strop.cli import main
from strop.evaluate.image_report import grid_examples
from strop.evaluate.metrics import CalibrationError, ScoredClassificationMetrics, roc_auc, roc_curve
from strop.evaluate.report import build_report
from strop.explain.gradcam import grad_cam
from strop.models.classifier import Output
from strop.models.efficientnet_lite import EfficientNetLite, LiteConfig


@pytest.fixture(scope="module")
def image_splits(tmp_path_factory) -> dict[str, Path]:
    """Toy splits; in test, 3 'spot' images are filed under 'vertical', so the report has errors to show."""
    root = tmp_path_factory.mktemp("images")
    splits = {split: write_image_folder(root / split, n, seed)
              for split, n, seed in (("train", 60, 1), ("validation", 30, 2), ("test", 30, 3))}
    for f in sorted((splits["test"] / "spot").glob("*.png"))[:3]:
        f.rename(splits["test"] / "vertical" / f"mislabelled-{f.name}")
    return splits


@pytest.fixture(scope="module")
def trained(tiny_vision_model, image_splits, tmp_path_factory):
    """Full fine-tuning, 4 epochs (32 steps) of 60 toy images at 32 px."""
    out = tmp_path_factory.mktemp("run")
    data = {f"data.{k}": v for k, v in image_splits.items()}
    # one thread: this tiny model's kernels are microseconds, and a second thread only waits for a busy core
    return strop.train(None, tiny_overrides(tiny_vision_model, out / "runs", **data, **{
        "image.size": 32, "train.threads": 1, "train.epochs": 4, "track": "none", "eval.report": False}))


# ----------------------------------------------------------------------------------------------------
# Grad-CAM


class PoolLinear(nn.Module):
    """conv -> global average pool -> linear: dy_c/dA_k(i, j) = W[c, k] / (h w) exactly, so Grad-CAM is,
    by hand, ReLU(sum_k W[c, k] / (h w) * A_k) (Zhou et al.'s class activation map, scaled)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 3)

    def cam_layers(self):
        return [("conv", self.conv), ("pool", self.pool)]  # pool's map is 1x1: never the one chosen

    def forward(self, pixel_values):
        return Output(self.head(self.pool(self.conv(pixel_values)).flatten(1)))


def test_grad_cam_equals_the_hand_computation():
    torch.manual_seed(0)
    model, x = PoolLinear(), torch.randn(2, 3, 5, 6)
    res = grad_cam(model, x, target=torch.tensor([2, 0]))
    a = model.conv(x).detach()  # (2, 4, 5, 6): the maps A_k
    w = model.head.weight.detach()
    for i, c in enumerate((2, 0)):
        alpha = w[c] / (5 * 6)  # the spatial mean of dy_c/dA_k, which is the same at every pixel here
        expected = torch.relu((alpha[:, None, None] * a[i]).sum(0))
        torch.testing.assert_close(res.cams[i], expected)
    assert (res.layer.name, res.layer.height, res.layer.width, res.layer.channels) == ("conv", 5, 6, 4)
    assert res.targets.tolist() == [2, 0]


def test_grad_cam_of_the_trained_run_equals_autograd_through_its_stages(trained):
    model = strop.load(trained.run_dir).model
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    res = grad_cam(model, x)  # each image's predicted class
    with torch.enable_grad():  # the same network written out stage by stage, the map taken by hand
        h = model.stem(x)
        for block in model.blocks:
            h = block(h)
        a = model.pooler.conv(h)
        logits = model.classifier(a.mean((2, 3)))
        targets = logits.argmax(1)
        (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), a)
    expected = torch.relu((grad.mean((2, 3), keepdim=True) * a).sum(1)).detach()
    # 32 px / stride 4 (stem 2, stage 2's first block 2): the last map is 8x8
    assert res.layer.name == "pooler.conv" and (res.layer.height, res.layer.width) == (8, 8)
    assert res.targets.tolist() == targets.tolist()
    torch.testing.assert_close(res.cams, expected)
    assert all(p.grad is None for p in model.parameters())  # only the maps' gradient was taken


@pytest.mark.parametrize("size, layer, side", [
    (32, "pooler.conv", 8),  # stride 2 (stem) x 2 (stage 2): the last map is 8x8
    (8, "pooler.conv", 2),  # 8 / 4: still 2x2 at the end
    (4, "blocks.0", 2),  # stage 2 brings 2x2 to 1x1, so stage 1's end (2x2) is the last that says where
])
def test_grad_cam_reads_the_last_map_of_at_least_2x2(tiny_vision_model, size, layer, side):
    config = json.loads((tiny_vision_model / "config.json").read_text())
    model = EfficientNetLite(LiteConfig.from_dict(config), 3)
    res = grad_cam(model, torch.zeros(1, 3, size, size))
    assert (res.layer.name, res.layer.height, res.layer.width) == (layer, side, side)


def test_grad_cam_of_efficientnet_lite0_at_28_px_reads_stage_5():
    # 28 px through strides 2, 1, 2, 2, 2, 1, 2, 1: 14, 14, 7, 4, 2, 2, 1, 1; stage 5 ends at block 10
    # (repeats 1 + 2 + 2 + 3 + 3 = 11 blocks), 112 channels (LITE0_STAGES)
    torch.manual_seed(0)
    res = grad_cam(EfficientNetLite(LiteConfig(), 2), torch.zeros(1, 3, 28, 28))
    assert (res.layer.name, res.layer.channels, res.layer.height) == ("blocks.10", 112, 2)


# ----------------------------------------------------------------------------------------------------
# metrics


def numpy_ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """The textbook definition, directly: bins (lo, hi] of equal width, a confidence of 0 in the first."""
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for b in range(bins):
        m = (confidence > edges[b]) & (confidence <= edges[b + 1])
        if b == 0:
            m |= confidence == 0
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - confidence[m].mean())
    return ece


def test_ece_streamed_equals_the_direct_numpy_computation():
    rng = np.random.default_rng(0)
    confidence = np.concatenate([rng.uniform(0, 1, 500), np.linspace(0, 1, 16)])  # bin edges included
    correct = rng.random(confidence.size) < confidence ** 2  # over-confident: a clearly non-zero ECE
    ece = CalibrationError()
    for part in np.array_split(np.arange(confidence.size), [7, 200, 201, 390]):  # uneven batches, one empty
        ece.update(confidence[part], correct[part])
    got = ece.compute()
    assert got["ece"] == pytest.approx(numpy_ece(confidence, correct), abs=1e-12)
    assert got["ece"] > 0.1 and sum(b["n"] for b in got["bins"]) == confidence.size


def test_ece_by_hand_and_inside_the_image_metrics():
    # two bins used: 0.9 (accuracy 1/2, gap 0.4) and 0.6 (accuracy 1, gap 0.4), each half the examples:
    # ECE = 0.5 x 0.4 + 0.5 x 0.4 = 0.4
    ece = CalibrationError()
    ece.update([0.9, 0.9, 0.6, 0.6], [True, False, True, True])
    assert ece.compute()["ece"] == pytest.approx(0.4)
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.4, 0.6], [0.4, 0.6]])
    metrics = ScoredClassificationMetrics(["a", "b"])
    metrics.update(probs, np.array([0, 0, 1, 1]))  # the same confidences and right/wrong as above
    assert metrics.compute()["ece"] == pytest.approx(0.4)


def test_roc_curve_area_equals_roc_auc_with_ties():
    score = np.array([0.9, 0.8, 0.8, 0.3, 0.3, 0.1])
    positive = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    fpr, tpr = roc_curve(score, positive)
    # ties at 0.8 and 0.3 are diagonal steps; the area is the Mann-Whitney AUC: (3 + 2.5 + 1.5) / 9 = 7/9
    assert np.trapezoid(tpr, fpr) == pytest.approx(7 / 9)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(np.stack([1 - score, score], 1), positive))
    assert roc_curve(score, np.ones(6, dtype=bool)) is None


def test_grid_takes_correct_images_from_every_class_then_the_most_confident_errors():
    probs = np.array([[.9, .1], [.8, .2], [.3, .7], [.95, .05], [.6, .4], [.2, .8]])
    labels = np.array([0, 0, 1, 1, 1, 0])  # rows 3, 4 and 5 are wrong, at 0.95, 0.6 and 0.8
    assert grid_examples(probs, labels, correct_k=3, errors_k=2) == [0, 2, 1, 3, 5]


# ----------------------------------------------------------------------------------------------------
# strop explain RUN --image


def test_cli_explain_image_writes_overlays_of_the_images_size(trained, image_splits, tmp_path, capsys):
    source = sorted((image_splits["test"] / "horizontal").glob("*.png"))[0]
    wide = tmp_path / "wide.png"
    Image.open(source).resize((40, 24)).save(wide)  # not square, not image.size: overlays keep 40 x 24
    out = tmp_path / "why"
    assert main(["explain", str(trained.run_dir), "--image", str(wide), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    (record,) = json.loads(captured.out)
    expected = strop.load(trained.run_dir).predict(str(wide))[0]
    assert record["label"] == expected["label"]
    assert record["score"] == pytest.approx(expected["score"], abs=1e-5)
    assert record["gradcam_layer"] == "pooler.conv" and record["gradcam_map"] == [8, 8]
    err = " ".join(captured.err.split())
    assert f"wide.png: {record['label']} ({record['score']:.3f})" in err and "pooler.conv (8x8 map" in err
    assert f"wrote 2 PNG overlays to {out}" in err
    assert sorted(p.name for p in out.iterdir()) == ["explanations.json", "wide.gradcam.png",
                                                     "wide.integrated_gradients.png"]
    for name in ("wide.gradcam.png", "wide.integrated_gradients.png"):
        overlay = np.asarray(Image.open(out / name))
        assert overlay.shape == (24, 40, 3)
        plain = np.asarray(Image.open(wide).convert("RGB"))
        assert np.abs(overlay.astype(int) - plain).max() > 30  # a heatmap drawn on it
    c = record["completeness"]  # integrated gradients add up to the logit difference from a black image
    assert abs(c["sum"] - c["logit_diff"]) <= 0.05 * abs(c["logit_diff"]) and c["within_tolerance"]


def test_cli_explain_a_folder_of_images(trained, image_splits, tmp_path, capsys):
    folder = tmp_path / "some"
    folder.mkdir()
    for f in sorted((image_splits["test"] / "spot").glob("*.png"))[:2]:
        shutil.copy(f, folder / f.name)
    # no --out: RUN/explain/; --target: the class explained, whatever was predicted
    assert main(["explain", str(trained.run_dir), "--image", str(folder), "--target", "vertical"]) == 0
    captured = capsys.readouterr()
    records = json.loads(captured.out)
    assert [Path(r["image"]).name for r in records] == sorted(p.name for p in folder.iterdir())
    assert [r["target"] for r in records] == ["vertical", "vertical"]
    assert all(r["label"] in IMAGE_CLASSES and sum(r["probs"].values()) == pytest.approx(1, abs=1e-5)
               for r in records)
    out = trained.run_dir / "explain"
    assert f"wrote 4 PNG overlays to {out}" in " ".join(captured.err.split())
    expected = [f"{Path(r['image']).stem}.{kind}.png" for r in records
                for kind in ("gradcam", "integrated_gradients")]
    assert sorted(p.name for p in out.glob("*.png")) == expected


def test_cli_explain_bad_image_is_one_error_and_writes_nothing(trained, image_splits, tmp_path, capsys):
    good = sorted((image_splits["test"] / "spot").glob("*.png"))[0]
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    cases = {str(tmp_path / "missing.png"): "missing.png: no such image file or folder",
             str(cut): "cut.png: cannot read this image"}
    for bad, message in cases.items():
        out = tmp_path / "never"
        # the good image first: nothing is written for it either, every image is read before any output
        assert main(["explain", str(trained.run_dir), "--image", str(good), "--image", bad,
                     "--out", str(out)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert err.startswith("error:") and message in err and "Traceback" not in err
        assert not out.exists()
    assert main(["explain", str(trained.run_dir), "--text", "a picture"]) == 2
    assert "this model classifies images: give --image" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# the report


def _section(page: str, name: str) -> str:
    found = re.search(rf'<section id="{name}">(.*?)</section>', page, re.S)
    assert found, name
    return found.group(1)


def test_report_of_an_image_run_has_roc_calibration_and_a_grid_of_real_images(trained):
    page = build_report(trained.run_dir).read_text()
    extra = json.loads((trained.run_dir / "report.json").read_text())
    test = trained.results["test"]
    # the report's ECE is the run's test ECE (the same 15 bins over the same model's test probabilities)
    assert extra["calibration"]["ece"] == pytest.approx(test["ece"], abs=1e-6)
    assert f"expected calibration error: <b>{test['ece']:.4f}</b>" in _section(page, "calibration")
    # one curve per class; their mean AUC is the run's one-vs-rest ROC AUC
    assert set(extra["roc_auc_per_class"]) == set(IMAGE_CLASSES)
    assert np.mean(list(extra["roc_auc_per_class"].values())) == pytest.approx(test["roc_auc"], abs=1e-6)
    assert "data:image/png;base64," in _section(page, "roc") and _section(page, "confusion")
    data = _section(page, "data")  # image shapes and the class balance; no text lengths of file names
    assert "<td>train</td><td>60</td><td>3 x 32 x 32</td>" in data and data.count("<img") == 1
    grid = extra["image_grid"]
    wrong = [g for g in grid if not g["correct"]]
    # 8 correct ones, then every error up to the report's 10 (4 epochs: accuracy 0.8, 6 errors)
    assert sum(g["correct"] for g in grid) == 8 and len(wrong) == min(10, round((1 - test["accuracy"]) * 30))
    assert [g["score"] for g in wrong] == sorted((g["score"] for g in wrong), reverse=True)
    # the model calls the squares filed under 'vertical' spots, more surely than any real error (4 epochs,
    # seed 42: 0.74, 0.69, 0.69, then a true error at 0.62, when this test was written)
    firsts = [Path(g["source"]).name.startswith("mislabelled-") for g in wrong[:4]]
    assert firsts == [True, True, True, False]
    images = _section(page, "images")
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', images)
    assert len(uris) == 2 * len(grid) and images.count('class="tile bad"') == len(wrong)
    picture, overlay = (np.asarray(Image.open(io.BytesIO(base64.b64decode(u)))) for u in uris[:2])
    assert picture.shape == overlay.shape == (32, 32, 3)  # image.size, under the tiles' 160 px cap
    assert picture.std() > 20 and np.abs(overlay.astype(int) - picture).max() > 30  # a real image, a heatmap
