"""Token classifiers: the architecture's own `*ForTokenClassification`, optionally with a word-shape feature.

The saved `model/` always loads with plain `AutoModelForTokenClassification` and gives the same logits (tested).
ner.casing=true widens the token-type embedding to one row per word shape (`strop.data.tokens.SHAPES`: no letters,
lower, Title, UPPER, mixed), every new row starting as a copy of row 0 so training starts from the pretrained model
exactly. The weights stay plain Hugging Face (config.type_vocab_size grows); what plain transformers cannot do on its
own is compute the shape ids: pass `token_type_ids` = `word_shape` of each subword's word (0 for special tokens), as
strop's tokens.encode_tokens does, or the model sees every word as shape 0 (no letters).
"""

from __future__ import annotations

import torch
from torch import nn

from strop.data.tokens import SHAPES
from strop.errors import ModelError
from strop.models.backbone import load_pretrained, resolve_model_path
from strop.models.classifier import backbone_overrides, label_maps, load_config_of, quiet_transformers


def build_token_model(model_cfg, label_names: list[str], casing: bool = False) -> nn.Module:
    """A fresh token classifier on the pretrained backbone at model_cfg.path (head initialised from torch's RNG)."""
    from transformers import AutoModelForTokenClassification

    quiet_transformers()
    folder = resolve_model_path(model_cfg.path, model_cfg.allow_pickle)
    base = load_config_of(folder, model_cfg.trust_remote_code)
    config = load_config_of(folder, model_cfg.trust_remote_code, num_labels=len(label_names),
                            id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
                            **backbone_overrides(model_cfg, base))
    if model_cfg.dropout is not None and hasattr(config, "classifier_dropout"):
        config.classifier_dropout = model_cfg.dropout
    try:
        model = load_pretrained(AutoModelForTokenClassification, folder, config=config,
                                allow_pickle=model_cfg.allow_pickle, trust_remote_code=model_cfg.trust_remote_code)
    except ValueError as e:
        raise ModelError(f"{folder}: architecture {config.model_type!r} has no token-classification head in "
                         f"transformers ({e})") from None
    if casing:
        add_shape_embeddings(model)
    return model


def load_token_model(folder, meta: dict) -> nn.Module:
    """The token classifier strop.json describes on the weights in `folder`: a trained model/ folder (whose config
    already holds the widened token-type embedding), or the base model of an adapter (widened here)."""
    from transformers import AutoModelForTokenClassification

    quiet_transformers()
    model = load_pretrained(AutoModelForTokenClassification, folder, num_labels=len(meta["labels"]),
                            **label_maps(meta["labels"]))
    if meta.get("casing") and model.config.type_vocab_size != len(SHAPES):
        add_shape_embeddings(model)
    return model


def add_shape_embeddings(model: nn.Module) -> None:
    """Grow the token-type embedding to one row per word shape; new rows copy row 0 (no change at the start)."""
    embeddings = getattr(model.base_model, "embeddings", None)
    old = getattr(embeddings, "token_type_embeddings", None)
    if old is None or not hasattr(model.config, "type_vocab_size"):
        raise ModelError(f"ner.casing=true feeds word shapes as token type ids, but {model.config.model_type!r} has "
                         "no token-type embedding; set ner.casing=false for this model")
    new = nn.Embedding(len(SHAPES), old.embedding_dim)
    with torch.no_grad():
        # every shape starts as type 0, the type every token had in pretraining: training starts from the same model
        new.weight.copy_(old.weight[:1].expand(len(SHAPES), -1))
    new._strop_always_train = True  # no pretrained value: PEFT methods must train it too (models/peft.py)
    embeddings.token_type_embeddings = new
    model.config.type_vocab_size = len(SHAPES)
