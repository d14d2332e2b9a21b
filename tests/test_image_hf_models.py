"""Hugging Face image-classification folders as image backbones (models/hf_vision.py): tiny random ViT and
ConvNeXt folders built from configs, trained on the toy images of conftest (class = a shape), then predicted
through strop.load and plain transformers, exported to ONNX with the parity gate, explained (Grad-CAM on the
patch grid / stage map, integrated gradients), LoRA and freezing, and the folders strop refuses (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_CLASSES, tiny_overrides, write_image_folder
from safetensors.torch import load_file

import strop
from strop.cli import main
from strop.explain.gradcam import grad_cam
from strop.explain.image_attribution import pixel_batch, read_originals
from strop.models.hf_vision import stated_size
from strop.models.vision import ImageProcessor

transformers = pytest.importorskip("transformers")

VIT_PROCESSOR = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                 "size": {"height": 32, "width": 32}, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
CONVNEXT_PROCESSOR = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 32},
                      "crop_pct": 0.875, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
                      "image_std": [0.229, 0.224, 0.225]}


def save_folder(folder: Path, config, processor: dict) -> Path:
    """A random model of `config` with a 10-label head (a head strop must replace) and its processor file."""
    torch.manual_seed(0)
    transformers.AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    """ViT, 2 layers 32 wide, 32 px images cut into 8 px patches: 16 patch tokens and a class token."""
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8, num_labels=10)
    return save_folder(tmp_path_factory.mktemp("tiny-vit"), config, VIT_PROCESSOR)


@pytest.fixture(scope="module")
def tiny_convnext(tmp_path_factory) -> Path:
    """ConvNeXt, 4 stages of one block, 8-64 channels: maps at strides 4, 8, 16 and 32."""
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=10)
    return save_folder(tmp_path_factory.mktemp("tiny-convnext"), config, CONVNEXT_PROCESSOR)


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory) -> Path:
    """ResNet, 4 stages of one bottleneck, 8-64 channels, batch norms throughout; processor: 64 px."""
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                       num_labels=10)
    return save_folder(tmp_path_factory.mktemp("tiny-resnet"), config,
                       {**CONVNEXT_PROCESSOR, "size": {"shortest_edge": 64}})


@pytest.fixture(scope="module")
def image_splits(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    return {split: write_image_folder(root / split, n, seed)
            for split, n, seed in (("train", 60, 1), ("validation", 30, 2), ("test", 30, 3))}


def overrides(model: Path, out: Path, splits: dict, **extra) -> list[str]:
    # image.size left empty: the folder's size. Augmentation off and 10 epochs: a random transformer with no
    # convolutional prior needs the plain images and ~80 steps to tell the shapes apart
    base = {"train.threads": 1, "train.epochs": 10, "train.lr": 1e-3, "image.augment": "none",
            "track": "none", "eval.report": False, **{f"data.{k}": v for k, v in splits.items()}}
    base.update(extra)
    return tiny_overrides(model, out / "runs", **base)


@pytest.fixture(scope="module")
def vit_run(tiny_vit, image_splits, tmp_path_factory):
    return strop.train(None, overrides(tiny_vit, tmp_path_factory.mktemp("vit"), image_splits))


def test_vit_folder_learns_the_toy_images_with_its_own_size_and_normalisation(vit_run):
    results = vit_run.results
    # seed 42 when written: test AUC 0.952, accuracy 0.867 (chance: 0.5 and 0.333)
    assert results["steps"] == 80 and results["test"]["roc_auc"] > 0.9 and results["test"]["accuracy"] > 0.75
    meta = json.loads((vit_run.model_dir / "strop.json").read_text())
    assert meta["image"]["size"] == 32  # image.size empty: the 32 of the folder's preprocessor_config.json
    assert meta["labels"] == IMAGE_CLASSES
    assert sorted(p.name for p in vit_run.model_dir.iterdir()) == ["config.json", "model.safetensors",
                                                                  "preprocessor_config.json", "strop.json"]
    processor = json.loads((vit_run.model_dir / "preprocessor_config.json").read_text())
    assert processor == VIT_PROCESSOR  # written back whole: the folder loads with transformers' processor


def test_vit_head_replacement_is_printed(tiny_vit, image_splits, tmp_path, capfd):
    strop.train(None, overrides(tiny_vit, tmp_path, image_splits, **{"train.max_steps": 1}))
    err = " ".join(capfd.readouterr().err.split())
    assert f"image.size=32 (the input size model folder {tiny_vit.name} states" in err
    assert (f"model: {tiny_vit.name}'s 10-label head (classifier) dropped; a new 3-label head is "
            "trained") in err


def test_trained_vit_predicts_alike_through_strop_and_plain_transformers(vit_run, image_splits):
    predictor = strop.load(vit_run.run_dir)
    assert type(predictor.model).__name__ == "ViTForImageClassification"
    files = sorted(image_splits["test"].rglob("*.png"))[:6]
    ours = predictor.predict([str(f) for f in files])
    x = pixel_batch(predictor, read_originals(files))  # the pixels strop fed the model
    assert x.shape == (6, 3, 32, 32) and -1 <= x.min() < x.max() <= 1  # [0, 1] less 0.5, over 0.5
    plain = transformers.AutoModelForImageClassification.from_pretrained(vit_run.model_dir).eval()
    assert plain.config.id2label == dict(enumerate(IMAGE_CLASSES))
    with torch.no_grad():
        probs = plain(pixel_values=x).logits.softmax(-1)
    torch.testing.assert_close(torch.tensor([[p["probs"][c] for c in IMAGE_CLASSES] for p in ours]), probs)
    again = predictor.evaluate_file(image_splits["test"])
    assert again["roc_auc"] == pytest.approx(vit_run.results["test"]["roc_auc"], abs=1e-6)


def test_vit_exports_to_onnx_with_the_parity_gate(vit_run, image_splits):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    from strop.compress.export import ExportOptions, export_run

    parity = export_run(vit_run.run_dir, ExportOptions(int8=False, timing=False), log=lambda m: None)
    # ~1.5e-7 measured: fp32 kernels that sum in another order
    assert parity["onnx"]["passed"] and parity["onnx"]["max_abs_logit_diff"] < 1e-5
    session = ort.InferenceSession(str(vit_run.run_dir / "export" / "model.onnx"))
    (pixels,) = session.get_inputs()
    assert pixels.name == "pixel_values" and pixels.shape == ["batch", 3, 32, 32]  # only the batch is free
    exported = strop.load(vit_run.run_dir / "export").evaluate_file(image_splits["test"])
    assert exported["roc_auc"] == pytest.approx(vit_run.results["test"]["roc_auc"], abs=1e-6)


def test_vit_grad_cam_reads_the_last_blocks_input_on_the_patch_grid(vit_run, image_splits, tmp_path):
    image = sorted((image_splits["test"] / "spot").glob("*.png"))[0]
    assert main(["explain", str(vit_run.run_dir), "--image", str(image), "--out", str(tmp_path / "x")]) == 0
    record = json.loads((tmp_path / "x" / "explanations.json").read_text())[0]
    assert sorted(p.name for p in (tmp_path / "x").glob("*.png")) == [f"{image.stem}.gradcam.png",
                                                                    f"{image.stem}.integrated_gradients.png"]
    # 32 px / 8 px patches: a 4x4 grid; hidden state 1 is the input of the last of the 2 blocks (the last
    # block's own output reaches the logit only through the class token)
    assert record["gradcam_layer"] == "hidden_states.1" and record["gradcam_map"] == [4, 4]
    assert record["completeness"]["within_tolerance"]
    model = strop.load(vit_run.run_dir).model
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    res = grad_cam(model, x)
    with torch.enable_grad():  # by hand: the patch tokens (after the class token) laid out row by row
        out = model(pixel_values=x, output_hidden_states=True)
        h = out.hidden_states[1]
        (grad,) = torch.autograd.grad(out.logits.gather(1, res.targets[:, None]).sum(), h)
    a, g = (t[:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2) for t in (h.detach(), grad))
    torch.testing.assert_close(res.cams, torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1)))


def test_vit_lora_trains_merges_and_keeps_the_head_trainable(tiny_vit, image_splits, tmp_path):
    run = strop.train(None, overrides(tiny_vit, tmp_path, image_splits, **{
        "peft.method": "lora", "peft.r": 4, "train.lr": 2e-3}))  # the task's LoRA default
    meta = json.loads((run.model_dir / "strop.json").read_text())["peft"]
    assert "vit.layers.0.attention.q_proj" in meta["targets"]
    assert not any(t.startswith("classifier") for t in meta["targets"])  # the head trains in full instead
    assert meta["merge_max_abs_diff"] < 1e-4
    # seed 42 when written: test AUC 0.99 (LoRA r=4 on every linear layer and the patch projection)
    assert run.results["test"]["roc_auc"] > 0.9
    merged = strop.load(run.run_dir).evaluate_file(image_splits["test"])
    adapter = strop.load(run.run_dir / "adapter").evaluate_file(image_splits["test"])
    assert adapter["loss"] == pytest.approx(merged["loss"], abs=1e-5)


def test_vit_freeze_trains_only_the_top_layer_and_the_head(tiny_vit, image_splits, tmp_path):
    run = strop.train(None, overrides(tiny_vit, tmp_path, image_splits, **{
        "peft.method": "freeze", "peft.unfrozen_layers": 1, "train.epochs": 1}))
    base, tuned = (load_file(str(f / "model.safetensors")) for f in (tiny_vit, run.model_dir))
    changed = {k for k in base if not k.startswith("classifier.") and not torch.equal(base[k], tuned[k])}
    assert changed and all(k.startswith("vit.encoder.layer.1.") for k in changed)  # the top of the 2 layers
    top = sum(v.numel() for k, v in tuned.items() if k.startswith(("vit.encoder.layer.1.", "classifier.")))
    assert run.results["trainable_params"] == top and tuned["classifier.weight"].shape == (3, 32)


def test_convnext_at_a_larger_size_learns_and_explains_a_stage_map(tiny_convnext, image_splits, tmp_path):
    run = strop.train(None, overrides(tiny_convnext, tmp_path, image_splits, **{"image.size": 64}))
    # seed 42 when written: test AUC 0.90 at 64 px (the folder states 32; a CNN takes any size)
    assert run.results["test"]["roc_auc"] > 0.8
    assert json.loads((run.model_dir / "strop.json").read_text())["image"]["size"] == 64
    image = sorted((image_splits["test"] / "vertical").glob("*.png"))[0]
    assert main(["explain", str(run.run_dir), "--image", str(image), "--out", str(tmp_path / "x")]) == 0
    record = json.loads((tmp_path / "x" / "explanations.json").read_text())[0]
    # 64 px at strides 4, 8, 16, 32: the stages' maps are 16, 8, 4, 2; the last (hidden state 4) is 2x2
    assert record["gradcam_layer"] == "hidden_states.4" and record["gradcam_map"] == [2, 2]
    assert (tmp_path / "x" / f"{image.stem}.gradcam.png").stat().st_size > 0


def test_resnet_lora_holds_the_frozen_batch_norm_statistics(tiny_resnet, image_splits, tmp_path):
    """LoRA freezes the base, batch norms included: their running statistics stay the pretrained ones, so
    the base + adapter/ predicts what the merged model/ does."""
    run = strop.train(None, overrides(tiny_resnet, tmp_path, image_splits, **{
        "peft.method": "lora", "peft.r": 4, "train.epochs": 2}))
    base, merged = (load_file(str(f / "model.safetensors")) for f in (tiny_resnet, run.model_dir))
    stats = [k for k in base if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(base[k], merged[k]) for k in stats)
    assert json.loads((run.model_dir / "strop.json").read_text())["image"]["size"] == 64  # the folder's
    merged_metrics = strop.load(run.run_dir).evaluate_file(image_splits["test"])
    adapter = strop.load(run.run_dir / "adapter").evaluate_file(image_splits["test"])
    assert adapter["loss"] == pytest.approx(merged_metrics["loss"], abs=1e-5)


def test_stated_size_reads_the_processor_then_the_config(tmp_path):
    config = {"model_type": "vit", "image_size": 48}
    crop = {"size": {"shortest_edge": 256}, "do_center_crop": True,
            "crop_size": {"height": 224, "width": 224}}
    for processor, side in (({"size": {"height": 40, "width": 40}}, 40), ({"size": 30}, 30),
                            ({"size": {"shortest_edge": 36}}, 36), (crop, 224),
                            ({"size": {"height": 20, "width": 30}}, 48),  # not square: config.json's
                            ({}, 48)):
        (tmp_path / "config.json").write_text(json.dumps(config))
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({**processor, "do_normalize": False}))
        assert stated_size(tmp_path) == side, processor


def test_processor_keeps_the_folders_settings_and_honours_do_normalize(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**CONVNEXT_PROCESSOR, "image_mean": 0.5}))
    p = ImageProcessor.from_folder(tmp_path)
    assert p.image_mean == (0.5, 0.5, 0.5) and p.image_std == (0.229, 0.224, 0.225)
    p.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text()) == {**CONVNEXT_PROCESSOR,
                                                                               "image_mean": [0.5] * 3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    p = ImageProcessor.from_folder(tmp_path)
    assert (p.image_mean, p.image_std) == ((0.0,) * 3, (1.0,) * 3)


# -----------------------------------------------------------------------------------------------------
# folders strop refuses: exit 2, one message with the fix, no run folder


def _bert(folder: Path, vit: Path) -> list[str]:
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=50)
    transformers.BertModel(config).save_pretrained(folder)
    return []


def _pickle_only(folder: Path, vit: Path) -> list[str]:
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(vit / name, folder / name)
    torch.save(load_file(str(vit / "model.safetensors")), folder / "pytorch_model.bin")
    return []


def _no_processor(folder: Path, vit: Path) -> list[str]:
    shutil.copytree(vit, folder)
    (folder / "preprocessor_config.json").unlink()
    return []


def _timm(folder: Path, vit: Path) -> list[str]:
    shutil.copytree(vit, folder)
    config = {"model_type": "timm_wrapper", "architecture": "resnet18"}
    (folder / "config.json").write_text(json.dumps(config))
    return []


def _wrong_size(folder: Path, vit: Path) -> list[str]:
    shutil.copytree(vit, folder)
    return ["image.size=64"]


@pytest.mark.parametrize("make, message", [
    (_bert, "model_type 'bert' is not an image classifier: give a Hugging Face image-classification folder"),
    (_pickle_only, "only has pickle weights (pytorch_model.bin), which can run code when loaded; strop "
                   "loads image models from safetensors only. Convert them"),
    (_no_processor, "has no preprocessor_config.json, so the normalisation its weights were trained with is "
                    "unknown"),
    (_timm, "timm checkpoints need timm, which imports torchvision"),
    (_wrong_size, "image.size=64: the model in {folder} cannot take 64x64 images (Input image size (64*64) "
                  "doesn't match model (32*32)); set image.size=32 (the size it was trained at) or leave "
                  "image.size empty"),
])
def test_unusable_folders_exit_2_with_the_fix(make, message, tiny_vit, image_splits, tmp_path, capsys):
    folder = tmp_path / "model"
    extra = make(folder, tiny_vit)
    out = tmp_path / "out"
    args = ["train", f"model.path={folder}", f"data.train={image_splits['train']}", f"output_dir={out}",
            "name=bad", "track=none", *extra]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert message.format(folder=folder) in err
    assert not (out / "bad").exists()
