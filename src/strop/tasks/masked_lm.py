"""Masked-LM (continued) pretraining of an encoder on unlabelled text: `task=masked_lm`, `strop pretrain`.

Data are documents: a .txt file, one per line, or a text column of a table (data/corpus.py). They are
packed into rows of model.max_length tokens and masked by whole words, BERT's 80/10/10, the masks drawn in
`collate` from the loop's seeded rng so a resumed run is exact, and fixed for evaluation so perplexity
compares between evaluations (data/masked_text.py). The model is the architecture's `*ForMaskedLM` with
the encoder's pooler kept (models/masked_lm.py); the loss is cross-entropy at the masked tokens, whose
logits alone are computed. Validation perplexity (lower is better) picks the best step and drives early
stopping. The run's model/ is an encoder folder that `strop train model.path=RUN/model data.train=...`
fine-tunes; predicting, exporting and serving a masked-LM run are refused, with that as the reason.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from strop.data.batching import eval_batches
from strop.data.corpus import TASK, prepare_corpus
from strop.data.masked_text import PackedText, collate_masked, pack_documents
from strop.device import autocast
from strop.errors import ConfigError
from strop.models.layers import output_positions
from strop.models.masked_lm import build_masked_lm, load_masked_lm
from strop.predict_masked_lm import MaskedLMScorer
from strop.tasks.base import Task

EVAL_ROWS = 32  # rows per forward pass when scoring: the logits are (masked positions, vocabulary)
FINE_TUNE = "strop train model.path=RUN/model data.train=labelled.csv"


class MaskedLM(Task):
    name = TASK
    description = ("masked-LM pretraining of an encoder on unlabelled text (strop pretrain): a .txt file, "
                   "one document per line, or a text column")
    metrics = ("perplexity", "masked_accuracy", "loss")  # of the masked tokens, under fixed evaluation masks
    model_inputs = ("input_ids", "attention_mask")
    head_names = ("cls", "lm_head")  # BERT's, RoBERTa's masked-LM heads: trained in full, never PEFT-wrapped
    auto_detected = False  # unlabelled text reads as nothing else's data only by name: task=masked_lm
    export_refusal = (f"a masked-LM run is not exported: its model/ folder is an encoder to fine-tune "
                      f"({FINE_TUNE}), and that run exports")
    predict_refusal = (f"a masked-LM run predicts no labels; fine-tune a classifier from its encoder "
                       f"({FINE_TUNE}), or score held-out text with strop eval RUN --data held.txt "
                       "(perplexity)")
    serve_refusal = predict_refusal

    # -- data -----------------------------------------------------------------------------------------------

    def prepare(self, cfg, carve: bool = True):
        return prepare_corpus(cfg, carve)

    def check_settings(self, cfg, ds, processor) -> None:
        if cfg.peft.method != "none":
            # an adapter method trains the head in full as a copy, which unties its output layer from the word
            # embeddings the saved model re-ties on loading; the encoder is what pretraining is for anyway
            raise ConfigError(f"peft.method={cfg.peft.method!r}: masked-LM pretraining trains the whole "
                              "encoder; set peft.method=none (model.frozen_layers still fixes the bottom "
                              "layers)")
        if processor.mask_token_id is None:
            raise ConfigError(f"the tokenizer of model.path={cfg.model.path!r} has no mask token, which "
                              "masked-LM training puts in place of the words it hides; use an encoder "
                              "whose tokenizer has one (BERT, RoBERTa, ...), or add it: "
                              "tokenizer.add_special_tokens({'mask_token': '[MASK]'}), save the tokenizer "
                              "into the folder, and resize the model's embeddings")
        specials = int(processor.cls_token_id is not None) + int(processor.sep_token_id is not None)
        if cfg.model.max_length <= specials:
            raise ConfigError(f"model.max_length={cfg.model.max_length} leaves no room for text beside the "
                              f"{specials} special tokens of each row; set model.max_length to 128 or more")

    def encode(self, processor, examples, meta: dict) -> PackedText:
        return pack_documents(processor, examples.texts, meta["max_length"], meta["mlm"]["probability"])

    def collate(self, enc: PackedText, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict:
        return collate_masked(enc, idx, rng)

    def split_summary(self, ds, split: str, enc: PackedText) -> dict:
        # data.json's examples count documents; sequences are the packed rows the model reads
        return {"documents": enc.n_documents, "sequences": len(enc), "tokens": enc.n_tokens}

    # -- model ----------------------------------------------------------------------------------------------

    def build_model(self, cfg, labels: list[str]):
        return build_masked_lm(cfg.model)

    def load_model(self, folder, meta: dict, head: bool = True):
        return load_masked_lm(folder)

    def num_outputs(self, labels: list[str]) -> int:
        return 0

    def forward(self, model, batch: dict) -> torch.Tensor:
        """Logits at the masked tokens only, (masked tokens, vocabulary): the output layer is the model's
        widest (30k words x hidden) and the loss reads ~15% of the positions."""
        inputs = {k: v for k, v in batch.items() if k in self.model_inputs}
        with output_positions(model, batch["labels"] != -100):
            return model(**inputs).logits

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean cross-entropy over the batch's masked tokens; `logits` are those of the masked positions
        (`forward`), or the model's (batch, sequence, vocabulary)."""
        keep = batch["labels"] != -100
        if logits.dim() == 3:
            logits = logits[keep]
        return F.cross_entropy(logits.float(), batch["labels"][keep])

    # -- evaluation, metadata, prediction -------------------------------------------------------------------

    @torch.inference_mode()
    def evaluate(self, model, enc: PackedText, labels: list[str], batch_size: int, device: torch.device,
                 precision: str = "fp32", threshold: float = 0.5, keep_outputs: bool = False):
        """{perplexity, masked_accuracy, loss, masked_tokens} over every masked token of the split under
        the fixed evaluation masks (perplexity = exp of the mean loss)."""
        was = model.training
        model.eval()
        nll, right, count = 0.0, 0, 0
        try:
            for idx in eval_batches(enc.lengths, min(batch_size, EVAL_ROWS)):
                batch = {k: v.to(device) for k, v in self.collate(enc, idx).items()}
                with autocast(device, precision):
                    logits = self.forward(model, batch).float()
                gold = batch["labels"][batch["labels"] != -100]
                nll += float(F.cross_entropy(logits, gold, reduction="sum"))
                right += int((logits.argmax(-1) == gold).sum())
                count += len(gold)
        finally:
            model.train(was)
        loss = nll / max(count, 1)
        return {"perplexity": math.exp(min(loss, 50.0)), "masked_accuracy": right / max(count, 1),
                "loss": loss, "masked_tokens": count}, None

    def meta(self, cfg, ds) -> dict:
        return {"max_length": cfg.model.max_length, "text_column": ds.columns.text, "label_column": None,
                "text_pair_column": None, "mlm": {"probability": cfg.mlm.probability, "whole_word": True}}

    def predictor(self, model, processor, meta: dict, device: torch.device, precision: str = "fp32"):
        return MaskedLMScorer(model, processor, meta, device, precision, task=self)

    def agreement(self, a: np.ndarray, b: np.ndarray, threshold: float) -> float | None:
        return None


MASKED_LM = MaskedLM()
