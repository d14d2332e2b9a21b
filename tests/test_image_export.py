"""`strop export` of an image-classification run (tiny random EfficientNet-Lite, conftest.tiny_vision_model,
trained on toy images): ONNX fp32 with the parity gate, static int8 calibrated on the training images, the
export folder used by predict / eval / strop.load like the run itself, and the errors (no training images for
int8, a graph that disagrees with PyTorch)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import IMAGE_CLASSES, write_image_folder
from test_image_classification import overrides

import strop
from strop.cli import main
from strop.compress.export import ExportOptions, export_run
from strop.errors import ExportError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def image_splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {split: write_image_folder(root / split, n, seed)
            for split, n, seed in (("train", 60, 1), ("validation", 30, 2), ("test", 30, 3))}


@pytest.fixture(scope="module")
def exported(tiny_vision_model, image_splits, tmp_path_factory):
    """A full fine-tuning run (6 epochs of 60 toy images, as test_image_classification's) and its export,
    timed on 4 images so the timing path runs without costing seconds."""
    run = strop.train(None, overrides(tiny_vision_model, tmp_path_factory.mktemp("run"), image_splits))
    parity = export_run(run.run_dir, ExportOptions(timing_examples=4), log=lambda m: None)
    return run, parity


def test_export_writes_fp32_and_static_int8_graphs_and_their_checks(exported):
    import onnxruntime as ort

    run, parity = exported
    folder = run.run_dir / "export"
    assert sorted(p.name for p in folder.iterdir()) == ["model.int8.onnx", "model.onnx", "parity.json",
                                                        "preprocessor_config.json", "strop.json"]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (pixels,), (logits,) = session.get_inputs(), session.get_outputs()
    # image.size=32 in the run; only the batch axis is free: predictors resize every image to the run's size
    assert (pixels.name, pixels.type) == ("pixel_values", "tensor(float)")
    assert pixels.shape == ["batch", 3, 32, 32]
    assert (logits.name, logits.shape) == ("logits", ["batch", 3])
    meta = json.loads((folder / "strop.json").read_text())
    assert meta["onnx"]["inputs"] == ["pixel_values"] and meta["onnx"]["dynamic_axes"] == ["batch"]
    assert meta["onnx"]["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    assert meta["image"] == {"size": 32, "channels": 3, "augment": "light"}
    assert meta["labels"] == IMAGE_CLASSES
    # the parity gate, on the 30 validation images: ~5e-7 measured; fp32 kernels that sum in another order
    assert parity["onnx"]["passed"] and parity["onnx"]["max_abs_logit_diff"] < 1e-5
    assert parity["held_data"]["examples"] == 30 and parity["primary_metric"] == "roc_auc"
    # no PyTorch int8 variant: torch's dynamic int8 would quantise the head alone
    assert list(parity["variants"]) == ["torch_fp32", "onnx_fp32", "onnx_int8"]
    int8 = parity["variants"]["onnx_int8"]
    assert int8["quantization"]["format"] == "QDQ" and int8["quantization"]["op_types_to_quantize"] is None
    assert int8["quantization"]["calibration_examples"] == 60  # all 60 training images (fewer than 256)
    assert set(int8["metric_changes"]) >= {"accuracy", "roc_auc", "macro_f1", "mcc"}
    assert int8["latency_ms_p50"] > 0 and int8["throughput_bs32"] > 0


def test_onnx_probabilities_equal_the_runs(exported, image_splits):
    run, _ = exported
    torch_predictor, onnx_predictor = strop.load(run.run_dir), strop.load(run.run_dir / "export")
    assert type(onnx_predictor).__name__ == "ImagePredictor"
    assert type(onnx_predictor.model).__name__ == "OnnxModel"
    examples = onnx_predictor.file_examples(image_splits["test"], True)[1]
    # batches of 7: neither the export's traced batch (2) nor a divisor of 30: the batch axis really is free
    ours = torch.from_numpy(torch_predictor.outputs_of(examples, 7))
    theirs = torch.from_numpy(onnx_predictor.outputs_of(examples, 7))
    # probabilities of fp32 graphs: the logits differ by ~5e-7 (parity above), the softmax by less
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_int8_graph_agrees_with_the_run_on_toy_images(exported, image_splits):
    run, parity = exported
    int8 = strop.load(run.run_dir / "export" / "model.int8.onnx")
    examples = int8.file_examples(image_splits["test"], True)[1]
    ours = strop.load(run.run_dir).outputs_of(examples, 64)
    theirs = int8.outputs_of(examples, 64)
    # measured when written: every one of the 30 test images (and the 30 validation images in parity.json)
    # gets the same class, probabilities within 0.008 of fp32's; the shapes are far apart and 60 calibration
    # images cover them. 0.03 leaves room for int8 kernels that round differently on other CPUs
    assert (theirs.argmax(1) == ours.argmax(1)).mean() == 1.0
    assert np.abs(theirs - ours).max() < 0.03
    assert parity["variants"]["onnx_int8"]["agreement"] == 1.0
    assert parity["variants"]["onnx_int8"]["metric_changes"]["accuracy"] == 0.0


def test_predict_and_eval_through_the_export_give_the_runs_results(exported, image_splits, tmp_path, capsys):
    run, _ = exported
    export = run.run_dir / "export"
    capsys.readouterr()
    assert main(["eval", str(export), "--data", str(image_splits["test"])]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for metric in ("roc_auc", "accuracy", "macro_f1", "loss"):  # the run's own test metrics (results.json)
        assert metrics[metric] == pytest.approx(run.results["test"][metric], abs=1e-5), metric
    for source, out in ((run.run_dir, tmp_path / "torch.csv"), (export, tmp_path / "onnx.csv")):
        assert main(["predict", str(source), "--data", str(image_splits["test"]), "--out", str(out)]) == 0
    ours, theirs = (list(csv.DictReader(p.open())) for p in (tmp_path / "torch.csv", tmp_path / "onnx.csv"))
    assert len(theirs) == 30 and list(theirs[0]) == list(ours[0])  # path, label, prediction, score, prob_*
    assert [r["prediction"] for r in theirs] == [r["prediction"] for r in ours]
    assert max(abs(float(a["score"]) - float(b["score"])) for a, b in zip(ours, theirs)) < 1e-5


def test_serve_loads_the_export_with_its_image_processor(exported, image_splits):
    from PIL import Image

    from strop.serve.backend import load_model_for_serving

    run, _ = exported
    loaded = load_model_for_serving(run.run_dir, backend="onnx", onnx_file="model.onnx")
    assert loaded.backend == "onnx" and loaded.precision == "fp32"
    images = [np.asarray(Image.open(p)) for p in sorted(image_splits["test"].rglob("*.png"))[:6]]
    served = loaded.predictor.predict_inputs(images)  # what serve's batcher calls with decoded uploads
    ours = strop.load(run.run_dir).predict(images)
    assert [p["label"] for p in served] == [p["label"] for p in ours]
    # fp32 graph: probabilities within 1e-5 of the run's, as test_onnx_probabilities_equal_the_runs
    assert max(abs(a["score"] - b["score"]) for a, b in zip(served, ours)) < 1e-5


def test_int8_without_the_training_images_exits_2_and_writes_nothing(exported, image_splits, tmp_path,
                                                                      capsys):
    run, _ = exported
    moved = tmp_path / "moved"
    shutil.copytree(run.run_dir, moved, ignore=shutil.ignore_patterns("export", "checkpoints"))
    config = moved / "config.yaml"
    config.write_text(config.read_text().replace(str(image_splits["train"]), str(tmp_path / "gone")))
    capsys.readouterr()
    assert main(["export", str(moved), "--data", str(image_splits["validation"])]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "int8 export (static: activation ranges calibrated on 256 training examples) needs the run's " \
           "training data" in err and "--no-int8" in err and str(tmp_path / "gone") in err
    assert sorted(p.name for p in moved.iterdir()) == sorted(p.name for p in run.run_dir.iterdir()
                                                             if p.name not in ("export", "checkpoints"))
    # the way out the message names: the fp32 graph alone, checked on the labelled folder given
    held = str(image_splits["validation"])
    assert main(["export", str(moved), "--no-int8", "--no-timing", "--data", held]) == 0
    assert sorted(p.name for p in (moved / "export").glob("*.onnx")) == ["model.onnx"]


def test_a_graph_that_disagrees_with_pytorch_is_not_exported(exported, monkeypatch, tmp_path):
    import strop.compress.export as export_module
    from strop.compress.onnx import export_graph

    run, _ = exported
    before = (run.run_dir / "export" / "model.onnx").stat().st_mtime_ns

    def export_off_by_a_bit(model, inputs, path):
        shifted = __import__("copy").deepcopy(model)  # an exporter that changes the model: head bias + 0.01
        with torch.no_grad():
            shifted.classifier.bias += 0.01
        return export_graph(shifted, inputs, path)

    monkeypatch.setattr(export_module, "export_graph", export_off_by_a_bit)
    with pytest.raises(ExportError, match=r"max \|logit difference\| 0.01 > tolerance 0.001"):
        export_run(run.run_dir, ExportOptions(int8=False, timing=False), log=lambda m: None)
    assert (run.run_dir / "export" / "model.onnx").stat().st_mtime_ns == before  # the good export is kept
    shutil.rmtree(run.run_dir / "export.failed")


def test_export_help_says_what_happens_to_image_runs(capsys):
    assert main(["export", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Image-classification runs export model.onnx (input pixel_values" in text
    assert "static int8 calibrated on 256 of the run's training images" in text and "--no-int8" in text
