"""Masked-LM models: the architecture's own `*ForMaskedLM`, keeping the encoder's pooler.

An encoder folder (the default all-MiniLM-L6-v2, any BERT-like folder) loads with `AutoModelForMaskedLM`;
its language-model head starts from the folder's head weights where it has them (BERT checkpoints do) and
is new otherwise (sentence encoders ship none), its output layer tied to the word embeddings. transformers
builds the masked-LM model without the pooler (BERT's `add_pooling_layer=False`), so saving it would drop
the pooler, and a classifier fine-tuned from the result (`BertForSequenceClassification` reads the pooled
first token) would start from a random one. So the base model is loaded with `AutoModel` (pooler included)
and put in the masked-LM model's place; the pooler is frozen, as masked-LM training never reads it. The
saved `model/` holds the encoder (pooler included) and the head: `AutoModel` loads the encoder from it,
`AutoModelForSequenceClassification` a classifier on it, `AutoModelForMaskedLM` the whole model
(continued pretraining goes on from there).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from strop.errors import ModelError
from strop.models.backbone import load_pretrained, resolve_model_path
from strop.models.classifier import backbone_overrides, load_config_of, quiet_transformers


def masked_lm_from(folder: Path, allow_pickle: bool = False, trust_remote_code: bool = False,
                   **config_overrides) -> nn.Module:
    """The folder's masked-LM model with the base model of `AutoModel` (and so its pooler) inside."""
    from transformers import AutoModel, AutoModelForMaskedLM

    quiet_transformers()
    safety = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    try:
        model = load_pretrained(AutoModelForMaskedLM, folder, **safety, **config_overrides)
    except ModelError as e:
        raise ModelError(f"{e}; masked-LM training needs an encoder that transformers has a masked-LM head "
                         "for (BERT, RoBERTa, DistilBERT, ELECTRA, ...)") from None
    base = load_pretrained(AutoModel, folder, **safety, **config_overrides)
    prefix = model.base_model_prefix
    pooler = getattr(base, "pooler", None)
    if isinstance(pooler, nn.Module) and getattr(getattr(model, prefix, None), "pooler", "absent") is None:
        pooler.requires_grad_(False)  # no masked-LM loss reaches it: kept as pretrained, for the classifier
        setattr(model, prefix, base)
        model.tie_weights()  # the output layer shares the new base model's word embeddings again
    return model


def build_masked_lm(model_cfg) -> nn.Module:
    """A masked-LM model on the pretrained encoder at model_cfg.path (a new head initialised from torch's
    RNG), with model.hidden_dropout / attention_dropout applied."""
    folder = resolve_model_path(model_cfg.path, model_cfg.allow_pickle)
    overrides = backbone_overrides(model_cfg, load_config_of(folder, model_cfg.trust_remote_code))
    return masked_lm_from(folder, model_cfg.allow_pickle, model_cfg.trust_remote_code, **overrides)


def load_masked_lm(folder) -> nn.Module:
    """A trained masked-LM model from its model/ folder (or the base model of an adapter)."""
    return masked_lm_from(resolve_model_path(folder))
