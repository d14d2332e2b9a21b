"""Token classification (NER): a tag per word, entities with character offsets.

Data are CoNLL files or JSONL token lists (tags converted to IOB2 inside); a sentence longer than model.max_length
becomes overlapping subword windows (`ner.stride`), merged back into one tag sequence per sentence for metrics
and predictions. The model is the architecture's `*ForTokenClassification`, optionally with word shapes as token
type ids (`ner.casing`); metrics are entity-level (seqeval's definition), decoding constrained to valid IOB2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from strop.data.batching import INPUT_NAMES, Encoded
from strop.data.ner import is_token_data, prepare_tokens
from strop.data.tokens import collate_tokens, encode_tokens, window_size
from strop.evaluate.entities import evaluate_tokens
from strop.evaluate.report_parts import entities_section
from strop.models.token_classifier import build_token_model, load_token_model
from strop.predict_tokens import TokenPredictor
from strop.tasks.base import ExportSignature, Task


class TokenClassification(Task):
    name = "token_classification"
    description = "a tag per word (NER): CoNLL files or JSONL token lists"
    metrics = ("f1", "precision", "recall", "macro_f1", "token_accuracy", "loss")  # f1: entity-level micro F1
    takes_words = True
    export = ExportSignature(INPUT_NAMES, ("batch", "sequence", "labels"))  # agreement: per real subword

    def detects(self, cfg) -> bool:
        return is_token_data(cfg)

    def prepare(self, cfg, carve: bool = True):
        return prepare_tokens(cfg, carve)

    def check_settings(self, cfg, ds, processor) -> None:
        window_size(processor, cfg.model.max_length, cfg.ner.stride)  # a stride too large for the windows stops here

    def encode(self, processor, examples, meta: dict) -> Encoded:
        return encode_tokens(processor, examples, meta["max_length"], meta.get("stride", 32),
                             meta.get("label_subwords", "first"), meta.get("casing", False), meta["labels"],
                             meta.get("decoding", "constrained"))

    def collate(self, enc: Encoded, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict:
        return collate_tokens(enc, idx)

    def split_summary(self, ds, split: str, enc: Encoded) -> dict:
        # windows: rows the model sees; split_into_windows: sentences longer than model.max_length
        return {"sentences": enc.n_examples, "windows": len(enc), "split_into_windows": enc.n_split}

    def build_model(self, cfg, labels: list[str]):
        return build_token_model(cfg.model, labels, casing=cfg.ner.casing)

    def load_model(self, folder: Path, meta: dict, head: bool = True):
        return load_token_model(folder, meta)

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        # logits (batch, seq_len, L), labels (batch, seq_len) with -100 = not scored
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    def evaluate(self, model, enc: Encoded, labels: list[str], batch_size: int, device: torch.device,
                 precision: str = "fp32", threshold: float = 0.5, keep_outputs: bool = False):
        return evaluate_tokens(model, enc, labels, batch_size, device, precision, keep_outputs)

    def meta(self, cfg, ds) -> dict:
        n = cfg.ner
        return {"max_length": cfg.model.max_length, "text_column": "tokens", "label_column": "tags",
                "text_pair_column": None, "scheme": ds.scheme, "casing": n.casing, "decoding": n.decoding,
                "stride": n.stride, "word_split": n.word_split, "label_subwords": n.label_subwords,
                "token_column": n.token_column, "tag_column": n.tag_column, "tokens_key": n.tokens_key,
                "tags_key": n.tags_key}

    def report_sections(self, predictor, examples, results, split, errors_k, explain_k):
        if examples is None:
            return {}, {}
        return {"entities": entities_section(predictor, examples, results, split)}, {}

    def predictor(self, model, processor, meta: dict, device: torch.device, precision: str = "fp32"):
        return TokenPredictor(model, processor, meta, device, precision, task=self)


TOKEN_CLASSIFICATION = TokenClassification()
