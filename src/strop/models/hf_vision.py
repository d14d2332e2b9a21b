"""Hugging Face image-classification folders (ViT, ConvNeXt, ResNet, Swin, ...) as image backbones.

A folder qualifies when its config.json's model_type is one transformers builds with
AutoModelForImageClassification, its weights are safetensors and it holds a preprocessor_config.json
(the normalisation the weights were trained with). It loads offline and without code shipped in the
folder. The head is sized to the run's labels: a head of another width (ImageNet's 1000 classes) is
dropped and a new one starts from torch's RNG; a head of the same width (a strop run's model/, a folder
trained on as many classes) is kept. A trained run's model/ is such a folder again, so plain
`AutoModelForImageClassification` loads it as it loads the base.

Not supported: timm checkpoints (model_type timm_wrapper) need timm, which imports torchvision, and no
torchvision on PyPI loads against the pinned torch 2.13.0 without replacing it (DECISIONS.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from strop.errors import ConfigError, ModelError
from strop.models.backbone import PICKLE_WEIGHTS, load_pretrained, read_model_config
from strop.models.classifier import backbone_overrides, label_maps, load_config_of, quiet_transformers
from strop.models.layers import mark_heads
from strop.models.vision import read_json

PROCESSOR_FILE = "preprocessor_config.json"
TIMM_TYPE = "timm_wrapper"
TIMM_REFUSAL = ("timm checkpoints need timm, which imports torchvision, and no torchvision on PyPI loads "
                "against torch 2.13.0 without replacing it; convert the model to a transformers folder "
                "(ViT, ConvNeXt, ResNet, ...) or use model.path=default")


def image_model_types() -> list[str]:
    """The model_types transformers builds with AutoModelForImageClassification (timm's wrapper aside)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return sorted(t for t in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES if t != TIMM_TYPE)


def check_hf_image_folder(folder: Path) -> Path:
    """`folder` if it is an image-classification folder strop loads; else a ModelError with the fix."""
    config, where = read_model_config(folder), folder / "config.json"
    model_type = config.get("model_type")
    if config.get("auto_map"):
        raise ModelError(f"{where}: the model needs code shipped in the folder (auto_map), which strop "
                         "does not run for image models; give a folder of an architecture transformers "
                         "has built in")
    if model_type == TIMM_TYPE:
        raise ModelError(f"{where}: {TIMM_REFUSAL}")
    if model_type not in image_model_types():
        raise ModelError(f"{where}: model_type {model_type!r} is not an image classifier: give a Hugging "
                         "Face image-classification folder (a model_type AutoModelForImageClassification "
                         "builds: vit, convnext, resnet, swin, deit, beit, ...), a folder strop wrote "
                         "(efficientnet_lite) or model.path=default (EfficientNet-Lite0, ImageNet)")
    if not (list(folder.glob("*.safetensors")) or list(folder.glob("*.safetensors.index.json"))):
        pickled = [p for p in PICKLE_WEIGHTS if (folder / p).is_file()]
        if pickled:
            raise ModelError(f"model folder {folder} only has pickle weights ({pickled[0]}), which can run "
                             "code when loaded; strop loads image models from safetensors only. Convert "
                             "them on a machine you trust: AutoModelForImageClassification"
                             ".from_pretrained(folder).save_pretrained(new_folder)")
        raise ModelError(f"model folder {folder} has no weights (*.safetensors); copy the weights into it")
    processor_settings(folder)  # the normalisation is part of the model: refused here, before any training
    return folder


def processor_settings(folder: Path) -> dict:
    """preprocessor_config.json of an image folder, checked: it states the normalisation (image_mean /
    image_std, or do_normalize false)."""
    path = folder / PROCESSOR_FILE
    if not path.is_file():
        raise ModelError(f"model folder {folder} has no {PROCESSOR_FILE}, so the normalisation its "
                         "weights were trained with is unknown; copy the preprocessor_config.json that came "
                         "with the model")
    data = read_json(path)
    if data.get("do_normalize", True) and not ("image_mean" in data and "image_std" in data):
        raise ModelError(f"{path} has no image_mean / image_std; add the per-channel mean and std the model "
                         "was trained with (pixels scaled to [0, 1]), or do_normalize: false")
    return data


def side_of(value) -> int | None:
    """The square side a preprocessor's size / crop_size states: an int, {height, width} (equal) or
    {shortest_edge}; None for anything else."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "height" in value and value.get("height") == value.get("width"):
            return int(value["height"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
    return None


def stated_size(folder: Path) -> int | None:
    """The input side the folder's model was trained at: what its processor gives the model (the crop
    when it crops, else the resize), else config.json's image_size; None when neither says."""
    data = processor_settings(folder)
    if data.get("do_center_crop") and side_of(data.get("crop_size")):
        return side_of(data["crop_size"])
    image_size = read_model_config(folder).get("image_size")
    return side_of(data.get("size")) or (image_size if isinstance(image_size, int) else None)


def head_children(model: nn.Module) -> list[str]:
    """The classifier's own head: every child of the model outside its backbone (`base_model`) that has
    weights (classifier, fc, head, a distillation head, ...), whatever the architecture calls it."""
    backbone = model.base_model
    return [name for name, child in model.named_children()
            if child is not backbone and any(True for _ in child.parameters())]


def build_hf_classifier(folder: Path, labels: list[str], model_cfg=None) -> tuple[nn.Module, str]:
    """(the folder's classifier with a len(labels)-way head, its head flagged (models/layers.py), one line
    saying what became of the folder's head). model_cfg: the run's model section (hidden / attention
    dropout overrides); None when loading a trained model."""
    from transformers import AutoModelForImageClassification

    quiet_transformers()
    overrides = backbone_overrides(model_cfg, load_config_of(folder, False)) if model_cfg else {}
    model, info = load_pretrained(AutoModelForImageClassification, folder, num_labels=len(labels),
                                  ignore_mismatched_sizes=True, output_loading_info=True,
                                  **label_maps(labels), **overrides)
    heads = head_children(model)
    mark_heads(model, tuple(heads))
    hold_frozen_batch_norms(model)
    in_head = [k for k in info["missing_keys"] if k.split(".")[0] in heads]
    others = sorted(set(info["missing_keys"]) - set(in_head))
    if others:
        raise ModelError(f"{folder}: the weights do not fit config.json (missing {others[:5]}); copy the "
                         "model folder again")
    return model, head_note(folder, heads, len(labels), in_head, info["mismatched_keys"])


def hold_frozen_batch_norms(model: nn.Module) -> None:
    """Batch norms whose scale is frozen (peft.method=freeze below the top layers, LoRA's base) keep their
    running statistics too, as in strop's EfficientNet-Lite: frozen means the layer computes what it did,
    and an adapter saved without the statistics would not reproduce the trained model. A pre-hook, as
    what is frozen is decided after the model is built; model.train() sets the flag again each time."""
    def hold(module, args):
        if module.training and module.weight is not None and not module.weight.requires_grad:
            module.training = False

    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            m.register_forward_pre_hook(hold)


def head_note(folder: Path, heads: list[str], n: int, missing: list, mismatched: list) -> str:
    """What became of the folder's head, in one line for the log."""
    named = ", ".join(heads)
    if mismatched:
        old = read_model_config(folder).get("id2label") or {}
        width = f"{len(old)}-label " if old else ""
        return f"model: {folder.name}'s {width}head ({named}) dropped; a new {n}-label head is trained"
    if missing:
        return f"model: {folder.name} has no classification head; a new {n}-label head ({named}) is trained"
    return f"model: {folder.name}'s own {n}-label head ({named}) kept: it has the run's number of labels"


@torch.no_grad()
def check_input_size(model: nn.Module, size: int, folder: Path) -> None:
    """Refuse an image.size the model cannot take (a ViT's position embeddings are fixed to its training
    size, a windowed model needs a multiple of its window) by running one blank image through it."""
    was_training = model.training
    model.eval()
    try:
        model(pixel_values=torch.zeros(1, 3, size, size))
    except (ValueError, RuntimeError) as e:
        stated = stated_size(folder)
        fix = (f"set image.size={stated} (the size it was trained at) or leave image.size empty" if stated
               else "choose another image.size")
        raise ConfigError(f"image.size={size}: the model in {folder} cannot take {size}x{size} images "
                          f"({str(e).splitlines()[0][:200].rstrip('.')}); {fix}") from None
    finally:
        model.train(was_training)
