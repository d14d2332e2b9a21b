"""Which image backbone a model folder holds, and building it: strop's EfficientNet-Lite folders
(models/vision.py, the default model) or Hugging Face image-classification folders (models/hf_vision.py:
ViT, ConvNeXt, ResNet, ...). The image tasks ask here, so a new kind of folder is a branch in this file,
not in the tasks. Both kinds take `pixel_values` (batch, 3, size, size), normalised as the folder's
preprocessor_config.json says, and return `.logits`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from strop.errors import ModelError
from strop.models.backbone import read_model_config
from strop.models.efficientnet_lite import MODEL_TYPE
from strop.models.hf_vision import build_hf_classifier, check_hf_image_folder, check_input_size, stated_size
from strop.models.vision import build_image_classifier, default_vision_path, vision_folder

# image.size when the user sets none and the folder states no size: EfficientNet-Lite0's ImageNet size,
# measured best for 28 px MedMNIST images upsampled (config.py's image.size)
DEFAULT_SIZE = 224


def is_strop_folder(folder: Path) -> bool:
    return read_model_config(folder).get("model_type") == MODEL_TYPE


def image_model_folder(path: str | Path) -> Path:
    """The checked image model folder `path` names (`default`: EfficientNet-Lite0); errors say what is
    missing."""
    folder = default_vision_path() if str(path) == "default" else Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"model.path={str(path)!r}: folder not found. Give a Hugging Face image-"
                         "classification folder (config.json, *.safetensors, preprocessor_config.json), a "
                         "vision folder strop wrote, or `default` (EfficientNet-Lite0, ImageNet); no model "
                         "hub is contacted")
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json; give an image-classification model "
                         "folder or model.path=default")
    return vision_folder(folder) if is_strop_folder(folder) else check_hf_image_folder(folder)


def input_size(path: str | Path) -> tuple[int, Path | None]:
    """(the image side the model at `path` takes by default, the folder that stated it or None): a Hugging
    Face folder's own size, else DEFAULT_SIZE. A folder that cannot be read gives DEFAULT_SIZE: its error
    is reported where the model is loaded, with the rest of the checks."""
    if str(path) == "default":
        return DEFAULT_SIZE, None
    folder = Path(path).expanduser()
    try:
        size = None if is_strop_folder(folder) else stated_size(folder)
    except (ModelError, OSError):
        return DEFAULT_SIZE, None
    return (size, folder) if size else (DEFAULT_SIZE, None)


def build_image_model(folder: Path, labels: list[str], model_cfg=None, size: int | None = None,
                      head: bool = True) -> tuple[nn.Module, str | None]:
    """(the folder's classifier with a len(labels)-way head, a line to print about the head or None).

    model_cfg: the run's model section when training (dropouts), None when loading a trained model;
    size: the run's image.size, checked against what the model can take; head=False: a new head for
    strop's folders (a Hugging Face folder keeps a head of the right width, models/hf_vision.py)."""
    if is_strop_folder(folder):
        dropout = model_cfg.dropout if model_cfg is not None else None
        return build_image_classifier(folder, len(labels), dropout, head=head), None
    model, note = build_hf_classifier(folder, labels, model_cfg)
    if size is not None:
        check_input_size(model, size, folder)
    return model, note
