"""Sequence classifiers: a pretrained backbone plus a task head, saved so plain `transformers` can load them.

pooling=cls uses the architecture's own `*ForSequenceClassification` head, so `model/` loads with
`AutoModelForSequenceClassification` and gives the same logits. pooling=mean is our head (mean of token states +
linear); its `model/` holds the backbone in Hugging Face format plus `head.safetensors`, loaded with `strop.load`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from strop.errors import ConfigError, ModelError
from strop.models.backbone import load_pretrained, resolve_model_path, save_pretrained
from strop.models.layers import input_embeddings, layer_list

META_FILE = "strop.json"


class Output:
    """Minimal model output: logits (batch, num_labels)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits


class MeanPoolClassifier(nn.Module):
    """Mean of the backbone's token states over real tokens (L2-normalised if `normalize`: the sentence-embedding
    space few-shot training shapes), dropout, then a linear layer."""

    def __init__(self, backbone: nn.Module, num_labels: int, dropout: float, normalize: bool = False):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.normalize = normalize
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=getattr(backbone.config, "initializer_range", 0.02))
        nn.init.zeros_(self.classifier.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """input_ids, attention_mask (LongTensor): (batch, seq_len) -> pooled embeddings (batch, hidden)."""
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(pooled.float(), dim=-1) if self.normalize else pooled

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> Output:
        """input_ids, attention_mask (LongTensor): (batch, seq_len) -> Output with logits (batch, num_labels)."""
        return Output(self.classifier(self.dropout(self.embed(input_ids, attention_mask, token_type_ids))))


def mean_pool_classifier(backbone: nn.Module, num_labels: int, meta: dict) -> MeanPoolClassifier:
    """The pooling=mean classifier a saved model's strop.json describes (head weights not loaded)."""
    return MeanPoolClassifier(backbone, num_labels, 0.0, normalize=bool(meta.get("normalize")))


def quiet_transformers():
    from transformers.utils import logging

    # "Some weights ... newly initialized" is expected for a new head; strop says what it builds itself
    logging.set_verbosity_error()
    logging.disable_progress_bar()  # per-shard load/save bars are noise next to strop's own progress


# config attribute names of backbone dropouts across architectures (BERT/RoBERTa/ELECTRA, DistilBERT, others)
HIDDEN_DROPOUT = ("hidden_dropout_prob", "dropout", "hidden_dropout")
ATTENTION_DROPOUT = ("attention_probs_dropout_prob", "attention_dropout")


def backbone_overrides(model_cfg, config) -> dict:
    """Config attributes to change for model.hidden_dropout / model.attention_dropout, for this architecture."""
    out = {}
    for value, names in ((model_cfg.hidden_dropout, HIDDEN_DROPOUT), (model_cfg.attention_dropout, ATTENTION_DROPOUT)):
        if value is not None:
            out.update({n: value for n in names if hasattr(config, n)})
    return out


def load_config_of(folder: Path, trust_remote_code: bool, **kwargs):
    """AutoConfig of a model folder; a folder that ships its own code needs model.trust_remote_code=true."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{folder} needs custom code shipped in the folder to load; run it only if you trust "
                             "the folder, with model.trust_remote_code=true") from None
        raise ModelError(f"cannot read the config of {folder} ({e})") from None


def apply_freezing(model: nn.Module, model_cfg) -> nn.Module:
    """model.freeze_embeddings and model.frozen_layers, for a model of any task."""
    if model_cfg.freeze_embeddings:
        input_embeddings(model).requires_grad_(False)
    if model_cfg.frozen_layers:
        freeze_bottom(model, model_cfg.frozen_layers)
    return model


def freeze_bottom(model: nn.Module, n: int) -> None:
    """Fix the embedding layer (word, position, type embeddings and their norm) and the bottom `n` transformer
    layers, so autograd builds no backward graph below layer n. Modules strop adds (`_strop_always_train`) stay
    trainable."""
    layers = layer_list(model)
    if n >= len(layers):
        raise ConfigError(f"model.frozen_layers={n} but the model has {len(layers)} layers; freeze fewer (at most "
                          f"{len(layers) - 1}) or use peft.method=freeze to train only the head")
    words = input_embeddings(model)
    embeddings = next((m for m in model.modules() if any(c is words for c in m.children()) and m is not model),
                      words)
    embeddings.requires_grad_(False)
    for layer in list(layers)[:n]:
        layer.requires_grad_(False)
    for m in model.modules():
        if getattr(m, "_strop_always_train", False):
            m.requires_grad_(True)


def build_classifier(model_cfg, labels: list[str], num_labels: int, problem_type: str) -> nn.Module:
    """A fresh sequence classifier on the pretrained backbone at model_cfg.path (head initialised from torch's RNG):
    the architecture's own head (pooling=cls) or mean pooling + linear."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    quiet_transformers()
    folder = resolve_model_path(model_cfg.path, model_cfg.allow_pickle)
    safety = dict(allow_pickle=model_cfg.allow_pickle, trust_remote_code=model_cfg.trust_remote_code)
    base = load_config_of(folder, model_cfg.trust_remote_code)
    if model_cfg.pooling == "mean":
        backbone = load_pretrained(AutoModel, folder, **safety, **backbone_overrides(model_cfg, base))
        dropout = model_cfg.dropout if model_cfg.dropout is not None else \
            getattr(backbone.config, "hidden_dropout_prob", 0.1)
        return MeanPoolClassifier(backbone, num_labels, dropout)
    config = load_config_of(folder, model_cfg.trust_remote_code, num_labels=num_labels, problem_type=problem_type,
                            **label_maps(labels), **backbone_overrides(model_cfg, base))
    if model_cfg.dropout is not None:
        for name in ("classifier_dropout", "seq_classif_dropout"):
            if hasattr(config, name):
                setattr(config, name, model_cfg.dropout)
    try:
        return load_pretrained(AutoModelForSequenceClassification, folder, config=config, **safety)
    except ValueError as e:
        raise ModelError(f"{folder}: architecture {config.model_type!r} has no sequence-classification head in "
                         f"transformers ({e}); try model.pooling=mean") from None


def label_maps(labels: list[str]) -> dict:
    """id2label / label2id for a transformers config."""
    return {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}


def sequence_classifier(folder: Path, meta: dict, num_labels: int, problem_type: str) -> nn.Module:
    """The classifier strop.json describes on the weights in `folder`: a trained model/ folder, or the base model
    of an adapter (whose head the adapter holds). The mean-pooling head's weights are not loaded here."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    quiet_transformers()
    if meta.get("pooling") == "mean":
        return mean_pool_classifier(load_pretrained(AutoModel, folder), num_labels, meta)
    return load_pretrained(AutoModelForSequenceClassification, folder, num_labels=num_labels,
                           problem_type=problem_type, **label_maps(meta["labels"]))


def load_sequence_classifier(folder: Path, meta: dict, num_labels: int, problem_type: str) -> nn.Module:
    """A trained sequence classifier from its model/ folder (written by `save_model`)."""
    model = sequence_classifier(folder, meta, num_labels, problem_type)
    if isinstance(model, MeanPoolClassifier):
        model.classifier.load_state_dict(load_file(str(Path(folder) / "head.safetensors")))
    return model


def save_model(model: nn.Module, tokenizer, folder: Path, meta: dict) -> None:
    """Write weights (safetensors), config, tokenizer and strop.json into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, MeanPoolClassifier):
        save_pretrained(model.backbone, folder)
        head = {k: v.detach().contiguous().cpu() for k, v in model.classifier.state_dict().items()}
        save_file(head, str(folder / "head.safetensors"))
    else:
        save_pretrained(model, folder)
    tokenizer.save_pretrained(str(folder))
    (folder / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise ModelError(f"{folder} has no {META_FILE}; it is not a finished strop model folder")
    return json.loads(path.read_text(encoding="utf-8"))
